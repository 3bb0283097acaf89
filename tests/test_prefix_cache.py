"""The soft-prompt prefix cache of the transformers backend (``--prefix-cache-mib``): a cached soft
prompt gives the same bits as a computed one, memory stays within its byte budget, distinct soft
prompts never share an entry, and a server counts its hits."""

from __future__ import annotations

import random
import re
from types import SimpleNamespace

import httpx
import pytest
import torch

from lopa.serve.app import create_app
from lopa.serve.backends import ClassifyRow, GenerateRow, TransformersBackend
from lopa.serve.backends import softkv
from lopa.serve.backends.prefixcache import PrefixCache, soft_prompt_key
from lopa.serve.config import ServeConfig
from lopa.serve.wire import encode_soft_prompt
from serverproc import serve_in_thread

MODEL = "tiny-random-llama"
D = 64
WORDS = "the a film was great dull fine plot actor scene long short funny sad".split()

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def cached(request) -> TransformersBackend:
    return TransformersBackend(MODEL, dtype=request.param, device="cpu", prefix_cache_bytes=1 << 24)


def _softs(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(m, D, generator=g) * 0.05 for m in (3, 7, 16, 21)[:n]]


def _texts(backend: TransformersBackend, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [backend.tokenize(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))) for _ in range(n)]


def _classify_rows(backend: TransformersBackend, n: int = 12) -> list[ClassifyRow]:
    ids = backend.label_token_ids([" no", " yes"])
    softs = _softs(3)
    return [ClassifyRow(t, softs[i % 3], ids) for i, t in enumerate(_texts(backend, n))]


def test_classify_hit_equals_miss_and_any_batch(cached):
    rows = _classify_rows(cached)
    before = cached.prefix_cache_stats()
    missed = [cached.classify([r])[0] for r in rows[:3]]  # three new soft prompts
    after = cached.prefix_cache_stats()
    assert after["misses"] - before["misses"] == 3
    alone = [cached.classify([r])[0] for r in rows]       # all cached now
    assert cached.prefix_cache_stats()["hits"] - after["hits"] == len(rows)
    assert alone[:3] == missed                             # bit for bit
    if cached.dtype == torch.bfloat16:  # batch-invariant bit for bit in bf16, as without the cache
        assert cached.classify(rows) == alone
    else:  # float32's matrix kernels round with the batch size (see TransformersBackend)
        assert max(abs(a - b) for x, y in zip(cached.classify(rows), alone) for a, b in zip(x, y)) < 1e-4


def test_classify_close_to_the_joint_pass(cached):
    rows = _classify_rows(cached)
    plain = TransformersBackend(MODEL, dtype=str(cached.dtype).removeprefix("torch."), device="cpu")
    tol = 1e-4 if cached.dtype == torch.float32 else 0.05  # rounding only: the same positions, another split
    diff = max(abs(a - b) for x, y in zip(cached.classify(rows), plain.classify(rows)) for a, b in zip(x, y))
    assert diff < tol


def test_generate_hit_equals_miss(cached):
    softs = _softs(2, seed=3)
    rows = [GenerateRow(t, softs[i % 2], max_new_tokens=8, logprobs=3)
            for i, t in enumerate(_texts(cached, 4, seed=3))]
    first = [cached.generate([r])[0] for r in rows]   # rows 0 and 1 miss, 2 and 3 hit
    again = [cached.generate([r])[0] for r in rows]   # all hit
    batch = cached.generate(rows)
    assert [c.text for c in first] == [c.text for c in again]
    assert [c.logprobs for c in first] == [c.logprobs for c in again]
    if cached.dtype == torch.bfloat16:
        assert [c.logprobs for c in batch] == [c.logprobs for c in again]


def test_row_without_tokens_takes_the_joint_pass(cached):
    z = _softs(1, seed=5)[0]
    ids = cached.label_token_ids([" no", " yes"])
    before = cached.prefix_cache_stats()
    out = cached.classify([ClassifyRow([], z, ids), ClassifyRow(cached.tokenize("fine"), z, ids)])
    assert len(out) == 2 and cached.prefix_cache_stats()["misses"] - before["misses"] == 1


