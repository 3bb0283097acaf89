"""The HTTP server: one frozen model, any number of tasks, no per-task state.

Every request carries its own soft prompt (:mod:`lopa.serve.wire`); requests of all tasks meet in
one batcher (:mod:`lopa.serve.batcher`). Nothing here knows a generator or an artifact.

Endpoints (JSON; errors are ``{"error": {"message": ..., "type": ..., "param": ...}}``):

* ``POST /v1/classify``: ``{text | token_ids, soft_prompt, label_words}`` →
  ``{"logprobs": [...], "label": i, "label_word": w}``
* ``POST /v1/generate``: ``{text | token_ids, soft_prompt, max_new_tokens, temperature, top_p, stop,
  seed}`` → ``{"text": ..., "finish_reason": "stop" | "length"}``
* ``POST /v1/completions``: OpenAI's legacy completions, with ``soft_prompt`` as an extra body field
  (``openai`` client: ``extra_body={"soft_prompt": ...}``); ``GET /v1/models`` lists the one model.
* ``GET /health`` (model, width, limits) and ``GET /metrics`` (Prometheus text); both need no key.

With an API key configured, every ``/v1/`` call needs ``Authorization: Bearer KEY`` (what the
``openai`` client sends) or ``X-API-Key: KEY``. Bodies over ``max_body_bytes`` are refused (413)
before anything parses them.

Example::

    >>> from fastapi.testclient import TestClient
    >>> from lopa.serve.backends import TransformersBackend
    >>> from lopa.serve.wire import encode_soft_prompt
    >>> import torch
    >>> app = create_app(TransformersBackend("tiny-random-llama", dtype="float32"),
    ...                  ServeConfig(model="tiny-random-llama", dtype="float32"))
    >>> with TestClient(app) as http:
    ...     r = http.post("/v1/classify", json={"text": "Review: great\\nSentiment:", "label_words": [" bad", " good"],
    ...                                          "soft_prompt": encode_soft_prompt(torch.zeros(4, 64))})
    >>> r.status_code, sorted(r.json())
    (200, ['label', 'label_word', 'logprobs'])

From the command line: ``lopa serve --model smollm2-135m --port 8000``.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import hmac
import json
import logging
import math
import os
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from .backends import (BACKENDS, DTYPE_CHOICES, Backend, BackendError, ClassifyRow, Completion, GenerateRow,
                       check_backend_name, classification_result, make_backend)
from .batcher import Batcher, BatcherClosed, BatcherFull, torch_threads_init
from .wire import WireError, decode_soft_prompt

log = logging.getLogger("lopa.serve")

MiB = 1024 * 1024
MAX_LABELS = 1000
MAX_STOP = 16
LONG_TEXT = 10_000  # characters; longer texts are tokenised off the event loop


@dataclass
class ServeConfig:
    """Serve a frozen causal LM over HTTP. Clients send their own soft prompts, so one server holds
    no per-task weights and batches requests of any number of tasks together.

    Example: lopa serve --model smollm2-135m --port 8000 --api-key "$KEY"
    """

    model: str = "smollm2-135m"
    """the frozen base model: a short name (smollm2-135m, gemma3-270m, tiny-random-llama), hub id or local path"""
    host: str = "127.0.0.1"
    """interface to listen on (0.0.0.0 for every interface: set an API key then)"""
    port: int = 8000
    """TCP port to listen on"""
    api_key: str | None = field(default=None, repr=False)
    """require this key on /v1/* (Authorization: Bearer KEY or X-API-Key: KEY); default $LOPA_API_KEY, unset: no key"""
    dtype: str = field(default="auto", metadata={"choices": list(DTYPE_CHOICES)})
    """model dtype; auto = bfloat16 on a GPU or a CPU where native bf16 (AMX; AVX512-BF16 if a timed matmul says so) beats float32, float32 elsewhere"""
    device: str = "auto"
    """where the model runs: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ..."""
    backend: str = field(default="transformers", metadata={"choices": list(BACKENDS)})
    """what runs the model: transformers (in this process) or vllm (prompt_embeds into vLLM's continuous batching; pip install 'lopa[vllm]')"""
    max_batch_size: int = 32
    """the most requests (of any tasks) run together in one batch"""
    max_wait_ms: float = 5.0
    """how long a request may wait for others to fill its batch (vllm: unused, requests join its running batch)"""
    max_soft_tokens: int = 64
    """the most virtual tokens (m) a soft prompt may have"""
    max_prompt_tokens: int = 2048
    """the most text tokens a prompt may have (the soft prompt not counted)"""
    max_new_tokens: int = 256
    """the most tokens one generation may ask for"""
    max_body_bytes: int = 8 * MiB
    """requests with larger bodies are refused (413) before parsing"""
    threads: int | None = None
    """PyTorch CPU threads for the model (default: PyTorch's choice, one per core); 1 suits tiny models on busy machines"""
    log_level: str = field(default="info", metadata={"choices": ["critical", "error", "warning", "info", "debug"]})
    """server log level (info logs every request)"""

    def __post_init__(self) -> None:
        if not self.api_key:  # an empty --api-key means none, like an unset variable
            self.api_key = os.environ.get("LOPA_API_KEY") or None
        if not self.model:
            raise ValueError("model must name a causal LM")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {list(DTYPE_CHOICES)}, got {self.dtype!r}")
        try:
            check_backend_name(self.backend)
        except BackendError as e:
            raise ValueError(str(e)) from None
        for name, lo, hi in (("port", 0, 65535), ("max_batch_size", 1, 4096), ("max_soft_tokens", 1, 1 << 16),
                             ("max_prompt_tokens", 1, 1 << 24), ("max_new_tokens", 1, 1 << 20),
                             ("max_body_bytes", 1024, 1 << 34)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or not 1 <= self.threads <= 1024):
            raise ValueError(f"threads must be an integer in [1, 1024], got {self.threads!r}")
        if isinstance(self.max_wait_ms, bool) or not isinstance(self.max_wait_ms, (int, float)) \
                or not math.isfinite(self.max_wait_ms) or not 0 <= self.max_wait_ms <= 10_000:
            raise ValueError(f"max_wait_ms must be a number in [0, 10000], got {self.max_wait_ms!r}")


# -- errors ----------------------------------------------------------------------------------------

class APIError(Exception):
    """An error answer: HTTP status, a message for the user, an OpenAI-style type and the field at fault."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param


_TYPE_OF_STATUS = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                   405: "invalid_request_error", 413: "request_too_large", 422: "invalid_request_error",
                   503: "overloaded_error"}


def _error_body(message: str, type: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param}}


def _error_response(request: Request, status: int, message: str, type: str | None = None,
                    param: str | None = None) -> JSONResponse:
    type = type or _TYPE_OF_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    request.state.error_type = type  # read back by the metrics in _Guard
    return JSONResponse(_error_body(message, type, param), status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """Pydantic's error list as one readable line, e.g. ``body.max_new_tokens: Input should be ...``."""
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
        where = ".".join(loc) or "body"
        param = param or (loc[0] if loc else None)
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request", param


# -- metrics ---------------------------------------------------------------------------------------

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, total = [], 0
        for b, c in zip([*map(str, map(float, self.buckets)), "+Inf"], self.counts):
            total += c
            out.append(f'{name}_bucket{{{labels},le="{b}"}} {total}')
        out += [f"{name}_sum{{{labels}}} {self.sum}", f"{name}_count{{{labels}}} {self.count}"]
        return out


class Metrics:
    """Counters and histograms in the Prometheus text format (no dependency; labels are fixed sets)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.batch: dict[str, _Histogram] = {}

    def observe_request(self, endpoint: str, status: int, seconds: float, error_type: str | None) -> None:
        with self._lock:
            self.requests[endpoint, status] = self.requests.get((endpoint, status), 0) + 1
            self.latency.setdefault(endpoint, _Histogram(LATENCY_BUCKETS)).observe(seconds)
            if status >= 400:
                etype = error_type or _TYPE_OF_STATUS.get(status, "server_error" if status >= 500 else "client_error")
                self.errors[endpoint, etype] = self.errors.get((endpoint, etype), 0) + 1

    def observe_batch(self, kind: str, size: int) -> None:
        with self._lock:
            self.batch.setdefault(kind, _Histogram(BATCH_BUCKETS)).observe(size)

    def render(self, queue_depth: int = 0) -> str:
        with self._lock:
            lines = ["# HELP lopa_requests_total HTTP requests by endpoint and status code.",
                     "# TYPE lopa_requests_total counter"]
            lines += [f'lopa_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += ["# HELP lopa_errors_total Error answers by endpoint and error type.",
                      "# TYPE lopa_errors_total counter"]
            lines += [f'lopa_errors_total{{endpoint="{e}",type="{t}"}} {n}' for (e, t), n in sorted(self.errors.items())]
            lines += ["# HELP lopa_request_duration_seconds Time from request to answer, by endpoint.",
                      "# TYPE lopa_request_duration_seconds histogram"]
            for e, h in sorted(self.latency.items()):
                lines += h.lines("lopa_request_duration_seconds", f'endpoint="{e}"')
            lines += ["# HELP lopa_batch_size Rows per backend call, by kind (classify or generate).",
                      "# TYPE lopa_batch_size histogram"]
            for k, h in sorted(self.batch.items()):
                lines += h.lines("lopa_batch_size", f'kind="{k}"')
            lines += ["# HELP lopa_queue_depth Requests waiting for a batch.", "# TYPE lopa_queue_depth gauge",
                      f"lopa_queue_depth {queue_depth}"]
        return "\n".join(lines) + "\n"


# -- the guard: key and body size, before anything parses ------------------------------------------

async def _send_json(send: Callable[[dict], Awaitable[None]], status: int, payload: dict[str, Any],
                     extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *(extra_headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Guard:
    """ASGI middleware: API key (401), body size (413) and per-request metrics.

    The body is read here, at most ``max_body_bytes`` of it, and replayed to the app, so an oversized
    body never reaches the JSON parser. The excess of a refused body is read and dropped (up to a cap)
    so that the client, still sending, gets the 413 instead of a broken connection.
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

    async def _read_body(self, scope: dict, receive: Callable[[], Awaitable[dict]]) -> bytes | str | None:
        """The whole body; None when it is too large; "gone" when the client disconnected."""
        limit = self.cfg.max_body_bytes
        drain_cap = max(4 * limit, 64 * MiB)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._drain(receive, drain_cap)
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return "gone"
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._drain(receive, drain_cap - size)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    async def _drain(receive: Callable[[], Awaitable[dict]], budget: int) -> None:
        while budget > 0:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            budget -= len(message.get("body", b""))

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path = scope.get("path", "")
        endpoint = path if path in self.endpoints else "other"
        state = scope.setdefault("state", {})
        status = [500]

        async def send_and_note(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.key is not None and path.startswith("/v1/"):
                problem = self._auth_error(scope)
                if problem is not None:
                    state["error_type"] = "authentication_error"
                    await _send_json(send_and_note, 401, _error_body(problem, "authentication_error"),
                                     [(b"www-authenticate", b"Bearer")])
                    return
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                body = await self._read_body(scope, receive)
                if body == "gone":
                    status[0] = 499  # nginx's "client closed request"
                    return
                if body is None:
                    state["error_type"] = "request_too_large"
                    await _send_json(send_and_note, 413, _error_body(
                        f"the request body is larger than this server's limit of {self.cfg.max_body_bytes} bytes "
                        f"(--max-body-bytes)", "request_too_large"), [(b"connection", b"close")])
                    return
                receive = _replay(body, receive)  # type: ignore[arg-type]
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.observe_request(endpoint, status[0], time.perf_counter() - start, state.get("error_type"))


def _replay(body: bytes, receive: Callable[[], Awaitable[dict]]) -> Callable[[], Awaitable[dict]]:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # only a disconnect can come after the body

    return replay


# -- request schemas -------------------------------------------------------------------------------

class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored

    text: StrictStr | None = None
    """the prompt as text (tokenised by the server without special tokens); or give token_ids"""
    token_ids: list[StrictInt] | None = None
    """the prompt as token ids of the server's tokenizer; or give text"""
    soft_prompt: Any = None
    """{"dtype", "shape": [m, d], "data": base64}: see lopa.serve.wire"""


class ClassifyRequest(_Request):
    label_words: list[StrictStr] = Field(min_length=2, max_length=MAX_LABELS)
    """one word per class (leading space kept); each is scored by its first token"""


class GenerateRequest(_Request):
    max_new_tokens: StrictInt = 64
    temperature: float = Field(0.0, ge=0.0, le=100.0, allow_inf_nan=False)
    """0 = greedy"""
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: list[StrictStr] | None = Field(None, max_length=MAX_STOP)
    seed: StrictInt | None = Field(None, ge=0, lt=2 ** 63)


class CompletionRequest(BaseModel):
    """OpenAI's ``/v1/completions`` body; fields it has and lopa does not are refused when set."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: StrictStr | list[StrictStr] | list[StrictInt]
    max_tokens: StrictInt | None = 16
    temperature: float | None = Field(1.0, ge=0.0, le=100.0, allow_inf_nan=False)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt | None = 1
    seed: StrictInt | None = Field(None, ge=0, lt=2 ** 63)
    soft_prompt: Any = None


# OpenAI fields lopa cannot honour, and the value that means "not used"
_UNSUPPORTED = {"stream": (False, None), "echo": (False, None), "logprobs": (None, 0), "best_of": (None, 1),
                "suffix": (None, ""), "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
                "logit_bias": (None, {})}
_IGNORED = {"user", "stream_options"}


# -- the app ---------------------------------------------------------------------------------------

def create_app(backend: Backend, cfg: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``backend`` with the limits and key of ``cfg``.

    The batcher starts and stops with the app (its lifespan): on shutdown every request already
    queued is answered before the worker thread stops.
    """
    cfg = cfg or ServeConfig(model=backend.model_name)
    metrics = Metrics()
    make_batcher = getattr(backend, "make_batcher", None)  # a backend that batches continuously itself (vllm)
    batcher = make_batcher() if make_batcher is not None else \
        Batcher(backend, cfg.max_batch_size, cfg.max_wait_ms, on_batch=metrics.observe_batch,
                worker_init=torch_threads_init())
    started = int(time.time())
    dtype_name = str(backend.dtype).removeprefix("torch.")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        try:
            yield
        finally:
            await batcher.close()

    app = FastAPI(title="lopa", summary="one frozen model, any number of soft-prompted tasks", lifespan=lifespan)
    app.state.batcher, app.state.metrics, app.state.backend = batcher, metrics, backend

    # -- error answers ---------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(request, exc.status, exc.message, exc.type, exc.param)

    @app.exception_handler(WireError)
    async def _wire_error(request: Request, exc: WireError) -> JSONResponse:
        return _error_response(request, exc.status, exc.message, param="soft_prompt")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error_response(request, 422, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no endpoint {request.method} {request.url.path}; see GET /docs"
        return _error_response(request, exc.status_code, message)

    @app.exception_handler(BatcherClosed)
    async def _closing(request: Request, exc: BatcherClosed) -> JSONResponse:
        return _error_response(request, 503, str(exc), "unavailable_error")

    @app.exception_handler(BatcherFull)
    async def _full(request: Request, exc: BatcherFull) -> JSONResponse:
        return _error_response(request, 503, str(exc), "overloaded_error")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return _error_response(request, 500, f"internal server error ({type(exc).__name__}); see the server log",
                               "server_error")

    # -- shared checks ---------------------------------------------------------------------------
    @functools.lru_cache(maxsize=4096)
    def label_ids(words: tuple[str, ...]) -> tuple[int, ...]:
        try:
            return tuple(backend.label_token_ids(words))
        except ValueError as e:
            raise APIError(400, str(e), param="label_words") from None

    async def prompt_ids(text: str | None, token_ids: list[int] | None) -> list[int]:
        if (text is None) == (token_ids is None):
            raise APIError(400, "give exactly one of text or token_ids", param="text")
        if token_ids is not None:
            bad = next((t for t in token_ids if not 0 <= t < backend.vocab_size), None)
            if bad is not None:
                raise APIError(400, f"token id {bad} is outside the vocabulary [0, {backend.vocab_size})",
                               param="token_ids")
            ids = list(token_ids)
        elif len(text) > LONG_TEXT:  # tokenising megabytes would stall every other request
            ids = await asyncio.to_thread(backend.tokenize, text)
        else:
            ids = backend.tokenize(text)
        if len(ids) > cfg.max_prompt_tokens:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this server accepts at most "
                                f"{cfg.max_prompt_tokens} (--max-prompt-tokens)", param="text" if text else "token_ids")
        return ids

    def soft(obj: Any) -> torch.Tensor:
        if obj is None:
            raise APIError(400, "soft_prompt is required: {\"dtype\": ..., \"shape\": [m, d], \"data\": base64}",
                           param="soft_prompt")
        return decode_soft_prompt(obj, hidden_size=backend.hidden_size, max_soft_tokens=cfg.max_soft_tokens,
                                  out_dtype=backend.dtype)

    def check_new_tokens(n: int, name: str) -> None:
        if not 1 <= n <= cfg.max_new_tokens:
            raise APIError(400, f"{name} is {n}; this server allows 1 to {cfg.max_new_tokens} (--max-new-tokens)",
                           param=name)

    def check_stop(stop: list[str]) -> tuple[str, ...]:
        if len(stop) > MAX_STOP or any(not s or len(s) > 256 for s in stop):
            raise APIError(400, f"stop takes at most {MAX_STOP} non-empty strings of up to 256 characters",
                           param="stop")
        return tuple(stop)

    # -- endpoints -------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": backend.model_name, "hidden_size": backend.hidden_size,
                "max_soft_tokens": cfg.max_soft_tokens, "max_prompt_tokens": cfg.max_prompt_tokens,
                "max_new_tokens": cfg.max_new_tokens, "dtype": dtype_name, "backend": cfg.backend}

    @app.get("/metrics")
    async def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(batcher.queue_depth), media_type="text/plain; version=0.0.4")

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest) -> dict[str, Any]:
        """Log-probabilities of each label word's first token after ``[soft prompt ; prompt]``."""
        ids = await prompt_ids(req.text, req.token_ids)
        z = soft(req.soft_prompt)
        labels = label_ids(tuple(req.label_words))
        logprobs = await batcher.submit("classify", ClassifyRow(ids, z, list(labels)))
        return classification_result(logprobs, req.label_words)

    @app.post("/v1/generate")
    async def generate(req: GenerateRequest) -> dict[str, Any]:
        """A completion of ``[soft prompt ; prompt]``: greedy at temperature 0, else sampled."""
        check_new_tokens(req.max_new_tokens, "max_new_tokens")
        ids = await prompt_ids(req.text, req.token_ids)
        z = soft(req.soft_prompt)
        row = GenerateRow(ids, z, req.max_new_tokens, req.temperature, req.top_p, check_stop(req.stop or []),
                          req.seed)
        out: Completion = await batcher.submit("generate", row)
        return {"text": out.text, "finish_reason": out.finish_reason}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": backend.model_name, "object": "model", "created": started,
                                            "owned_by": "lopa"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> dict[str, Any]:
        """OpenAI-compatible completion; the soft prompt rides in the extra body field ``soft_prompt``."""
        if req.model is not None and req.model != backend.model_name:
            raise APIError(404, f"model {req.model!r} is not served here; this server serves {backend.model_name!r}",
                           "not_found_error", "model")
        extra = req.model_extra or {}
        for name, value in extra.items():
            if name in _UNSUPPORTED:
                if value not in _UNSUPPORTED[name]:
                    raise APIError(400, f"{name}={value!r} is not supported by this server", param=name)
            elif name not in _IGNORED:
                raise APIError(400, f"unknown field {name!r}", param=name)
        if req.n not in (None, 1):
            raise APIError(400, f"n={req.n} is not supported: this server returns one choice per request", param="n")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, f"prompt holds {len(prompt)} strings; send one prompt per request", param="prompt")
            prompt = prompt[0]
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        check_new_tokens(max_tokens, "max_tokens")
        ids = await prompt_ids(prompt, None) if isinstance(prompt, str) else await prompt_ids(None, list(prompt))
        z = soft(req.soft_prompt)
        stop = check_stop([req.stop] if isinstance(req.stop, str) else list(req.stop or []))
        temperature = 1.0 if req.temperature is None else req.temperature
        row = GenerateRow(ids, z, max_tokens, temperature, 1.0 if req.top_p is None else req.top_p, stop, req.seed)
        out: Completion = await batcher.submit("generate", row)
        prompt_tokens = len(ids) + int(z.shape[0])  # the virtual tokens occupy positions too
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": backend.model_name,
                "choices": [{"text": out.text, "index": 0, "finish_reason": out.finish_reason, "logprobs": None}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": out.completion_tokens,
                          "total_tokens": prompt_tokens + out.completion_tokens}}

    endpoints = {r.path for r in app.routes if hasattr(r, "path")}
    app.add_middleware(_Guard, cfg=cfg, metrics=metrics, endpoints=endpoints)
    return app


def serve(cfg: ServeConfig) -> int:
    """``lopa serve``: load the model, then answer HTTP until interrupted (Ctrl-C / SIGTERM finish
    the requests in flight first)."""
    import uvicorn

    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        backend = make_backend(cfg.backend, cfg.model, cfg.dtype, cfg.device, max_batch_size=cfg.max_batch_size,
                               max_model_len=cfg.max_soft_tokens + cfg.max_prompt_tokens + cfg.max_new_tokens)
    except BackendError as e:
        print(f"lopa serve: {e}", file=sys.stderr)
        return 2
    app = create_app(backend, cfg)
    if cfg.api_key is None and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key: anyone who can reach it can use it", cfg.host)
    print(f"lopa serve: {backend.model_name} (hidden size {backend.hidden_size}, "
          f"{str(backend.dtype).removeprefix('torch.')}) on http://{cfg.host}:{cfg.port}"
          f"{' (API key required)' if cfg.api_key else ''}", file=sys.stderr, flush=True)
    try:
        # keep-alive well above a batch's time: with uvicorn's 5 s default, a client's pooled connection could
        # be closed by the server just as the client reused it (a ReadError under load)
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=30,
                    timeout_keep_alive=75)
    finally:
        close = getattr(backend, "close", None)  # vllm: stop its engine processes
        if close is not None:
            close()
    return 0
