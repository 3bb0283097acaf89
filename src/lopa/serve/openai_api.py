"""OpenAI's ``/v1/completions`` and ``/v1/chat/completions``: requests to rows, completions to answers.

Both endpoints share one path: :func:`check_fields` refuses what the server cannot honour,
:func:`decode_rows` turns the decoding fields into ``n`` :class:`~lopa.serve.protocol.GenerateRow`
(one per choice, each its own row in the batch), :func:`run_rows` runs them, and the answer is built
as one JSON body or as server-sent events (:func:`sse_events`). A chat's ``messages`` become the
model's text through :func:`lopa.prompt_format.build_text`, the same function training uses, so a
soft prompt trained in chat format meets the same text here.

Streaming sends the finished completion: the rows run to the end in the batcher, then each choice
goes out as OpenAI's chunks (role, content, finish reason, optional usage, ``[DONE]``). Clients see
a valid stream; the first token arrives with the last.

Example::

    >>> from lopa.models import load_tokenizer
    >>> print(chat_text(load_tokenizer("tiny-random-llama"), [{"role": "system", "content": "Be brief."},
    ...                                                       {"role": "user", "content": "hi"}]))
    <|im_start|>system
    Be brief.<|im_end|>
    <|im_start|>user
    hi<|im_end|>
    <|im_start|>assistant
    <BLANKLINE>
    >>> [e.split(":")[0] for e in sse_events([{"a": 1}])]
    ['data', 'data']
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ..prompt_format import PromptFormat, build_text
from ..tasks.base import TaskError
from .checks import Checks
from .errors import APIError
from .protocol import Completion, GenerateRow, Submitter
from .schemas import IGNORED, UNSUPPORTED, ChatCompletionRequest, CompletionRequest, OpenAIRequest

SEED_RANGE = 2 ** 63  # what the schema accepts, and what every backend's RNG takes
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the server's limit


def check_fields(req: OpenAIRequest, model_name: str) -> None:
    """Refuse another model, OpenAI options lopa lacks (400 naming them) and unknown fields."""
    if req.model is not None and req.model != model_name:
        raise APIError(404, f"model {req.model!r} is not served here; this server serves {model_name!r}",
                       "not_found_error", "model")
    for name, value in (req.model_extra or {}).items():
        if name in UNSUPPORTED:
            if value not in UNSUPPORTED[name]:
                raise APIError(400, f"{name}={value!r} is not supported by this server", param=name)
        elif name not in IGNORED:
            raise APIError(400, f"unknown field {name!r}", param=name)
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")


def chat_text(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """The model text of a conversation: its chat template, ending with the assistant's turn opening."""
    try:
        return build_text(tokenizer, PromptFormat(chat_template=True), messages=messages).prompt
    except TaskError as e:
        raise APIError(400, str(e), param="messages") from None


def decode_rows(req: OpenAIRequest, checks: Checks, ids: list[int], max_tokens: int) -> list[GenerateRow]:
    """One row per choice. With a seed, choice ``i`` samples with ``seed + i`` (wrapped into the seed's
    range): reproducible and distinct."""
    z = checks.soft(req.soft_prompt)
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    n = req.n or 1
    seeds = [None if req.seed is None else (req.seed + i) % SEED_RANGE for i in range(n)]
    return [GenerateRow(ids, z, max_tokens, temperature, top_p, stop, seed) for seed in seeds]


async def run_rows(batcher: Submitter, rows: list[GenerateRow]) -> list[Completion]:
    return list(await asyncio.gather(*(batcher.submit("generate", r) for r in rows)))


