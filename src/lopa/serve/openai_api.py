"""OpenAI's ``/v1/completions`` and ``/v1/chat/completions``: requests to rows, completions to answers.

Both endpoints share one path: :func:`check_fields` refuses what the server cannot honour,
:func:`decode_rows` turns the decoding fields into ``n`` :class:`~lopa.serve.protocol.GenerateRow`
(one per choice, each its own row in the batch), :func:`run_rows` runs them, and the answer is built
as one JSON body (:class:`Answer`) or as server-sent events (:class:`Stream`). A chat's ``messages`` become the
model's text through :func:`lopa.prompt_format.build_text`, the same function training uses, so a
soft prompt trained in chat format meets the same text here.

Streaming (:class:`Stream`) sends each token's text as the backend decodes it, as OpenAI's chunks
(role, content, finish reason, optional usage, ``[DONE]``).

Log-probabilities (completions' ``logprobs: k``, chat's ``logprobs: true`` with ``top_logprobs: k``)
are the generated tokens' under the model's raw distribution (:class:`lopa.prefix.TokenLogprob`),
in each endpoint's OpenAI shape (:mod:`~lopa.serve.logprobs`); a streamed chunk carries those of the
tokens whose text it begins. ``/v1/completions`` takes a list of prompts too: choice ``i * n + j`` is
prompt ``i``'s choice ``j``, each prompt with the shared soft prompt or its own.

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
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

import torch

from ..prompt_format import PromptFormat, build_text
from ..tasks.base import TaskError
from .checks import Checks
from .errors import APIError, error_body
from .logprobs import chat_logprobs, completion_logprobs, kept, next_offset, token_strings
from .protocol import Completion, GenerateRow, Submitter, TokenLogprob
from .schemas import IGNORED, UNSUPPORTED, ChatCompletionRequest, CompletionRequest, OpenAIRequest

log = logging.getLogger("lopa.serve")
SEED_RANGE = 2 ** 63  # what the schema accepts, and what every backend's RNG takes
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the server's limit


def check_fields(req: OpenAIRequest, model_name: str) -> None:
    """Refuse another model, OpenAI options lopa lacks (400 naming them) and unknown fields."""
    if req.model is not None and req.model != model_name:
        raise APIError(404, f"model {req.model!r} is not served here; this server serves {model_name!r}",
                       "not_found_error", "model")
    for name, value in (req.model_extra or {}).items():
        if name == "top_logprobs" and value is not None and isinstance(req, CompletionRequest):
            raise APIError(400, "top_logprobs is a chat field; /v1/completions takes logprobs: k (0-20), "
                                "the number of most likely tokens to list per generated token", param=name)
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


def decode_rows(req: OpenAIRequest, z: torch.Tensor, ids: list[int], max_tokens: int,
                logprobs: int | None = None) -> list[GenerateRow]:
    """One row per choice of one prompt. With a seed, choice ``i`` samples with ``seed + i`` (wrapped
    into the seed's range): reproducible and distinct, and the same whether the prompt came alone or
    in a list."""
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    n = req.n or 1
    seeds = [None if req.seed is None else (req.seed + i) % SEED_RANGE for i in range(n)]
    return [GenerateRow(ids, z, max_tokens, temperature, top_p, stop, seed, logprobs=logprobs) for seed in seeds]


async def run_rows(batcher: Submitter, rows: list[GenerateRow]) -> list[Completion]:
    return list(await asyncio.gather(*(batcher.submit("generate", r) for r in rows)))


def usage(rows: list[GenerateRow], outs: list[Completion], n: int = 1) -> dict[str, int]:
    """OpenAI's usage: each prompt counted once (its virtual tokens occupy positions too; prompt ``i``'s
    ``n`` choices are rows ``i * n`` to ``i * n + n - 1``), every choice's tokens."""
    prompt = sum(len(r.token_ids) + int(r.soft_prompt.shape[0]) for r in rows[::n])
    done = sum(o.completion_tokens for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


@dataclass
class Answer:
    """One request's answer in OpenAI's shapes: the whole body, or its stream's chunks one by one."""

    object: str  # "text_completion" or "chat.completion"
    model: str
    rows: list[GenerateRow]
    tokenizer: Any = None  # needed for log-probabilities (token strings and offsets)
    n: int = 1  # choices per prompt

    def __post_init__(self) -> None:
        self.chat = self.object == "chat.completion"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        wanted = any(r.logprobs is not None for r in self.rows)
        self.strings = token_strings(self.tokenizer) if wanted and self.tokenizer is not None else None

    def listed(self, out: Completion, offsets: list[int] | None = None) -> tuple[list[TokenLogprob], list[int]]:
        """The tokens of a finished choice that its answer lists (see :func:`~lopa.serve.logprobs.kept`),
        with their text offsets (computed here unless given: a decode per token, so call it off the
        event loop for long answers)."""
        assert self.strings is not None
        steps = list(out.logprobs or [])
        ids = [s.token for s in steps]
        if offsets is None or len(offsets) != len(ids):
            offsets = self.strings.offsets(ids)
        cut = self.tokenizer.decode(ids, skip_special_tokens=True) != out.text  # a stop string cut it
        k = kept(steps, offsets, out.text, cut)
        return steps[:k], offsets[:k]

    def logprobs(self, i: int, steps: Sequence[TokenLogprob], offsets: Sequence[int]) -> dict[str, Any] | None:
        """Choice ``i``'s ``logprobs`` for these tokens in the endpoint's shape; None where it asked for none."""
        if self.rows[i].logprobs is None or self.strings is None:
            return None
        return chat_logprobs(self.strings, steps) if self.chat else completion_logprobs(self.strings, steps, offsets)

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def body(self, outs: list[Completion]) -> dict[str, Any]:
        """The whole answer (``stream: false``)."""
        lps = [self.logprobs(i, *self.listed(o)) if self.rows[i].logprobs is not None else None
               for i, o in enumerate(outs)]
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": o.text},
                        "finish_reason": o.finish_reason, "logprobs": lp} for i, (o, lp) in enumerate(zip(outs, lps))]
        else:
            choices = [{"text": o.text, "index": i, "finish_reason": o.finish_reason, "logprobs": lp}
                       for i, (o, lp) in enumerate(zip(outs, lps))]
        return {**self._head(self.object), "choices": choices, "usage": usage(self.rows, outs, self.n)}

    def chunk(self, i: int, text: str, finish_reason: str | None = None, *, role: bool = False,
              include_usage: bool = False, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        """One streamed chunk of choice ``i``: new text (with its tokens' ``logprobs``), or (with
        ``finish_reason``) its end."""
        extra = {"usage": None} if include_usage else {}
        if not self.chat:
            return {**self._head("text_completion"), "choices": [{"text": text, "index": i,
                                                                  "finish_reason": finish_reason,
                                                                  "logprobs": logprobs}], **extra}
        delta: dict[str, Any] = {"role": "assistant", "content": text} if role else \
            ({"content": text} if finish_reason is None else {})
        return {**self._head("chat.completion.chunk"), "choices": [{"index": i, "delta": delta,
                                                                    "finish_reason": finish_reason,
                                                                    "logprobs": logprobs}], **extra}

    def usage_chunk(self, outs: list[Completion]) -> dict[str, Any]:
        """The last chunk with ``stream_options.include_usage``: no choices, the request's usage."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(self.rows, outs, self.n)}


def sse(chunk: dict[str, Any] | str) -> str:
    """One server-sent event.

    >>> sse({"a": 1}), sse("[DONE]")
    ('data: {"a":1}\\n\\n', 'data: [DONE]\\n\\n')
    """
    data = chunk if isinstance(chunk, str) else json.dumps(chunk, ensure_ascii=True, separators=(",", ":"))
    return f"data: {data}\n\n"


class Stream:
    """``stream: true``: the rows go to the batcher now, and their tokens come out as SSE chunks as the
    backend makes them (a backend that reports no tokens, such as vLLM here, sends each choice whole).

    Text is sent only once it can no longer change: the decoded text of the tokens so far, cut
    before the first stop string in it; else less a trailing incomplete character (U+FFFD) and the
    last ``len(longest stop) - 1`` characters, where a stop string could still be completing. Each choice ends with the rest of its final text
    (cut at a stop string exactly as ``stream: false`` is), so the streamed text equals the whole one.

    With log-probabilities, a chunk carries those of the tokens whose text begins in it (by the
    offsets ``stream: false`` reports), and the choice's last text chunk the rest of the tokens its
    whole answer lists: together exactly the ``stream: false`` list.
    """

    def __init__(self, answer: Answer, batcher: Submitter, tokenizer: Any, include_usage: bool):
        self.answer, self.tokenizer, self.include_usage = answer, tokenizer, include_usage
        self.queue: asyncio.Queue[tuple[int, int | None, TokenLogprob | None]] = asyncio.Queue()
        self.gone = False  # set when the client disconnects: decoding rows stop at their next token
        loop = asyncio.get_running_loop()

        def on_token(i: int, token: int, logprob: TokenLogprob | None = None) -> bool:
            if not self.gone:
                loop.call_soon_threadsafe(self.queue.put_nowait, (i, token, logprob))
            return not self.gone

        for i, row in enumerate(answer.rows):
            if tokenizer is not None:
                row.on_token = lambda t, lp=None, i=i: on_token(i, t, lp)
        self.tasks = [asyncio.ensure_future(batcher.submit("generate", r)) for r in answer.rows]
        # tokens are queued from the worker thread before its batch returns, so a row's end comes after them
        for i, task in enumerate(self.tasks):
            task.add_done_callback(lambda _, i=i: self.queue.put_nowait((i, None, None)))
        rows = answer.rows
        self.hold = max((len(s) for s in rows[0].stop), default=1) - 1

    async def started(self) -> None:
        """Raise what the batcher refused at once (closing, full) while a 503 can still be answered."""
        await asyncio.sleep(0)
        for task in self.tasks:
            if task.done() and task.exception() is not None:
                self.cancel()
                raise task.exception()  # type: ignore[misc]

    def cancel(self) -> None:
        """The client went away: rows not yet in a batch are dropped, rows decoding stop at the next step."""
        self.gone = True
        for task in self.tasks:
            task.cancel()

    def _safe(self, i: int, text: str) -> str:
        # a stop string may arrive inside one token: cut there, as the final text will be
        hits = [text.find(x) for x in self.answer.rows[i].stop if x in text]
        if hits:
            return text[:min(hits)]
        text = text.rstrip("\ufffd")
        return text[:max(0, len(text) - self.hold)]

    async def events(self) -> AsyncIterator[str]:
        a, n = self.answer, len(self.answer.rows)
        toks: list[list[int]] = [[] for _ in range(n)]
        decoded = [""] * n  # the text of toks[i]
        steps: list[list[TokenLogprob]] = [[] for _ in range(n)]
        offsets: list[list[int]] = [[] for _ in range(n)]
        listed = [0] * n  # how many of steps[i] went out
        sent = [""] * n
        outs: list[Completion | None] = [None] * n
        try:
            if a.chat:
                for i in range(n):
                    yield sse(a.chunk(i, "", role=True, include_usage=self.include_usage))
            while any(o is None for o in outs):
                i, token, logprob = await self.queue.get()
                if token is not None:
                    if logprob is not None:
                        steps[i].append(logprob)
                        offsets[i].append(next_offset(offsets[i], decoded[i]))
                    toks[i].append(token)
                    decoded[i] = self.tokenizer.decode(toks[i], skip_special_tokens=True)
                    text = self._safe(i, decoded[i])
                    if text.startswith(sent[i]) and len(text) > len(sent[i]):
                        # the tokens whose text begins in what goes out now
                        upto = listed[i]
                        while upto < len(steps[i]) and offsets[i][upto] < len(text):
                            upto += 1
                        lp = a.logprobs(i, steps[i][listed[i]:upto], offsets[i][listed[i]:upto])
                        listed[i] = upto
                        yield sse(a.chunk(i, text[len(sent[i]):], include_usage=self.include_usage, logprobs=lp))
                        sent[i] = text
                    continue
                try:
                    out = self.tasks[i].result()
                except Exception as e:  # the answer has begun: the error goes in the stream, as OpenAI does
                    log.exception("a streamed row failed")
                    yield sse(error_body(f"generation failed ({type(e).__name__}); see the server log",
                                         "server_error"))
                    return
                outs[i] = out
                if not out.text.startswith(sent[i]):
                    log.warning("streamed text %r is not a prefix of the final %r", sent[i], out.text)
                rest = out.text[len(sent[i]):] if out.text.startswith(sent[i]) else ""
                lp = None
                if a.rows[i].logprobs is not None and a.strings is not None:
                    final, where = a.listed(out, offsets[i])  # the stream's offsets, where it saw every token
                    if len(final) > listed[i]:
                        lp = a.logprobs(i, final[listed[i]:], where[listed[i]:])
                if rest or lp is not None:
                    yield sse(a.chunk(i, rest, include_usage=self.include_usage, logprobs=lp))
                yield sse(a.chunk(i, "", out.finish_reason, include_usage=self.include_usage))
            if self.include_usage:
                yield sse(a.usage_chunk(outs))  # type: ignore[arg-type]
            yield sse("[DONE]")
        finally:
            self.cancel()


def prompts_of(req: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts: a text, a list of texts, token ids or a list of token-id lists.

    >>> [prompts_of(CompletionRequest(prompt=p)) for p in ("a", ["a", "b"], [1, 2], [[1], [2, 3]], [])]
    [['a'], ['a', 'b'], [[1, 2]], [[1], [2, 3]], [[]]]
    """
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if p and all(isinstance(x, (str, list)) for x in p):
        return list(p)  # type: ignore[arg-type]
    return [list(p)]  # type: ignore[arg-type]


async def completion_rows(req: CompletionRequest, checks: Checks, model: str) -> list[GenerateRow]:
    """``/v1/completions``: each prompt (with the shared soft prompt or its own) → ``n`` checked rows;
    prompt ``i``'s choice ``j`` is row ``i * n + j``."""
    check_fields(req, model)
    if req.echo:
        raise APIError(400, "echo=true is not supported by this server: it scores generated tokens only "
                            "(logprobs), not the prompt's", param="echo")
    prompts = prompts_of(req)
    softs = req.soft_prompt if isinstance(req.soft_prompt, list) else None
    if softs is not None and len(softs) != len(prompts):
        raise APIError(400, f"soft_prompt is a list of {len(softs)} soft prompts for {len(prompts)} prompt(s); "
                            f"give one soft prompt for all prompts or a list with one per prompt", param="soft_prompt")
    max_tokens = checks.new_tokens(COMPLETIONS_MAX_TOKENS if req.max_tokens is None else req.max_tokens, "max_tokens")
    ids = [await (checks.prompt_ids(p, None) if isinstance(p, str) else checks.prompt_ids(None, p)) for p in prompts]
    zs = [checks.soft(s) for s in softs] if softs is not None else [checks.soft(req.soft_prompt)] * len(prompts)
    return [row for z, i in zip(zs, ids) for row in decode_rows(req, z, i, max_tokens, req.logprobs)]


async def chat_rows(req: ChatCompletionRequest, checks: Checks, model: str, tokenizer: Any) -> list[GenerateRow]:
    """``/v1/chat/completions``: ``messages`` through the chat template → ``n`` checked rows."""
    check_fields(req, model)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
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
    return decode_rows(req, checks.soft(req.soft_prompt), ids, max_tokens,
                       (req.top_logprobs or 0) if req.logprobs else None)


__all__ = ["Answer", "Stream", "chat_rows", "chat_text", "check_fields", "completion_rows", "prompts_of", "run_rows",
           "sse", "usage"]
