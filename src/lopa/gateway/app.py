"""The gateway's HTTP API: OpenAI's endpoints with ``model`` naming a task.

* ``GET /v1/models``: the task names, in OpenAI's list format.
* ``POST /v1/completions`` and ``POST /v1/chat/completions``: OpenAI's bodies; the gateway computes
  the soft prompt of the request's text with its task's generator, adds it to the body and forwards
  every other field unchanged to the upstream's same endpoint. The answer (or its server-sent
  events, for ``stream: true``) comes back with ``model`` set to the task's name.
* ``POST /v1/classify``: ``{"model": TASK, "text": ..., "label_words": [...]}`` (label words default
  to the task's) → the upstream's ``{"logprobs", "label", "label_word"}``.
* ``GET /health`` (the gateway's tasks and the upstream's state) and ``GET /metrics`` (Prometheus);
  neither needs a key.

The text a task's generator reads is the text the server will read: a completion's ``prompt`` as
given, a chat's ``messages`` through the chat template exactly as the server renders them
(:func:`lopa.serve.openai_api.chat_text`), after the task's recorded system prompt when it was
trained in chat format and the conversation has none of its own. So an answer through the gateway
equals what :class:`lopa.client.Client` gets for the same artifact and text.

Example (an upstream that is not running: the task is listed, a completion is a 502)::

    >>> import tempfile, torch
    >>> from fastapi.testclient import TestClient
    >>> from lopa.artifact import save_artifact
    >>> from lopa.methods import InitContext, build_generator, make_config
    >>> from lopa.gateway.config import GatewayConfig
    >>> from lopa.gateway.registry import load_tasks
    >>> gen = build_generator(make_config("prompt-tuning", num_virtual_tokens=2), InitContext(torch.randn(9, 8)))
    >>> d = save_artifact(tempfile.mkdtemp(), gen, base_name="m", hidden_size=8)
    >>> cfg = GatewayConfig(task=[f"poet={d}"], upstream="http://127.0.0.1:9", connect_timeout=1)
    >>> with TestClient(create_app(cfg, load_tasks(cfg.task_dirs()))) as http:
    ...     names = [m["id"] for m in http.get("/v1/models").json()["data"]]
    ...     bad = http.post("/v1/completions", json={"model": "poem", "prompt": "x"})
    ...     down = http.post("/v1/completions", json={"model": "poet", "prompt": "x"})
    >>> names, bad.status_code, bad.json()["error"]["message"]
    (['poet'], 404, "model 'poem' is not a task of this gateway; its tasks are: poet")
    >>> down.status_code, down.json()["error"]["type"]
    (502, 'upstream_error')
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from ..serve.app import add_error_handlers  # the server's error answers, shared
from ..serve.errors import APIError, error_body
from ..serve.metrics import CONTENT_TYPE
from ..serve.middleware import Guard
from ..serve.openai_api import chat_text, sse
from ..serve.schemas import MAX_LABELS, MAX_MESSAGES, ChatMessage, LabelWord, Text
from ..serve.wire import encode_soft_prompt
from .batching import SoftPromptBatcher
from .config import GatewayConfig
from .metrics import GatewayMetrics
from .registry import Task, width_problems
from .upstream import Upstream

log = logging.getLogger("lopa.gateway")


# -- request bodies: only the fields the gateway reads are checked; the rest go to the upstream as they are

class _OpenAIBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Text
    """the task's name"""
    stream: StrictBool | None = False


class CompletionBody(_OpenAIBody):
    prompt: Text | list[Text] | list[StrictInt]


class ChatBody(_OpenAIBody):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)


class ClassifyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Text
    """the task's name"""
    text: Text
    """the model's whole prompt (the task's template already filled in)"""
    label_words: list[LabelWord] | None = Field(default=None, min_length=2, max_length=MAX_LABELS)
    """one word per class; default: the task's recorded label words"""


