"""The OpenAI endpoints against the official ``openai`` client: a real ``lopa serve`` on loopback.

Chat through the model's chat template, ``n`` choices, ``stream: true`` on both endpoints (with the
usage chunk), log-probabilities in both endpoints' shapes (streamed too), lists of prompts, and bad
requests answered 4xx. The server's answers are checked against the in-process backend on the same
text and soft prompt, so a chat is known to be the templated text, not only a 200, and greedy
log-probabilities against one plain forward pass over ``[Z ; prompt ; generated tokens]``.
"""

from __future__ import annotations

import os

import openai
import pytest
import torch

from lopa import prefix
from lopa.models import load_tokenizer
from lopa.prompt_format import PromptFormat, build_text
from lopa.serve.backends import GenerateRow, TransformersBackend
from lopa.serve.wire import decode_soft_prompt, encode_soft_prompt
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
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs=true"):
        oa.chat.completions.create(model=MODEL, messages=MESSAGES, top_logprobs=2, extra_body={"soft_prompt": soft})
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


# -- log-probabilities and lists of prompts ----------------------------------------------------------

PROMPT = "Once upon a time"


def forward_logprobs(backend: TransformersBackend, z: torch.Tensor, prompt_ids: list[int],
                     new_ids: list[int]) -> torch.Tensor:
    """log_softmax at the positions that predicted ``new_ids``: one pass over ``[Z ; prompt ; new]``
    without a KV cache (len(new_ids) × V)."""
    batch = prefix.assemble(backend.base, [z], [prompt_ids + new_ids])
    with torch.inference_mode():
        logits = backend.base(**batch.model_inputs(), use_cache=False).logits[0].float()
    return torch.log_softmax(logits[-len(new_ids) - 1:-1], dim=-1)


def test_greedy_completion_logprobs_are_the_models(oa, soft, backend):
    """``logprobs: 5`` at temperature 0: the chosen token leads its top list, and every number is what
    one plain forward pass over [Z ; prompt ; generated tokens] gives."""
    r = oa.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0.0, logprobs=5,
                              extra_body={"soft_prompt": soft})
    (c,) = r.choices
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == \
        r.usage.completion_tokens == 6  # the tiny random model meets no EOS here
    for chosen, tok, top in zip(lp.token_logprobs, lp.tokens, lp.top_logprobs):
        assert 5 <= len(top) <= 6 and top[tok] == chosen == max(top.values())
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert all(c.text[o:].startswith(t) for o, t in zip(lp.text_offset, lp.tokens) if not t.startswith("bytes:"))

    z = decode_soft_prompt(soft, hidden_size=D, max_soft_tokens=64, out_dtype=backend.dtype)
    ids = backend.tokenize(PROMPT)
    (ref,) = backend.generate([GenerateRow(ids, z, 6, logprobs=5)])
    assert ref.text == c.text
    new = [s.token for s in ref.logprobs]
    want = forward_logprobs(backend, z, ids, new)
    got = torch.tensor(lp.token_logprobs)
    assert torch.allclose(got, want[torch.arange(len(new)), torch.tensor(new)], atol=1e-4), (got, want.max(-1))
    for step, row in zip(ref.logprobs, want):  # the top 5 ids too, in order
        assert [t for t, _ in step.top] == row.topk(5).indices.tolist()


def test_chat_logprobs_and_top_logprobs(oa, soft):
    r = oa.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0.0, logprobs=True,
                                   top_logprobs=3, extra_body={"soft_prompt": soft})
    (c,) = r.choices
    content = c.logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        assert e.logprob == e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
        assert e.logprob <= 0
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8") == c.message.content
    # logprobs without top_logprobs: each token alone; without logprobs: none
    bare = oa.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0.0, logprobs=True,
                                      extra_body={"soft_prompt": soft}).choices[0].logprobs.content
    assert [(e.token, e.logprob, e.top_logprobs) for e in bare] == [(e.token, e.logprob, []) for e in content]
    assert oa.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, temperature=0.0,
                                      extra_body={"soft_prompt": soft}).choices[0].logprobs is None


