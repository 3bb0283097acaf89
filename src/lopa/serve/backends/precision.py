"""Where a backend runs and in what dtype: ``--device`` and ``--dtype`` resolved.

>>> resolve_dtype("float32", torch.device("cpu"))
torch.float32
>>> resolve_device("cpu")
device(type='cpu')
"""

from __future__ import annotations

import torch

from ...hardware import PRECISION_CHOICES, resolve_precision
from ..protocol import BackendError

DTYPE_CHOICES = PRECISION_CHOICES  # the server's --dtype takes the names training's --precision takes


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else the CPU; anything else as ``torch.device`` reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The backend's dtype: :func:`lopa.hardware.resolve_precision`, its errors as a BackendError."""
    try:
        return resolve_precision(dtype, device)
    except ValueError as e:
        raise BackendError(f"dtype: {e}") from None
