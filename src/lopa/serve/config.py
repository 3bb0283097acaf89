"""``lopa serve``'s settings: one dataclass that checks itself (the command line is its fields).

>>> ServeConfig(model="tiny-random-llama", max_batch_size=8).max_batch_size
8
>>> ServeConfig(port=70000)
Traceback (most recent call last):
...
ValueError: port must be an integer in [0, 65535], got 70000
>>> ServeConfig(batch_invariant="yes")
Traceback (most recent call last):
...
ValueError: batch_invariant must be one of ['auto', 'on', 'off'], got 'yes'
>>> ServeConfig(scheduling="eager")
Traceback (most recent call last):
...
ValueError: scheduling must be one of ['continuous', 'static'], got 'eager'
>>> ServeConfig(prefix_cache_mib=-1)
Traceback (most recent call last):
...
ValueError: prefix_cache_mib must be an integer in [0, 1048576], got -1
>>> ServeConfig(tensor_parallel_size=2)
Traceback (most recent call last):
...
ValueError: --tensor-parallel-size is a setting of vLLM's engine; add --backend vllm (the transformers backend runs on one device)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from .backends import BACKENDS, BATCH_INVARIANT_CHOICES, DTYPE_CHOICES, check_backend_name
from .protocol import SCHEDULING_CHOICES, BackendError

MiB = 1024 * 1024
# the fields of ServeConfig that only vLLM's engine reads (max_model_len is sent separately, with its default)
VLLM_ENGINE_SETTINGS = ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "quantization",
                        "enable_prefix_caching", "kv_cache_memory")


@dataclass
class ServeConfig:
    """Serve a frozen causal LM over HTTP. Clients send their own soft prompts, so one server holds
    no per-task weights and batches requests of any number of tasks together.

    Example: lopa serve --model smollm2-135m --port 8000 --api-key "$KEY"
    """

    model: str = "smollm2-135m"
    """the frozen base model: a short name (smollm2-135m, gemma3-270m, tiny-random-llama), hub id or local path"""
    host: str = "127.0.0.1"
    """interface to listen on (0.0.0.0 for every interface: set an API key then)"""
    port: int = 8000
    """TCP port to listen on"""
    api_key: str | None = field(default=None, repr=False)
    """require this key on /v1/* (Authorization: Bearer KEY or X-API-Key: KEY); default $LOPA_API_KEY, unset: no key"""
    dtype: str = field(default="auto", metadata={"choices": list(DTYPE_CHOICES)})
    """model dtype: auto, float32 (fp32), bfloat16 (bf16), float16 (fp16), the names lopa train --precision takes; auto = bfloat16 on a GPU or a CPU where native bf16 (AMX; AVX512-BF16 if a timed matmul says so) beats float32, float32 elsewhere"""
    device: str = "auto"
    """where the model runs: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ..."""
    batch_invariant: str = field(default="auto", metadata={"choices": list(BATCH_INVARIANT_CHOICES)})
    """on: rows are padded by their own length and batched only with rows padded alike, so a request's answer does not depend on what shares its batch, bit for bit where this machine's matrix products are invariant to the number of rows; off: pad rows to their batch's longest (PEFT's batching); auto: on where a check of the model's own matrix products at start finds them invariant (transformers; else off), the backend's own batching with vllm (README, Serving)"""
    backend: str = field(default="transformers", metadata={"choices": list(BACKENDS)})
    """what runs the model: transformers (in this process) or vllm (prompt_embeds into vLLM's continuous batching; pip install 'lopa[vllm]')"""
    scheduling: str = field(default="continuous", metadata={"choices": list(SCHEDULING_CHOICES)})
    """continuous: generation requests join and leave between decode steps, so a short one never waits for a long one already decoding (requests that arrive together still share each forward pass; answers equal static's for the same arrivals); static: each batch runs to its longest row before the next starts (vllm: always continuous, inside its engine)"""
    max_batch_size: int = 32
    """the most requests (of any tasks) run together in one batch (continuous: the most generation requests in open decode groups)"""
    max_wait_ms: float = 5.0
    """how long a request may wait for others to fill its batch (continuous: to start a decode group together; vllm: unused, requests join its running batch)"""
    max_soft_tokens: int = 64
    """the most virtual tokens (m) a soft prompt may have"""
    max_prompt_tokens: int = 2048
    """the most text tokens a prompt may have (the soft prompt not counted)"""
    max_new_tokens: int = 256
    """the most tokens one generation may ask for"""
    max_body_bytes: int = 8 * MiB
    """requests with larger bodies are refused (413) before parsing"""
    body_timeout_s: float = 30.0
    """the longest wait for the next piece of a request body; a client that stops sending gets 408 and the connection is closed"""
    prefix_cache_mib: int = 0
    """transformers: keep the keys and values of repeated soft prompts (one task's Z sent with every request) in this many MiB, least recently used evicted; 0 = off. An answer is the same bits whether its soft prompt was cached or not, but its soft prompt then runs as a pass of its own, which rounds differently from the joint pass used when off (README, Serving); vllm: see --enable-prefix-caching"""
    threads: int | None = None
    """PyTorch CPU threads for the model (default: PyTorch's choice, one per core); 1 suits tiny models on busy machines"""
    # vLLM's engine settings (--backend vllm only): unset leaves vLLM's own default
    tensor_parallel_size: int | None = None
    """vllm: split every layer over this many GPUs of this machine (vLLM's tensor_parallel_size; default 1)"""
    gpu_memory_utilization: float | None = None
    """vllm: the fraction of each GPU's memory vLLM may take for weights, activations and KV cache, in (0, 1] (vLLM's default 0.9)"""
    max_model_len: int | None = None
    """vllm: the longest sequence the engine holds (soft prompt + prompt + new tokens); at least max-soft-tokens + max-prompt-tokens + max-new-tokens, which is the default"""
    quantization: str | None = None
    """vllm: weight quantisation method passed to vLLM (awq, gptq, fp8, bitsandbytes, ...; default: what the checkpoint says)"""
    enable_prefix_caching: bool | None = None
    """vllm: reuse the KV cache of repeated prompt prefixes, a repeated soft prompt's full blocks included (vLLM's own caching, keyed on a hash of the embeddings); default: on where the installed vLLM hashes prompt embeddings (0.32 does), else off"""
    kv_cache_memory: float | None = None
    """vllm: KV cache size per GPU in GiB (vLLM's kv_cache_memory_bytes; when set, gpu-memory-utilization no longer sizes the cache)"""
    log_level: str = field(default="info", metadata={"choices": ["critical", "error", "warning", "info", "debug"]})
    """server log level (info logs every request)"""

    def __post_init__(self) -> None:
        if not self.api_key:  # an empty --api-key means none, like an unset variable
            self.api_key = os.environ.get("LOPA_API_KEY") or None
        if not self.model:
            raise ValueError("model must name a causal LM")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {list(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.batch_invariant not in BATCH_INVARIANT_CHOICES:
            raise ValueError(f"batch_invariant must be one of {list(BATCH_INVARIANT_CHOICES)}, "
                             f"got {self.batch_invariant!r}")
        if self.scheduling not in SCHEDULING_CHOICES:
            raise ValueError(f"scheduling must be one of {list(SCHEDULING_CHOICES)}, got {self.scheduling!r}")
        if self.scheduling == "static" and self.backend == "vllm":
            raise ValueError("--scheduling static is a setting of the transformers backend; "
                             "vLLM's engine always schedules continuously")
        for name, lo, hi in (("port", 0, 65535), ("max_batch_size", 1, 4096), ("max_soft_tokens", 1, 1 << 16),
                             ("max_prompt_tokens", 1, 1 << 24), ("max_new_tokens", 1, 1 << 20),
                             ("max_body_bytes", 1024, 1 << 34)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or not 1 <= self.threads <= 1024):
            raise ValueError(f"threads must be an integer in [1, 1024], got {self.threads!r}")
        if isinstance(self.body_timeout_s, bool) or not isinstance(self.body_timeout_s, (int, float)) \
                or not math.isfinite(self.body_timeout_s) or not 0.01 <= self.body_timeout_s <= 3600:
            raise ValueError(f"body_timeout_s must be a number in [0.01, 3600], got {self.body_timeout_s!r}")
        if isinstance(self.max_wait_ms, bool) or not isinstance(self.max_wait_ms, (int, float)) \
                or not math.isfinite(self.max_wait_ms) or not 0 <= self.max_wait_ms <= 10_000:
            raise ValueError(f"max_wait_ms must be a number in [0, 10000], got {self.max_wait_ms!r}")
        self._check_prefix_cache()
        self._check_engine_settings()
        try:  # last: the engine settings' own errors show even where the backend is not installed
            check_backend_name(self.backend)
        except BackendError as e:
            raise ValueError(str(e)) from None

    def _check_prefix_cache(self) -> None:
        n = self.prefix_cache_mib
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 1 << 20:
            raise ValueError(f"prefix_cache_mib must be an integer in [0, {1 << 20}], got {n!r}")
        if n and self.backend == "vllm":
            raise ValueError("--prefix-cache-mib is the transformers backend's cache; vLLM caches prefixes in its "
                             "own KV cache (--enable-prefix-caching, on by default)")

    def _check_engine_settings(self) -> None:
        given = [n for n in VLLM_ENGINE_SETTINGS if getattr(self, n) is not None]
        if given and self.backend != "vllm":
            names = ", ".join("--" + n.replace("_", "-") for n in given)
            raise ValueError(f"{names} {'is a setting' if len(given) == 1 else 'are settings'} of vLLM's engine; "
                             f"add --backend vllm (the {self.backend} backend runs on one device)")
        tp = self.tensor_parallel_size
        if tp is not None and (isinstance(tp, bool) or not isinstance(tp, int) or not 1 <= tp <= 1024):
            raise ValueError(f"tensor_parallel_size must be an integer in [1, 1024], got {tp!r}")
        g = self.gpu_memory_utilization
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g)
                              or not 0 < g <= 1):
            raise ValueError(f"gpu_memory_utilization must be a fraction in (0, 1], got {g!r}")
        n = self.max_model_len
        need = self.max_soft_tokens + self.max_prompt_tokens + self.max_new_tokens
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1 << 24:
                raise ValueError(f"max_model_len must be an integer in [1, {1 << 24}], got {n!r}")
            if n < need:
                # the server admits requests by the three limits; the engine must hold the longest of them
                raise ValueError(f"max_model_len {n} is below max_soft_tokens + max_prompt_tokens + max_new_tokens "
                                 f"= {need}: lower --max-prompt-tokens (or the others) or raise --max-model-len")
        q = self.quantization
        if q is not None and (not isinstance(q, str) or not q.strip() or not q.replace("_", "").replace("-", "").isalnum()):
            raise ValueError(f"quantization must name a vLLM quantisation method (awq, gptq, fp8, ...), got {q!r}")
        if self.enable_prefix_caching is not None and not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be true or false, got {self.enable_prefix_caching!r}")
        k = self.kv_cache_memory
        if k is not None and (isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k)
                              or not 0 < k <= 1 << 20):
            raise ValueError(f"kv_cache_memory must be a positive number of GiB (at most {1 << 20}), got {k!r}")

    @property
    def engine_max_model_len(self) -> int:
        """The longest sequence vLLM's engine must hold: ``--max-model-len`` or the sum of the three limits.

        >>> ServeConfig(max_soft_tokens=8, max_prompt_tokens=100, max_new_tokens=20).engine_max_model_len
        128
        """
        return self.max_model_len or self.max_soft_tokens + self.max_prompt_tokens + self.max_new_tokens

    def vllm_settings(self) -> dict[str, object]:
        """The vLLM engine settings given on the command line (unset ones left out), by :class:`ServeConfig`
        name; :func:`lopa.serve.backends.vllm.engine_kwargs` turns them into vLLM's keyword arguments.

        >>> ServeConfig().vllm_settings()  # the transformers backend takes none
        {}
        """
        return {n: getattr(self, n) for n in VLLM_ENGINE_SETTINGS if getattr(self, n) is not None}
