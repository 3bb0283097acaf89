"""Where a backend runs and in what dtype: ``--device`` and ``--dtype`` resolved.

>>> resolve_dtype("float32", torch.device("cpu"))
torch.float32
>>> resolve_device("cpu")
device(type='cpu')
"""

from __future__ import annotations

import torch

from ...hardware import cpu_bf16_is_faster
from ..protocol import BackendError

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else the CPU; anything else as ``torch.device`` reads it."""
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
