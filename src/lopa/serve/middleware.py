"""ASGI middleware in front of the app: API key (401), body size (413), body read timeout (408),
per-request metrics, and a last answer for anything the app did not handle (500).

Every refusal here that leaves unread bytes on the socket (413, 408) or follows an unknown failure
(500) says ``Connection: close`` and the server then closes it: the client knows not to reuse it,
instead of finding it dead on its next request.

Example (a key is required on ``/v1/``, not on ``/health``)::

    >>> from fastapi import FastAPI
    >>> from fastapi.testclient import TestClient
    >>> app = FastAPI()
    >>> _ = app.post("/v1/echo")(lambda: {"ok": True})
    >>> _ = app.get("/health")(lambda: {"ok": True})
    >>> app.add_middleware(Guard, cfg=ServeConfig(model="m", api_key="k"), metrics=Metrics(), endpoints={"/v1/echo"})
    >>> http = TestClient(app)
    >>> http.post("/v1/echo").status_code, http.post("/v1/echo", headers={"X-API-Key": "k"}).status_code
    (401, 200)
    >>> http.get("/health").status_code
    200
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any, Awaitable, Callable

from .config import MiB, ServeConfig
from .errors import error_body
from .metrics import Metrics


log = logging.getLogger("lopa.serve")

CLOSE = [(b"connection", b"close")]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


async def send_json(send: Send, status: int, payload: dict[str, Any],
                    extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(payload, ensure_ascii=True).encode("ascii")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *(extra_headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: API key (401), body size (413), body timeout (408), metrics, and 500s.

    The body is read here, at most ``max_body_bytes`` of it, and replayed to the app, so an oversized
    body never reaches the JSON parser. The excess of a refused body is read and dropped (up to a cap)
    so that the client, still sending, gets the 413 instead of a broken connection. Each wait for
    the next piece of the body is bounded by ``body_timeout_s``: a client that announces more than
    it sends gets 408 instead of holding the connection and a request slot forever.
    """

    def __init__(self, app: Any, cfg: ServeConfig, metrics: Metrics, endpoints: set[str]):
        self.app, self.cfg, self.metrics, self.endpoints = app, cfg, metrics, endpoints
        self.key = cfg.api_key.encode() if cfg.api_key else None

    def _auth_error(self, scope: dict) -> str | None:
        headers = dict(scope.get("headers") or [])
        auth, xkey = headers.get(b"authorization"), headers.get(b"x-api-key")
        given = None
        if auth is not None:
            scheme, _, token = auth.partition(b" ")
            given = token.strip() if scheme.lower() == b"bearer" else None
        if given is None and xkey is not None:
            given = xkey.strip()
        if not given:
            return "missing API key: send the header 'Authorization: Bearer YOUR_KEY' or 'X-API-Key: YOUR_KEY'"
        if not hmac.compare_digest(given, self.key or b""):
            return "invalid API key"
        return None

    async def _next(self, receive: Receive) -> dict | None:
        """The next ASGI message, or None when the client sent nothing for ``body_timeout_s``."""
        try:
            return await asyncio.wait_for(receive(), self.cfg.body_timeout_s)
        except asyncio.TimeoutError:
            return None

    async def _read_body(self, scope: dict, receive: Receive) -> bytes | str:
        """The whole body, or why not: "too_large", "timeout", or "gone" (the client disconnected)."""
        limit = self.cfg.max_body_bytes
        drain_cap = max(4 * limit, 64 * MiB)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._drain(receive, drain_cap)
            return "too_large"
        chunks, size = [], 0
        while True:
            message = await self._next(receive)
            if message is None:
                return "timeout"
            if message["type"] == "http.disconnect":
                return "gone"
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._drain(receive, drain_cap - size)
                return "too_large"
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _drain(self, receive: Receive, budget: int) -> None:
        while budget > 0:
            message = await self._next(receive)
            if message is None or message["type"] != "http.request" or not message.get("more_body", False):
                return
            budget -= len(message.get("body", b""))

    async def _refuse_body(self, why: str, send: Send, state: dict) -> None:
        if why == "too_large":
            state["error_type"] = "request_too_large"
            await send_json(send, 413, error_body(
                f"the request body is larger than this server's limit of {self.cfg.max_body_bytes} bytes "
                f"(--max-body-bytes)", "request_too_large"), CLOSE)
        else:
            state["error_type"] = "timeout_error"
            await send_json(send, 408, error_body(
                f"the request body did not arrive: nothing came for {self.cfg.body_timeout_s:g} s "
                f"(--body-timeout-s); is Content-Length larger than the body?", "timeout_error"), CLOSE)

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path = scope.get("path", "")
        endpoint = path if path in self.endpoints else "other"
        state = scope.setdefault("state", {})
        status = [500]
        started = [False]

        async def send_and_note(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0], started[0] = message["status"], True
                if message["status"] >= 500 and message["status"] != 503:  # 503 is a state, not a fault
                    message = {**message, "headers": [*message.get("headers", []), *CLOSE]}
            await send(message)

        try:
            if self.key is not None and path.startswith("/v1/"):
                problem = self._auth_error(scope)
                if problem is not None:
                    state["error_type"] = "authentication_error"
                    await send_json(send_and_note, 401, error_body(problem, "authentication_error"),
                                    [(b"www-authenticate", b"Bearer")])
                    return
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                body = await self._read_body(scope, receive)
                if body == "gone":
                    status[0] = 499  # nginx's "client closed request"
                    return
                if isinstance(body, str):
                    await self._refuse_body(body, send_and_note, state)
                    return
                receive = _replay(body, receive)
            await self._run_app(scope, receive, send_and_note, started, state)
        finally:
            self.metrics.observe_request(endpoint, status[0], time.perf_counter() - start, state.get("error_type"))

    async def _run_app(self, scope: dict, receive: Receive, send: Send, started: list[bool], state: dict) -> None:
        """The app; an exception it did not answer becomes a 500 that closes the connection cleanly."""
        try:
            await self.app(scope, receive, send)
        except Exception as exc:
            if started[0]:  # half an answer is out: only dropping the connection can tell the client
                raise
            log.exception("internal error on %s", scope.get("path"))
            state["error_type"] = "server_error"
            await send_json(send, 500, error_body(f"internal server error ({type(exc).__name__}); see the server log",
                                                  "server_error"))


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # only a disconnect can come after the body

    return replay
