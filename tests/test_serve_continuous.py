"""Continuous batching in the transformers backend (:mod:`lopa.serve.scheduler`): a short request
finishes while a long one decodes, a row that ends early in its group is answered at once, a client
that goes away frees its row, and every answer is the one static batching gives.

Ordering is asserted by events (which token came before which answer), never by timing thresholds.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch

from lopa.serve.backends import ClassifyRow, GenerateRow, TransformersBackend
from lopa.serve.batcher import Batcher
from lopa.serve.scheduler import ContinuousBatcher
from lopa.serve.wire import encode_soft_prompt
from serverproc import serve_in_thread

MODEL = "tiny-random-llama"
D = 64
LONG = 200

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def backend() -> TransformersBackend:
    return TransformersBackend(MODEL, dtype="float32", device="cpu")


def soft(seed: int, m: int = 4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(m, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


def long_row(be: TransformersBackend, on_token=None) -> GenerateRow:
    return GenerateRow(be.tokenize("Once upon a time"), soft(0, dtype=be.dtype), LONG, on_token=on_token)


def run(coro_fn, be: TransformersBackend, scheduling: str = "continuous", max_wait_ms: float = 1):
    """``coro_fn(batcher)`` on a started batcher of ``be``, closed afterwards."""
    async def main():
        b = be.make_batcher(max_batch_size=8, max_wait_ms=max_wait_ms, scheduling=scheduling)
        await b.start()
        try:
            return await coro_fn(b)
        finally:
            await b.close()
    return asyncio.run(main())


def streamed(events: list, name: str, first: asyncio.Event, on_each=lambda: None):
    """An ``on_token`` (called from the worker thread) that logs ``name`` and sets ``first`` on the first token."""
    loop = asyncio.get_running_loop()

    def on_token(token: int, logprob=None):
        events.append(name)
        loop.call_soon_threadsafe(first.set)
        return on_each()
    return on_token


def test_the_server_schedules_continuously_by_default(backend):
    assert isinstance(backend.make_batcher(max_batch_size=4, max_wait_ms=1), ContinuousBatcher)
    static = backend.make_batcher(max_batch_size=4, max_wait_ms=1, scheduling="static")
    assert type(static) is Batcher
    with pytest.raises(ValueError, match="scheduling must be one of"):
        backend.make_batcher(max_batch_size=4, max_wait_ms=1, scheduling="eager")


@pytest.mark.parametrize("scheduling", ["continuous", "static"])
def test_a_short_request_finishes_while_a_long_one_decodes(backend, scheduling):
    """Sent after the long request's first token, the 2-token request is answered before the long one
    ends (continuous); static batching makes it wait for the whole long batch."""
    async def main(b):
        events: list[str] = []
        first = asyncio.Event()
        long = asyncio.ensure_future(b.submit("generate", long_row(backend, streamed(events, "long", first))))
        await first.wait()
        short = GenerateRow(backend.tokenize("Hi"), soft(1), 2)
        got = await b.submit("generate", short)
        events.append("short-done")
        long_done_first = long.done()
        label = await b.submit("classify", ClassifyRow([1, 2, 3], soft(2), [5, 9]))
        events.append("classify-done")
        return events, got, await long, long_done_first, label

    events, short, long, long_done_first, label = run(main, backend, scheduling)
    assert short.completion_tokens == 2 and long.completion_tokens == LONG  # no EOS from this prompt
    assert label == backend.classify([ClassifyRow([1, 2, 3], soft(2), [5, 9])])[0]
    if scheduling == "static":
        assert long_done_first and events.index("short-done") == LONG
        return
    assert not long_done_first
    # the long row went on decoding after the short one and the classification were answered
    assert events.index("short-done") < events.index("classify-done") < len(events) - 1
    assert events[events.index("classify-done") + 1:].count("long") > 0


def _stop_that_ends(tokenizer, early: list[int], late_text: str) -> tuple[str, int]:
    """A stop string that the ``early`` tokens complete within their first ten and ``late_text`` never holds."""
    for k in range(10):
        piece = tokenizer.decode([early[k]], skip_special_tokens=True).strip()
        before = tokenizer.decode(early[:k], skip_special_tokens=True)
        if len(piece) >= 2 and piece not in before and piece not in late_text:
            return piece, k
    pytest.skip("no stop string separates the two rows")


def test_a_row_that_ends_early_is_answered_before_its_group_ends(backend):
    """Two rows in one decode group (same settings and padded length); a stop string ends one of them
    after a few tokens: it is answered while its neighbour still decodes, with static batching's answer."""
    ids_a, ids_b = backend.tokenize("def add(a, b):"), backend.tokenize("Once upon a time")
    za, zb = soft(3), soft(4)
    a_toks: list[int] = []
    free = backend.generate([GenerateRow(ids_a, za, 40, on_token=a_toks.append), GenerateRow(ids_b, zb, 40)])
    stop, _ = _stop_that_ends(backend.tokenizer, a_toks, free[1].text)
    rows = lambda **kw: [GenerateRow(ids_a, za, 40, stop=(stop,), **kw), GenerateRow(ids_b, zb, 40, stop=(stop,))]
    assert len(backend.open_groups(rows())) == 1
    static = backend.generate(rows())
    assert static[0].completion_tokens < 10 and static[1].completion_tokens == 40

    async def main(b):
        events: list[str] = []
        first = asyncio.Event()
        a_row, b_row = rows()
        b_row.on_token = streamed(events, "b", first)
        futs = [asyncio.ensure_future(b.submit("generate", r)) for r in (a_row, b_row)]
        futs[0].add_done_callback(lambda _: events.append("a-done"))
        return events, await asyncio.gather(*futs)

    events, outs = run(main, backend, max_wait_ms=200)
    assert outs == static
    assert events.index("a-done") < events.count("b")  # answered with some of b's tokens still to come


