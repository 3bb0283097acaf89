"""The server against the in-process path, under concurrency and load, and against bad input.

A real ``lopa serve`` runs in a subprocess on a loopback port (tiny-random-llama, float32); the same
numbers are computed in this process through :class:`lopa.client.Client` (url=None) or the backend.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

import lopa
from lopa.client import Client, ClientError, ServerError
from lopa.serve.backends import ClassifyRow, GenerateRow, TransformersBackend
from lopa.serve.batcher import Batcher, BatcherClosed, torch_threads_init
from lopa.serve.wire import encode_soft_prompt
from serverproc import serve_in_thread, start_server, stop_server, wait_healthy

KEY = "test-key-123"
MODEL = "tiny-random-llama"
D = 64
MAX_SOFT = 16
MAX_PROMPT = 256
MAX_NEW = 32
TASK = {"name": "toy", "kind": "classification", "template": "Review: {text}\nSentiment:",
        "label_words": [" negative", " positive"]}
LABEL_SETS = [[" no", " yes"], [" negative", " positive"], [" bad", " okay", " good"]]
WORDS = ("the a film was great dull fine plot actor scene long short funny sad music ending story "
         "really not quite bright dark warm cold").split()
TEXTS = ["Review: a fine film\nSentiment:", "Review: dull and long\nSentiment:",
         "Review: the actors were great\nSentiment:", "def add(a, b):\n"]


def random_text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))


def random_soft(rng: random.Random, m: int | None = None) -> torch.Tensor:
    m = m or rng.randint(1, MAX_SOFT)
    return torch.randn(m, D, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))


# -- fixtures --------------------------------------------------------------------------------------



pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    base, tok = lopa.load_base(MODEL)
    out = {}
    configs = {"prompt-tuning": lopa.make_config("prompt-tuning", num_virtual_tokens=5),
               "lopa": lopa.make_config("lopa", num_virtual_tokens=4, rank=2, hidden_size=16,
                                        encoder="tiny-random-bert")}
    for i, (name, cfg) in enumerate(configs.items()):
        model = lopa.SoftPromptModel(base, tok, cfg, task=TASK)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():  # trained-looking weights: tasks and instances really differ
            for p in model.generator.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
        out[name] = model.save_pretrained(tmp_path_factory.mktemp(name))
    return out


@pytest.fixture(scope="module")
def backend() -> TransformersBackend:
    return TransformersBackend(MODEL, dtype="float32")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``lopa serve`` in a subprocess; at the end it must stop cleanly on SIGINT."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "LOPA_API_KEY": KEY, "TOKENIZERS_PARALLELISM": "false"}
    proc, url = start_server(["--model", MODEL, "--dtype", "float32", "--max-batch-size", "32", "--max-wait-ms", "2",
                              "--max-soft-tokens", str(MAX_SOFT), "--max-prompt-tokens", str(MAX_PROMPT),
                              "--max-new-tokens", str(MAX_NEW), "--log-level", "warning", "--threads", "1"], log, env)
    wait_healthy(proc, url, log, timeout_s=120)
    yield url
    stop_server(proc, log, timeout_s=30)


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


# -- agreement with the in-process path ------------------------------------------------------------

def test_health(http):
    h = http.get("/health").json()
    assert h["status"] == "ok" and h["model"] == MODEL and h["hidden_size"] == D
    assert h["max_soft_tokens"] == MAX_SOFT and h["dtype"] == "float32" and h["backend"] == "transformers"
    assert h["prefix_caching"] is False  # off by default (--prefix-cache-mib 0)
    assert httpx.get(http.base_url.join("/health")).status_code == 200  # no key needed


@pytest.mark.parametrize("method", ["prompt-tuning", "lopa"])
def test_server_matches_in_process(server, artifacts, method):
    local = Client(artifacts[method])
    remote = Client(artifacts[method], url=server, api_key=KEY, concurrency=1)  # one request at a time
    assert torch.equal(local.soft_prompt(TEXTS), remote.soft_prompt(TEXTS))
    a, b = local.classify(TEXTS), remote.classify(TEXTS)
    for x, y in zip(a, b):
        assert x["label"] == y["label"] and x["label_word"] == y["label_word"]
        assert max(abs(p - q) for p, q in zip(x["logprobs"], y["logprobs"])) < 1e-5
    assert local.generate(TEXTS, max_new_tokens=12) == remote.generate(TEXTS, max_new_tokens=12)
    if method == "lopa":  # instance-dependent: different texts, different prompts
        z = local.soft_prompt(TEXTS[:2])
        assert not torch.allclose(z[0], z[1])


def test_client_refuses_a_server_of_another_width(server, tmp_path):
    from lopa.artifact import save_artifact
    from lopa.methods import InitContext, build_generator
    gen = build_generator(lopa.make_config("prompt-tuning", num_virtual_tokens=2), InitContext(torch.randn(10, 32)))
    d = save_artifact(tmp_path / "narrow", gen, base_name="some-32-wide-model", hidden_size=32)
    with pytest.raises(ClientError, match="width 32 .* serves 'tiny-random-llama' of width 64"):
        Client(d, url=server, api_key=KEY)


def test_client_with_wrong_key_gets_a_clear_error(server, artifacts):
    c = Client(artifacts["prompt-tuning"], url=server, api_key="nope")  # /health needs no key
    with pytest.raises(ServerError, match="401: invalid API key"):
        c.classify(TEXTS[:1])


async def _post_all(url: str, requests: list[tuple[str, dict]], concurrency: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                                 limits=limits) as c:
        sem = asyncio.Semaphore(concurrency)

        async def one(path: str, body: dict) -> httpx.Response:
            async with sem:
                return await c.post(path, json=body)

        return await asyncio.gather(*(one(p, b) for p, b in requests))


def test_matches_among_50_other_tasks(server, artifacts, backend):
    """The artifact's answers do not change when 50 other tasks share its batches."""
    local = Client(artifacts["lopa"])
    z = local.soft_prompt(TEXTS)
    want_cls, want_gen = local.classify(TEXTS), local.generate(TEXTS, max_new_tokens=12)
    target = [("/v1/classify", {"text": t, "soft_prompt": encode_soft_prompt(zi), "label_words": TASK["label_words"]})
              for t, zi in zip(TEXTS, z)]
    target += [("/v1/generate", {"text": t, "soft_prompt": encode_soft_prompt(zi), "max_new_tokens": 12})
               for t, zi in zip(TEXTS, z)]
    rng = random.Random(0)
    others, expected = [], []
    for _ in range(50):
        soft, text = random_soft(rng), random_text(rng)
        words = rng.choice(LABEL_SETS)
        others.append(("/v1/classify", {"text": text, "soft_prompt": encode_soft_prompt(soft), "label_words": words}))
        expected.append(backend.classify([ClassifyRow(backend.tokenize(text), soft, backend.label_token_ids(words))])[0])
        others.append(("/v1/generate", {"text": text, "soft_prompt": encode_soft_prompt(soft), "max_new_tokens": 12}))
        expected.append(backend.generate([GenerateRow(backend.tokenize(text), soft, 12)])[0].text)
    mixed = others[:50] + target + others[50:]  # the target's rows land in the middle of the crowd
    responses = asyncio.run(_post_all(server, mixed, concurrency=len(mixed)))
    assert [r.status_code for r in responses] == [200] * len(mixed), [r.text for r in responses if r.status_code != 200]
    got = [r.json() for r in responses]
    got_target, got_others = got[50:50 + len(target)], got[:50] + got[50 + len(target):]
    for w, g in zip(want_cls, got_target[:len(TEXTS)]):
        assert w["label"] == g["label"] and max(abs(p - q) for p, q in zip(w["logprobs"], g["logprobs"])) < 1e-5
    assert [g["text"] for g in got_target[len(TEXTS):]] == want_gen
    for (path, _), e, g in zip(others, expected, got_others):
        if path == "/v1/classify":
            assert max(abs(p - q) for p, q in zip(e, g["logprobs"])) < 1e-5
        else:
            assert g["text"] == e


