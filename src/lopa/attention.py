"""Attention for decoding on a CPU in bf16: transformers' SDPA, except that one-query steps run in float32.

PyTorch's CPU flash-attention kernel is slow on bf16 for a single query: for a decode step of 32
rows, 9 heads and 58 cached positions it takes 2.8 ms in bf16 against 0.34 ms in float32 (one thread,
this repository's CPU), which made attention a third of every decode step of SmolLM2. ``lopa_sdpa``
is transformers' SDPA attention with that one case upcast: the query, keys and values of a
one-position step on the CPU in bf16 or fp16 go through SDPA in float32 and the output is cast back.
Every other call (prefill, training, classification, any GPU, float32 models) is transformers' own
SDPA, unchanged. :func:`lopa.models.load_base` installs it on models that use SDPA.

Example::

    >>> import lopa
    >>> base, _ = lopa.load_base("tiny-random-llama")
    >>> base.config._attn_implementation
    'lopa_sdpa'
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "lopa_sdpa"
_LOW = (torch.bfloat16, torch.float16)


def lopa_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers' ``sdpa_attention_forward``, with one-query CPU steps in bf16/fp16 run in float32."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if query.device.type == "cpu" and query.dtype in _LOW and query.shape[-2] == 1:
        dtype = query.dtype
        mask = attention_mask
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.float()
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), mask,
                                              *args, **kwargs)
        return out.to(dtype), weights
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


def register() -> None:
    """Make ``lopa_sdpa`` a valid ``attn_implementation`` with SDPA's masks (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(NAME, lopa_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # else the masks would be built for another kernel


def install(model: Any) -> bool:
    """Switch a model that uses transformers' SDPA to ``lopa_sdpa``; True if it did. Models on
    another implementation (eager, flash-attention, a user's choice) are left as they are."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    register()
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, ImportError, NotImplementedError):  # a model class that takes no custom attention
        return False
    return config._attn_implementation == NAME