def _rows_of_every_kind(be: TransformersBackend) -> list[GenerateRow]:
    texts = ["Once upon a time", "def add(a, b):", "Review: dull and long", "hello", "The capital of France is"]
    rows = []
    for i, t in enumerate(texts * 2):
        kw = dict(temperature=0.8, top_p=0.9, seed=7 + i) if i % 2 else {}
        rows.append(GenerateRow(be.tokenize(t), soft(10 + i, 2 + i % 3, be.dtype), 12 + 6 * (i % 3),
                                stop=(" the",) if i % 4 == 3 else (), logprobs=3 if i % 3 == 0 else None, **kw))
    return rows


def test_answers_equal_static_batching_arriving_together(backend):
    """Rows admitted together form the groups static batching forms: the same answers bit for bit
    (greedy, seeded sampling, log-probabilities, stop strings), in float32 too."""
    static = backend.generate(_rows_of_every_kind(backend))

    async def main(b):
        return await asyncio.gather(*(b.submit("generate", r) for r in _rows_of_every_kind(backend)))

    assert run(main, backend, max_wait_ms=200) == static


def test_answers_equal_each_request_alone_arriving_mixed():
    """bfloat16, batch-invariant: a request's answer alone equals its answer arriving in the middle of
    other decoding groups (bit for bit, log-probabilities included)."""
    bf16 = TransformersBackend(MODEL, dtype="bfloat16", device="cpu")
    assert bf16.batch_invariant
    alone = [bf16.generate([r])[0] for r in _rows_of_every_kind(bf16)]

    async def main(b):
        first = asyncio.Event()
        long = asyncio.ensure_future(b.submit("generate", long_row(bf16, streamed([], "long", first))))
        await first.wait()
        futs = []
        for r in _rows_of_every_kind(bf16):  # one at a time, each joining groups already decoding
            futs.append(asyncio.ensure_future(b.submit("generate", r)))
            await asyncio.sleep(0.005)
        return await asyncio.gather(*futs), await long, b.stats

    mixed, long, stats = run(main, bf16)
    assert mixed == alone
    assert long == bf16.generate([long_row(bf16)])[0]


def test_a_client_that_leaves_frees_its_row(backend):
    """A streamed row whose ``on_token`` says False ends there; a request whose future is cancelled
    (its client went away) is dropped from its group at the next step, and the group goes."""
    async def main(b):
        events: list[str] = []
        first = asyncio.Event()
        gone = asyncio.ensure_future(b.submit("generate", long_row(backend, streamed(events, "gone", first))))
        await first.wait()
        gone.cancel()
        seen: list[str] = []
        left = long_row(backend, streamed(seen, "left", asyncio.Event(), on_each=lambda: len(seen) < 3))
        out = await b.submit("generate", left)
        return events, out, b.running, len(b._open)

    events, out, running, open_groups = run(main, backend)
    assert out.completion_tokens == 3 and out.finish_reason == "stop"
    assert running == 0 and open_groups == 0
    assert len(events) < 10  # dropped within a step or two of its cancellation, far before its budget


# -- through a real server -------------------------------------------------------------------------

def test_over_http_a_short_completion_is_answered_while_a_long_stream_goes_on(backend, monkeypatch):
    """A real server: a 2-token completion sent after a 200-token stream's first chunk is answered
    while the stream's group still decodes (the server's own log of decode steps says so), and the
    stream then ends whole."""
    from lopa.serve.server import ServeConfig, create_app
    steps: list[tuple[int, int]] = []  # (the group's token budget, rows that ended), in the worker's order
    open_groups = backend.open_groups

    def logged_groups(rows):
        groups = open_groups(rows)
        for g in groups:
            def step(g=g, inner=g.step):
                ended = inner()
                steps.append((g.rows[0].max_new_tokens, len(ended)))
                return ended
            g.step = step
        return groups

    monkeypatch.setattr(backend, "open_groups", logged_groups)
    app = create_app(backend, ServeConfig(model=MODEL, dtype="float32", max_wait_ms=1, max_new_tokens=256))
    srv, thread, url = serve_in_thread(app)
    z = encode_soft_prompt(soft(0))

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            body = {"prompt": "Once upon a time", "max_tokens": LONG, "stream": True, "soft_prompt": z}
            async with c.stream("POST", "/v1/completions", json=body) as r:
                lines = r.aiter_lines()
                while not (await lines.__anext__()).startswith("data: {"):
                    pass
                short = await c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "soft_prompt": z})
                rest = [line async for line in lines if line.startswith("data: ")]
                return short, rest

    try:
        short, rest = asyncio.run(main())
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 2
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
    short_end = steps.index((2, 1))
    assert steps[short_end + 1:].count((LONG, 0)) > 0 and steps[-1] == (LONG, 1)
