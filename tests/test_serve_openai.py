"""The OpenAI endpoints against the official ``openai`` client: a real ``lopa serve`` on loopback.

Chat through the model's chat template, ``n`` choices, ``stream: true`` on both endpoints (with the
usage chunk), and bad requests answered 4xx. The server's answers are checked against the in-process
backend on the same text and soft prompt, so a chat is known to be the templated text, not only a 200.
"""

from __future__ import annotations

import os

import openai
import pytest
import torch

from lopa.models import load_tokenizer
from lopa.prompt_format import PromptFormat, build_text
from lopa.serve.backends import GenerateRow, TransformersBackend
from lopa.serve.wire import encode_soft_prompt
from serverproc import start_server, stop_server, wait_healthy

KEY = "openai-test-key"
MODEL = "tiny-random-llama"
D = 64
MAX_NEW = 8
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "LOPA_API_KEY": KEY, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc, url = start_server(["--model", MODEL, "--dtype", "float32", "--max-wait-ms", "2",
                              "--max-new-tokens", str(MAX_NEW), "--log-level", "warning", "--threads", "1"], log, env)
    wait_healthy(proc, url, log, timeout_s=120)
    yield url
    stop_server(proc, log, timeout_s=30)


@pytest.fixture(scope="module")
def oa(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def soft() -> dict:
    return encode_soft_prompt(torch.randn(4, D, generator=torch.Generator().manual_seed(0)))


@pytest.fixture(scope="module")
def backend() -> TransformersBackend:
    torch.set_num_threads(1)
    return TransformersBackend(MODEL, dtype="float32")


def greedy(backend: TransformersBackend, text: str, soft: dict, max_new: int) -> str:
    from lopa.serve.wire import decode_soft_prompt
    z = decode_soft_prompt(soft, hidden_size=D, max_soft_tokens=64, out_dtype=backend.dtype)
    (out,) = backend.generate([GenerateRow(backend.tokenize(text), z, max_new)])
    return out.text


def test_chat_is_the_chat_template_text(oa, soft, backend):
    r = oa.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0.0,
                                   extra_body={"soft_prompt": soft})
    text = build_text(load_tokenizer(MODEL), PromptFormat(chat_template=True), messages=MESSAGES).prompt
    assert r.object == "chat.completion" and len(r.choices) == 1
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == greedy(backend, text, soft, 6)
    assert r.choices[0].finish_reason in ("stop", "length")
    n_prompt = len(backend.tokenize(text)) + 4
    assert r.usage.prompt_tokens == n_prompt and r.usage.total_tokens == n_prompt + r.usage.completion_tokens
    assert 1 <= r.usage.completion_tokens <= 6


def test_n_choices_on_both_endpoints(oa, soft):
    chat = oa.chat.completions.create(model=MODEL, messages=MESSAGES, n=3, seed=5, max_tokens=MAX_NEW,
                                      extra_body={"soft_prompt": soft})
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert len({c.message.content for c in chat.choices}) > 1  # seed + i per choice: distinct samples
    again = oa.chat.completions.create(model=MODEL, messages=MESSAGES, n=3, seed=5, max_tokens=MAX_NEW,
                                       extra_body={"soft_prompt": soft})
    assert [c.message.content for c in again.choices] == [c.message.content for c in chat.choices]
    comp = oa.completions.create(model=MODEL, prompt="Once upon", n=2, max_tokens=4, temperature=0.0,
                                 extra_body={"soft_prompt": soft})
    assert [c.index for c in comp.choices] == [0, 1] and comp.choices[0].text == comp.choices[1].text
    # greedy choices are equal, so they cost equally; usage counts every choice
    assert comp.usage.completion_tokens % 2 == 0 and 2 <= comp.usage.completion_tokens <= 8