class Gateway:
    """What the routes share: the tasks, one soft-prompt batcher per task, the upstream, the metrics."""

    def __init__(self, cfg: GatewayConfig, tasks: dict[str, Task], health: dict[str, Any] | None = None):
        self.cfg, self.tasks = cfg, tasks
        # one thread computes soft prompts (and loads the chat tokenizer), off the event loop
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lopa-gateway")
        self.metrics = GatewayMetrics(queue_depth=lambda: sum(b.depth for b in self.batchers.values()))
        self.batchers = {name: SoftPromptBatcher(t.compute, self.executor, max_batch_size=cfg.max_batch_size,
                                                 max_wait_ms=cfg.max_wait_ms,
                                                 on_batch=lambda n, name=name: self.metrics.observe_soft_prompts(name, n))
                         for name, t in tasks.items()}
        self.upstream = Upstream(cfg.upstream, cfg.upstream_key, timeout=cfg.upstream_timeout,
                                 connect_timeout=cfg.connect_timeout, max_connections=cfg.max_connections)
        self.upstream.info = health
        self.metrics.upstream_up.set(1 if health else 0)
        self._tokenizer: Any = None
        self._tokenizer_lock = asyncio.Lock()
        self.started = int(time.time())

    async def close(self) -> None:
        for b in self.batchers.values():
            await b.close()
        await self.upstream.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # -- tasks and the upstream ------------------------------------------------------------------
    def task(self, name: str) -> Task:
        task = self.tasks.get(name)
        if task is None:
            raise APIError(404, f"model {name!r} is not a task of this gateway; its tasks are: "
                                f"{', '.join(self.tasks)}", "not_found_error", "model")
        return task

    async def upstream_health(self) -> dict[str, Any]:
        """Ask the upstream's ``/health`` and check every task against it."""
        try:
            info = await self.upstream.health()
        except APIError:
            self.metrics.upstream_up.set(0)
            raise
        self.metrics.upstream_up.set(1)
        for problem in width_problems(self.tasks, info, self.upstream.url):
            log.error("%s", problem)
        return info

    async def ready(self, task: Task) -> None:
        """The upstream is known (asked now if it was not reachable before) and can serve ``task``."""
        if self.upstream.info is None:
            await self.upstream_health()
        if task.problem:
            raise APIError(502, task.problem, "upstream_error", "model")

    async def soft_prompt(self, task: Task, text: str) -> dict[str, Any]:
        try:  # refused here, a text the task cannot read fails its own request and no batch-mate's
            task.check(text)
        except ValueError as e:
            raise APIError(400, f"task {task.name!r}: {e}") from None
        z = await self.batchers[task.name].submit(text)
        return encode_soft_prompt(z, self.cfg.wire_dtype)

    async def chat_text(self, messages: list[dict[str, str]]) -> str:
        """The model text the server will build from ``messages`` (its chat template, its tokenizer)."""
        loop = asyncio.get_running_loop()
        if self._tokenizer is None:
            async with self._tokenizer_lock:
                if self._tokenizer is None:
                    self._tokenizer = await loop.run_in_executor(self.executor, self._load_tokenizer)
        return await loop.run_in_executor(self.executor, chat_text, self._tokenizer, messages)

    def _load_tokenizer(self) -> Any:
        from ..models import load_tokenizer
        served = (self.upstream.info or {}).get("model")
        names = [self.cfg.tokenizer] if self.cfg.tokenizer else \
            list(dict.fromkeys(n for n in [served, *(t.artifact.base_model for t in self.tasks.values())] if n))
        tried = []
        for name in names:
            try:
                return load_tokenizer(name)
            except Exception as e:  # a hub id offline, a path that is not there, ...
                tried.append(f"{name!r} ({type(e).__name__}: {str(e)[:200]})")
        raise APIError(500, f"the gateway cannot load the tokenizer that renders chat messages (tried "
                            f"{', '.join(tried) or 'nothing'}); start it with --tokenizer NAME_OR_PATH",
                       "server_error", "messages")

    # -- forwarding ------------------------------------------------------------------------------
    async def forward(self, task: Task, path: str, body: dict[str, Any], stream: bool,
                      start: float) -> dict[str, Any] | StreamingResponse:
        if not stream:
            data = await self._upstream_call(self.upstream.post(path, body))
            if "model" in data:
                data["model"] = task.name
            self.metrics.observe_task(task.name, path, 200, time.perf_counter() - start, None)
            return data
        r = await self._upstream_call(self.upstream.stream(path, body))
        return StreamingResponse(self._relay(task, path, r, start), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _upstream_call(self, call: Awaitable[Any]) -> Any:
        try:
            out = await call
        except APIError as e:
            if e.type in ("upstream_error", "timeout_error") and e.status in (502, 504):
                self.metrics.upstream_up.set(0)
                if e.status == 502:
                    self.upstream.info = None  # ask again before the next request: it may come back another model
            raise
        self.metrics.upstream_up.set(1)
        return out

    async def _relay(self, task: Task, path: str, r: httpx.Response, start: float) -> AsyncIterator[str]:
        """The upstream's events with ``model`` set to the task's name; a stream that breaks ends with an error event."""
        status, etype = 200, None
        lines = self.upstream.lines(r)
        try:
            async for line in lines:
                if not line.startswith("data:"):
                    continue  # blank separators (rewritten below) and comments
                data = line[5:].strip()
                try:
                    obj = json.loads(data) if data != "[DONE]" else data
                except ValueError:
                    yield f"data: {data}\n\n"
                    continue
                if isinstance(obj, dict):
                    if "model" in obj:
                        obj["model"] = task.name
                    if isinstance(obj.get("error"), dict):
                        status, etype = 500, obj["error"].get("type")
                yield sse(obj)
        except APIError as e:
            status, etype = e.status, e.type
            log.warning("stream of task %r broke: %s", task.name, e.message)
            yield sse(error_body(e.message, e.type))
        finally:
            await lines.aclose()
            await r.aclose()  # a client that left closes the upstream's stream too: its rows stop decoding
            self.metrics.observe_task(task.name, path, status, time.perf_counter() - start, etype)


Prepare = Callable[[Task], Awaitable[tuple["str | list[str]", dict[str, Any]]]]


def create_app(cfg: GatewayConfig, tasks: dict[str, Task], health: dict[str, Any] | None = None) -> FastAPI:
    """The gateway's app over loaded ``tasks``; ``health`` is the upstream's ``/health`` when known
    (the tasks already checked against it), else it is asked on the first request."""
    gw = Gateway(cfg, tasks, health)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await gw.close()

    app = FastAPI(title="lopa gateway", summary="trained tasks by name, for any OpenAI client", lifespan=lifespan)
    app.state.gateway = gw
    add_error_handlers(app)
    _info_routes(app, gw)
    _task_routes(app, gw)
    endpoints = {r.path for r in app.routes if hasattr(r, "path")}
    app.add_middleware(Guard, cfg=cfg, metrics=gw.metrics, endpoints=endpoints)  # type: ignore[arg-type]
    return app


def _info_routes(app: FastAPI, gw: Gateway) -> None:
    @app.get("/health")
    async def health() -> dict[str, Any]:
        """The gateway's tasks and whether the upstream answers (asked now, within a few seconds)."""
        try:
            info, error = await gw.upstream_health(), None
        except APIError as e:
            info, error = {}, e.message
        tasks = {name: t.describe() for name, t in gw.tasks.items()}
        ok = error is None and all(t["ready"] for t in tasks.values())
        return {"status": "ok" if ok else "degraded", "tasks": tasks,
                "upstream": {"url": gw.upstream.url, "reachable": error is None, "error": error,
                             **{k: info.get(k) for k in ("model", "hidden_size", "max_soft_tokens", "backend")}}}

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return Response(gw.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": gw.started, "owned_by": "lopa"}
                                           for name in gw.tasks]}


