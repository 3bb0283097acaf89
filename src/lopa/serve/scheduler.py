"""Continuous batching for a backend that decodes in steps: requests join and leave between decode
steps, so a short request never waits for the longest one already decoding.

Each round of the worker loop:

1. *admit*: the rows waiting (up to ``max_batch_size`` rows decoding in all; once they fill the
   free places or the oldest has waited ``max_wait_ms``, as a static batch closes) leave the queue
   together: classification rows run at once (one forward each group, between decode steps), and
   generation rows open as new decode groups (``backend.open_groups``). Rows that arrive together
   still share a group and so one batched forward per step, as with the static :class:`Batcher`.
2. *advance*: every open group makes one token (a new group's first step is its prefill).
3. *answer*: every row that ended in this round (EOS, stop string, budget, client gone) gets its
   result at once; groups with no row left are dropped.

A group's passes are the ones static batching runs for the same rows (its rows stay in it, fed EOS
once ended, until the whole group is done), only interleaved with other groups' passes; so every
row's numbers are what the static batcher gives for the same arrivals, and batch-invariant rows are
bit-identical alone or beside anything. A row whose request was cancelled (its client went away) is
dropped from its group before the next step.

The backend needs ``classify(rows)`` and ``open_groups(rows)``, returning objects with ``step()``
(``[(position in rows, result), ...]`` for the rows that ended), ``drop(position)``, ``live``,
``started`` and ``finished`` (:class:`~lopa.serve.backends.decode_group.DecodeGroup`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

from .batcher import Batcher, _Item

log = logging.getLogger("lopa.serve")


@dataclass
class _Open:
    """An open decode group and the queue items it answers (its positions index ``items``)."""

    group: Any
    items: list[_Item]


def _step_all(groups: Sequence[Any]) -> list[list[tuple[int, Any]] | Exception]:
    """One token for every group, in the worker thread; a failing group gives its exception, not the others'."""
    out: list[list[tuple[int, Any]] | Exception] = []
    for g in groups:
        try:
            out.append(g.step())
        except Exception as e:
            out.append(e)
    return out


def _settle(item: _Item, result: Any = None, error: BaseException | None = None) -> None:
    if item.future.done():  # cancelled: the client went away
        return
    if error is not None:
        item.future.set_exception(error)
    else:
        item.future.set_result(result)


class ContinuousBatcher(Batcher):
    """A :class:`Batcher` (same ``submit``, ``close``, limits, stats and metrics) that schedules
    generation rows continuously; see the module's text. ``max_batch_size`` bounds the rows decoding
    at once (and each admission); ``max_wait_ms`` is how long new rows may wait for company before
    they start (see :meth:`_due`)."""

    def __init__(self, backend: Any, *args: Any, **kwargs: Any):
        super().__init__(backend, *args, **kwargs)
        self._open: list[_Open] = []
        self.stats["rounds"] = 0

    @property
    def running(self) -> int:
        """Rows decoding now."""
        return sum(o.group.live for o in self._open)

    @property
    def held(self) -> int:
        """Rows in open groups, ended ones included: each is still computed (fed EOS) at every step of its group."""
        return sum(len(o.group.members) for o in self._open)

    async def _run(self) -> None:
        while True:
            if not self._pending and not self._open:
                if self._closing:
                    return
                await self._wait(None)
                continue
            if not self._open:  # idle: let the first rows gather company, as the static batcher does
                await self._fill()
            try:
                if self._due():
                    await self._admit()
                if self._open:
                    await self._advance()
            except Exception as e:  # never let the loop die: queued rows would wait for ever
                log.exception("a scheduling round failed")
                for o in self._open:
                    for it in o.items:
                        _settle(it, error=e)
                self._open = []

    def _due(self) -> bool:
        """Whether the waiting rows start in this round. While groups decode, new rows wait as the static
        batcher's batch does: until they fill the free places or the oldest has waited ``max_wait``. So
        rows arriving a few steps apart share one group instead of each opening its own (a decode step
        costs a group about as much for one row as for many)."""
        if not self._pending:
            return False
        if not self._open:
            return True
        waited = asyncio.get_running_loop().time() - self._pending[0].enqueued
        return waited >= self.max_wait or len(self._pending) >= self.max_batch_size - self.held

    def _take(self) -> tuple[list[_Item], list[_Item]]:
        """The waiting rows to start now, in arrival order: classification rows (one batch) and
        generation rows (as many as free decoding places); the others keep their place in the queue."""
        classify: list[_Item] = []
        generate: list[_Item] = []
        keep: deque[_Item] = deque()
        free = self.max_batch_size - self.held
        while self._pending and (len(classify) < self.max_batch_size or len(generate) < free):
            it = self._pending.popleft()
            if it.future.done():  # the client went away while it waited
                continue
            if it.kind == "classify" and len(classify) < self.max_batch_size:
                classify.append(it)
            elif it.kind == "generate" and len(generate) < free:
                generate.append(it)
            else:
                keep.append(it)
        self._pending.extendleft(reversed(keep))
        return classify, generate

    async def _admit(self) -> None:
        classify, generate = self._take()
        if classify:
            await self._execute(classify)  # the static batcher's path: one call, rows retried alone on failure
        if generate:
            self._count("generate", len(generate))
            await self._open_groups(generate)

    async def _open_groups(self, items: list[_Item]) -> None:
        """Open the decode groups of ``items``; if that fails, each row alone, so one bad row fails only itself."""
        loop = asyncio.get_running_loop()
        try:
            groups = await loop.run_in_executor(self._executor, self.backend.open_groups, [it.row for it in items])
        except Exception as e:
            if len(items) == 1:
                _settle(items[0], error=e)
                return
            log.warning("opening %d generation rows failed; retrying them one by one", len(items), exc_info=True)
            for it in items:
                await self._open_groups([it])
            return
        self._open += [_Open(g, items) for g in groups]

    async def _advance(self) -> None:
        """Drop the rows whose clients left, make one token in every group, answer the rows that ended."""
        for o in self._open:
            for p in o.group.members:
                if o.items[p].future.done():
                    o.group.drop(p)
        loop = asyncio.get_running_loop()
        current = self._open
        outcomes = await loop.run_in_executor(self._executor, _step_all, [o.group for o in current])
        self.stats["rounds"] += 1
        failed: list[tuple[_Open, Exception]] = []
        for o, outcome in zip(current, outcomes):
            if isinstance(outcome, Exception):
                failed.append((o, outcome))
                continue
            for p, result in outcome:
                _settle(o.items[p], result)
        gone = {id(o) for o, _ in failed}
        self._open = [o for o in self._open if not o.group.finished and id(o) not in gone]
        for o, error in failed:
            await self._failed(o, error)

    async def _failed(self, o: _Open, error: Exception) -> None:
        """A group's step raised. Before its prefill ran (nothing streamed yet) its rows retry one by
        one, as the static batcher retries a failed batch; after, its unfinished rows get the error."""
        rows = [o.items[p] for p in o.group.members if not o.items[p].future.done()]
        if not o.group.started and len(rows) > 1:
            log.warning("a decode group of %d rows failed; retrying them one by one", len(rows), exc_info=error)
            for it in rows:
                await self._open_groups([it])
            return
        log.error("a decode group failed", exc_info=error)
        for it in rows:
            _settle(it, error=error)
