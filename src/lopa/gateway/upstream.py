"""Talking to the upstream ``lopa serve``: its ``/health``, a JSON request, or a stream of events.

Every failure becomes an :class:`~lopa.serve.errors.APIError` the gateway answers with: an upstream
that cannot be reached is a 502, one that does not answer in time a 504, one that refuses the
gateway's own key a 502 that says so. The upstream's answers to a bad request (400, 413, 422) and
its 503 (overloaded, shutting down) go to the client unchanged: they are about the request.

Example (nothing listens on port 9 of this machine)::

    >>> import asyncio
    >>> async def down():
    ...     up = Upstream("http://127.0.0.1:9", connect_timeout=1)
    ...     try:
    ...         await up.health()
    ...     except APIError as e:
    ...         return e.status, e.message.startswith("the upstream lopa server at http://127.0.0.1:9 cannot be reached")
    ...     finally:
    ...         await up.close()
    >>> asyncio.run(down())
    (502, True)
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import httpx

from ..lanes import AsyncLanes
from ..serve.errors import APIError

PASSED_THROUGH = {400, 408, 413, 422, 429, 503}  # about the request or the upstream's load: the client's to see
HEALTH_TIMEOUT_S = 5.0


def _headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def transport_error(exc: httpx.HTTPError, url: str, timeout: float) -> APIError:
    """A request that got no answer: 504 when time ran out, 502 when the upstream cannot be reached."""
    if isinstance(exc, httpx.ConnectTimeout):
        return APIError(504, f"the upstream lopa server at {url} did not accept a connection in time "
                             f"(--connect-timeout); the gateway keeps serving and tries again on the next request",
                        "timeout_error")
    if isinstance(exc, httpx.TimeoutException):
        return APIError(504, f"the upstream lopa server at {url} did not answer within {timeout:g} s "
                             f"(--upstream-timeout)", "timeout_error")
    return APIError(502, f"the upstream lopa server at {url} cannot be reached ({type(exc).__name__}: {exc}); "
                         f"the gateway keeps serving and tries again on the next request", "upstream_error")


def status_error(status: int, data: Any, text: str, url: str) -> APIError:
    """The upstream answered ``status`` >= 400: the error the client gets.

    >>> e = status_error(401, {"error": {"message": "invalid API key"}}, "", "http://up")
    >>> e.status, e.message
    (502, "the upstream lopa server at http://up refused the gateway's key (upstream said: invalid API key); check --upstream-key")
    >>> e = status_error(422, {"error": {"message": "n: too big", "type": "invalid_request_error", "param": "n"}}, "", "u")
    >>> e.status, e.message, e.param
    (422, 'n: too big', 'n')
    """
    err = data.get("error") if isinstance(data, dict) else None
    err = err if isinstance(err, dict) else {}
    message = str(err.get("message") or text[:500] or f"HTTP {status}")
    if status in PASSED_THROUGH:
        return APIError(status, message, str(err.get("type") or "invalid_request_error"), err.get("param"))
    if status in (401, 403):
        return APIError(502, f"the upstream lopa server at {url} refused the gateway's key (upstream said: "
                             f"{message}); check --upstream-key", "upstream_error")
    return APIError(502, f"the upstream lopa server at {url} answered {status}: {message}", "upstream_error")


class Upstream:
    """HTTP connections to one ``lopa serve``; ``info`` holds its last ``/health`` answer.

    Requests answered in one piece, the gateway's main load, go through lanes of one connection each
    (:mod:`lopa.lanes`): through one httpx pool of ``max_connections`` connections, each request cost
    the gateway more CPU than the upstream spent on it. Streams and ``/health`` share an ordinary pool
    of up to ``max_connections``: a stream holds its connection for the whole answer, so the pool's cost
    per request is small beside it.
    """

    def __init__(self, url: str, key: str | None = None, *, timeout: float = 120.0, connect_timeout: float = 5.0,
                 max_connections: int = 64):
        self.url, self.timeout = url.rstrip("/"), timeout
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        headers, http_timeout = _headers(key), httpx.Timeout(timeout, connect=connect_timeout, pool=None)
        self.http = httpx.AsyncClient(base_url=self.url, headers=headers, limits=limits, timeout=http_timeout)
        self.lanes = AsyncLanes(max_connections, lambda one: httpx.AsyncClient(
            base_url=self.url, headers=headers, limits=one, timeout=http_timeout))
        self.info: dict[str, Any] | None = None
        self.last_error: str | None = None

    async def close(self) -> None:
        await self.http.aclose()
        await self.lanes.aclose()

    def _failed(self, exc: httpx.HTTPError) -> APIError:
        err = transport_error(exc, self.url, self.timeout)
        self.last_error = err.message
        return err

    async def health(self) -> dict[str, Any]:
        """The upstream's ``/health`` (kept in ``info``), within a few seconds at most."""
        try:
            r = await self.http.get("/health", timeout=httpx.Timeout(min(self.timeout, HEALTH_TIMEOUT_S),
                                                                     connect=self.http.timeout.connect))
        except httpx.HTTPError as e:
            raise self._failed(e) from None
        self.info = _json_answer(r, self.url, "/health")
        self.last_error = None
        return self.info

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` and return the upstream's JSON answer."""
        try:
            async with self.lanes.lease() as http:
                r = await http.post(path, json=body)
        except httpx.HTTPError as e:
            raise self._failed(e) from None
        return _json_answer(r, self.url, path)

    async def stream(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """POST ``body`` and return the open streaming answer (status 200; an error status is raised
        here, before the client's own answer begins). Read it with :meth:`lines`."""
        request = self.http.build_request("POST", path, json=body)
        try:
            r = await self.http.send(request, stream=True)
        except httpx.HTTPError as e:
            raise self._failed(e) from None
        if r.status_code != 200:
            try:
                await r.aread()
            except httpx.HTTPError as e:
                raise self._failed(e) from None
            finally:
                await r.aclose()
            raise status_error(r.status_code, _try_json(r), r.text, self.url)
        return r

    async def lines(self, r: httpx.Response) -> AsyncIterator[str]:
        """The lines of a streaming answer; a broken or stalled stream raises :class:`APIError`."""
        try:
            async for line in r.aiter_lines():
                yield line
        except httpx.HTTPError as e:
            raise self._failed(e) from None
        finally:
            await r.aclose()


def _try_json(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return None


def _json_answer(r: httpx.Response, url: str, path: str) -> dict[str, Any]:
    data = _try_json(r)
    if r.status_code >= 400:
        raise status_error(r.status_code, data, r.text, url)
    if not isinstance(data, dict):
        raise APIError(502, f"the upstream at {url} answered {path} with something other than a JSON object; "
                            f"is it a lopa serve?", "upstream_error")
    return data


def probe(url: str, key: str | None = None, connect_timeout: float = 5.0) -> dict[str, Any]:
    """The upstream's ``/health``, synchronously (for the gateway's start); raises :class:`APIError`."""
    try:
        r = httpx.get(url.rstrip("/") + "/health", headers=_headers(key),
                      timeout=httpx.Timeout(HEALTH_TIMEOUT_S, connect=connect_timeout))
    except httpx.HTTPError as e:
        raise transport_error(e, url, HEALTH_TIMEOUT_S) from None
    return _json_answer(r, url, "/health")


__all__ = ["Upstream", "probe", "status_error", "transport_error"]