def test_sampled_logprobs_are_the_raw_distribution(oa, soft):
    """At temperature 2 the numbers are still the model's own distribution (as vLLM's default), not
    the flattened one sampled from: the same token after the same text scores the same."""
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=1, logprobs=20, extra_body={"soft_prompt": soft})
    greedy = oa.completions.create(temperature=0.0, **kw).choices[0].logprobs.top_logprobs[0]
    for seed in range(3):
        hot = oa.completions.create(temperature=2.0, seed=seed, **kw).choices[0].logprobs
        tok, value = hot.tokens[0], hot.token_logprobs[0]
        if tok in greedy:
            assert abs(greedy[tok] - value) < 1e-5
        assert value <= max(greedy.values()) + 1e-5


def _chunk_logprobs(chunks, chat: bool) -> list:
    out = []
    for ch in chunks:
        if not ch.choices or ch.choices[0].logprobs is None:
            continue
        lp = ch.choices[0].logprobs
        if chat:
            out += [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs]) for e in lp.content]
        else:
            out += list(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset))
    return out


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_streamed_logprobs_equal_the_whole_answers(oa, soft, endpoint):
    """Streamed with logprobs, with and without a stop string that cuts the text: the chunks' tokens,
    in order, are the whole answer's, and each chunk carries the tokens whose text begins in it."""
    dropped = 0
    for seed, cut in [(0, False), (1, True), (2, True)]:
        kw = dict(model=MODEL, max_tokens=MAX_NEW, temperature=1.0, seed=seed, extra_body={"soft_prompt": soft})
        if endpoint == "chat":
            kw.update(messages=MESSAGES, logprobs=True, top_logprobs=2)
            create, text_of = oa.chat.completions.create, (lambda c: c.message.content)
        else:
            kw.update(prompt=PROMPT, logprobs=2)
            create, text_of = oa.completions.create, (lambda c: c.text)
        if cut:
            free = text_of(create(**kw).choices[0])
            kw["stop"] = [free[4:7] or "zz"]
        resp = create(**kw)
        whole = resp.choices[0]
        chunks = list(create(**kw, stream=True))
        if endpoint == "chat":
            want = [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs]) for e in whole.logprobs.content]
            streamed_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            lp = whole.logprobs
            want = list(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset))
            streamed_text = "".join(c.choices[0].text for c in chunks if c.choices)
            for ch in chunks:  # a chunk's tokens begin inside its own text
                if ch.choices and ch.choices[0].logprobs is not None and ch.choices[0].text:
                    start = streamed_text.find(ch.choices[0].text)
                    assert all(o < start + len(ch.choices[0].text) for o in ch.choices[0].logprobs.text_offset)
        assert streamed_text == text_of(whole)
        assert _chunk_logprobs(chunks, endpoint == "chat") == want
        assert len(want) >= 1 and (cut or len(want) == MAX_NEW)
        dropped += resp.usage.completion_tokens - len(want)
    assert dropped > 0  # the stop strings' tokens: counted in usage, not listed


def test_a_list_of_prompts_with_n_choices(oa, soft):
    """prompt i's choice j is choice i * n + j, each as if its prompt came alone (a seed included)."""
    prompts = ["Once upon", "The cat sat", "def add(a, b):"]
    r = oa.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=4, temperature=1.0, seed=3,
                              extra_body={"soft_prompt": soft})
    assert [c.index for c in r.choices] == list(range(6))
    for i, p in enumerate(prompts):
        alone = oa.completions.create(model=MODEL, prompt=p, n=2, max_tokens=4, temperature=1.0, seed=3,
                                      extra_body={"soft_prompt": soft})
        assert [c.text for c in r.choices[2 * i:2 * i + 2]] == [c.text for c in alone.choices]
    tok = load_tokenizer(MODEL)
    n_prompt = sum(len(tok(p, add_special_tokens=False)["input_ids"]) + 4 for p in prompts)
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == sum(1 for _ in r.choices) * 4  # no EOS on the tiny model


