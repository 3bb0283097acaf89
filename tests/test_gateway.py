"""``lopa gateway`` with the official ``openai`` client: real processes on loopback.

A real ``lopa serve`` (tiny-random-llama, float32) is the upstream of a real ``lopa gateway`` serving
two tasks: ``toy`` (prompt-tuning, a classification task in plain format) and ``brief`` (LoPA with
the tiny encoder, a generation task trained in chat format with a system prompt). Answers through
the gateway are checked against :class:`lopa.client.Client` talking to the same server with the same
artifact and text. A second gateway points at a hand-made stub upstream that can be down, up or
slow (502, recovery and 504) and that keeps what it is sent: the soft prompt must equal the client's
for the text the server will render (the tiny random model's greedy answers barely depend on their
input, so equal answers alone would prove little).
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

import lopa
from lopa.client import Client
from lopa.models import load_tokenizer
from lopa.prompt_format import PromptFormat, build_text
from serverproc import free_port, start_server, stop_server, wait_healthy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEY = "upstream-key"  # the server's
GW_KEY = "gateway-key"  # the gateway's own
MODEL = "tiny-random-llama"
SYSTEM = "Be brief."
TOY = {"name": "toy", "kind": "classification", "template": "Review: {text}\nSentiment:",
       "label_words": [" negative", " positive"]}
BRIEF = {"name": "brief", "kind": "generation", "prompt_format": {"chat_template": True, "system_prompt": SYSTEM}}
TEXTS = ["Review: a fine film\nSentiment:", "Review: dull and long\nSentiment:"]
MESSAGES = [{"role": "user", "content": "Name a colour."}]
# a sentence-pair task: LoPA's encoder reads the two fields apart (encoder_input "auto"), so a text its template
# did not make cannot be read
PAIRS = {"name": "pairs", "kind": "classification", "template": "{sentence1} ? {sentence2} Answer:",
         "label_words": [" No", " Yes"]}
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _artifact(directory: Path, config, task: dict, seed: int) -> Path:
    base, tok = lopa.load_base(MODEL)
    model = lopa.SoftPromptModel(base, tok, config, task=task)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # trained-looking weights: tasks and texts really differ
        for p in model.generator.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model.save_pretrained(directory)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tasks")
    return {"toy": _artifact(root / "toy", lopa.make_config("prompt-tuning", num_virtual_tokens=5), TOY, 1),
            "brief": _artifact(root / "brief", lopa.make_config("lopa", num_virtual_tokens=4, rank=2, hidden_size=16,
                                                                encoder="tiny-random-bert"), BRIEF, 2),
            "pairs": _artifact(root / "pairs", lopa.make_config("lopa", num_virtual_tokens=3, rank=2, hidden_size=8,
                                                                encoder="tiny-random-bert"), PAIRS, 3)}


@pytest.fixture(scope="module")
def stub_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def servers(artifacts, stub_port, tmp_path_factory):
    """(upstream url, gateway url, stub gateway url): all three start together, to save time."""
    logs = tmp_path_factory.mktemp("logs")
    up, up_url = start_server(["--model", MODEL, "--dtype", "float32", "--max-wait-ms", "2", "--max-new-tokens", "16",
                               "--log-level", "warning", "--threads", "1"], logs / "serve.log", {**ENV, "LOPA_API_KEY": KEY})
    tasks = [f"{name}={path}" for name, path in artifacts.items()]
    gw, gw_url = start_server(["--task", *tasks, "--upstream", up_url, "--upstream-key", KEY, "--api-key", GW_KEY,
                               "--threads", "1", "--max-wait-ms", "50", "--log-level", "warning"],
                              logs / "gateway.log", ENV, verb="gateway")
    stub, stub_url = start_server(["--task", *tasks, "--upstream", f"http://127.0.0.1:{stub_port}",
                                   "--upstream-timeout", "1", "--connect-timeout", "1", "--threads", "1",
                                   "--log-level", "warning"], logs / "stub-gateway.log", ENV, verb="gateway")
    procs = [(up, up_url, logs / "serve.log"), (gw, gw_url, logs / "gateway.log"),
             (stub, stub_url, logs / "stub-gateway.log")]
    for proc, url, log in procs:
        wait_healthy(proc, url, log, timeout_s=180)
    yield up_url, gw_url, stub_url
    with ThreadPoolExecutor(len(procs)) as pool:  # each must stop cleanly; together, to save time
        list(pool.map(lambda p: stop_server(p[0], p[2], timeout_s=30), procs))


@pytest.fixture(scope="module")
def oa(servers) -> openai.OpenAI:
    return openai.OpenAI(base_url=servers[1] + "/v1", api_key=GW_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def clients(servers, artifacts):
    """lopa.Client per task, straight to the upstream: what the gateway's answers must equal."""
    out = {name: Client(path, url=servers[0], api_key=KEY, concurrency=1) for name, path in artifacts.items()}
    yield out
    for c in out.values():
        c.close()