def test_openai_client_completion(server, artifacts):
    import openai
    local = Client(artifacts["prompt-tuning"])
    z = local.soft_prompt(TEXTS[:1])[0]
    oa = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in oa.models.list().data] == [MODEL]
    resp = oa.completions.create(model=MODEL, prompt=TEXTS[0], max_tokens=10, temperature=0,
                                 extra_body={"soft_prompt": encode_soft_prompt(z)})
    assert resp.object == "text_completion" and resp.model == MODEL and resp.id.startswith("cmpl-")
    choice = resp.choices[0]
    assert choice.index == 0 and choice.logprobs is None and choice.finish_reason in ("stop", "length")
    assert choice.text == local.generate(TEXTS[:1], max_new_tokens=10)[0]
    n_prompt = len(local.transport.tokenize(TEXTS[0])) + z.shape[0]
    assert resp.usage.prompt_tokens == n_prompt
    assert resp.usage.total_tokens == n_prompt + resp.usage.completion_tokens
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).completions.create(
            model=MODEL, prompt="x", extra_body={"soft_prompt": encode_soft_prompt(z)})
    with pytest.raises(openai.BadRequestError, match="best_of=2 is not supported"):
        oa.completions.create(model=MODEL, prompt="x", best_of=2, extra_body={"soft_prompt": encode_soft_prompt(z)})
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        oa.completions.create(model="gpt-4", prompt="x", extra_body={"soft_prompt": encode_soft_prompt(z)})