def test_chat_stream_equals_the_whole_answer(oa, soft):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0.0, extra_body={"soft_prompt": soft})
    whole = oa.chat.completions.create(**kw)
    chunks = list(oa.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    plain = list(oa.chat.completions.create(**kw, stream=True))
    assert all(c.usage is None for c in plain)
    # token by token: more than one content chunk for a multi-token answer
    pieces = [c.choices[0].delta.content for c in plain if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 or whole.usage.completion_tokens <= 1, pieces


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_streamed_text_with_stop_strings_equals_the_whole(oa, soft, endpoint):
    """A stop string may complete over several tokens: what was streamed must never be taken back."""
    for seed in range(4):
        kw = dict(model=MODEL, max_tokens=MAX_NEW, temperature=1.0, seed=seed, extra_body={"soft_prompt": soft})
        if endpoint == "chat":
            free = oa.chat.completions.create(messages=MESSAGES, **kw).choices[0].message.content
        else:
            free = oa.completions.create(prompt="Once upon a time", **kw).choices[0].text
        stop = [free[3:6] or "zz", "\n"]  # a stop string the sampled text really meets, mid-answer
        if endpoint == "chat":
            whole = oa.chat.completions.create(messages=MESSAGES, stop=stop, **kw).choices[0]
            parts = [(c.choices[0].delta.content or "", c.choices[0].finish_reason)
                     for c in oa.chat.completions.create(messages=MESSAGES, stop=stop, stream=True, **kw)]
            want = whole.message.content
        else:
            whole = oa.completions.create(prompt="Once upon a time", stop=stop, **kw).choices[0]
            parts = [(c.choices[0].text, c.choices[0].finish_reason)
                     for c in oa.completions.create(prompt="Once upon a time", stop=stop, stream=True, **kw)]
            want = whole.text
        assert "".join(t for t, _ in parts) == want
        assert [f for _, f in parts if f] == [whole.finish_reason]


def test_completions_stream_equals_the_whole_answer(oa, soft):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0.0, extra_body={"soft_prompt": soft})
    whole = oa.completions.create(**kw)
    chunks = list(oa.completions.create(**kw, stream=True, n=2, stream_options={"include_usage": True}))
    for i in range(2):
        assert "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) == \
            whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 2 * whole.usage.completion_tokens


def test_bad_chat_requests_are_4xx(oa, soft, server):
    import httpx
    with pytest.raises(openai.UnprocessableEntityError, match="content"):
        oa.chat.completions.create(model=MODEL, messages=[{"role": "user"}], extra_body={"soft_prompt": soft})
    with pytest.raises(openai.UnprocessableEntityError, match="role"):
        oa.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}],
                                   extra_body={"soft_prompt": soft})
    with pytest.raises(openai.BadRequestError, match="soft_prompt is required"):
        oa.chat.completions.create(model=MODEL, messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="logprobs=True is not supported"):
        oa.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=True, extra_body={"soft_prompt": soft})
    with pytest.raises(openai.BadRequestError, match="max_tokens is 999"):
        oa.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=999, extra_body={"soft_prompt": soft})
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        oa.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_body={"soft_prompt": soft})
    with pytest.raises(openai.UnprocessableEntityError, match="n"):
        oa.chat.completions.create(model=MODEL, messages=MESSAGES, n=0, extra_body={"soft_prompt": soft})
    r = httpx.post(server + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"messages": [], "soft_prompt": soft, "stream": True})
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/json")  # not a stream


def test_a_row_whose_client_left_stops_decoding(backend, soft):
    """``on_token`` returning False (the stream's client went away) ends that row at once; its
    neighbour in the same pass decodes on to its budget."""
    from lopa.serve.wire import decode_soft_prompt
    z = decode_soft_prompt(soft, hidden_size=D, max_soft_tokens=64, out_dtype=backend.dtype)
    ids = backend.tokenize("Once upon a time")
    (free,) = backend.generate([GenerateRow(ids, z, MAX_NEW)])
    assert free.completion_tokens == MAX_NEW  # the tiny random model meets no EOS here
    seen: list[int] = []
    left = GenerateRow(ids, z, MAX_NEW, on_token=lambda t: seen.append(t) or len(seen) < 2)
    stays = GenerateRow(ids, z, MAX_NEW, on_token=lambda t: None)
    out_left, out_stays = backend.generate([left, stays])
    assert out_left.completion_tokens == 2 and len(seen) == 2
    assert out_stays.text == free.text


def test_a_stream_dropped_by_its_client_leaves_the_server_serving(server, soft, oa):
    import httpx
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": MAX_NEW, "soft_prompt": soft}
    for _ in range(3):
        with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            first = next(r.iter_lines())
            assert first.startswith("data: {")
    r = oa.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, extra_body={"soft_prompt": soft})
    assert r.choices[0].message.content is not None