def usage(rows: list[GenerateRow], outs: list[Completion]) -> dict[str, int]:
    """OpenAI's usage: the prompt counted once (its virtual tokens occupy positions too), every choice's tokens."""
    prompt = len(rows[0].token_ids) + int(rows[0].soft_prompt.shape[0])
    done = sum(o.completion_tokens for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


@dataclass
class Answer:
    """What both endpoints answer: ids and the finished choices."""

    object: str  # "text_completion" or "chat.completion"
    model: str
    rows: list[GenerateRow]
    outs: list[Completion]

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.object == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _choice(self, i: int, out: Completion) -> dict[str, Any]:
        if self.object == "chat.completion":
            return {"index": i, "message": {"role": "assistant", "content": out.text},
                    "finish_reason": out.finish_reason, "logprobs": None}
        return {"text": out.text, "index": i, "finish_reason": out.finish_reason, "logprobs": None}

    def body(self) -> dict[str, Any]:
        return {**self._head(self.object), "choices": [self._choice(i, o) for i, o in enumerate(self.outs)],
                "usage": usage(self.rows, self.outs)}

    def chunks(self, include_usage: bool) -> list[dict[str, Any]]:
        """OpenAI's stream of chunks for the finished choices (usage last, with empty choices, on request)."""
        chat = self.object == "chat.completion"
        obj = "chat.completion.chunk" if chat else "text_completion"
        extra = {"usage": None} if include_usage else {}
        out = []
        for i, o in enumerate(self.outs):
            if chat:
                steps = [({"role": "assistant", "content": ""}, None), ({"content": o.text}, None),
                         ({}, o.finish_reason)]
                out += [{**self._head(obj), "choices": [{"index": i, "delta": d, "finish_reason": f,
                                                         "logprobs": None}], **extra} for d, f in steps]
            else:
                steps = [(o.text, None), ("", o.finish_reason)]
                out += [{**self._head(obj), "choices": [{"text": t, "index": i, "finish_reason": f,
                                                         "logprobs": None}], **extra} for t, f in steps]
        if include_usage:
            out.append({**self._head(obj), "choices": [], "usage": usage(self.rows, self.outs)})
        return out


def sse_events(chunks: Iterable[dict[str, Any]]) -> list[str]:
    """Server-sent events: one ``data:`` line per chunk, then ``data: [DONE]``."""
    events = [f"data: {json.dumps(c, ensure_ascii=True, separators=(',', ':'))}\n\n" for c in chunks]
    return events + ["data: [DONE]\n\n"]


async def completion_answer(req: CompletionRequest, checks: Checks, batcher: Submitter, model: str) -> Answer:
    """``/v1/completions``: one prompt (text, a one-string list or token ids) → ``n`` choices."""
    check_fields(req, model)
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, f"prompt holds {len(prompt)} strings; send one prompt per request", param="prompt")
        prompt = prompt[0]
    max_tokens = checks.new_tokens(COMPLETIONS_MAX_TOKENS if req.max_tokens is None else req.max_tokens, "max_tokens")
    ids = await (checks.prompt_ids(prompt, None) if isinstance(prompt, str) else checks.prompt_ids(None, list(prompt)))
    rows = decode_rows(req, checks, ids, max_tokens)
    return Answer("text_completion", model, rows, await run_rows(batcher, rows))


async def chat_answer(req: ChatCompletionRequest, checks: Checks, batcher: Submitter, model: str,
                      tokenizer: Any) -> Answer:
    """``/v1/chat/completions``: ``messages`` through the chat template → ``n`` assistant replies."""
    check_fields(req, model)
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise APIError(400, "give one of max_tokens and max_completion_tokens", param="max_completion_tokens")
    name, value = (("max_completion_tokens", req.max_completion_tokens) if req.max_completion_tokens is not None
                   else ("max_tokens", req.max_tokens))
    max_tokens = checks.new_tokens(checks.cfg.max_new_tokens if value is None else value, name)
    if tokenizer is None:
        raise APIError(501, "this backend exposes no tokenizer, so it cannot apply a chat template; "
                            "use /v1/completions", "not_implemented_error", "messages")
    text = chat_text(tokenizer, [m.model_dump() for m in req.messages])
    ids = await checks.prompt_ids(text, None)
    rows = decode_rows(req, checks, ids, max_tokens)
    return Answer("chat.completion", model, rows, await run_rows(batcher, rows))


__all__ = ["Answer", "chat_answer", "chat_text", "check_fields", "completion_answer", "sse_events", "usage"]
