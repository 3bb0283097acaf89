"""Soft prompts computed in batches: the requests of one task that arrive within a few milliseconds
share one call of the task's generator (and encoder).

A :class:`SoftPromptBatcher` per task collects texts for up to ``max_wait_ms`` (or until
``max_batch_size`` are waiting), runs ``compute(texts)`` once in the executor (never on the event
loop), and hands each request its own row. A failing call fails only the requests in that batch.

Example::

    >>> import asyncio, torch
    >>> from concurrent.futures import ThreadPoolExecutor
    >>> calls = []
    >>> def compute(texts):
    ...     calls.append(list(texts))
    ...     return torch.arange(len(texts), dtype=torch.float32).view(-1, 1, 1).expand(-1, 2, 3)
    >>> async def main():
    ...     b = SoftPromptBatcher(compute, ThreadPoolExecutor(1), max_batch_size=8, max_wait_ms=20)
    ...     zs = await asyncio.gather(*(b.submit(t) for t in ["a", "b", "c"]))
    ...     await b.close()
    ...     return [z.shape for z in zs], [float(z[0, 0]) for z in zs]
    >>> asyncio.run(main())
    ([torch.Size([2, 3]), torch.Size([2, 3]), torch.Size([2, 3])], [0.0, 1.0, 2.0])
    >>> calls
    [['a', 'b', 'c']]
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from typing import Callable, Sequence

import torch

log = logging.getLogger("lopa.gateway")


class SoftPromptBatcher:
    """One task's soft prompts: ``submit(text)`` → that text's ``m × d`` Z, computed with the others
    waiting at the same time. ``on_batch(size)`` is told the size of every call (for the metrics)."""

    def __init__(self, compute: Callable[[Sequence[str]], torch.Tensor], executor: Executor, *,
                 max_batch_size: int = 32, max_wait_ms: float = 5.0, on_batch: Callable[[int], None] | None = None):
        self.compute, self.executor = compute, executor
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_ms / 1000
        self.on_batch = on_batch
        self._queue: asyncio.Queue[tuple[str, asyncio.Future[torch.Tensor]]] | None = None
        self._worker: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Requests waiting for their soft prompt's batch to start."""
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, text: str) -> torch.Tensor:
        if self._worker is None:  # started on first use, in the loop that serves the requests
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        fut: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        assert self._queue is not None
        self._queue.put_nowait((text, fut))
        return await fut

    async def _collect(self) -> list[tuple[str, asyncio.Future[torch.Tensor]]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return [(t, f) for t, f in batch if not f.done()]  # a client that left cancelled its future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            try:
                z = await loop.run_in_executor(self.executor, self.compute, [t for t, _ in batch])
            except Exception as e:  # this batch's requests fail; the next batch is served
                log.exception("computing %d soft prompt(s) failed", len(batch))
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch))
            for i, (_, f) in enumerate(batch):
                if not f.done():
                    f.set_result(z[i])

    async def close(self) -> None:
        """Stop the worker; requests still waiting get an error."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        while self._queue is not None and not self._queue.empty():
            _, f = self._queue.get_nowait()
            if not f.done():
                f.set_exception(RuntimeError("the gateway is shutting down"))
