"""HTTP clients lent out one request at a time, each holding a single connection of its own.

httpx's connection pool (httpcore 1.0) examines every connection it holds on every request: it
asks each one whether it has expired, which polls its socket and looks up its peer. With 64
keep-alive connections to one ``lopa serve``, a client spent about 7 ms of CPU per request on that
scan, measured against a server that answered in about 2. The client, not the server, was then the
bound: one Python process could not send more than 100-200 requests a second. (httpcore's own fix,
encode/httpcore#924, is not released.)

Lanes keep up to ``n`` clients of one connection each and lend a free one for each request. A
request then goes through a pool of one connection, however many requests are in flight. The
client most recently given back is lent first, so a light load reuses a few warm connections and
opens no more than it needs.

:class:`Lanes` is for threads (``httpx.Client``) and :class:`AsyncLanes` for one event loop
(``httpx.AsyncClient``). ``make(limits)`` builds a client and must pass ``limits`` on.

Example (a client per lane, made only when a request finds every lane busy)::

    >>> import httpx
    >>> def answer(request): return httpx.Response(200, json={"path": request.url.path})
    >>> lanes = Lanes(4, lambda limits: httpx.Client(transport=httpx.MockTransport(answer), limits=limits))
    >>> with lanes.lease() as http:
    ...     http.get("http://server/health").json()
    {'path': '/health'}
    >>> with lanes.lease() as http:
    ...     http.get("http://server/v1/models").json()["path"]
    '/v1/models'
    >>> lanes.opened  # the second request reused the first lane
    1
    >>> lanes.close()
"""

from __future__ import annotations

import asyncio
import queue
import threading
from contextlib import asynccontextmanager, contextmanager
from typing import AsyncIterator, Callable, Generic, Iterator, TypeVar

import httpx

# one connection per lane; keep-alive, so a lane keeps its connection between requests
ONE_CONNECTION = httpx.Limits(max_connections=1, max_keepalive_connections=1)

C = TypeVar("C")


class LanesClosed(RuntimeError):
    """A lease was asked of lanes that were closed."""


class _Count(Generic[C]):
    """The lanes' bookkeeping shared by both kinds: how many may exist, which exist."""

    def __init__(self, n: int, make: Callable[[httpx.Limits], C]):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"lanes need n >= 1 (the most requests in flight at once), got {n!r}")
        self.n, self._make = n, make
        self._clients: list[C] = []
        self._closed = False

    @property
    def opened(self) -> int:
        """Clients open now (at most ``n``; none once closed)."""
        return len(self._clients)

    def _check_open(self) -> None:
        if self._closed:
            raise LanesClosed("these HTTP lanes are closed")

    def _new(self) -> C | None:
        """A new client when fewer than ``n`` exist, else None."""
        self._check_open()
        if len(self._clients) >= self.n:
            return None
        client = self._make(ONE_CONNECTION)
        self._clients.append(client)
        return client


class Lanes(_Count[httpx.Client]):
    """Up to ``n`` ``httpx.Client`` s of one connection each, lent to one thread at a time.

    Args:
        n: the most clients, so the most requests in flight at once; a lease waits while all are lent.
        make: builds a client from the limits it must use (``ONE_CONNECTION``).
    """

    def __init__(self, n: int, make: Callable[[httpx.Limits], httpx.Client]):
        super().__init__(n, make)
        self._idle: queue.LifoQueue[httpx.Client] = queue.LifoQueue()
        self._lock = threading.Lock()

    def _take(self) -> httpx.Client:
        self._check_open()
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            client = self._new()
        return client if client is not None else self._idle.get()

    @contextmanager
    def lease(self) -> Iterator[httpx.Client]:
        """A client to make one request with; it goes back when the block ends."""
        client = self._take()
        try:
            yield client
        finally:
            self._idle.put(client)

    def close(self) -> None:
        """Close every client; a later lease raises :class:`LanesClosed`."""
        with self._lock:
            self._closed = True
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()


class AsyncLanes(_Count[httpx.AsyncClient]):
    """Up to ``n`` ``httpx.AsyncClient`` s of one connection each, lent to one task at a time; use them
    from one event loop.

    >>> import asyncio
    >>> def answer(request): return httpx.Response(200, text=request.url.path)
    >>> async def main():
    ...     lanes = AsyncLanes(2, lambda limits: httpx.AsyncClient(transport=httpx.MockTransport(answer),
    ...                                                            limits=limits))
    ...     async def get(path):
    ...         async with lanes.lease() as http:
    ...             return (await http.get("http://server" + path)).text
    ...     out = await asyncio.gather(*(get(f"/{i}") for i in range(5)))
    ...     await lanes.aclose()
    ...     return out, lanes.opened
    >>> asyncio.run(main())
    (['/0', '/1', '/2', '/3', '/4'], 0)
    """

    def __init__(self, n: int, make: Callable[[httpx.Limits], httpx.AsyncClient]):
        super().__init__(n, make)
        self._idle: asyncio.LifoQueue[httpx.AsyncClient] = asyncio.LifoQueue()

    async def _take(self) -> httpx.AsyncClient:
        self._check_open()
        if not self._idle.empty():
            return self._idle.get_nowait()
        client = self._new()
        return client if client is not None else await self._idle.get()

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[httpx.AsyncClient]:
        """A client to make one request with; it goes back when the block ends."""
        client = await self._take()
        try:
            yield client
        finally:
            self._idle.put_nowait(client)

    async def aclose(self) -> None:
        """Close every client; a later lease raises :class:`LanesClosed`."""
        self._closed = True
        clients, self._clients = self._clients, []
        for client in clients:
            await client.aclose()
