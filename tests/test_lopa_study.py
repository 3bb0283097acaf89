"""The LoPA study script: its placement probe (a soft prompt between the text and the template's cue) and its variants."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lopa.methods import make_config
from lopa.model import build_model

_SPEC = importlib.util.spec_from_file_location("lopa_study", Path(__file__).parents[1] / "scripts" / "lopa_study.py")
study = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(study)


def _model(tiny_base):
    base, tok = tiny_base
    torch.manual_seed(0)
    return build_model(base, tok, make_config("prompt-tuning", num_virtual_tokens=3)), base, tok


def test_before_cue_puts_the_prompt_between_text_and_cue_and_restores_the_prefix(tiny_base, tmp_path):
    model, base, tok = _model(tiny_base)
    (tmp_path / study.PLACEMENT_FILE).write_text(json.dumps({"placement": "before-cue", "cue": " It was"}))
    texts = ["a fine and moving film . It was", "bad It was"]
    before = model._batch(texts).inputs_embeds
    with study.placed(tmp_path):
        batch = model._batch(texts)
    z = model.soft_prompts(texts)
    emb = base.get_input_embeddings()
    for row, text in enumerate(texts):
        head = tok(text[:-len(" It was")], add_special_tokens=False)["input_ids"]
        cue = tok(" It was", add_special_tokens=False)["input_ids"]
        real = int(batch.attention_mask[row].sum())
        want = torch.cat([emb(torch.tensor(head)), z[row], emb(torch.tensor(cue))])
        assert torch.allclose(batch.inputs_embeds[row, -real:], want.to(batch.inputs_embeds.dtype), atol=1e-6)
        assert batch.position_ids[row, -real:].tolist() == list(range(real))
    # outside the block the model is the library's again: [soft prompt ; text ; cue]
    assert torch.equal(model._batch(texts).inputs_embeds, before)
    assert not torch.equal(batch.inputs_embeds, before)


def test_before_cue_refuses_a_text_without_the_cue(tiny_base, tmp_path):
    model, _, _ = _model(tiny_base)
    (tmp_path / study.PLACEMENT_FILE).write_text(json.dumps({"placement": "before-cue", "cue": " It was"}))
    with study.placed(tmp_path), pytest.raises(ValueError, match="end with ' It was'"):
        model._batch(["no cue here"])


def test_a_run_without_a_placement_keeps_the_prefix(tiny_base, tmp_path):
    model, _, _ = _model(tiny_base)
    texts = ["bad It was"]
    before = model._batch(texts).inputs_embeds
    with study.placed(tmp_path):
        assert torch.equal(model._batch(texts).inputs_embeds, before)


@pytest.mark.parametrize("name", sorted(study.VARIANTS))
def test_every_variant_is_a_valid_run(name):
    """A typo in a variant's settings (an option its method does not have, a value out of range) fails here,
    not after the variants before it have trained for an hour."""
    from lopa.train import TrainArgs
    settings = dict(study.VARIANTS[name])
    placement = settings.pop("placement", None)
    assert placement is None or placement in study.PLACEMENTS
    args = TrainArgs.from_flat(**{"task": "sst2", "precision": "fp32", "out": "unused", **settings})
    config = args.method_config()
    for key, value in settings.items():
        if key in args.options:
            assert getattr(config, key) == value