def test_lru_keeps_within_its_byte_budget(tiny_base):
    base, _ = tiny_base
    softs = [torch.randn(5, D, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    size = softkv.kv_bytes(softkv.soft_prompt_kv(base, softs[0]))
    cache = PrefixCache(max_bytes=2 * size + 1, model_name=MODEL)  # room for two

    def compute(z):
        return softkv.soft_prompt_kv(base, z)

    for i in (0, 1, 0, 2):                    # 0 used again before 2 comes: 1 is the least recently used
        cache.get(softs[i], compute)
    assert cache.stats() == {"hits": 1, "misses": 3, "bytes": 2 * size, "entries": 2, "evictions": 1,
                             "max_bytes": 2 * size + 1}
    cache.get(softs[0], compute)
    cache.get(softs[1], compute)
    assert cache.stats()["hits"] == 2 and cache.stats()["misses"] == 4  # 0 was kept, 1 had gone
    tiny = PrefixCache(max_bytes=16, model_name=MODEL)  # larger than the whole cache: never kept
    tiny.get(softs[0], compute), tiny.get(softs[0], compute)
    assert tiny.stats() == {"hits": 0, "misses": 2, "bytes": 0, "entries": 0, "evictions": 0, "max_bytes": 16}


def test_distinct_soft_prompts_never_share_an_entry():
    z = torch.randn(4, D)
    nudged = z.clone()
    nudged[2, 5] = torch.nextafter(nudged[2, 5], torch.tensor(float("inf")))  # one bit of one value
    keys = {soft_prompt_key(z, MODEL), soft_prompt_key(nudged, MODEL), soft_prompt_key(z.reshape(8, 32), MODEL),
            soft_prompt_key(z.to(torch.bfloat16), MODEL), soft_prompt_key(z, "another-model"),
            soft_prompt_key(torch.zeros(4, D), MODEL), soft_prompt_key(-torch.zeros(4, D), MODEL)}
    assert len(keys) == 7
    assert soft_prompt_key(z.clone(), MODEL) == soft_prompt_key(z, MODEL)


def test_rows_with_distinct_soft_prompts_in_one_pass(cached):
    ids = cached.label_token_ids([" no", " yes"])
    t = cached.tokenize("the film was great")
    softs = _softs(4, seed=11)
    same_len = [torch.randn(7, D, generator=torch.Generator().manual_seed(i)) * 0.05 for i in range(3)]
    rows = [ClassifyRow(t, z, ids) for z in softs + same_len]
    out = cached.classify(rows)
    assert len({tuple(o) for o in out}) == len(rows)  # each row read its own soft prompt
    if cached.dtype == torch.bfloat16:
        assert out == [cached.classify([r])[0] for r in rows]


def test_models_with_sliding_windows_are_refused():
    base = SimpleNamespace(config=SimpleNamespace(layer_types=["sliding_attention", "full_attention"]))
    assert "sliding" in softkv.unsupported(base)
    assert softkv.unsupported(SimpleNamespace(config=SimpleNamespace(layer_types=["full_attention"]))) is None
    assert "sliding" in softkv.unsupported(SimpleNamespace(config=SimpleNamespace(sliding_window=4096)))
    qwen2 = SimpleNamespace(sliding_window=4096, use_sliding_window=False)  # named but off
    assert softkv.unsupported(SimpleNamespace(config=qwen2)) is None


def test_config_checks_the_option():
    assert ServeConfig(prefix_cache_mib=64).prefix_cache_mib == 64
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="prefix_cache_mib"):
            ServeConfig(prefix_cache_mib=bad)


def test_server_counts_hits_on_a_repeated_task_stream():
    backend = TransformersBackend(MODEL, dtype="float32", device="cpu", prefix_cache_bytes=1 << 20)
    app = create_app(backend, ServeConfig(model=MODEL, dtype="float32", max_wait_ms=1, prefix_cache_mib=1))
    srv, thread, url = serve_in_thread(app)
    z = torch.randn(8, D, generator=torch.Generator().manual_seed(1)) * 0.05
    texts = [f"Review: the film was {w}\nSentiment:" for w in WORDS]
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            answers = [c.post("/v1/classify", json={"text": t, "soft_prompt": encode_soft_prompt(z),
                                                      "label_words": [" no", " yes"]}).json() for t in texts]
            metrics = c.get("/metrics").text
            assert c.get("/health").json()["prefix_caching"] is True
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
    value = lambda name: float(re.search(rf"^{name} (\S+)$", metrics, re.M).group(1))  # noqa: E731
    assert value("lopa_prefix_cache_misses_total") == 1
    assert value("lopa_prefix_cache_hits_total") == len(texts) - 1
    assert value("lopa_prefix_cache_entries") == 1 and value("lopa_prefix_cache_bytes") > 0
    ids = backend.label_token_ids([" no", " yes"])
    direct = [backend.classify([ClassifyRow(backend.tokenize(t), z, ids)])[0] for t in texts]
    assert [a["logprobs"] for a in answers] == direct