# -- bad input -------------------------------------------------------------------------------------

def _good_classify() -> dict:
    return {"text": "Review: fine\nSentiment:", "soft_prompt": encode_soft_prompt(torch.ones(3, D) * 0.1),
            "label_words": [" no", " yes"]}


def _with_soft(**changes) -> dict:
    body = _good_classify()
    body["soft_prompt"] = {**body["soft_prompt"], **changes}
    return body


def _nan_soft() -> dict:
    z = torch.zeros(3, D)
    z[0, 0] = float("nan")
    return {**_good_classify(), "soft_prompt": encode_soft_prompt(z)}


OK_HEADERS = {"Authorization": f"Bearer {KEY}"}
BAD_CASES = [
    # (id, path, body (or raw bytes), headers, status, message fragment)
    ("malformed-base64", "/v1/classify", _with_soft(data="#" * 1024), OK_HEADERS, 400, "not valid standard base64"),
    ("short-base64", "/v1/classify", _with_soft(data="AAAA"), OK_HEADERS, 400, "needs 768 bytes = 1024 characters"),
    ("wrong-dtype", "/v1/classify", _with_soft(dtype="float64"), OK_HEADERS, 400, "dtype must be one of"),
    ("wrong-width", "/v1/classify", {**_good_classify(), "soft_prompt": encode_soft_prompt(torch.ones(3, 32))},
     OK_HEADERS, 400, "shape[1] is 32, but this model's hidden size is 64"),
    ("nan", "/v1/classify", _nan_soft(), OK_HEADERS, 400, "NaN or infinite"),
    ("m-too-large", "/v1/classify", {**_good_classify(), "soft_prompt": encode_soft_prompt(torch.ones(MAX_SOFT + 1, D))},
     OK_HEADERS, 400, f"is {MAX_SOFT + 1}; this server accepts 1 to {MAX_SOFT}"),
    ("missing-soft-prompt", "/v1/classify", {k: v for k, v in _good_classify().items() if k != "soft_prompt"},
     OK_HEADERS, 400, "soft_prompt is required"),
    ("oversized-body", "/v1/classify", {**_good_classify(), "text": "x" * (9 * 1024 * 1024)}, OK_HEADERS, 413,
     "larger than this server's limit of 8388608 bytes"),
    ("too-many-new-tokens", "/v1/generate", {**_good_classify(), "label_words": None, "max_new_tokens": 10_000},
     OK_HEADERS, 400, f"max_new_tokens is 10000; this server allows 1 to {MAX_NEW}"),
    ("too-many-max-tokens", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10_000,
                                                "soft_prompt": encode_soft_prompt(torch.ones(2, D))},
     OK_HEADERS, 400, f"max_tokens is 10000; this server allows 1 to {MAX_NEW}"),
    ("prompt-too-long", "/v1/classify", {**_good_classify(), "text": None, "token_ids": [5] * (MAX_PROMPT + 1)},
     OK_HEADERS, 400, f"the prompt is {MAX_PROMPT + 1} tokens; this server accepts at most {MAX_PROMPT}"),
    ("token-out-of-vocab", "/v1/classify", {**_good_classify(), "text": None, "token_ids": [1, 10 ** 9]},
     OK_HEADERS, 400, "token id 1000000000 is outside the vocabulary"),
    ("text-and-token-ids", "/v1/classify", {**_good_classify(), "token_ids": [1, 2]}, OK_HEADERS, 400,
     "exactly one of text or token_ids"),
    ("label-clash", "/v1/classify", {**_good_classify(), "label_words": [" great", " great!"]}, OK_HEADERS, 400,
     "start with the same token"),
    ("one-label", "/v1/classify", {**_good_classify(), "label_words": [" yes"]}, OK_HEADERS, 422,
     "label_words: List should have at least 2 items"),
    ("unknown-field", "/v1/classify", {**_good_classify(), "lable_words": [" a", " b"]}, OK_HEADERS, 422,
     "lable_words: Extra inputs are not permitted"),
    ("wrong-type", "/v1/generate", {**_good_classify(), "label_words": None, "temperature": "hot"}, OK_HEADERS, 422,
     "temperature: Input should be a valid number"),
    ("invalid-json", "/v1/classify", b'{"text": "x", ', OK_HEADERS, 422, "not valid JSON"),
    ("missing-key", "/v1/classify", _good_classify(), {}, 401, "missing API key"),
    ("wrong-key", "/v1/classify", _good_classify(), {"Authorization": "Bearer wrong"}, 401, "invalid API key"),
    ("wrong-x-api-key", "/v1/classify", _good_classify(), {"X-API-Key": "wrong"}, 401, "invalid API key"),
    ("no-such-endpoint", "/v1/nothing", _good_classify(), OK_HEADERS, 404, "no endpoint POST /v1/nothing"),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_request_then_good_request(server, case):
    _, path, body, headers, status, fragment = case
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if v is not None}
        content = json.dumps(body).encode()
    else:
        content = body
    with httpx.Client(base_url=server, timeout=60) as c:
        r = c.post(path, content=content, headers={**headers, "Content-Type": "application/json"})
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert fragment in err["message"], err
        assert isinstance(err["type"], str) and err["type"]
        ok = c.post("/v1/classify", json=_good_classify(), headers={"X-API-Key": KEY})
        assert ok.status_code == 200, ok.text
        assert set(ok.json()) == {"logprobs", "label", "label_word"}