def _forwarded(raw: dict[str, Any]) -> dict[str, Any]:
    """The client's body for the upstream: every field but ``model`` (the upstream serves one model)."""
    if "soft_prompt" in raw:
        raise APIError(400, "the gateway computes each request's soft prompt from its task; do not send "
                            "soft_prompt (to send your own, call the lopa server directly)", param="soft_prompt")
    return {k: v for k, v in raw.items() if k != "model"}


def _task_routes(app: FastAPI, gw: Gateway) -> None:
    async def run(path: str, name: str, stream: bool, prepare: Prepare) -> dict[str, Any] | StreamingResponse:
        task = gw.task(name)
        start = time.perf_counter()
        try:
            await gw.ready(task)
            texts, body = await prepare(task)
            if isinstance(texts, str):
                body["soft_prompt"] = await gw.soft_prompt(task, texts)
            else:  # a list of prompts: one soft prompt each, computed together by the task's batcher
                body["soft_prompt"] = list(await asyncio.gather(*(gw.soft_prompt(task, t) for t in texts)))
            return await gw.forward(task, path, body, stream, start)
        except APIError as e:
            gw.metrics.observe_task(task.name, path, e.status, time.perf_counter() - start, e.type)
            raise
        except Exception:
            gw.metrics.observe_task(task.name, path, 500, time.perf_counter() - start, "server_error")
            raise

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionBody, request: Request) -> dict[str, Any] | StreamingResponse:
        """OpenAI's completion with ``model`` a task: the generator reads ``prompt`` as given."""
        async def prepare(task: Task) -> tuple[str | list[str], dict[str, Any]]:
            body = _forwarded(await request.json())
            prompt = req.prompt
            if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
                # a list of prompts: the server answers each with its own soft prompt (choice i*n + j)
                return (list(prompt) if task.needs_text else ""), body
            if not isinstance(prompt, str):
                if task.needs_text:
                    raise APIError(400, f"task {task.name!r} computes its soft prompt from the prompt's text; "
                                        f"send the prompt as text, not token ids", param="prompt")
                prompt = ""  # this task's soft prompt does not depend on the text
            return prompt, body

        return await run("/v1/completions", req.model, bool(req.stream), prepare)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatBody, request: Request) -> dict[str, Any] | StreamingResponse:
        """OpenAI's chat with ``model`` a task: the task's system prompt first (when it was trained in
        chat format and the conversation brings none), the generator reading the server's chat text."""
        async def prepare(task: Task) -> tuple[str, dict[str, Any]]:
            body = _forwarded(await request.json())
            messages = [m.model_dump() for m in req.messages]
            if task.fmt.chat_template and task.fmt.system_prompt and messages[0]["role"] != "system":
                system = {"role": "system", "content": task.fmt.system_prompt}
                messages.insert(0, system)
                body["messages"] = [system, *body["messages"]]
            return (await gw.chat_text(messages) if task.needs_text else ""), body

        return await run("/v1/chat/completions", req.model, bool(req.stream), prepare)

    @app.post("/v1/classify")
    async def classify(req: ClassifyBody) -> dict[str, Any]:
        """Log-probabilities of the label words' first tokens after ``[the task's soft prompt ; text]``."""
        async def prepare(task: Task) -> tuple[str, dict[str, Any]]:
            words = req.label_words or task.label_words
            if len(words) < 2:
                raise APIError(400, f"task {task.name!r} records no label words; send label_words",
                               param="label_words")
            return req.text, {"text": req.text, "label_words": words}

        return await run("/v1/classify", req.model, False, prepare)  # type: ignore[return-value]
