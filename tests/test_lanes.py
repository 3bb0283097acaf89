"""HTTP lanes against a real server on loopback: each lane keeps one connection, no more lanes open
than requests in flight, connections are reused, and closed lanes refuse clearly."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi import FastAPI, Request

from lopa.lanes import AsyncLanes, Lanes, LanesClosed
from serverproc import serve_in_thread


@pytest.fixture(scope="module")
def url():
    """A server that answers after a short wait with the client's own port: one port, one connection."""
    app = FastAPI()

    @app.get("/port")
    async def port(request: Request) -> dict[str, int]:
        await asyncio.sleep(0.02)  # requests overlap, so a pool that could open more connections would
        return {"port": request.client.port}

    srv, thread, base = serve_in_thread(app)
    yield base
    srv.should_exit = True
    thread.join(10)


def sync_lanes(n: int, base: str) -> Lanes:
    return Lanes(n, lambda limits: httpx.Client(base_url=base, limits=limits, timeout=10))


def test_threads_share_n_connections(url):
    lanes = sync_lanes(3, url)
    active, most = 0, 0
    lock = threading.Lock()

    def get(_: int) -> int:
        nonlocal active, most
        with lanes.lease() as http:
            with lock:
                active += 1
                most = max(most, active)
            try:
                return http.get("/port").json()["port"]
            finally:
                with lock:
                    active -= 1

    try:
        with ThreadPoolExecutor(8) as pool:
            ports = list(pool.map(get, range(40)))
    finally:
        lanes.close()
    assert len(ports) == 40
    assert most == 3  # eight threads, three lanes: the others waited for one
    assert len(set(ports)) == 3  # each lane kept its one connection for all its requests
    assert lanes.opened == 0


def test_sequential_requests_reuse_one_lane(url):
    lanes = sync_lanes(16, url)
    try:
        ports = []
        for _ in range(5):
            with lanes.lease() as http:
                ports.append(http.get("/port").json()["port"])
        assert lanes.opened == 1 and len(set(ports)) == 1
    finally:
        lanes.close()


def test_async_lanes_open_only_what_is_in_flight(url):
    async def main() -> tuple[list[int], int]:
        lanes = AsyncLanes(4, lambda limits: httpx.AsyncClient(base_url=url, limits=limits, timeout=10))

        async def get() -> int:
            async with lanes.lease() as http:
                return (await http.get("/port")).json()["port"]
        try:
            ports = await asyncio.gather(*(get() for _ in range(30)))
            return ports, lanes.opened
        finally:
            await lanes.aclose()

    ports, opened = asyncio.run(main())
    assert len(ports) == 30 and opened == 4
    assert len(set(ports)) == 4


def test_a_failed_request_gives_its_lane_back(url):
    lanes = sync_lanes(1, url)
    try:
        with pytest.raises(httpx.HTTPError):
            with lanes.lease() as http:
                http.get("http://127.0.0.1:9/nothing-listens", timeout=1)
        with lanes.lease() as http:  # the one lane is free again, not lost to the failure
            assert http.get("/port").status_code == 200
    finally:
        lanes.close()


def test_closed_lanes_refuse_and_bad_sizes_are_named(url):
    lanes = sync_lanes(2, url)
    lanes.close()
    with pytest.raises(LanesClosed, match="closed"):
        with lanes.lease():
            pass
    for n in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n >= 1"):
            Lanes(n, httpx.Client)