def test_chunked_oversized_body_is_refused(server):
    def chunks():
        for _ in range(10):
            yield b"x" * (1024 * 1024)  # no Content-Length: the limit is counted while streaming

    with httpx.Client(base_url=server, timeout=60, headers=OK_HEADERS) as c:
        r = c.post("/v1/classify", content=chunks())
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
        assert c.post("/v1/classify", json=_good_classify()).status_code == 200


def test_metrics(http):
    http.post("/v1/classify", json=_good_classify())
    http.post("/v1/classify", json=_with_soft(dtype="float64"))
    text = http.get("/metrics").text
    assert 'lopa_requests_total{endpoint="/v1/classify",status="200"}' in text
    assert 'lopa_requests_total{endpoint="/v1/classify",status="400"}' in text
    assert 'lopa_errors_total{endpoint="/v1/classify",type="invalid_request_error"}' in text
    assert 'lopa_batch_size_bucket{kind="classify",le="+Inf"}' in text
    assert 'lopa_request_duration_seconds_count{endpoint="/v1/classify"}' in text
    assert "lopa_queue_depth " in text


# -- load ------------------------------------------------------------------------------------------

def test_load_2000_requests_32_clients_100_tasks(server, backend):
    """2,000 requests of 100 tasks from 32 concurrent clients: no error, each answer its own."""
    rng = random.Random(1)
    tasks = [(random_soft(rng), rng.choice(LABEL_SETS)) for _ in range(100)]
    wire = [encode_soft_prompt(z) for z, _ in tasks]
    requests, rows = [], []
    for i in range(2000):
        t = rng.randrange(100)
        text = random_text(rng)
        z, words = tasks[t]
        if i % 10 == 9:
            requests.append(("/v1/generate", {"text": text, "soft_prompt": wire[t], "max_new_tokens": 4}))
            rows.append(GenerateRow(backend.tokenize(text), z, 4))
        else:
            requests.append(("/v1/classify", {"text": text, "soft_prompt": wire[t], "label_words": words}))
            rows.append(ClassifyRow(backend.tokenize(text), z, backend.label_token_ids(words)))
    expected: list = [None] * len(rows)
    for kind, fn in (("classify", backend.classify), ("generate", lambda r: [c.text for c in backend.generate(r)])):
        idx = [i for i, (p, _) in enumerate(requests) if p.endswith(kind)]
        for s in range(0, len(idx), 64):
            for i, res in zip(idx[s:s + 64], fn([rows[i] for i in idx[s:s + 64]])):
                expected[i] = res

    start = time.monotonic()
    responses = asyncio.run(asyncio.wait_for(_post_all(server, requests, concurrency=32), timeout=150))
    elapsed = time.monotonic() - start
    bad = [(i, r.status_code, r.text[:200]) for i, r in enumerate(responses) if r.status_code != 200]
    assert not bad, bad[:5]
    for i, ((path, _), r) in enumerate(zip(requests, responses)):
        got = r.json()
        if path == "/v1/classify":
            assert max(abs(p - q) for p, q in zip(expected[i], got["logprobs"])) < 1e-4, i
        else:
            assert got["text"] == expected[i], i
    assert elapsed < 120, f"2,000 requests took {elapsed:.1f} s"
    print(f"\nload: 2000 requests in {elapsed:.1f} s ({2000 / elapsed:.0f} req/s)")


