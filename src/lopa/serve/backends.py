"""Backends: what actually runs the frozen model on ``[soft prompt ; tokens]`` rows.

A backend takes already-checked rows (token ids, an ``m × d`` soft prompt, and the row's label ids or
decoding settings) and returns one result per row. Rows may belong to any number of tasks; the
backend knows no task and holds no per-task state. It groups the rows that can share a forward pass
itself, so the batcher (:mod:`lopa.serve.batcher`) and the in-process client (:mod:`lopa.client`)
call it the same way and get the same numbers.

``transformers`` runs the model in this process; ``vllm`` hands ``prompt_embeds`` to vLLM
(:mod:`lopa.serve.vllm_backend`, imported only when asked for; ``pip install 'lopa[vllm]'``).

Example::

    >>> import torch
    >>> backend = TransformersBackend("tiny-random-llama", dtype="float32")
    >>> ids = backend.label_token_ids([" no", " yes"])
    >>> rows = [ClassifyRow([1, 2, 3], torch.zeros(4, 64), ids), ClassifyRow([7], torch.ones(2, 64), ids)]
    >>> [len(lp) for lp in backend.classify(rows)]
    [2, 2]
    >>> backend.generate([GenerateRow([1, 2], torch.zeros(4, 64), max_new_tokens=3)])[0].finish_reason
    'length'
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch

from .. import prefix
from ..hardware import cpu_bf16_is_faster
from ..models import load_base

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
BACKENDS = ("transformers", "vllm")


class BackendError(RuntimeError):
    """A backend that cannot be built here (not installed, not implemented, bad setting)."""


@dataclass
class ClassifyRow:
    """One classification request: score each label's first token after ``[soft ; tokens]``."""

    token_ids: list[int]
    soft_prompt: torch.Tensor  # m × d
    label_ids: list[int]       # one token id per class


@dataclass
class GenerateRow:
    """One generation request; ``temperature == 0`` is greedy (``top_p`` and ``seed`` are then unused)."""

    token_ids: list[int]
    soft_prompt: torch.Tensor
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def group_key(self) -> tuple[Any, ...]:
        """Rows with equal keys decode together in one ``generate`` call.

        Greedy rows need only the same length budget and stop strings. Sampled rows also need the
        same temperature and top_p; a seeded row runs alone, because the seed sets one RNG for the
        whole batch and the same request must give the same text whatever else is in the batch.
        """
        if self.temperature == 0:
            return ("greedy", self.max_new_tokens, tuple(self.stop))
        uid = id(self) if self.seed is not None else None
        return ("sample", self.max_new_tokens, tuple(self.stop), float(self.temperature), float(self.top_p),
                self.seed, uid)


@dataclass
class Completion:
    """A generated text; ``finish_reason`` is ``"length"`` when the budget ran out, else ``"stop"``."""

    text: str
    finish_reason: str
    completion_tokens: int


class Backend(Protocol):
    """What the server needs from a backend."""

    model_name: str
    hidden_size: int
    vocab_size: int
    dtype: torch.dtype

    def tokenize(self, text: str) -> list[int]: ...

    def label_token_ids(self, label_words: Sequence[str]) -> list[int]: ...

    def classify(self, rows: Sequence[ClassifyRow]) -> list[list[float]]: ...

    def generate(self, rows: Sequence[GenerateRow]) -> list[Completion]: ...


