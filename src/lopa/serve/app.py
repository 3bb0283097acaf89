"""The HTTP API: thin routes over :mod:`~lopa.serve.checks`, the batcher and the backend.

Endpoints (JSON; errors are ``{"error": {"message": ..., "type": ..., "param": ...}}``):

* ``POST /v1/classify``: ``{text | token_ids, soft_prompt, label_words}`` →
  ``{"logprobs": [...], "label": i, "label_word": w}``
* ``POST /v1/generate``: ``{text | token_ids, soft_prompt, max_new_tokens, temperature, top_p, stop,
  seed}`` → ``{"text": ..., "finish_reason": "stop" | "length"}``
* ``POST /v1/completions``: OpenAI's legacy completions, with ``soft_prompt`` as an extra body field
  (``openai`` client: ``extra_body={"soft_prompt": ...}``); a list of prompts (with one soft prompt
  for all or a list of one per prompt), ``n`` choices, ``logprobs: k``, ``stream: true`` as
  server-sent events; ``GET /v1/models`` lists the one model.
* ``POST /v1/chat/completions``: OpenAI's chat, ``messages`` through the model's chat template, the
  soft prompt as for completions, ``logprobs: true`` with ``top_logprobs: k``
  (:mod:`~lopa.serve.openai_api`).
* ``GET /health`` (model, width, limits) and ``GET /metrics`` (Prometheus text); both need no key.

With an API key configured, every ``/v1/`` call needs ``Authorization: Bearer KEY`` (what the
``openai`` client sends) or ``X-API-Key: KEY`` (:mod:`~lopa.serve.middleware`).

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
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import BatcherClosed, BatcherFull
from .checks import Checks
from .config import ServeConfig
from .errors import APIError, error_body, error_type, validation_message
from .metrics import CONTENT_TYPE, Metrics
from .middleware import Guard
from .openai_api import Answer, Stream, chat_rows, completion_rows, run_rows
from .protocol import Backend, ClassifyRow, Completion, GenerateRow, Submitter, classification_result
from .schemas import ChatCompletionRequest, ClassifyRequest, CompletionRequest, GenerateRequest, OpenAIRequest
from .wire import WireError

log = logging.getLogger("lopa.serve")


def create_app(backend: Backend, cfg: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``backend`` with the limits and key of ``cfg``.

    The batcher starts and stops with the app (its lifespan): on shutdown every request already
    queued is answered before the worker thread stops.
    """
    cfg = cfg or ServeConfig(model=backend.model_name)
    checks = Checks(backend, cfg)
    batcher: Submitter | None = None
    metrics = Metrics(queue_depth=lambda: batcher.queue_depth if batcher is not None else 0,
                      prefix_cache=getattr(backend, "prefix_cache_stats", None))
    batcher = backend.make_batcher(max_batch_size=cfg.max_batch_size, max_wait_ms=cfg.max_wait_ms,
                                   on_batch=metrics.observe_batch, scheduling=cfg.scheduling)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        try:
            yield
        finally:
            await batcher.close()
            checks.close()

    app = FastAPI(title="lopa", summary="one frozen model, any number of soft-prompted tasks", lifespan=lifespan)
    app.state.batcher, app.state.metrics, app.state.backend = batcher, metrics, backend
    add_error_handlers(app)
    _info_routes(app, backend, cfg, batcher, metrics)
    _model_routes(app, checks, batcher)
    _openai_routes(app, backend, checks, batcher)
    endpoints = {r.path for r in app.routes if hasattr(r, "path")}
    app.add_middleware(Guard, cfg=cfg, metrics=metrics, endpoints=endpoints)
    return app


def _error_response(request: Request, status: int, message: str, type: str | None = None,
                    param: str | None = None) -> JSONResponse:
    type = type or error_type(status)
    request.state.error_type = type  # read back by the metrics in the Guard
    return ErrorResponse(error_body(message, type, param), status_code=status)