# -- the batcher and graceful shutdown -------------------------------------------------------------

class _SlowEcho:
    def __init__(self) -> None:
        self.batches: list[int] = []

    def classify(self, rows):
        time.sleep(0.02)
        self.batches.append(len(rows))
        return [[float(r)] for r in rows]

    def generate(self, rows):
        if any(r == "boom" for r in rows):
            raise RuntimeError("boom")
        return [r.upper() for r in rows]


def test_batcher_batches_isolates_failures_and_drains_on_close():
    async def main():
        be = _SlowEcho()
        b = Batcher(be, max_batch_size=8, max_wait_ms=50)
        await b.start()
        cls = [asyncio.ensure_future(b.submit("classify", i)) for i in range(20)]
        gen = [asyncio.ensure_future(b.submit("generate", s)) for s in ("a", "boom", "c")]
        await asyncio.sleep(0)
        await b.close()  # everything already queued is still answered
        assert [c.result() for c in cls] == [[float(i)] for i in range(20)]
        assert gen[0].result() == "A" and gen[2].result() == "C"
        with pytest.raises(RuntimeError, match="boom"):
            gen[1].result()
        assert max(be.batches) == 8 and sum(be.batches) == 20
        with pytest.raises(BatcherClosed):
            await b.submit("classify", 1)

    asyncio.run(main())


class _MatmulTimer:
    """Times a matmul in the batcher's worker thread: process CPU seconds and wall seconds."""

    def __init__(self) -> None:
        self.a = torch.randn(1536, 1536)
        self.threads: list[str] = []

    def classify(self, rows):
        self.threads.append(threading.current_thread().name)
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(8):
            self.a @ self.a
        return [(time.process_time() - c0, time.perf_counter() - t0) for _ in rows]

    def generate(self, rows):
        return rows


