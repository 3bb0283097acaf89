"""Artifacts on disk: every way a directory can be wrong gives an ArtifactError that names the
problem, nothing is ever unpickled, and PEFT prompt-tuning adapters go both ways."""

from __future__ import annotations

import builtins
import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import lopa
from lopa import prefix
from lopa.artifact import (CONFIG_NAME, PEFT_CONFIG, PEFT_WEIGHTS, WEIGHTS_NAME, ArtifactError, export_peft,
                           import_peft, load_artifact, read_meta)

from conftest import build_model, perturb_

D = 64


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any attempt to unpickle during the test fails it loudly."""

    def refuse(*a, **k):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)


@pytest.fixture
def artifact(tiny_base, tiny_encoder, tmp_path):
    """A saved LoPA artifact (trained-looking weights) and the model that wrote it."""
    base, tok = tiny_base
    model = build_model(base, tok, tiny_encoder, "lopa", num_virtual_tokens=3, rank=2, hidden_size=8,
                        encoder="tiny-random-bert")
    perturb_(model.generator)
    model.task = {"template": "{text} It was", "label_words": [" terrible", " great"]}
    return model.save_pretrained(tmp_path / "art"), model


def edit_meta(directory, **changes):
    path = directory / CONFIG_NAME
    meta = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    path.write_text(json.dumps(meta))


def test_round_trip_without_the_base_model(artifact):
    directory, model = artifact
    art = load_artifact(directory, expected_hidden_size=D)
    assert art.config == model.config
    assert (art.base_model, art.hidden_size, art.encoder_dim) == ("tiny-random-llama", D, 32)
    assert art.task == model.task and art.num_output_tokens == 3
    assert not art.generator.training
    for k, v in model.generator.state_dict().items():
        assert torch.equal(art.generator.state_dict()[k], v)


@pytest.mark.parametrize("payload", [b"", b"not a safetensors file at all", b"\xff" * 64])
def test_corrupt_weights(artifact, no_unpickling, payload):
    directory, _ = artifact
    (directory / WEIGHTS_NAME).write_bytes(payload)
    with pytest.raises(ArtifactError, match=f"{WEIGHTS_NAME} is corrupt"):
        load_artifact(directory)


def test_truncated_weights(artifact, no_unpickling):
    directory, _ = artifact
    data = (directory / WEIGHTS_NAME).read_bytes()
    (directory / WEIGHTS_NAME).write_bytes(data[:len(data) // 2])
    with pytest.raises(ArtifactError, match="corrupt"):
        load_artifact(directory)


def test_pickled_weights_are_not_unpickled(artifact, tmp_path, no_unpickling):
    directory, _ = artifact
    sentinel = tmp_path / "pwned"
    (directory / WEIGHTS_NAME).write_bytes(_evil_pickle(sentinel))
    with pytest.raises(ArtifactError, match="corrupt"):
        load_artifact(directory)
    assert not sentinel.exists()


@pytest.mark.parametrize("text,named", [
    ("{not json", "not valid JSON"),
    ("\xff\xfe garbage", "not valid JSON"),
    ('{"model_type": "llama", "hidden_size": 64}', "not a lopa artifact config"),  # a HF config.json
    ('["a", "list"]', "not a lopa artifact config"),
    ('{"format": "lopa.soft-prompt", "format_version": 99, "config": {}, "hidden_size": 64}', "upgrade lopa"),
    ('{"format": "lopa.soft-prompt", "format_version": 1, "hidden_size": 64}', "'config'"),
])
def test_corrupt_or_foreign_config(artifact, no_unpickling, text, named):
    directory, _ = artifact
    (directory / CONFIG_NAME).write_text(text, encoding="latin-1")
    with pytest.raises(ArtifactError, match=named):
        load_artifact(directory)


def test_missing_files(artifact, tmp_path):
    directory, _ = artifact
    (directory / WEIGHTS_NAME).unlink()
    with pytest.raises(ArtifactError, match=f"{WEIGHTS_NAME} is missing"):
        load_artifact(directory)
    (directory / CONFIG_NAME).unlink()
    with pytest.raises(ArtifactError, match=f"{CONFIG_NAME} is missing"):
        load_artifact(directory)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "nowhere")


def test_base_model_of_another_width(artifact, tiny_base, tiny_encoder):
    directory, _ = artifact
    with pytest.raises(ArtifactError, match=r"width 64.*'tiny-random-llama'.*width is 576"):
        load_artifact(directory, expected_hidden_size=576)
    # the wrapper checks the same thing against the base it is given
    base, tok = tiny_base
    edit_meta(directory, hidden_size=576)
    with pytest.raises(ArtifactError, match="576"):
        lopa.SoftPromptModel.from_pretrained(directory, base, tok, encoder=tiny_encoder)


def test_unknown_method(artifact):
    directory, _ = artifact
    meta = json.loads((directory / CONFIG_NAME).read_text())
    edit_meta(directory, method="p-tuning-v3", config={**meta["config"], "method": "p-tuning-v3"})
    with pytest.raises(ArtifactError, match="unknown method 'p-tuning-v3'"):
        load_artifact(directory)


def test_unknown_or_invalid_setting(artifact):
    directory, _ = artifact
    meta = json.loads((directory / CONFIG_NAME).read_text())
    edit_meta(directory, config={**meta["config"], "warp_factor": 9})
    with pytest.raises(ArtifactError, match="warp_factor"):
        load_artifact(directory)
    edit_meta(directory, config={**meta["config"], "rank": 0})
    with pytest.raises(ArtifactError, match="rank"):
        load_artifact(directory)


def test_tensors_of_the_wrong_shape(artifact):
    directory, _ = artifact
    tensors = load_file(directory / WEIGHTS_NAME)
    tensors["shared"] = torch.zeros(4, D)  # m = 3 recorded
    save_file(tensors, directory / WEIGHTS_NAME)
    with pytest.raises(ArtifactError, match=r"wrong shape \['shared \(4, 64\) \(settings say \(3, 64\)\)'\]"):
        load_artifact(directory)
    del tensors["shared"]
    tensors["extra"] = torch.zeros(1)
    save_file(tensors, directory / WEIGHTS_NAME)
    with pytest.raises(ArtifactError, match=r"missing \['shared'\], unexpected \['extra'\]"):
        load_artifact(directory)


def test_settings_that_disagree_with_the_tensors(artifact):
    directory, _ = artifact
    meta = json.loads((directory / CONFIG_NAME).read_text())
    edit_meta(directory, config={**meta["config"], "rank": 3})
    with pytest.raises(ArtifactError, match="wrong shape"):
        load_artifact(directory)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(artifact, bad):
    directory, _ = artifact
    tensors = load_file(directory / WEIGHTS_NAME)
    tensors["u_head.fc2.weight"][0, 0] = bad
    save_file(tensors, directory / WEIGHTS_NAME)
    with pytest.raises(ArtifactError, match="NaN or infinite"):
        load_artifact(directory)


def test_saving_is_atomic_and_overwrites(artifact):
    directory, model = artifact
    perturb_(model.generator, seed=7)
    model.save_pretrained(directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])  # no temp files
    art = load_artifact(directory)
    assert torch.equal(art.generator.shared, model.generator.shared)


# -- pickles are refused -----------------------------------------------------------------------------
class _Evil:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.exec, (f"open({self.path!r}, 'w').close()",)


def _evil_pickle(sentinel) -> bytes:
    return pickle.dumps({"prompt_embeddings": _Evil(sentinel)})


def test_pickled_peft_adapter_is_refused(tmp_path, monkeypatch):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    sentinel = tmp_path / "pwned"
    (adapter / PEFT_CONFIG).write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4,
                                                   "token_dim": D, "num_transformer_submodules": 1}))
    (adapter / "adapter_model.bin").write_bytes(_evil_pickle(sentinel))

    def refuse(*a, **k):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(ArtifactError, match="adapter_model.bin is a pickle; lopa never unpickles"):
        import_peft(adapter)
    with pytest.raises(ArtifactError, match="import_peft"):  # and the artifact loader points the way
        load_artifact(adapter)
    assert not sentinel.exists()


def test_foreign_peft_adapters_are_refused(tmp_path):
    adapter = tmp_path / "lora"
    adapter.mkdir()
    with pytest.raises(ArtifactError, match=PEFT_CONFIG):
        import_peft(adapter)
    (adapter / PEFT_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(ArtifactError, match="'LORA'"):
        import_peft(adapter)
    (adapter / PEFT_CONFIG).write_text("{oops")
    with pytest.raises(ArtifactError, match="corrupt"):
        import_peft(adapter)
    (adapter / PEFT_CONFIG).write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4,
                                                   "token_dim": D}))
    save_file({"prompt_embeddings": torch.zeros(5, D)}, adapter / PEFT_WEIGHTS)
    with pytest.raises(ArtifactError, match=r"shape \(4, 64\)"):
        import_peft(adapter)


def test_only_prompt_tuning_exports_to_peft(artifact, tmp_path):
    directory, _ = artifact
    with pytest.raises(ArtifactError, match="only prompt-tuning"):
        export_peft(directory, tmp_path / "peft")


# -- PEFT interoperability ----------------------------------------------------------------------------
def _lopa_logits(base, tok, prompt, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    batch = prefix.assemble(base, [prompt], [ids])
    assert batch.attention_mask.all()  # one row: no padding, positions are arange
    with torch.no_grad():
        return base(**batch.model_inputs()).logits[0]


def _peft_logits(peft_model, tok, text):
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]


TEXT = "Review: a gripping, funny film. It was"


def test_export_peft_loads_in_peft_with_the_same_logits(tiny_base, fresh_base, tmp_path):
    from peft import PeftModel
    base, tok = tiny_base
    model = build_model(base, tok, None, "prompt-tuning", num_virtual_tokens=5)
    perturb_(model.generator, scale=0.3)
    model.save_pretrained(tmp_path / "art")
    out = export_peft(tmp_path / "art", tmp_path / "peft")
    assert {PEFT_CONFIG, PEFT_WEIGHTS} <= {p.name for p in out.iterdir()}
    assert json.loads((out / PEFT_CONFIG).read_text())["peft_type"] == "PROMPT_TUNING"

    peft_model = PeftModel.from_pretrained(fresh_base[0], str(out)).eval()
    theirs = _peft_logits(peft_model, tok, TEXT)
    ours = _lopa_logits(base, tok, model.generator.prompt.detach(), TEXT)
    assert theirs.shape == ours.shape  # PEFT returns logits for the virtual tokens too
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=0), (theirs - ours).abs().max()
    # and through lopa's classify path (LM head at the last position only)
    assert torch.allclose(prefix.last_logits(base, model.eval()._batch([TEXT]))[0], theirs[-1], atol=1e-5)


def test_import_peft_reads_peft_s_own_adapter(tiny_base, fresh_base, tmp_path):
    from peft import PromptTuningConfig, TaskType, get_peft_model
    base, tok = tiny_base
    own_base = fresh_base[0]  # get_peft_model wraps and mutates its base: keep the shared one out of it
    torch.manual_seed(3)
    peft_model = get_peft_model(own_base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    assert (tmp_path / "peft" / PEFT_WEIGHTS).exists()
    peft_prompt = peft_model.prompt_encoder["default"].embedding.weight.detach()

    art = import_peft(tmp_path / "peft", out=tmp_path / "art", task={"template": "{text}"})
    assert art.config.method == "prompt-tuning" and art.config.num_virtual_tokens == 6 and art.hidden_size == D
    assert torch.equal(art.generator.prompt.detach(), peft_prompt)
    # the saved copy is an ordinary lopa artifact that runs on the shared base and agrees with PEFT
    loaded = lopa.SoftPromptModel.from_pretrained(tmp_path / "art", base, tok).eval()
    assert loaded.task == {"template": "{text}"}
    assert torch.equal(loaded.generator.prompt.detach(), peft_prompt)
    theirs = _peft_logits(peft_model.eval(), tok, TEXT)
    ours = _lopa_logits(base, tok, loaded.generator.prompt.detach(), TEXT)
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=0)
    # export then import is the identity
    back = import_peft(export_peft(tmp_path / "art", tmp_path / "peft2"))
    assert torch.equal(back.generator.prompt, art.generator.prompt)


def test_read_meta_is_the_json_config(artifact):
    directory, model = artifact
    meta = read_meta(directory)
    assert meta["format"] == "lopa.soft-prompt" and meta["config"]["rank"] == 2
    assert meta["encoder_dim"] == 32 and meta["task"]["label_words"] == [" terrible", " great"]
    shutil.rmtree(directory)
    with pytest.raises(ArtifactError, match="does not exist"):
        read_meta(directory)
