"""The instance encoders: the field reader for sentence pairs (``encoder_input="fields"``), its features,
its errors, and the models, artifacts and clients that carry it."""

from __future__ import annotations

import pytest
import torch

import lopa
from lopa.encoders import FieldEncoder

PAIR = "{sentence1} ? {sentence2} Answer:"
PAIRS = ["The cat sat. ? A cat was sitting. Answer:", "Stocks fell. ? The film was long. Answer:",
         "Rain today. ? Rain today. Answer:"]


def test_pair_features_hold_the_fields_cosine_and_distance(tiny_encoder):
    enc = FieldEncoder(tiny_encoder, PAIR)
    d = tiny_encoder.dim
    feats = enc.encode(PAIRS)
    assert enc.dim == 2 * d and feats.shape == (3, 2 * d)
    a = tiny_encoder.encode(["The cat sat.", "Stocks fell.", "Rain today."])
    b = tiny_encoder.encode(["A cat was sitting.", "The film was long.", "Rain today."])
    cos = torch.nn.functional.cosine_similarity(a, b)
    assert torch.allclose(feats[:, :d].mean(-1), cos, atol=1e-5)  # mean of a*b at unit rms = cosine
    assert torch.allclose(feats[2, d:], torch.zeros(d))  # one sentence twice: no distance
    swapped = FieldEncoder(tiny_encoder, "{sentence2} ? {sentence1} Answer:").encode(PAIRS)
    assert torch.allclose(swapped, feats)  # symmetric in the pair


def test_one_field_gives_its_own_features_without_the_template_words(tiny_encoder):
    enc = FieldEncoder(tiny_encoder, "Review: {text}\nSentiment:")
    feats = enc.encode(["Review: a fine film\nSentiment:"])
    plain = tiny_encoder.encode(["a fine film"])
    assert enc.dim == tiny_encoder.dim
    assert torch.allclose(feats, torch.nn.functional.normalize(plain, dim=-1) * tiny_encoder.dim ** 0.5, atol=1e-6)


def test_fields_are_encoded_once_each_through_the_inner_cache(tiny_encoder):
    enc = FieldEncoder(lopa.load_encoder("tiny-random-bert"), PAIR)
    enc.encode(PAIRS)
    assert enc.stats["encoded"] == 5  # "Rain today." twice is one field to encode
    enc.encode(PAIRS)
    assert enc.stats["encoded"] == 5


def test_bad_templates_and_texts_get_clear_errors(tiny_encoder):
    with pytest.raises(ValueError, match="one or two template fields"):
        FieldEncoder(tiny_encoder, "{a} {b} {c}")
    with pytest.raises(ValueError, match="one or two template fields"):
        FieldEncoder(tiny_encoder, "no slots")
    with pytest.raises(ValueError, match="template filled in"):
        FieldEncoder(tiny_encoder, PAIR).encode(["a prompt written by hand"])
    with pytest.raises(ValueError, match="template filled in"):  # checked before any batch is formed
        FieldEncoder(tiny_encoder, PAIR).check([PAIRS[0], "a prompt written by hand"])
    FieldEncoder(tiny_encoder, PAIR).check(PAIRS)
    tiny_encoder.check(["any text at all"])
    with pytest.raises(ValueError, match="only whitespace between"):
        FieldEncoder(tiny_encoder, "{question1} {question2} Answer:")


def _pair_model(base, tok, **kw):
    config = lopa.make_config("lopa", num_virtual_tokens=3, rank=2, hidden_size=8, encoder="tiny-random-bert",
                              encoder_input="fields", **kw)
    return lopa.SoftPromptModel(base, tok, config, task={"name": "pairs", "kind": "classification",
                                                         "template": PAIR, "label_words": [" No", " Yes"]})


def test_a_fields_artifact_reloads_and_the_client_computes_the_same_prompts(tiny_base, tmp_path):
    base, tok = tiny_base
    model = _pair_model(base, tok).eval()
    assert isinstance(model.encoder, FieldEncoder) and model.generator.u_head.fc1.in_features == 64
    with torch.no_grad():
        z = model.soft_prompts(PAIRS)
    model.save_pretrained(tmp_path / "art")
    loaded = lopa.SoftPromptModel.from_pretrained(tmp_path / "art", base, tok).eval()
    assert loaded.config.encoder_input == "fields"
    with torch.no_grad():
        assert torch.equal(loaded.soft_prompts(PAIRS), z)
    from lopa.client import Client
    with Client(tmp_path / "art") as client:
        assert torch.equal(client.soft_prompt(PAIRS), z)
        assert torch.equal(client.soft_prompt([client.format(sentence1="The cat sat.",
                                                             sentence2="A cat was sitting.")]), z[:1])


def test_a_trained_field_encoder_saves_the_weights_a_plain_encoder_would(tiny_base, tmp_path):
    base, tok = tiny_base
    model = _pair_model(base, tok, train_encoder=True)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.01)
    model.eval()
    with torch.no_grad():
        z = model.soft_prompts(PAIRS)
    model.save_pretrained(tmp_path / "art")
    loaded = lopa.SoftPromptModel.from_pretrained(tmp_path / "art", base, tok).eval()
    with torch.no_grad():
        assert torch.equal(loaded.soft_prompts(PAIRS), z)
    from safetensors.torch import load_file
    keys = set(load_file(str(tmp_path / "art" / "encoder.safetensors")))
    assert keys == set(lopa.load_encoder("tiny-random-bert").state_dict())


def test_fields_without_a_template_is_a_clear_error(tiny_base):
    base, tok = tiny_base
    config = lopa.make_config("lopa", num_virtual_tokens=3, rank=2, hidden_size=8, encoder="tiny-random-bert",
                              encoder_input="fields")
    with pytest.raises(ValueError, match="none is recorded"):
        lopa.SoftPromptModel(base, tok, config)
    with pytest.raises(lopa.methods.ConfigError, match="encoder_input"):
        lopa.make_config("lopa", encoder_input="pairs")


@pytest.mark.parametrize("kind,template,reads", [
    ("classification", PAIR, "fields"),
    ("classification", "{sentence} It was", "prompt"),
    ("generation", "{question}\n{context}\n", "prompt"),  # chosen on sentence-pair classification only
    ("classification", "{question1} {question2} Answer:", "prompt"),  # cannot be read back apart
])
def test_instance_methods_read_a_sentence_pair_apart_by_default(tiny_base, kind, template, reads):
    base, tok = tiny_base
    config = lopa.make_config("lopa", num_virtual_tokens=3, rank=2, hidden_size=8, encoder="tiny-random-bert")
    assert config.encoder_input == "auto" == lopa.make_config("idpg").encoder_input
    model = lopa.SoftPromptModel(base, tok, config, task={"kind": kind, "template": template})
    assert model.config.encoder_input == reads  # decided once, so an artifact records what ran
    assert isinstance(model.encoder, FieldEncoder) == (reads == "fields")
    # an artifact from before the setting existed read the whole prompt
    stored = {k: v for k, v in config.to_dict().items() if k != "encoder_input"}
    assert lopa.methods.MethodConfig.from_dict(stored).encoder_input == "prompt"