def test_batcher_worker_keeps_the_servers_torch_thread_count():
    """``--threads 1`` must hold in the worker thread, where the model runs: a thread started later computes
    on every core unless it sets its own count (the server's throughput would then depend on idle cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    inits: list[str] = []
    try:
        init = torch_threads_init()

        def worker_init():
            inits.append(threading.current_thread().name)
            init()

        async def main():
            be = _MatmulTimer()
            b = Batcher(be, max_batch_size=4, max_wait_ms=1, worker_init=worker_init)
            await b.start()
            (cpu, wall), = [await b.submit("classify", 0)]
            await b.close()
            return be, cpu, wall

        be, cpu, wall = asyncio.run(main())
    finally:
        torch.set_num_threads(before)
    assert inits == be.threads and inits[0].startswith("lopa-backend")  # once, in the worker, before the batch
    assert cpu <= 1.3 * wall + 0.02, f"the worker used {cpu / wall:.2f} cores with 1 torch thread"


def test_graceful_shutdown_answers_requests_in_flight():
    from lopa.serve.server import ServeConfig, create_app
    be = TransformersBackend(MODEL, dtype="float32")
    app = create_app(be, ServeConfig(model=MODEL, dtype="float32", max_batch_size=4, max_wait_ms=1))
    srv, thread, url = serve_in_thread(app)
    n = 24
    body = {"text": "hello", "soft_prompt": encode_soft_prompt(torch.ones(2, D)), "max_new_tokens": 24}

    async def fire():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            tasks = [asyncio.ensure_future(c.post("/v1/generate", json=body)) for _ in range(n)]
            batcher = app.state.batcher
            while batcher.stats["rows"] + batcher.queue_depth < n:  # every request has reached the server
                await asyncio.sleep(0.01)
            srv.should_exit = True  # what SIGINT / SIGTERM do
            return await asyncio.gather(*tasks)

    responses = asyncio.run(fire())
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert [r.status_code for r in responses] == [200] * n
    assert len({r.json()["text"] for r in responses}) == 1


# -- the command line ------------------------------------------------------------------------------

def test_cli_classify_and_generate(server, artifacts, tmp_path, capsys):
    from lopa.cli import main
    d = str(artifacts["lopa"])
    assert main(["classify", "--artifact", d, "--url", server, "--api-key", KEY, "--text", TEXTS[0], TEXTS[1]]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["label"] for x in lines] == [x["label"] for x in Client(d).classify(TEXTS[:2])]
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "a", "text": "a fine film"}) + "\n" + json.dumps({"id": 7, "text": "dull"}) + "\n")
    assert main(["generate", "--artifact", d, "--url", server, "--api-key", KEY, "--input", str(inp),
                 "--apply-template", "--max-new-tokens", "6"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    want = Client(d).generate([TASK["template"].format(text="a fine film"), TASK["template"].format(text="dull")],
                              max_new_tokens=6)
    assert [x["id"] for x in lines] == ["a", 7] and [x["text"] for x in lines] == want
    assert main(["classify", "--artifact", d, "--url", server, "--api-key", "bad", "--text", "x"]) == 1
    assert "invalid API key" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed: the backend exists")
def test_vllm_backend_is_explained():
    from lopa.serve.server import ServeConfig
    with pytest.raises(ValueError, match="pip install 'lopa\\[vllm\\]'|not available in this version"):
        ServeConfig(backend="vllm")


def test_serve_does_not_import_the_client_side():
    code = ("import sys, lopa.serve.server, lopa.serve.batcher, lopa.serve.backends, lopa.serve.wire; "
            "print(sorted(m for m in sys.modules if m.startswith('lopa.')))")
    mods = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                      .stdout.replace("'", '"'))
    forbidden = {"methods", "model", "artifact", "train", "client"}
    assert not [m for m in mods if m.split(".")[1] in forbidden], mods
    assert "lopa.prefix" in mods and "lopa.models" in mods