def test_a_list_of_prompts_with_a_soft_prompt_each(oa, soft):
    other = encode_soft_prompt(torch.randn(6, D, generator=torch.Generator().manual_seed(1)))
    kw = dict(model=MODEL, max_tokens=4, temperature=0.0, logprobs=1)
    r = oa.completions.create(prompt=["Once upon", "The cat sat"], extra_body={"soft_prompt": [soft, other]}, **kw)
    a = oa.completions.create(prompt="Once upon", extra_body={"soft_prompt": soft}, **kw).choices[0]
    b = oa.completions.create(prompt="The cat sat", extra_body={"soft_prompt": other}, **kw).choices[0]
    assert [(c.text, c.logprobs.token_logprobs) for c in r.choices] == \
        [(a.text, a.logprobs.token_logprobs), (b.text, b.logprobs.token_logprobs)]
    # token-id prompts in a list too, and streamed: chunks carry their choice's index
    ids = load_tokenizer(MODEL)("Once upon", add_special_tokens=False)["input_ids"]
    chunks = list(oa.completions.create(prompt=[ids, ids], n=2, stream=True, extra_body={"soft_prompt": soft}, **kw))
    for i in range(4):
        assert "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) == a.text


def test_bad_logprobs_and_prompt_lists_are_4xx(oa, soft, server):
    import httpx
    extra = {"soft_prompt": soft}
    for bad in (21, -1):
        with pytest.raises(openai.UnprocessableEntityError, match="logprobs"):
            oa.completions.create(model=MODEL, prompt="x", logprobs=bad, extra_body=extra)
        with pytest.raises(openai.UnprocessableEntityError, match="top_logprobs"):
            oa.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=bad,
                                       extra_body=extra)
    with pytest.raises(openai.BadRequestError, match="echo=true is not supported"):
        oa.completions.create(model=MODEL, prompt="x", echo=True, logprobs=1, extra_body=extra)
    with pytest.raises(openai.BadRequestError, match="top_logprobs is a chat field"):
        oa.completions.create(model=MODEL, prompt="x", extra_body={**extra, "top_logprobs": 2})
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs=true"):
        oa.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=False, top_logprobs=0, extra_body=extra)
    with pytest.raises(openai.BadRequestError, match="a list of 2 soft prompts for 3 prompt"):
        oa.completions.create(model=MODEL, prompt=["a", "b", "c"], extra_body={"soft_prompt": [soft, soft]})
    with pytest.raises(openai.UnprocessableEntityError, match="prompt"):
        oa.completions.create(model=MODEL, prompt=["a"] * 65, extra_body=extra)
    headers = {"Authorization": f"Bearer {KEY}"}
    for path, body in [("/v1/completions", {"prompt": "x", "logprobs": True}),
                       ("/v1/completions", {"prompt": "x", "logprobs": "3"}),
                       ("/v1/completions", {"prompt": "x", "logprobs": 2.5}),
                       ("/v1/completions", {"prompt": "x", "echo": "yes"}),
                       ("/v1/completions", {"prompt": ["x", 3]}),
                       ("/v1/completions", {"prompt": "x", "soft_prompt": []}),
                       ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": 1}),
                       ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": True}),
                       ("/v1/chat/completions", {"messages": MESSAGES, "soft_prompt": [soft]})]:
        r = httpx.post(server + path, headers=headers, json={"soft_prompt": soft, "max_tokens": 2, **body})
        assert r.status_code == 422 and "error" in r.json(), (body, r.text)


def test_the_clients_chat_over_http_equals_the_servers_chat_endpoint(server, oa, tiny_base, tmp_path):
    """lopa.Client renders a chat-format artifact's conversation (recorded system prompt first) with the
    tokenizer it loads by the artifact's model name; the server's chat endpoint renders the same text."""
    import lopa
    from lopa.client import Client
    base, tok = tiny_base
    system = "Be brief."
    task = {"name": "qa", "kind": "generation", "prompt_format": {"chat_template": True, "system_prompt": system}}
    path = lopa.SoftPromptModel(base, tok, lopa.make_config("prompt-tuning", num_virtual_tokens=3, seed=2),
                                task=task).save_pretrained(tmp_path / "a")
    conv = [{"role": "user", "content": "Name a colour."}]
    with Client(path, url=server, api_key=KEY) as client:
        assert client.transport.tokenizer is None  # the weights stay on the server
        text = client.build_prompt(messages=conv)
        assert text == build_text(tok, PromptFormat(True, system), messages=conv).prompt
        mine = client.chat([conv], max_new_tokens=MAX_NEW)[0]
        z = client.soft_prompt([text])[0]
    r = oa.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": system}, *conv],
                                   max_tokens=MAX_NEW, temperature=0, extra_body={"soft_prompt": encode_soft_prompt(z)})
    assert r.choices[0].message.content == mine
