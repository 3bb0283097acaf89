"""The soft-prompt wire format: a JSON object that carries an ``m × d`` array without pickle.

``{"dtype": "float16" | "bfloat16" | "float32", "shape": [m, d], "data": base64 of the raw array}``,
little-endian, row-major, standard base64 with padding. The server does not trust it: dtype, shape,
width, the number of tokens and the length of ``data`` are all checked against the shape *before* a
byte is decoded, so a client cannot make the server allocate more than ``max_soft_tokens × d``
values, and a malformed or non-finite array is a :class:`WireError` (a 4xx), never a crash.

Example::

    >>> import torch
    >>> z = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    >>> obj = encode_soft_prompt(z, dtype="bfloat16")
    >>> obj["dtype"], obj["shape"], obj["data"]
    ('bfloat16', [2, 3], 'AACAPwBAQECAQKBA')
    >>> decode_soft_prompt(obj, hidden_size=3, max_soft_tokens=8).float().tolist()
    [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    >>> decode_soft_prompt({**obj, "shape": [2, 4]}, hidden_size=3, max_soft_tokens=8)
    Traceback (most recent call last):
    ...
    lopa.serve.wire.WireError: soft_prompt.shape[1] is 4, but this model's hidden size is 3
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
import torch

# wire name -> (little-endian numpy dtype of the raw bytes, torch dtype, bytes per value)
DTYPES: dict[str, tuple[str, torch.dtype, int]] = {
    "float32": ("<f4", torch.float32, 4),
    "float16": ("<f2", torch.float16, 2),
    "bfloat16": ("<i2", torch.bfloat16, 2),  # numpy has no bfloat16: move the bits as int16, view in torch
}


class WireError(ValueError):
    """A soft prompt the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def encoded_length(num_bytes: int) -> int:
    """Length of the padded standard base64 text of ``num_bytes`` bytes."""
    return 4 * ((num_bytes + 2) // 3)


def encode_soft_prompt(tensor: torch.Tensor, dtype: str = "float32") -> dict[str, Any]:
    """An ``m × d`` tensor as the wire object (cast to ``dtype`` first).

    >>> encode_soft_prompt(torch.ones(1, 2))
    {'dtype': 'float32', 'shape': [1, 2], 'data': 'AACAPwAAgD8='}
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if tensor.dim() != 2:
        raise ValueError(f"a soft prompt is m × d (2 dimensions); got shape {tuple(tensor.shape)}")
    np_dtype, torch_dtype, _ = DTYPES[dtype]
    t = tensor.detach().to("cpu", torch_dtype).contiguous()
    if torch_dtype is torch.bfloat16:
        t = t.view(torch.int16)
    raw = t.numpy().astype(np_dtype, copy=False).tobytes()
    return {"dtype": dtype, "shape": [int(tensor.shape[0]), int(tensor.shape[1])],
            "data": base64.b64encode(raw).decode("ascii")}


def _short(x: Any, limit: int = 60) -> str:
    """``repr(x)`` cut to ``limit`` characters: an error message must not echo megabytes back."""
    r = repr(x)
    return r if len(r) <= limit else r[:limit] + "..."


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def decode_soft_prompt(obj: Any, *, hidden_size: int, max_soft_tokens: int, max_bytes: int | None = None,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Check and decode a wire object into an ``m × d`` tensor (in the wire dtype, or ``out_dtype``).

    Raises :class:`WireError` (status 400) naming the first problem found. ``out_dtype`` is the
    model's dtype: values that overflow it (1e30 in float16) are refused too, since they would reach
    the model as infinities.
    """
    if not isinstance(obj, dict):
        raise WireError(400, f"soft_prompt must be an object {{dtype, shape, data}}, got {type(obj).__name__}")
    extra = sorted(repr(k) for k in obj if k not in ("dtype", "shape", "data"))
    if extra:
        raise WireError(400, f"soft_prompt has unknown field(s) {', '.join(extra)}; expected dtype, shape, data")
    dtype = obj.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:  # a list or object is no dict key: test the type first
        raise WireError(400, f"soft_prompt.dtype must be one of {sorted(DTYPES)}, got {_short(dtype)}")
    shape = obj.get("shape")
    if not isinstance(shape, list) or len(shape) != 2 or not all(_is_int(s) for s in shape):
        raise WireError(400, f"soft_prompt.shape must be two integers [m, d], got {_short(shape)}")
    m, d = shape
    if d != hidden_size:
        raise WireError(400, f"soft_prompt.shape[1] is {d}, but this model's hidden size is {hidden_size}")
    if not 1 <= m <= max_soft_tokens:
        raise WireError(400, f"soft_prompt.shape[0] (m, the number of virtual tokens) is {m}; this server "
                             f"accepts 1 to {max_soft_tokens}")
    np_dtype, torch_dtype, itemsize = DTYPES[dtype]
    num_bytes = m * d * itemsize
    if max_bytes is not None and num_bytes > max_bytes:
        raise WireError(400, f"soft_prompt of shape {shape} in {dtype} is {num_bytes} bytes; the limit is {max_bytes}")
    data = obj.get("data")
    if not isinstance(data, str):
        raise WireError(400, f"soft_prompt.data must be a base64 string, got {type(data).__name__}")
    want = encoded_length(num_bytes)
    if len(data) != want:  # checked before decoding, so a huge string costs nothing
        raise WireError(400, f"soft_prompt.data has {len(data)} base64 characters, but shape {shape} in {dtype} "
                             f"needs {num_bytes} bytes = {want} characters (standard base64 with padding)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise WireError(400, f"soft_prompt.data is not valid standard base64: {e}") from None
    if len(raw) != num_bytes:  # padding may hide a short payload behind the right text length
        raise WireError(400, f"soft_prompt.data decodes to {len(raw)} bytes; shape {shape} in {dtype} needs {num_bytes}")
    arr = np.frombuffer(raw, dtype=np_dtype).astype(np_dtype[1:], copy=True)  # native order, writable
    t = torch.from_numpy(arr).reshape(m, d)
    if torch_dtype is torch.bfloat16:
        t = t.view(torch.bfloat16)
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise WireError(400, f"soft_prompt holds {bad} NaN or infinite value(s)")
    if out_dtype is not None and out_dtype != t.dtype:
        t = t.to(out_dtype)
        if not bool(torch.isfinite(t).all()):
            raise WireError(400, f"soft_prompt has values too large for the model's dtype "
                                 f"{str(out_dtype).removeprefix('torch.')}")
    return t