class ErrorResponse(JSONResponse):
    """JSON in ASCII: a message may quote the client's input, which can hold a lone surrogate that
    UTF-8 cannot encode (Starlette's default would fail on it, turning a 4xx into a 500)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's ``{"error": {message, type, param, code}}``; shared by the gateway so a
    client sees one error shape from either process."""
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> ErrorResponse:
        return _error_response(request, exc.status, exc.message, exc.type, exc.param)

    @app.exception_handler(WireError)
    async def _wire_error(request: Request, exc: WireError) -> JSONResponse:
        return _error_response(request, exc.status, exc.message, param="soft_prompt")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
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


def _info_routes(app: FastAPI, backend: Backend, cfg: ServeConfig, batcher: Submitter, metrics: Metrics) -> None:
    started = int(time.time())
    dtype_name = str(backend.dtype).removeprefix("torch.")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": backend.model_name, "hidden_size": backend.hidden_size,
                "max_soft_tokens": cfg.max_soft_tokens, "max_prompt_tokens": cfg.max_prompt_tokens,
                "max_new_tokens": cfg.max_new_tokens, "dtype": dtype_name, "backend": cfg.backend,
                "batch_invariant": backend.batch_invariant,
                "prefix_caching": bool(getattr(backend, "prefix_caching", False))}

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": backend.model_name, "object": "model", "created": started,
                                            "owned_by": "lopa"}]}


def _model_routes(app: FastAPI, checks: Checks, batcher: Submitter) -> None:
    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest) -> dict[str, Any]:
        """Log-probabilities of each label word's first token after ``[soft prompt ; prompt]``."""
        ids = await checks.prompt_ids(req.text, req.token_ids)
        z = checks.soft(req.soft_prompt)
        labels = await checks.label_ids(req.label_words)
        logprobs = await batcher.submit("classify", ClassifyRow(ids, z, labels))
        return classification_result(logprobs, req.label_words)

    @app.post("/v1/generate")
    async def generate(req: GenerateRequest) -> dict[str, Any]:
        """A completion of ``[soft prompt ; prompt]``: greedy at temperature 0, else sampled."""
        checks.new_tokens(req.max_new_tokens, "max_new_tokens")
        ids = await checks.prompt_ids(req.text, req.token_ids)
        z = checks.soft(req.soft_prompt)
        row = GenerateRow(ids, z, req.max_new_tokens, req.temperature, req.top_p, tuple(req.stop or ()), req.seed)
        out: Completion = await batcher.submit("generate", row)
        return {"text": out.text, "finish_reason": out.finish_reason}


def _openai_routes(app: FastAPI, backend: Backend, checks: Checks, batcher: Submitter) -> None:
    tokenizer = getattr(backend, "tokenizer", None)

    async def answer(obj: str, rows: list[GenerateRow], req: OpenAIRequest) -> dict[str, Any] | StreamingResponse:
        a = Answer(obj, backend.model_name, rows, tokenizer, req.n or 1)
        if not req.stream:
            outs = await run_rows(batcher, rows)
            if a.strings is not None:  # log-probabilities: token offsets cost a decode per token, off the loop
                return await asyncio.to_thread(a.body, outs)
            return a.body(outs)
        stream = Stream(a, batcher, tokenizer, bool(req.stream_options and req.stream_options.include_usage))
        await stream.started()
        return StreamingResponse(stream.events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest) -> dict[str, Any] | StreamingResponse:
        """OpenAI-compatible completion; the soft prompt rides in the extra body field ``soft_prompt``."""
        return await answer("text_completion", await completion_rows(req, checks, backend.model_name), req)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest) -> dict[str, Any] | StreamingResponse:
        """OpenAI-compatible chat: ``messages`` through the model's chat template, the soft prompt in
        the extra body field ``soft_prompt`` (it goes before the templated text)."""
        return await answer("chat.completion", await chat_rows(req, checks, backend.model_name, tokenizer), req)
