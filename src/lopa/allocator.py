"""Keep freed memory in the process instead of handing it back to the kernel after every forward pass.

With glibc's defaults a tensor of a few MiB is ``mmap``-ed when it is made and ``munmap``-ed when it
is freed, and the top of the heap is trimmed whenever more than 128 KiB of it is free. A transformer's
activations are exactly such tensors, made and freed in every layer of every pass, so each pass
touches its memory afresh: about 55,000 minor page faults per forward of smollm2-135m on a batch of 32
rows of 42 tokens, measured on this project's 2-core machine, and 12-14% of the pass's time. Raising the
``mmap`` threshold to its ceiling (32 MiB on 64-bit) and the trim threshold to 1 GiB lets glibc reuse
the same pages pass after pass: 0-300 faults per forward. PyTorch's CPU performance guide recommends
the same effect through jemalloc or tcmalloc; this needs neither.

A thread other than the main one (the server's model thread) allocates from its own arena, built of
64 MiB sub-heaps, and glibc unmaps such a sub-heap as soon as it is wholly free, whatever the trim
threshold, unless the arena's top pad says to keep that much. With the two thresholds alone, about
one process in four still refaulted a worker's activations, up to 93,000 pages a pass (measured; a
sub-heap was dropped and mapped again up to 23,000 times a run), so the top pad is raised to a
sub-heap's full size too. The pad reserves address space, not memory: pages count only once touched.

The ``lopa`` command calls :func:`retain_freed_memory` once at start, so ``lopa serve``, ``lopa train``
and the benchmarks (which time the in-process contenders in the same process as their server's
client) all run with it. A library user calls it once, early. It changes nothing where glibc is not
the allocator, where ``LOPA_MALLOC=system`` asks for glibc's defaults, or where the user's own
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_`` (or ``glibc.malloc``
tunables) are set (theirs win).

The cost: memory freed after a peak (a long prompt, a large batch) stays in the process, up to 1 GiB
above what is in use, for the next peak, instead of going back to the system. A server's RSS then stays
at its working set rather than rising and falling with every pass.

>>> first = retain_freed_memory()  # "tuned" here; elsewhere why not ("not glibc", ...)
>>> retain_freed_memory() == ("already tuned" if first in ("tuned", "already tuned") else first)  # once per process
True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

MMAP_THRESHOLD = 32 * 2 ** 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 2 ** 30
# a thread arena's sub-heap (HEAP_MAX_SIZE, twice the mmap ceiling on 64-bit): heap_trim frees a wholly free
# sub-heap unless the pad it is given (the top pad) reaches what would be left, and that is never above this
TOP_PAD = 2 * MMAP_THRESHOLD
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # from glibc's malloc.h
_state: str | None = None


def retain_freed_memory() -> str:
    """Tune glibc's allocator to reuse freed memory (see the module's text); what it did, as a word.

    Returns ``"tuned"`` the first time it changes the settings, ``"already tuned"`` after, and otherwise
    why it left them: ``"not glibc"``, ``"LOPA_MALLOC=system"`` or ``"MALLOC_ set by the user"``.
    """
    global _state
    if _state is not None:
        return "already tuned" if _state == "tuned" else _state
    _state = _tune()
    return _state


def _tune() -> str:
    choice = os.environ.get("LOPA_MALLOC", "retain")
    if choice not in ("retain", "system"):
        raise ValueError(f"LOPA_MALLOC must be 'retain' (the default) or 'system', got {choice!r}")
    if choice == "system":
        return "LOPA_MALLOC=system"
    if (any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"))
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")):
        return "MALLOC_ set by the user"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "not glibc"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt answers 1 on success; a libc that ignores a setting (another allocator preloaded) is left as it is
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    ok = mallopt(_M_TOP_PAD, TOP_PAD) == 1 and ok
    return "tuned" if ok else "not glibc"
