"""Log-probabilities in the answers, on scripted tokens (no model): characters split over byte-level
tokens, a stop string that cuts the text, and streamed chunks that add up to the whole answer."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from lopa.models import load_tokenizer
from lopa.prefix import TokenLogprob, cut_at_stop
from lopa.serve.logprobs import TokenStrings
from lopa.serve.openai_api import Answer, Stream
from lopa.serve.protocol import Completion, GenerateRow

TEXT = "h 日本 wörld, then a stop here and more"
STOP = ("a stop",)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-random-llama")


class Scripted:
    """A submitter that 'generates' fixed tokens: each through ``on_token``, then the Completion a
    backend would return (the text cut at the stop string, every token counted and listed)."""

    def __init__(self, tokenizer, ids: list[int]):
        self.tokenizer, self.ids = tokenizer, ids

    async def submit(self, kind: str, row: GenerateRow) -> Completion:
        steps = [TokenLogprob(t, -0.5 * (j + 1), ((t, -0.5 * (j + 1)), (7, -9.0))) for j, t in enumerate(self.ids)]
        for s in steps:
            if row.on_token is not None:
                row.on_token(s.token, s.keep_top(row.logprobs))
            await asyncio.sleep(0)
        decoded = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        text = cut_at_stop(decoded, row.stop)
        return Completion(text, "stop" if text != decoded else "length", len(self.ids),
                          [s.keep_top(row.logprobs) for s in steps])


def _rows(ids_len: int, k: int) -> list[GenerateRow]:
    return [GenerateRow([1, 2], torch.zeros(2, 64), ids_len, stop=STOP, logprobs=k)]


async def _stream(answer: Answer, sub: Scripted, tok) -> list[dict]:
    s = Stream(answer, sub, tok, include_usage=False)
    await s.started()
    return [json.loads(e[6:]) for e in [x async for x in s.events()] if e.startswith("data: {")]


@pytest.mark.parametrize("chat", [False, True])
def test_split_characters_and_a_stop_string(tok, chat):
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert any(TokenStrings(tok).token(t)[0].startswith("bytes:") for t in ids)  # 日本 splits over tokens
    sub = Scripted(tok, ids)
    obj = "chat.completion" if chat else "text_completion"
    whole_answer = Answer(obj, "m", _rows(len(ids), 1), tok)
    (out,) = asyncio.run(_run_one(sub, whole_answer.rows[0]))
    whole = whole_answer.body([out])["choices"][0]
    text = whole["message"]["content"] if chat else whole["text"]
    assert text == "h 日本 wörld, then "
    chunks = asyncio.run(_stream(Answer(obj, "m", _rows(len(ids), 1), tok), Scripted(tok, ids), tok))
    streamed = "".join((c["choices"][0]["delta"].get("content") or "") if chat else c["choices"][0]["text"]
                       for c in chunks)
    assert streamed == text
    lps = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"] is not None]
    if chat:
        listed = whole["logprobs"]["content"]
        assert [e for lp in lps for e in lp["content"]] == listed
        # " a" begins before the cut (the stop string starts inside it) and is listed; " stop" on are not
        assert b"".join(bytes(e["bytes"]) for e in listed).decode() == "h 日本 wörld, then a"
        assert all(len(e["top_logprobs"]) == 1 for e in listed)
    else:
        listed = whole["logprobs"]
        assert [t for lp in lps for t in lp["tokens"]] == listed["tokens"]
        assert [o for lp in lps for o in lp["text_offset"]] == listed["text_offset"]
        assert all(o < len(text) for o in listed["text_offset"]) and len(listed["tokens"]) < len(ids)
        assert listed["tokens"][0] == "h" and listed["tokens"][-1] == " a"
        for tok_str, off in zip(listed["tokens"][:-1], listed["text_offset"]):
            if not tok_str.startswith("bytes:"):
                assert text[off:].startswith(tok_str)
        # each chunk's tokens begin in that chunk's text
        at = 0
        for c in chunks:
            piece, lp = c["choices"][0]["text"], c["choices"][0]["logprobs"]
            if lp is not None:
                assert all(o < at + len(piece) for o in lp["text_offset"])
            at += len(piece)


async def _run_one(sub: Scripted, row: GenerateRow) -> list[Completion]:
    return [await sub.submit("generate", row)]
