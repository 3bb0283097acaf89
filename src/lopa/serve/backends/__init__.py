"""Backends: what actually runs the frozen model on ``[soft prompt ; tokens]`` rows.

One module per backend, each building on :mod:`lopa.serve.protocol` alone: ``transformers`` runs the
model in this process; ``vllm`` hands ``prompt_embeds`` to vLLM (imported only when asked for;
``pip install 'lopa[vllm]'``). A backend groups the rows that can share a forward pass itself, so the
batcher and the in-process client (:mod:`lopa.client`) call it the same way and get the same numbers.
A new backend is one module here and one entry in :data:`BACKENDS`.

Example::

    >>> check_backend_name("transformers")
    >>> check_backend_name("tpu")
    Traceback (most recent call last):
    ...
    lopa.serve.protocol.BackendError: unknown backend 'tpu'; choose one of ['transformers', 'vllm']
"""

from __future__ import annotations

import importlib.util
from typing import Callable

from ..protocol import Backend, BackendError, ClassifyRow, Completion, GenerateRow, classification_result
from .precision import DTYPE_CHOICES, resolve_device, resolve_dtype
from .transformers import BATCH_INVARIANT_CHOICES, TransformersBackend

__all__ = ["BACKENDS", "BATCH_INVARIANT_CHOICES", "DTYPE_CHOICES", "Backend", "BackendError", "ClassifyRow", "Completion", "GenerateRow",
           "TransformersBackend", "check_backend_name", "classification_result", "make_backend", "resolve_device",
           "resolve_dtype"]


def _transformers(model_name: str, dtype: str, device: str, max_model_len: int | None,
                  max_batch_size: int | None, batch_invariant: str, engine_settings: dict | None,
                  prefix_cache_bytes: int) -> Backend:
    # sizes nothing ahead: needs neither limit
    if engine_settings:
        raise BackendError(f"{sorted(engine_settings)} are settings of vLLM's engine; use --backend vllm")
    return TransformersBackend(model_name, dtype=dtype, device=device, batch_invariant=batch_invariant,
                               prefix_cache_bytes=prefix_cache_bytes)


def _vllm(model_name: str, dtype: str, device: str, max_model_len: int | None, max_batch_size: int | None,
          batch_invariant: str, engine_settings: dict | None, prefix_cache_bytes: int) -> Backend:
    from .vllm import VLLMBackend  # only here: vLLM is an optional extra
    if prefix_cache_bytes:
        raise BackendError("the prefix cache in bytes is the transformers backend's; vLLM caches prefixes in its "
                           "own KV cache (--enable-prefix-caching)")
    if batch_invariant == "on":
        raise BackendError("the vllm backend schedules its own batches and cannot promise batch-invariant answers; "
                           "use --backend transformers or --batch-invariant auto")
    return VLLMBackend(model_name, dtype=dtype, device=device, max_model_len=max_model_len,
                       max_num_seqs=max_batch_size, settings=engine_settings)


# name -> (builder, the distribution it needs or None)
_REGISTRY: dict[str, tuple[Callable[..., Backend], str | None]] = {
    "transformers": (_transformers, None),
    "vllm": (_vllm, "vllm"),
}
BACKENDS = tuple(_REGISTRY)


def check_backend_name(name: str) -> None:
    """Raise :class:`BackendError` unless ``name`` is a backend this install can run."""
    if name not in _REGISTRY:
        raise BackendError(f"unknown backend {name!r}; choose one of {list(BACKENDS)}")
    needs = _REGISTRY[name][1]
    if needs is not None and importlib.util.find_spec(needs) is None:
        raise BackendError(f"the {name} backend needs {needs}: pip install 'lopa[{name}]' "
                           f"(or use --backend transformers)")


def make_backend(name: str, model_name: str, dtype: str = "auto", device: str = "auto", *,
                 max_model_len: int | None = None, max_batch_size: int | None = None,
                 batch_invariant: str = "auto", engine_settings: dict | None = None,
                 prefix_cache_bytes: int = 0) -> Backend:
    """Build a backend by name. ``max_model_len`` (the longest soft prompt + prompt + new tokens) and
    ``max_batch_size`` size vLLM's engine (its ``max_model_len`` and ``max_num_seqs``); the
    transformers backend needs neither. ``batch_invariant``: see
    :class:`~lopa.serve.backends.transformers.TransformersBackend`. ``engine_settings``: vLLM's engine
    options by :class:`~lopa.serve.config.ServeConfig` name (:func:`lopa.serve.backends.vllm.engine_kwargs`);
    the transformers backend refuses any. ``prefix_cache_bytes``: the transformers backend's soft-prompt
    prefix cache (0: off; :mod:`~lopa.serve.backends.prefixcache`)."""
    check_backend_name(name)
    return _REGISTRY[name][0](model_name, dtype, device, max_model_len, max_batch_size, batch_invariant,
                              engine_settings, prefix_cache_bytes)

