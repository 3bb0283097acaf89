"""The batcher: requests of any tasks go into one queue and leave in shared batches.

A batch closes when it holds ``max_batch_size`` rows or when its oldest row has waited
``max_wait_ms``; it then runs on the backend in one worker thread, so the event loop keeps accepting
requests meanwhile, and those requests form the next batch (under load a batch never waits: its
oldest row has already waited through the previous one). Throughput therefore depends on the number
of rows, not on how many tasks they belong to: a soft prompt is data, not a per-task weight.

This is ``--scheduling static``: a generation batch runs to its longest row before the next batch
starts. :class:`lopa.serve.scheduler.ContinuousBatcher` (the default for the transformers backend)
is this class with rows joining and leaving between decoding steps.

Each row gets its own future. If a whole batch fails, its rows are retried one by one so that one
bad row cannot fail the others. :meth:`Batcher.close` refuses new rows and finishes every row
already queued before it returns.

Example::

    >>> import asyncio
    >>> class Echo:  # any object with classify/generate over lists of rows
    ...     def classify(self, rows): return [[float(r)] for r in rows]
    ...     def generate(self, rows): return [str(r) for r in rows]
    >>> async def main():
    ...     batcher = Batcher(Echo(), max_batch_size=8, max_wait_ms=1)
    ...     await batcher.start()
    ...     out = await asyncio.gather(*(batcher.submit("classify", i) for i in range(3)), batcher.submit("generate", 7))
    ...     await batcher.close()
    ...     return out, batcher.stats
    >>> asyncio.run(main())
    ([[0.0], [1.0], [2.0], '7'], {'batches': 2, 'rows': 4})
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from .protocol import KINDS

log = logging.getLogger("lopa.serve")


def torch_threads_init() -> Callable[[], None]:
    """A ``worker_init`` that gives the worker thread the calling thread's torch thread count.

    ``torch.set_num_threads(1)`` in the main thread leaves a thread started later computing on every
    core (measured here: a matmul in a pool thread took 2 cores' time after the main thread set 1);
    the server's ``--threads`` must hold where the model runs.
    """
    import torch
    n = torch.get_num_threads()
    return lambda: torch.set_num_threads(n)


class BatcherClosed(RuntimeError):
    """The batcher is shutting down and takes no new rows."""


class BatcherFull(RuntimeError):
    """More rows are waiting than ``max_queue``: the server is overloaded, try again later."""


@dataclass
class _Item:
    kind: str
    row: Any
    future: asyncio.Future
    enqueued: float


class Batcher:
    """Collect rows into batches and run them on ``backend`` (``backend.classify(rows)`` /
    ``backend.generate(rows)``, each returning one result per row, in order).

    Args:
        backend: the model runner; called from one worker thread only.
        max_batch_size: the most rows in one batch (classification and generation rows together).
        max_wait_ms: how long the oldest row of a batch may wait for others to join.
        max_queue: rows allowed to wait at once; more are refused with :class:`BatcherFull`.
        on_batch: called as ``on_batch(kind, size)`` for each backend call (metrics).
        worker_init: called once in the worker thread before its first batch. Per-thread settings
            belong here: ``torch.set_num_threads`` applies to the thread that calls it, and a new thread
            starts with one compute thread per core whatever the main thread set (see
            :func:`torch_threads_init`).
    """

    def __init__(self, backend: Any, max_batch_size: int = 32, max_wait_ms: float = 5.0, max_queue: int = 4096,
                 on_batch: Callable[[str, int], None] | None = None,
                 worker_init: Callable[[], None] | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.stats = {"batches": 0, "rows": 0}
        self._pending: deque[_Item] = deque()
        self._wakeup: asyncio.Event | None = None
        self._closing = False
        self._task: asyncio.Task | None = None
        # one thread: the backend is not thread-safe, and torch runs each forward on the server's --threads cores
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lopa-backend", initializer=worker_init)

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        """Start the collecting loop on the running event loop."""
        if self._task is not None:
            return
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="lopa-batcher")

    async def submit(self, kind: str, row: Any) -> Any:
        """Queue one row and wait for its result (or the backend's exception)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if self._task is None or self._wakeup is None:
            raise RuntimeError("Batcher.start() was not awaited")
        if self._closing:
            raise BatcherClosed("the server is shutting down")
        if len(self._pending) >= self.max_queue:
            raise BatcherFull(f"{len(self._pending)} requests are already waiting; try again later")
        loop = asyncio.get_running_loop()
        item = _Item(kind, row, loop.create_future(), loop.time())
        self._pending.append(item)
        self._wakeup.set()
        return await item.future

    async def close(self) -> None:
        """Take no new rows, finish all queued and running ones, then stop the worker thread."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def _wait(self, timeout: float | None) -> None:
        assert self._wakeup is not None
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def _fill(self) -> None:
        """Let the batch fill until it is full or its oldest row has waited ``max_wait``."""
        loop = asyncio.get_running_loop()
        deadline = self._pending[0].enqueued + self.max_wait
        while len(self._pending) < self.max_batch_size and not self._closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await self._wait(remaining)

    def _count(self, kind: str, n: int) -> None:
        """One backend call of ``n`` rows, in the stats and the metrics."""
        self.stats["batches"] += 1
        self.stats["rows"] += n
        if self.on_batch is not None:
            self.on_batch(kind, n)

    async def _run(self) -> None:
        while True:
            while not self._pending:
                if self._closing:
                    return
                await self._wait(None)
            await self._fill()
            n = min(len(self._pending), self.max_batch_size)
            batch = [self._pending.popleft() for _ in range(n)]
            batch = [it for it in batch if not it.future.done()]  # the client went away
            try:
                await self._execute(batch)
            except Exception as e:  # never let the loop die: queued rows would wait for ever
                log.exception("batch failed")
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(e)

    async def _execute(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        for kind in KINDS:
            items = [it for it in batch if it.kind == kind]
            if not items:
                continue
            fn = getattr(self.backend, kind)
            self._count(kind, len(items))
            try:
                results = await loop.run_in_executor(self._executor, fn, [it.row for it in items])
                if len(results) != len(items):
                    raise RuntimeError(f"backend returned {len(results)} results for {len(items)} rows")
            except Exception as e:
                if len(items) == 1:
                    if not items[0].future.done():
                        items[0].future.set_exception(e)
                    continue
                log.warning("a batch of %d %s rows failed; retrying them one by one", len(items), kind,
                            exc_info=True)
                for it in items:
                    try:
                        (result,) = await loop.run_in_executor(self._executor, fn, [it.row])
                    except Exception as e:
                        if not it.future.done():
                            it.future.set_exception(e)
                    else:
                        if not it.future.done():
                            it.future.set_result(result)
                continue
            for it, result in zip(items, results):
                if not it.future.done():
                    it.future.set_result(result)
