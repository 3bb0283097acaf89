"""What this machine runs fast: the server's ``--dtype auto`` and training's ``--precision auto`` ask here.

>>> isinstance(cpu_supports_bf16(), bool)
True
"""

from __future__ import annotations

from pathlib import Path

import torch


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
    elsewhere bfloat16 on CPU is several times slower than float32, so float32 is the default there.
    """
    if "AVX512" not in torch.backends.cpu.get_cpu_capability().upper():
        return False
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def fast_precision() -> str:
    """``bf16`` on a GPU with bfloat16 or a CPU with native bf16, else ``fp32``."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"
