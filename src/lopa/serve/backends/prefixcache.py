"""The soft-prompt prefix cache: each distinct soft prompt's keys and values
(:func:`lopa.serve.backends.softkv.soft_prompt_kv`), kept least-recently-used within a byte budget.

When many requests repeat one task-wide soft prompt (prompt tuning, LoPT), the server computes its
keys and values once and each later request runs its tokens only. The key is a hash of the soft
prompt's bytes in the model's dtype, its dtype, its shape and the model's name, so two soft prompts
share an entry only when every bit is equal (and then their keys and values are equal too).

>>> import torch
>>> cache = PrefixCache(max_bytes=1000, model_name="m")
>>> kv = lambda z: ((z.clone(), z.clone()),)  # stand-in for the model's pass: 2 × 4 × 4 bytes
>>> z = torch.ones(1, 4)
>>> _ = cache.get(z, kv); _ = cache.get(z, kv); _ = cache.get(z * 2, kv)
>>> cache.stats()
{'hits': 1, 'misses': 2, 'bytes': 64, 'entries': 2, 'evictions': 0, 'max_bytes': 1000}
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch

from ..labelcache import ByteLRU
from .softkv import KV, kv_bytes


def soft_prompt_key(soft: torch.Tensor, model_name: str) -> bytes:
    """A digest of every bit of ``soft`` with its dtype and shape, and the model that reads it."""
    h = hashlib.sha256()
    h.update(f"{model_name}\0{soft.dtype}\0{tuple(soft.shape)}\0".encode())
    h.update(soft.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.digest()


class PrefixCache:
    """Soft prompt -> its keys and values, at most ``max_bytes`` of them (least recently used go first).

    ``hits`` / ``misses`` count lookups; a soft prompt larger than the budget is computed every time.
    Not thread-safe: the backend's one worker thread uses it (a scrape only reads the counters).
    """

    def __init__(self, max_bytes: int, model_name: str):
        self.model_name = model_name
        self._lru: ByteLRU[bytes, KV] = ByteLRU(max_bytes, size=lambda key, kv: kv_bytes(kv))
        self.hits = self.misses = 0

    def get(self, soft: torch.Tensor, compute: Callable[[torch.Tensor], KV]) -> KV:
        """The keys and values of ``soft`` (already in the model's dtype): cached, or ``compute(soft)`` kept."""
        key = soft_prompt_key(soft, self.model_name)
        kv = self._lru.get(key)
        if kv is not None:
            self.hits += 1
            return kv
        self.misses += 1
        kv = compute(soft)
        self._lru.put(key, kv)
        return kv

    def stats(self) -> dict[str, int]:
        lru = self._lru
        return {"hits": self.hits, "misses": self.misses, "bytes": lru.total, "entries": len(lru),
                "evictions": lru.evictions, "max_bytes": lru.max_bytes}
