"""A least-recently-used cache bounded by the total size of its keys and values, not by their count:
a count bound lets a few huge keys hold any amount of memory.

>>> cache = ByteLRU(max_bytes=100, size=lambda key, value: len(key))
>>> cache.put("a" * 60, 1); cache.put("b" * 30, 2)
>>> cache.get("a" * 60)  # now the most recently used
1
>>> cache.put("c" * 30, 3)  # 120 bytes: the least recently used entry goes
>>> [len(k) for k in cache.keys()], cache.total
([60, 30], 90)
>>> cache.put("d" * 500, 4)  # larger than the whole cache: not kept
>>> len(cache), cache.get("d" * 500)
(2, None)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """``get``/``put`` with eviction of the least recently used entries once ``size`` summed over the
    entries exceeds ``max_bytes``. Not thread-safe: use it from one thread (the event loop)."""

    def __init__(self, max_bytes: int, size: Callable[[K, V], int]):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        self.max_bytes, self._size = max_bytes, size
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.total = 0
        self.evictions = 0  # entries dropped to make room (a metric of the prefix cache)

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[K]:
        return list(self._entries)

    def get(self, key: K) -> V | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        self._entries.move_to_end(key)
        return hit[0]

    def put(self, key: K, value: V) -> None:
        n = self._size(key, value)
        if n > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.total -= old[1]
        self._entries[key] = (value, n)
        self.total += n
        while self.total > self.max_bytes:
            _, (_, m) = self._entries.popitem(last=False)
            self.total -= m
            self.evictions += 1
