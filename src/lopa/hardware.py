"""What this machine runs fast, and the one precision vocabulary: training's and evaluation's
``--precision`` and the server's ``--dtype`` take the same names and are decided here only.

Names: ``auto``, ``float32``, ``bfloat16``, ``float16``, with the short forms ``fp32``, ``bf16`` and
``fp16`` accepted everywhere. ``auto`` is bfloat16 on a GPU that has it (else float16) or a CPU where
bf16 is native and faster (:func:`cpu_bf16_is_faster`), else float32.

On a CPU, bfloat16 pays only where the matrix units run it natively *and* faster than float32. With
AMX (Sapphire Rapids and later, when the kernel exposes it) bf16 matmuls are several times faster
than fp32. With AVX512-BF16 alone it depends on the part and on oneDNN's kernels: on one 2-core
virtual machine here (AMX present in the silicon but not exposed) a bf16 ``linear`` ran at half the
fp32 rate. So where only AVX512-BF16 is there, :func:`cpu_bf16_is_faster` times one matrix product
in both dtypes, once per process, and picks the faster.

>>> isinstance(cpu_supports_bf16(), bool), isinstance(cpu_bf16_is_faster(), bool)
(True, True)
>>> fast_precision() in ("bf16", "fp32")
True
>>> resolve_precision("bf16"), precision_name("fp32")
(torch.bfloat16, 'float32')
>>> precision_name("half")
Traceback (most recent call last):
...
ValueError: precision must be one of auto, float32 (fp32), bfloat16 (bf16), float16 (fp16); got 'half'
"""

from __future__ import annotations

import functools
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
SHORT = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PRECISION_CHOICES = (*PRECISIONS, *SHORT)  # what an option accepts
PRECISION_HELP = "auto, float32 (fp32), bfloat16 (bf16), float16 (fp16)"

# bf16 is chosen only when it is clearly faster: the timing is a few milliseconds on a shared machine
BF16_MIN_SPEEDUP = 1.15


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_supports_bf16() -> bool:
    """True when this CPU runs bfloat16 matmuls natively (AVX512-BF16 or AMX), not by emulation.

    PyTorch's dispatch level must be AVX512 and the CPU must report ``avx512_bf16`` or ``amx_bf16``;
    elsewhere bfloat16 on CPU is several times slower than float32. Native is not the same as faster:
    see :func:`cpu_bf16_is_faster`.
    """
    if "AVX512" not in torch.backends.cpu.get_cpu_capability().upper():
        return False
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def bf16_matmul_speedup(m: int = 512, k: int = 576, n: int = 1536, repeats: int = 5) -> float:
    """fp32 time over bf16 time of one ``m × k`` by ``k × n`` product on this CPU (best of ``repeats``),
    at torch's current thread count; above 1 means bf16 is faster."""
    def best(dtype: torch.dtype) -> float:
        a = torch.randn(m, k).to(dtype)
        w = torch.randn(n, k).to(dtype)
        torch.nn.functional.linear(a, w)  # warm-up: kernel selection, allocation
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.nn.functional.linear(a, w)
            times.append(time.perf_counter() - t0)
        return min(times)
    with torch.inference_mode():
        return best(torch.float32) / best(torch.bfloat16)


@functools.lru_cache(maxsize=None)
def cpu_bf16_is_faster() -> bool:
    """True when bfloat16 is native on this CPU and faster than float32: always with AMX; with
    AVX512-BF16 alone, when :func:`bf16_matmul_speedup` (measured once per process) is at least
    ``BF16_MIN_SPEEDUP``."""
    if not cpu_supports_bf16():
        return False
    if "amx_bf16" in _cpu_flags():
        return True
    return bf16_matmul_speedup() >= BF16_MIN_SPEEDUP


def fast_precision() -> str:
    """What training records for ``--precision auto``: ``bf16`` where :func:`resolve_precision` picks
    bfloat16, else ``fp32`` (training never picks float16 by itself: it would need loss scaling)."""
    return "bf16" if resolve_precision("auto") == torch.bfloat16 else "fp32"


def precision_name(value: str) -> str:
    """The canonical name of a precision (``bf16`` → ``bfloat16``); a ValueError names the choices."""
    name = SHORT.get(value, value)
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISION_HELP}; got {value!r}")
    return name


def resolve_precision(value: str, device: torch.device | str | None = None) -> torch.dtype:
    """The torch dtype a precision means on ``device`` (default: CUDA when available, else the CPU);
    ``auto`` is decided here and nowhere else."""
    name = precision_name(value)
    if name != "auto":
        return getattr(torch, name)
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_bf16_is_faster() else torch.float32


def autocast(precision: str | torch.dtype) -> Any:
    """Mixed-precision autocast for a reduced precision (on the GPU when there is one), nothing for float32."""
    dtype = precision if isinstance(precision, torch.dtype) else resolve_precision(precision)
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=dtype)
