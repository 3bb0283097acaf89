"""Shared fixtures: one tiny random base model and one tiny encoder per session, and a builder that
turns a (method, settings) pair into a SoftPromptModel on them.

The base model is shared, so tests must never train or mutate it; that is the library's promise
anyway, and tests that hand a model to PEFT (which wraps it in place) use ``fresh_base`` instead.
"""

from __future__ import annotations

import pytest
import torch

import lopa
from lopa import prefix

# (id, method, settings): every method and every variant the foundation ships. Small m, r, h keep the
# suite fast; the instance methods read the tiny encoder unless they name "self".
VARIANTS = [
    ("prompt-tuning-vocab", "prompt-tuning", dict(num_virtual_tokens=4, init="vocab")),
    ("prompt-tuning-text", "prompt-tuning", dict(num_virtual_tokens=4, init="text", init_text="It was great")),
    ("prompt-tuning-random", "prompt-tuning", dict(num_virtual_tokens=4, init="random")),
    ("lopt-1", "lopt-1", dict(num_virtual_tokens=4, rank=2)),
    ("lopt-2", "lopt-2", dict(num_virtual_tokens=4, rank=2)),
    ("idpg", "idpg", dict(num_virtual_tokens=4, hidden_size=16, encoder="tiny-random-bert")),
    ("lopa-gate", "lopa", dict(num_virtual_tokens=4, rank=2, hidden_size=16, encoder="tiny-random-bert")),
    ("lopa-add", "lopa", dict(num_virtual_tokens=4, rank=2, hidden_size=16, encoder="tiny-random-bert",
                              combine="add")),
    ("lopa-max", "lopa", dict(num_virtual_tokens=4, rank=2, hidden_size=16, encoder="tiny-random-bert",
                              combine="max")),
    ("lopa-concat", "lopa", dict(num_virtual_tokens=4, rank=2, hidden_size=16, encoder="tiny-random-bert",
                                 combine="concat")),
    ("lopa-self", "lopa", dict(num_virtual_tokens=4, rank=2, hidden_size=16, encoder="self")),
]
VARIANT_IDS = [v[0] for v in VARIANTS]

TEXTS = ["Review: a gripping, funny film. It was", "Review: dull. It was", "Review: a gripping, funny film. It was"]
LABEL_WORDS = [" terrible", " great"]


@pytest.fixture(scope="session")
def tiny_base():
    """(base, tokenizer): the 2-layer, width-64 random Llama with SmolLM2's tokenizer. Shared: never train it."""
    return lopa.load_base("tiny-random-llama")


@pytest.fixture(scope="session")
def tiny_encoder():
    """The 2-layer, width-32 random BERT encoder with MiniLM's tokenizer."""
    return lopa.load_encoder("tiny-random-bert")


@pytest.fixture
def fresh_base():
    """A base of its own, for tests that let a third party (PEFT) wrap or mutate it."""
    return lopa.load_base("tiny-random-llama")


def build_model(base, tok, shared_encoder, method: str, **settings) -> lopa.SoftPromptModel:
    """A SoftPromptModel for ``method``; instance methods get the shared tiny encoder unless the
    config names ``self`` (then the model builds the self encoder on the base's embeddings)."""
    config = lopa.make_config(method, **settings)
    use_encoder = config.instance_dependent and config.encoder != "self"
    return lopa.SoftPromptModel(base, tok, config, encoder=shared_encoder if use_encoder else None)


@pytest.fixture
def make_model(tiny_base, tiny_encoder):
    """``make_model(method, **settings)`` on the shared tiny base and encoder."""
    base, tok = tiny_base

    def make(method: str, **settings) -> lopa.SoftPromptModel:
        return build_model(base, tok, tiny_encoder, method, **settings)

    return make


@pytest.fixture
def label_ids(tiny_base):
    return torch.tensor(prefix.label_token_ids(tiny_base[1], LABEL_WORDS))


def perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Move every trainable weight away from its initialisation, so a save/load round trip that
    silently kept the initial weights cannot pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip themselves, saying why, where torch sees no CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests: the tiny model's ops gain nothing from threads, and on a
    busy 2-core machine two OpenMP threads that wait for each other at every op make it many times
    slower (server subprocesses get --threads 1 for the same reason)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