def chat_prompt(messages: list[dict], system: str | None) -> str:
    return build_text(load_tokenizer(MODEL), PromptFormat(chat_template=True, system_prompt=system),
                      messages=messages).prompt


# -- the OpenAI endpoints --------------------------------------------------------------------------

def test_models_lists_the_task_names(oa):
    assert [m.id for m in oa.models.list().data] == ["toy", "brief", "pairs"]


@pytest.mark.parametrize("task", ["toy", "brief"])
def test_completions_equal_the_clients_answer(oa, clients, task):
    for text in TEXTS:
        r = oa.completions.create(model=task, prompt=text, max_tokens=8, temperature=0.0)
        assert r.model == task and r.object == "text_completion"
        assert r.choices[0].text == clients[task].generate([text], max_new_tokens=8)[0]
        assert r.usage.prompt_tokens > clients[task].artifact.num_output_tokens  # the soft prompt counts too


def test_a_list_of_prompts_is_answered_prompt_by_prompt(oa, clients):
    """The instance-dependent task gets one soft prompt per prompt; choices come as the server orders
    them (prompt i, copy j at i*n + j), each equal to the client's answer for that prompt alone."""
    r = oa.completions.create(model="brief", prompt=TEXTS[:2], max_tokens=6, temperature=0.0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    direct = clients["brief"].generate(TEXTS[:2], max_new_tokens=6)
    assert [c.text for c in r.choices] == [direct[0], direct[0], direct[1], direct[1]]


@pytest.mark.parametrize("task", ["toy", "brief"])
def test_chat_equals_the_client_on_the_servers_chat_text(oa, clients, task):
    """``brief`` was trained in chat format with a system prompt: the gateway puts it first; ``toy``
    records plain text, so its chat is the conversation alone. The instance-dependent ``brief``
    computes its soft prompt from exactly the text the server renders."""
    r = oa.chat.completions.create(model=task, messages=MESSAGES, max_tokens=8, temperature=0.0)
    text = chat_prompt(MESSAGES, SYSTEM if task == "brief" else None)
    assert r.model == task and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == clients[task].generate([text], max_new_tokens=8)[0]
    # the server read exactly that text (the tiny random model's answers alone say little: they barely vary)
    n_text = len(load_tokenizer(MODEL)(text, add_special_tokens=False)["input_ids"])
    assert r.usage.prompt_tokens == n_text + clients[task].artifact.num_output_tokens
    # a conversation with its own system prompt keeps it
    own = [{"role": "system", "content": "Answer in French."}, *MESSAGES]
    r = oa.chat.completions.create(model=task, messages=own, max_tokens=8, temperature=0.0)
    assert r.choices[0].message.content == clients[task].generate([chat_prompt(own, None)], max_new_tokens=8)[0]


@pytest.mark.parametrize("task", ["toy", "brief"])
def test_streams_on_both_endpoints_equal_the_whole_answers(oa, task):
    kw = dict(model=task, max_tokens=8, temperature=0.0)
    whole = oa.chat.completions.create(messages=MESSAGES, **kw)
    chunks = list(oa.chat.completions.create(messages=MESSAGES, stream=True, stream_options={"include_usage": True},
                                             **kw))
    assert {c.model for c in chunks} == {task} and all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens

    whole = oa.completions.create(prompt=TEXTS[0], **kw)
    chunks = list(oa.completions.create(prompt=TEXTS[0], stream=True, **kw))
    assert {c.model for c in chunks} == {task}
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [whole.choices[0].finish_reason]


def test_classify_passes_through_with_the_tasks_label_words(servers, clients):
    with httpx.Client(base_url=servers[1], headers={"Authorization": f"Bearer {GW_KEY}"}, timeout=60) as http:
        r = http.post("/v1/classify", json={"model": "toy", "text": TEXTS[0]})
        assert r.status_code == 200, r.text
        want = clients["toy"].classify(TEXTS[:1])[0]
        assert r.json()["label_word"] == want["label_word"] in TOY["label_words"]
        assert max(abs(p - q) for p, q in zip(r.json()["logprobs"], want["logprobs"])) < 1e-5
        r = http.post("/v1/classify", json={"model": "brief", "text": "x"})  # a generation task: no label words
        assert r.status_code == 400 and "send label_words" in r.json()["error"]["message"]


def test_concurrent_requests_share_soft_prompt_batches(oa, servers):
    texts = [f"Review: film number {i}\nSentiment:" for i in range(6)]
    barrier = threading.Barrier(len(texts))

    def one(text: str) -> str:
        barrier.wait()
        return oa.completions.create(model="brief", prompt=text, max_tokens=4, temperature=0.0).model

    before = _metric(servers[1], 'lopa_gateway_soft_prompt_batch_size_count{task="brief"}')
    with ThreadPoolExecutor(len(texts)) as pool:
        assert list(pool.map(one, texts)) == ["brief"] * len(texts)
    batches = _metric(servers[1], 'lopa_gateway_soft_prompt_batch_size_count{task="brief"}') - before
    assert 1 <= batches < len(texts)  # at least two requests shared one generator call


def test_a_sentence_pair_task_reads_its_fields_and_refuses_other_texts_alone(servers, clients):
    """A text the pair task's template did not make is a 400 for its own request; a request batched beside
    it is answered as the client answers it."""
    good = "The cat sat. ? A cat was sitting. Answer:"
    with httpx.Client(base_url=servers[1], headers={"Authorization": f"Bearer {GW_KEY}"}, timeout=60) as http:
        def post(text: str) -> httpx.Response:
            return http.post("/v1/classify", json={"model": "pairs", "text": text})

        with ThreadPoolExecutor(2) as pool:
            ok, bad = pool.map(post, [good, "a text written by hand"])
    assert bad.status_code == 400, bad.text
    assert "not made by the template" in bad.json()["error"]["message"]
    assert ok.status_code == 200, ok.text
    want = clients["pairs"].classify([good])[0]
    assert ok.json()["label_word"] == want["label_word"]
    assert max(abs(p - q) for p, q in zip(ok.json()["logprobs"], want["logprobs"])) < 1e-5


# -- errors ----------------------------------------------------------------------------------------

def test_unknown_task_is_a_404_naming_the_tasks(oa):
    with pytest.raises(openai.NotFoundError, match="'sentiment' is not a task of this gateway; its tasks are: toy, brief, pairs"):
        oa.completions.create(model="sentiment", prompt="x")
    with pytest.raises(openai.NotFoundError, match="its tasks are: toy, brief, pairs"):
        oa.chat.completions.create(model="gpt-4", messages=MESSAGES)


def test_api_key_is_required(servers):
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        openai.OpenAI(base_url=servers[1] + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(servers[1] + "/v1/models").status_code == 401
    assert httpx.get(servers[1] + "/health").status_code == 200  # no key needed


def test_malformed_requests_are_4xx(oa, servers):
    with pytest.raises(openai.UnprocessableEntityError, match="messages"):
        oa.chat.completions.create(model="toy", messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="do not send soft_prompt"):
        oa.completions.create(model="toy", prompt="x", extra_body={"soft_prompt": {"dtype": "float32"}})
    with pytest.raises(openai.BadRequestError, match="best_of=2 is not supported"):  # the upstream's own check
        oa.completions.create(model="toy", prompt="x", best_of=2)
    with pytest.raises(openai.BadRequestError, match="send the prompt as text"):
        oa.completions.create(model="brief", prompt=[1, 2, 3])
    r = httpx.post(servers[1] + "/v1/completions", content=b"{not json", headers={"X-API-Key": GW_KEY,
                                                                                   "Content-Type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]["message"]


def test_health_and_metrics(oa, servers):
    h = httpx.get(servers[1] + "/health").json()
    assert h["status"] == "ok" and h["upstream"]["reachable"] and h["upstream"]["hidden_size"] == 64
    assert h["tasks"]["brief"]["instance_dependent"] and h["tasks"]["toy"]["method"] == "prompt-tuning"
    oa.completions.create(model="toy", prompt="x", max_tokens=2)
    text = httpx.get(servers[1] + "/metrics").text
    assert 'lopa_gateway_task_requests_total{endpoint="/v1/completions",status="200",task="toy"}' in text
    assert "lopa_gateway_upstream_up 1.0" in text


def test_width_mismatch_is_refused_at_start_naming_both_widths(servers, artifacts, tmp_path, capsys):
    from lopa.artifact import save_artifact
    from lopa.cli import main
    from lopa.methods import InitContext, build_generator
    gen = build_generator(lopa.make_config("prompt-tuning", num_virtual_tokens=2), InitContext(torch.randn(10, 32)))
    narrow = save_artifact(tmp_path / "narrow", gen, base_name="some-32-wide-model", hidden_size=32)
    assert main(["gateway", "--task", f"toy={artifacts['toy']}", f"narrow={narrow}", "--upstream", servers[0],
                 "--log-level", "error"]) == 2
    err = capsys.readouterr().err
    assert "task 'narrow'" in err and "width 32 ('some-32-wide-model')" in err
    assert f"serves '{MODEL}' of width 64" in err and "task 'toy'" not in err


def test_missing_or_corrupt_artifacts_stop_the_start_naming_the_path(tmp_path, capsys):
    from lopa.cli import main
    with pytest.raises(SystemExit):
        main(["gateway", "--task", f"gone={tmp_path / 'nowhere'}"])
    assert f"artifact directory {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    bad = tmp_path / "tasks" / "broken"
    bad.mkdir(parents=True)
    (bad / "soft_prompt_config.json").write_text("{not json")
    assert main(["gateway", "--tasks", str(tmp_path / "tasks"), "--upstream", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "task 'broken'" in err and str(bad / "soft_prompt_config.json") in err and "corrupt" in err


# -- an upstream that is down, then up, then slow; and what the gateway sends it --------------------

class StubUpstream:
    """A lopa serve stand-in on ``port``: ``/health``, and OpenAI answers after ``delay`` seconds; it keeps
    every request body it gets in ``seen``. Started on demand, so the gateway first finds it down."""

    def __init__(self, port: int):
        self.port, self.delay, self.seen = port, 0.0, []
        self.server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> None:
        if self.server is not None:
            return
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, obj: dict) -> None:
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._send({"status": "ok", "model": MODEL, "hidden_size": 64, "max_soft_tokens": 64})

            def do_POST(self) -> None:
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.seen.append((self.path, req))
                time.sleep(stub.delay)
                head = {"id": "stub", "created": 0, "model": "stub"}
                if req.get("stream"):  # one chunk, then silence past the gateway's timeout
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    chunk = {**head, "object": "text_completion", "choices": [{"text": "o", "index": 0,
                                                                               "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(2.0)
                    return
                if self.path == "/v1/chat/completions":
                    self._send({**head, "object": "chat.completion", "choices": [{
                        "index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]})
                else:
                    self._send({**head, "object": "text_completion", "choices": [{
                        "text": "ok", "index": 0, "finish_reason": "stop", "logprobs": None}]})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture(scope="module")
def stub(stub_port):
    s = StubUpstream(stub_port)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stub_oa(servers) -> openai.OpenAI:
    return openai.OpenAI(base_url=servers[2] + "/v1", api_key="none", max_retries=0, timeout=30)


def test_upstream_down_is_502_then_served_once_up_and_slow_is_504(servers, stub, stub_oa):
    url = servers[2]
    with pytest.raises(openai.InternalServerError, match="cannot be reached") as e:
        stub_oa.completions.create(model="toy", prompt="x")
    assert e.value.status_code == 502
    h = httpx.get(url + "/health").json()
    assert h["status"] == "degraded" and not h["upstream"]["reachable"] and "cannot be reached" in h["upstream"]["error"]
    stub.start()
    r = stub_oa.completions.create(model="toy", prompt="x")
    assert r.model == "toy" and r.choices[0].text == "ok"
    assert httpx.get(url + "/health").json()["status"] == "ok"
    stub.delay = 2.0  # past the gateway's --upstream-timeout 1
    try:
        with pytest.raises(openai.APIStatusError, match="did not answer within 1 s") as e:
            stub_oa.completions.create(model="toy", prompt="x")
        assert e.value.status_code == 504
    finally:
        stub.delay = 0.0
    assert stub_oa.completions.create(model="toy", prompt="x").model == "toy"  # and it goes on serving
    # a stream that stalls after it began ends with an error event: its status is out already
    chunks = []
    with pytest.raises(openai.APIError, match="did not answer within 1 s"):
        for c in stub_oa.completions.create(model="toy", prompt="x", stream=True):
            chunks.append(c)
    assert [(c.model, c.choices[0].text) for c in chunks] == [("toy", "o")]
    assert 'lopa_gateway_task_errors_total{task="toy",type="timeout_error"} 2.0' in httpx.get(url + "/metrics").text


def _sent(stub: StubUpstream) -> tuple[str, dict, torch.Tensor]:
    from lopa.serve.wire import decode_soft_prompt
    path, body = stub.seen[-1]
    return path, body, decode_soft_prompt(body["soft_prompt"], hidden_size=64, max_soft_tokens=64)


def test_the_upstream_gets_the_clients_soft_prompt_the_servers_text_and_every_other_field(stub, stub_oa, clients):
    """What the gateway sends, exactly: Z equals lopa.Client's for the text the server will render
    (for a chat: the task's system prompt first), and the fields it does not use go on unchanged."""
    stub.start()
    brief = clients["brief"]
    stub_oa.chat.completions.create(model="brief", messages=MESSAGES, max_tokens=5, seed=3, stop=["x"], user="u",
                                    logprobs=True, top_logprobs=2)
    path, body, z = _sent(stub)
    assert path == "/v1/chat/completions" and "model" not in body
    assert body["messages"] == [{"role": "system", "content": SYSTEM}, *MESSAGES]
    assert {k: body[k] for k in ("max_tokens", "seed", "stop", "user", "logprobs", "top_logprobs")} == \
        {"max_tokens": 5, "seed": 3, "stop": ["x"], "user": "u", "logprobs": True, "top_logprobs": 2}
    assert torch.allclose(z, brief.soft_prompt([chat_prompt(MESSAGES, SYSTEM)])[0], atol=1e-6)
    assert not torch.allclose(z, brief.soft_prompt([chat_prompt(MESSAGES, None)])[0], atol=1e-3)  # the text matters

    stub_oa.completions.create(model="brief", prompt=TEXTS[1], max_tokens=3)
    path, body, z = _sent(stub)
    assert path == "/v1/completions" and body["prompt"] == TEXTS[1] and body["max_tokens"] == 3
    assert torch.allclose(z, brief.soft_prompt([TEXTS[1]])[0], atol=1e-6)

    stub_oa.completions.create(model="brief", prompt=TEXTS[:2], max_tokens=3)  # one Z per prompt, in order
    path, body = stub.seen[-1]
    from lopa.serve.wire import decode_soft_prompt
    zs = [decode_soft_prompt(x, hidden_size=64, max_soft_tokens=64) for x in body["soft_prompt"]]
    assert body["prompt"] == TEXTS[:2] and len(zs) == 2
    assert all(torch.allclose(z, brief.soft_prompt([t])[0], atol=1e-6) for z, t in zip(zs, TEXTS[:2]))

    stub_oa.chat.completions.create(model="toy", messages=MESSAGES)  # plain format: the conversation as it is
    path, body, z = _sent(stub)
    assert body["messages"] == MESSAGES and torch.equal(z, clients["toy"].soft_prompt(["anything"])[0])


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0
