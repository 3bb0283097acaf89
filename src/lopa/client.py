"""The client side: an artifact's generator turns texts into soft prompts here, next to the user.

With a server URL the client needs no base-model weights at all, only the artifact (its generator and
recorded width) and, for instance-dependent methods, its frozen encoder; it checks the width against
the server's ``/health`` before sending anything. Without a URL it loads the base model and runs the
same backend code as the server (:mod:`lopa.serve.backends`), so both give the same numbers.

Texts are the model's whole prompt (the task's template already filled in, as in training);
:meth:`Client.format` fills the artifact's recorded template.

Example (in-process; pass ``url="http://127.0.0.1:8000"`` to use a ``lopa serve`` instead)::

    >>> import tempfile, lopa
    >>> base, tok = lopa.load_base("tiny-random-llama")
    >>> task = {"template": "Review: {text}\\nSentiment:", "label_words": [" negative", " positive"]}
    >>> d = lopa.SoftPromptModel(base, tok, lopa.make_config("prompt-tuning", num_virtual_tokens=4),
    ...                          task=task).save_pretrained(tempfile.mkdtemp())
    >>> client = Client(d)
    >>> out = client.classify([client.format(text="a fine film")])
    >>> sorted(out[0]), out[0]["label_word"] in task["label_words"]
    (['label', 'label_word', 'logprobs'], True)
    >>> client.soft_prompt(["x"]).shape
    torch.Size([1, 4, 64])

Command line::

    $ lopa classify --artifact runs/sst2-lopa --url http://127.0.0.1:8000 --text "Review: fine\\nSentiment:"
    $ lopa generate --artifact runs/mbpp-lopa --input prompts.jsonl --max-new-tokens 128
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .artifact import Artifact, ArtifactError, load_artifact
from .encoders import Encoder
from .prompt_format import PromptFormat, build_text
from .soft_prompt import compute, load_instance_encoder
from .tasks.base import TaskError
from .transport import HTTP, ClientError, InProcess, Sampling, ServerError, Transport

__all__ = ["Client", "ClientError", "ServerError"]


class Client:
    """Soft prompts from an artifact, run on a ``lopa serve`` server or in-process.

    Args:
        artifact_dir: a directory written by :meth:`lopa.SoftPromptModel.save_pretrained`.
        url: the server (``http://host:port``); ``None`` runs the base model in this process.
        api_key: the server's key (default ``$LOPA_API_KEY``).
        model: in-process only: the base model (default: the one recorded in the artifact).
        dtype: in-process only: the base model's dtype (float32 by default, for exact numbers).
        wire_dtype: how soft prompts travel: ``float32`` (exact, default), ``bfloat16`` or ``float16``.
        timeout: seconds per HTTP request.
        concurrency: requests in flight at once (the server batches them together).
        batch_size: texts per soft-prompt computation (and, in-process, per forward pass).
    """

    def __init__(self, artifact_dir: str | Path, url: str | None = None, api_key: str | None = None,
                 model: str | None = None, *, dtype: str = "float32", wire_dtype: str = "float32",
                 timeout: float = 120.0, concurrency: int = 16, batch_size: int = 32):
        self.artifact_dir = Path(artifact_dir)
        self.artifact: Artifact = load_artifact(artifact_dir)
        self.config = self.artifact.config
        self.url = url.rstrip("/") if url else None
        self.batch_size = max(1, batch_size)
        self._chat_tokenizer: Any = None  # loaded on first need (a chat-format artifact over HTTP)
        if self.url is None:
            name = model or self.artifact.base_model
            if not name:
                raise ClientError("the artifact records no base model; pass model= (a short name, hub id or path)")
            self.transport: Transport = InProcess(name, dtype=dtype)
        else:
            if model is not None:
                warnings.warn("model= is ignored with a server url: the server's model answers", stacklevel=2)
            key = api_key if api_key is not None else os.environ.get("LOPA_API_KEY")
            self.transport = HTTP(self.url, key, timeout=timeout, concurrency=concurrency, wire_dtype=wire_dtype)
        self.health: dict[str, Any] = getattr(self.transport, "health", {})
        self._check_model()
        self.encoder = self._load_encoder()
        self.artifact.generator.eval()

    # -- set-up ----------------------------------------------------------------------------------
    def _check_model(self) -> None:
        t, a = self.transport, self.artifact
        where = f"the server at {self.url} serves" if self.url else "in this process,"
        if t.hidden_size != a.hidden_size:
            raise ClientError(f"the artifact was trained for a base model of width {a.hidden_size} "
                              f"({a.base_model!r}), but {where} {t.model!r} of width {t.hidden_size}")
        if t.max_soft_tokens is not None and a.num_output_tokens > t.max_soft_tokens:
            raise ClientError(f"the artifact's soft prompts have {a.num_output_tokens} tokens; the server "
                              f"accepts at most {t.max_soft_tokens} (lopa serve --max-soft-tokens)")
        if self.url and a.base_model and t.model and t.model != a.base_model:
            warnings.warn(f"the artifact was trained on {a.base_model!r}, the server serves {t.model!r} "
                          f"(same width {t.hidden_size}): check that this is the same model", stacklevel=3)

    def _load_encoder(self) -> Encoder | None:
        if getattr(self.config, "encoder", None) == "self" and self.transport.base is None:
            raise ClientError("this artifact's encoder is 'self' (the base model's own embeddings), so it "
                              "needs the base model's weights: run it in-process (url=None)")
        try:
            return load_instance_encoder(self.config, self.artifact_dir, base=self.transport.base,
                                         tokenizer=self.transport.tokenizer, encoder_dim=self.artifact.encoder_dim,
                                         task=self.task)
        except ValueError as e:
            raise ClientError(str(e)) from None

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- soft prompts ----------------------------------------------------------------------------
    @property
    def task(self) -> dict[str, Any]:
        return self.artifact.task

    def format(self, **fields: str) -> str:
        """The artifact's recorded template filled with ``fields`` (e.g. ``text="a fine film"``), in the
        recorded prompt format (see :meth:`build_prompt`): the model's whole text, as in training."""
        template = self.task.get("template")
        if not template:
            raise ClientError("the artifact records no template; pass whole prompts")
        try:
            return self.build_prompt(template.format(**fields))
        except KeyError as e:
            raise ClientError(f"the template {template!r} needs the field {e.args[0]!r}") from None

    @property
    def prompt_format(self) -> PromptFormat:
        """The format the task was trained in: plain or the chat template, and its system prompt."""
        return PromptFormat.from_settings(self.task.get("prompt_format"))

    def build_prompt(self, prompt: str | None = None, *, messages: Sequence[dict[str, str]] | None = None) -> str:
        """A user's ``prompt`` (or a ``messages`` conversation) as the model's whole text, in the
        recorded format, by the function training used (:func:`lopa.prompt_format.build_text`). A plain
        format without a system prompt leaves a prompt as it is; the chat template needs the base
        model's tokenizer (in-process: the model's; with a server: loaded by the artifact's model name)."""
        fmt = self.prompt_format
        if prompt is not None and messages is None and not fmt.chat_template and not fmt.system_prompt:
            return prompt
        try:
            return build_text(self._tokenizer(), fmt, prompt=prompt, messages=messages).prompt
        except TaskError as e:
            raise ClientError(str(e)) from None

    def _tokenizer(self) -> Any:
        if self.transport.tokenizer is not None:
            return self.transport.tokenizer
        if self._chat_tokenizer is None:
            from .models import load_tokenizer
            name = self.artifact.base_model or self.transport.model
            try:
                self._chat_tokenizer = load_tokenizer(name)
            except Exception as e:  # a hub id offline, a path that is not there, ...
                raise ClientError(f"the chat template needs the tokenizer of {name!r}, which cannot be loaded "
                                  f"here ({type(e).__name__}: {str(e)[:200]})") from None
        return self._chat_tokenizer

    def chat(self, conversations: Sequence[Sequence[dict[str, str]]], **generate_kwargs: Any) -> list[str]:
        """The assistant's next turn for each conversation (``[{"role", "content"}, ...]``), rendered in
        the recorded format; ``generate_kwargs`` as for :meth:`generate`."""
        return self.generate([self.build_prompt(messages=m) for m in conversations], **generate_kwargs)

    @torch.no_grad()
    def soft_prompt(self, texts: Sequence[str]) -> torch.Tensor:
        """Z for each text (B × m × d, float32, CPU): the generator reads the encoder's features of the
        text when its method is instance-dependent, and ignores the text otherwise."""
        return compute(self.artifact.generator, self.encoder, texts).cpu()

    def _chunks(self, texts: Sequence[str]) -> Iterator[tuple[list[str], torch.Tensor]]:
        texts = list(texts)
        for i in range(0, len(texts), self.batch_size):
            chunk = texts[i:i + self.batch_size]
            yield chunk, self.soft_prompt(chunk)

    # -- tasks -----------------------------------------------------------------------------------
    def classify(self, texts: Sequence[str], label_words: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """One ``{"logprobs", "label", "label_word"}`` per text, as the server's ``/v1/classify`` answers.

        ``label_words`` default to the artifact's task.
        """
        words = list(label_words if label_words is not None else self.task.get("label_words") or [])
        if len(words) < 2:
            raise ClientError("pass label_words: the artifact records none for its task")
        return [r for chunk, z in self._chunks(texts) for r in self.transport.classify(chunk, z, words)]

    def generate(self, texts: Sequence[str], max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Sequence[str] | None = None, seed: int | None = None) -> list[str]:
        """One completion per text: greedy at ``temperature=0`` (default), else sampled."""
        sampling = Sampling(max_new_tokens, temperature, top_p, tuple(stop or ()), seed)
        return [t for chunk, z in self._chunks(texts) for t in self.transport.generate(chunk, z, sampling)]


# -- the command line ------------------------------------------------------------------------------

@dataclass
class _ClientArgs:
    artifact: str = ""
    """the artifact directory (soft_prompt_config.json + soft_prompt.safetensors)"""
    url: str | None = None
    """a lopa server, e.g. http://127.0.0.1:8000; omitted: run the base model in this process"""
    api_key: str | None = field(default=None, repr=False)
    """the server's API key (default: $LOPA_API_KEY)"""
    model: str | None = None
    """in-process only: the base model (default: the one recorded in the artifact)"""
    text: list[str] | None = None
    """input texts, each the model's whole prompt (or the template's {text} with --apply-template)"""
    input: str | None = None
    """a JSONL file of inputs: one object per line with "text" (or the template's fields with --apply-template); an "id" is echoed"""
    apply_template: bool = False
    """fill the artifact's recorded template with each input instead of sending it as is"""

    def __post_init__(self) -> None:
        if not self.artifact:
            raise ValueError("--artifact is required: the directory of a trained soft-prompt generator")
        if not self.text and not self.input:
            raise ValueError("give inputs with --text or --input FILE.jsonl")
        if self.text and self.input:
            raise ValueError("give --text or --input, not both")
        if self.input and not Path(self.input).is_file():
            raise ValueError(f"--input {self.input}: no such file")


@dataclass
class ClassifyArgs(_ClientArgs):
    """Classify texts with a trained artifact; prints one JSON line per input:
    {"logprobs": [...], "label": i, "label_word": w} (plus "id" when the input has one)."""

    label_words: list[str] | None = None
    """one word per class, leading spaces kept (default: the artifact's task)"""


@dataclass
class GenerateArgs(_ClientArgs):
    """Generate completions with a trained artifact; prints one JSON line per input: {"text": completion}
    (plus "id" when the input has one)."""

    max_new_tokens: int = 64
    """the most tokens to generate per input"""
    temperature: float = 0.0
    """sampling temperature; 0 = greedy"""
    top_p: float = 1.0
    """nucleus sampling threshold (with temperature > 0)"""
    stop: list[str] | None = None
    """strings that end a completion (cut before them)"""
    seed: int | None = None
    """seed for sampling"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("--temperature must be >= 0 and --top-p in (0, 1]")


def _inputs(args: _ClientArgs, client: Client) -> tuple[list[str], list[Any]]:
    """(prompts, ids) from --text or a JSONL file."""
    if args.text:
        records: list[dict[str, Any]] = [{"text": t} for t in args.text]
    else:
        records = []
        with open(args.input, encoding="utf-8") as f:  # type: ignore[arg-type]
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ClientError(f"{args.input}:{n}: not valid JSON ({e})") from None
                if not isinstance(rec, dict):
                    raise ClientError(f"{args.input}:{n}: each line must be a JSON object")
                records.append(rec)
    prompts = []
    for n, rec in enumerate(records, 1):
        if args.apply_template:
            prompts.append(client.format(**{k: str(v) for k, v in rec.items() if k != "id"}))
        elif isinstance(rec.get("text"), str):
            prompts.append(rec["text"])
        else:
            raise ClientError(f"input {n} has no \"text\" string (or use --apply-template with the template's fields)")
    return prompts, [rec.get("id") for rec in records]


def _run_cli(args: _ClientArgs, run: Any) -> int:
    try:
        with Client(args.artifact, url=args.url, api_key=args.api_key, model=args.model) as client:
            prompts, ids = _inputs(args, client)
            for rid, result in zip(ids, run(client, prompts)):
                print(json.dumps({**({"id": rid} if rid is not None else {}), **result}), flush=True)
    except (ClientError, ArtifactError) as e:
        print(f"lopa: {e}", file=sys.stderr)
        return 1
    return 0


def classify_cli(args: ClassifyArgs) -> int:
    """``lopa classify``: one JSON line per input."""
    return _run_cli(args, lambda c, texts: c.classify(texts, args.label_words))


def generate_cli(args: GenerateArgs) -> int:
    """``lopa generate``: one JSON line per input."""
    return _run_cli(args, lambda c, texts: ({"text": t} for t in c.generate(
        texts, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        stop=args.stop, seed=args.seed)))