def classification_result(logprobs: Sequence[float], label_words: Sequence[str]) -> dict[str, Any]:
    """The JSON answer for one classified row; the server and the in-process client both use it.

    >>> classification_result([-2.0, -0.5], [" bad", " good"])
    {'logprobs': [-2.0, -0.5], 'label': 1, 'label_word': ' good'}
    """
    k = max(range(len(logprobs)), key=lambda i: logprobs[i])
    return {"logprobs": list(logprobs), "label": k, "label_word": label_words[k]}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU that has it (else float16) or a CPU where native bf16 is faster than
    float32 (:func:`lopa.hardware.cpu_bf16_is_faster`), else float32."""
    if dtype not in DTYPE_CHOICES:
        raise BackendError(f"dtype must be one of {DTYPE_CHOICES}, got {dtype!r}")
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_bf16_is_faster() else torch.float32


class TransformersBackend:
    """A Hugging Face causal LM run through :mod:`lopa.prefix` (the same code as training and the
    client), on one device.

    Args:
        model_name: a short name (``smollm2-135m``), hub id or local path (see :func:`lopa.models.load_base`).
        dtype: ``auto`` (see :func:`resolve_dtype`), ``float32``, ``bfloat16`` or ``float16``.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``, ...

    Not thread-safe: call it from one thread at a time (the batcher owns one worker thread).
    """

    def __init__(self, model_name: str, dtype: str = "auto", device: str = "auto"):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model_name = model_name
        self.base, self.tokenizer = load_base(model_name, self.dtype)
        self.base.to(self.device)
        emb = self.base.get_input_embeddings().weight
        self.hidden_size = int(emb.shape[1])
        self.vocab_size = int(emb.shape[0])

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a prompt, without special tokens (as :class:`lopa.SoftPromptModel` does)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def label_token_ids(self, label_words: Sequence[str]) -> list[int]:
        """First token of each label word; ValueError when two share one (see :func:`lopa.prefix.label_token_ids`)."""
        return prefix.label_token_ids(self.tokenizer, label_words)

    @torch.inference_mode()
    def classify(self, rows: Sequence[ClassifyRow]) -> list[list[float]]:
        """Label log-probabilities for every row: one forward pass per distinct number of classes."""
        out: list[list[float] | None] = [None] * len(rows)
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(len(r.label_ids), []).append(i)
        for idx in groups.values():
            batch = prefix.assemble(self.base, [rows[i].soft_prompt for i in idx], [rows[i].token_ids for i in idx])
            label_ids = torch.tensor([rows[i].label_ids for i in idx], dtype=torch.long)
            logp = prefix.classify(self.base, batch, label_ids).cpu().tolist()
            for i, lp in zip(idx, logp):
                out[i] = lp
        return out  # type: ignore[return-value]

    def generate(self, rows: Sequence[GenerateRow]) -> list[Completion]:
        """Completions for every row: one KV-cached decoding loop (:func:`lopa.prefix.generate_ids`) per
        group of equal settings; ``completion_tokens`` counts the tokens generated."""
        out: list[Completion | None] = [None] * len(rows)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r.group_key(), []).append(i)
        for idx in groups.values():
            first = rows[idx[0]]
            batch = prefix.assemble(self.base, [rows[i].soft_prompt for i in idx], [rows[i].token_ids for i in idx])
            sample = first.temperature > 0
            stop = list(first.stop) or None
            ids = prefix.generate_ids(self.base, self.tokenizer, batch, max_new_tokens=first.max_new_tokens,
                                      do_sample=sample, temperature=first.temperature if sample else 1.0,
                                      top_p=first.top_p if sample else 1.0, stop=stop,
                                      seed=first.seed if sample else None)
            for i, toks in zip(idx, ids):
                decoded = self.tokenizer.decode(toks, skip_special_tokens=True)
                text = prefix.cut_at_stop(decoded, stop)
                # the whole budget spent and no stop string in it: cut by length; else EOS or a stop string
                reason = "length" if len(toks) >= first.max_new_tokens and text == decoded else "stop"
                out[i] = Completion(text, reason, len(toks))
        return out  # type: ignore[return-value]


def make_backend(name: str, model_name: str, dtype: str = "auto", device: str = "auto", *,
                 max_model_len: int | None = None, max_batch_size: int | None = None) -> Backend:
    """Build a backend by name. ``max_model_len`` (the longest soft prompt + prompt + new tokens) and
    ``max_batch_size`` size vLLM's engine (its ``max_model_len`` and ``max_num_seqs``); the
    transformers backend needs neither."""
    check_backend_name(name)
    if name == "vllm":
        from .vllm_backend import VLLMBackend  # only here: vLLM is an optional extra
        return VLLMBackend(model_name, dtype=dtype, device=device, max_model_len=max_model_len,
                           max_num_seqs=max_batch_size)
    return TransformersBackend(model_name, dtype=dtype, device=device)


def check_backend_name(name: str) -> None:
    """Raise :class:`BackendError` unless ``name`` is a backend this install can run."""
    if name == "transformers":
        return
    if name == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise BackendError("the vllm backend needs vLLM: pip install 'lopa[vllm]' (or use --backend transformers)")
        return
    raise BackendError(f"unknown backend {name!r}; choose one of {list(BACKENDS)}")
