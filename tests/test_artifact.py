"""Artifacts on disk: every way a directory can be wrong gives an ArtifactError that names the
problem, nothing is ever unpickled, and PEFT prompt-tuning adapters go both ways."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import re
import resource
import shutil
import signal

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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


# ------------------------------------------------------------------ nothing allocated before it is checked


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("changes,named", [
    (dict(hidden_size=10 ** 9), "'hidden_size' must be an integer in"),  # was a 4 GB zeros(1, d)
    (dict(encoder_dim=10 ** 9), "'encoder_dim' must be an integer in"),  # was a 64 GB first layer
    (dict(hidden_size=65536), "wrong shape"),  # in range, but not what the tensors are
    (dict(encoder_dim=65536), "wrong shape"),
])
def test_huge_recorded_sizes_are_refused_before_any_allocation(artifact, no_unpickling, changes, named):
    directory, _ = artifact
    edit_meta(directory, **changes)
    before = _peak_rss_mb()
    with pytest.raises(ArtifactError, match=named):
        load_artifact(directory)
    assert _peak_rss_mb() - before < 256


@pytest.mark.parametrize("method,settings", [
    ("lopa", dict(num_virtual_tokens=1024, rank=4096, hidden_size=65536)),  # 1 TiB of float32 at d = 65536
    ("idpg", dict(num_virtual_tokens=1024, hidden_size=65536)),
    ("lopt-2", dict(num_virtual_tokens=1024, rank=4096)),
    ("prompt-tuning", dict(num_virtual_tokens=1024)),
])
def test_settings_at_their_maxima_are_checked_against_the_header_first(artifact, no_unpickling, method, settings):
    directory, _ = artifact
    meta = json.loads((directory / CONFIG_NAME).read_text())
    shared = ("seed",) if method in ("prompt-tuning", "lopt-2") else ("seed", "encoder", "pooling", "dropout")
    config = {k: meta["config"][k] for k in shared}
    edit_meta(directory, method=method, hidden_size=65536, encoder_dim=65536, num_output_tokens=None,
              config={"method": method, **config, **settings})
    before = _peak_rss_mb()
    with pytest.raises(ArtifactError, match="does not match method"):
        load_artifact(directory)
    assert _peak_rss_mb() - before < 256


@pytest.fixture
def alarm():
    """Fail (rather than hang the suite) if the test blocks for 10 s."""
    def ring(*_):
        raise TimeoutError("blocked for 10 s")
    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("name", [CONFIG_NAME, WEIGHTS_NAME])
def test_fifo_is_refused_without_blocking(artifact, alarm, name):
    directory, _ = artifact
    (directory / name).unlink()
    os.mkfifo(directory / name)
    with pytest.raises(ArtifactError, match=rf"{name} is not a regular file \(it is a FIFO\)"):
        load_artifact(directory)


@pytest.mark.parametrize("name", [CONFIG_NAME, WEIGHTS_NAME])
def test_link_to_dev_zero_is_refused(artifact, alarm, name):
    directory, _ = artifact
    (directory / name).unlink()
    (directory / name).symlink_to("/dev/zero")
    with pytest.raises(ArtifactError, match=rf"{name} is not a regular file \(it is a character device\)"):
        load_artifact(directory)


def test_link_to_a_regular_file_is_fine_and_oversized_files_are_refused(artifact, tmp_path):
    directory, _ = artifact
    real = tmp_path / "elsewhere.json"
    shutil.move(directory / CONFIG_NAME, real)
    (directory / CONFIG_NAME).symlink_to(real)
    assert load_artifact(directory).hidden_size == D
    (directory / CONFIG_NAME).unlink()
    (directory / CONFIG_NAME).write_text(" " * (2 << 20) + real.read_text())
    with pytest.raises(ArtifactError, match="larger than 1,048,576 bytes"):
        load_artifact(directory)
    with pytest.raises(ArtifactError, match="more than the 100"):
        (directory / CONFIG_NAME).write_text(real.read_text())
        load_artifact(directory, max_bytes=100)


def _deep(n: int) -> str:
    return "[" * n + "]" * n


# every malformed config is the artifact error, naming the file and the field (was a raw ValueError,
# TypeError, RecursionError or KeyError)
MALFORMED = [
    ("hidden-size-string", lambda m: m.update(hidden_size="64"), "'hidden_size' must be an integer"),
    ("hidden-size-float", lambda m: m.update(hidden_size=64.0), "'hidden_size' must be an integer"),
    ("hidden-size-bool", lambda m: m.update(hidden_size=True), "'hidden_size' must be an integer"),
    ("hidden-size-negative", lambda m: m.update(hidden_size=-1), "'hidden_size' must be an integer"),
    ("hidden-size-missing", lambda m: m.pop("hidden_size"), "missing the field 'hidden_size'"),
    ("encoder-dim-string", lambda m: m.update(encoder_dim="32"), "'encoder_dim' must be an integer"),
    ("format-version-string", lambda m: m.update(format_version="1"), "'format_version' must be"),
    ("config-string", lambda m: m.update(config="lopa"), "'config' must be an object"),
    ("config-list", lambda m: m.update(config=[1, 2]), "'config' must be an object"),
    ("method-unhashable", lambda m: m["config"].update(method=["lopa"]), "'config.method' must be a string"),
    ("method-disagrees", lambda m: m.update(method="idpg"), "'config.method' must be a string equal to 'method'"),
    ("nested-junk", lambda m: m["config"].update(num_virtual_tokens={"a": [{"b": None}]}), "'config.num_virtual_tokens'"),
    ("rank-string", lambda m: m["config"].update(rank="2"), "'config.rank' must be int"),
    ("dropout-nan", lambda m: m["config"].update(dropout=float("nan")), "'config.dropout' must be float"),
    ("encoder-number", lambda m: m["config"].update(encoder=5), "'config.encoder' must be str"),
    ("base-model-list", lambda m: m.update(base_model=["x"]), "'base_model' must be a string"),
    ("num-output-tokens-wrong", lambda m: m.update(num_output_tokens=7), "'num_output_tokens' is 7"),
    ("task-list", lambda m: m.update(task=["x"]), "'task' must be an object"),
    ("task-nested", lambda m: m["task"].update(name={"deep": [1]}), "'task.name.deep' must be a list of strings"),
    ("label-words-string", lambda m: m["task"].update(label_words=" great"), "'task.label_words' must be a list"),
    ("label-words-surrogate", lambda m: m["task"].update(label_words=[" \ud800"]), "'task.label_words' is not valid Unicode"),
]


@pytest.mark.parametrize("edit,named", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_config_names_the_file_and_field(artifact, no_unpickling, edit, named):
    directory, _ = artifact
    meta = json.loads((directory / CONFIG_NAME).read_text())
    edit(meta)
    (directory / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=re.escape(named)) as e:
        load_artifact(directory)
    assert str(directory / CONFIG_NAME) in str(e.value)


@pytest.mark.parametrize("text", [
    _deep(100_000),  # deep recursion
    '{"format": "lopa.soft-prompt", "config": ' + _deep(50_000) + ', "hidden_size": 64}',
    '{"format": "lopa.soft-prompt", "config": {}, "hidden_size": ' + "9" * 5000 + "}",  # int past Python's digit limit
    "null", "\ufeff{}", '"\ud800"',
])
def test_unparseable_config_is_the_artifact_error(artifact, no_unpickling, text):
    directory, _ = artifact
    (directory / CONFIG_NAME).write_text(text, encoding="utf-8", errors="surrogatepass")
    with pytest.raises(ArtifactError, match=re.escape(str(directory / CONFIG_NAME))):
        load_artifact(directory)


@pytest.mark.parametrize("template,named", [
    ("{text:>8000000000} It was", "has a format spec"),  # padded to 8 GB when filled
    ("{text!r} It was", "has a conversion"),
    ("{text.upper} It was", "must be a plain column name"),
    ("{text[0]} It was", "must be a plain column name"),
    ("{text:{text}}", "has a format spec"),
    ("{0} It was", "must be a plain column name"),
    ("{text It was", "malformed"),
    ("{text} \ud800", "not valid Unicode"),
    (["{text}"], "must be a string"),
])
def test_template_with_more_than_plain_slots_is_refused(artifact, template, named):
    directory, _ = artifact
    edit_meta(directory, task={"template": template, "label_words": [" terrible", " great"]})
    with pytest.raises(ArtifactError, match=re.escape(named)) as e:
        load_artifact(directory)
    assert "'task.template'" in str(e.value)


def test_non_float_tensors_are_refused(artifact):
    directory, _ = artifact
    tensors = load_file(directory / WEIGHTS_NAME)
    tensors["shared"] = tensors["shared"].to(torch.int32)
    save_file(tensors, directory / WEIGHTS_NAME)
    with pytest.raises(ArtifactError, match=r"\['shared'\] are not floating point"):
        load_artifact(directory)


@pytest.mark.parametrize("name,safe", [("adapter_model.bin", "adapter_model.safetensors"),
                                       ("pytorch_model.bin", "model.safetensors")])
def test_baseline_with_pickled_weights_is_refused_with_a_conversion_command(tmp_path, no_unpickling, name, safe):
    from lopa.baselines import BASELINE_CONFIG, BaselineModel
    sentinel = tmp_path / "pwned"
    run = tmp_path / "best"
    run.mkdir()
    (run / BASELINE_CONFIG).write_text(json.dumps({"kind": "lora" if "adapter" in name else "full",
                                                   "base_model": "tiny-random-llama"}))
    (run / name).write_bytes(_evil_pickle(sentinel))
    with pytest.raises(ValueError, match=rf"{name} is a pickle and lopa never unpickles.*save_file.*'{safe}'"):
        BaselineModel.from_pretrained(run)
    assert not sentinel.exists()


@pytest.mark.parametrize("changes,named", [
    (dict(num_virtual_tokens="4"), "'num_virtual_tokens' must be an integer"),
    (dict(token_dim=10 ** 9), "'token_dim' must be an integer"),
    (dict(num_transformer_submodules=[1]), "'num_transformer_submodules'"),
    (dict(base_model_name_or_path={"x": 1}), "'base_model_name_or_path' must be a string"),
])
def test_malformed_peft_config_is_the_artifact_error(tmp_path, changes, named):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / PEFT_CONFIG).write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4,
                                                   "token_dim": D, **changes}))
    save_file({"prompt_embeddings": torch.zeros(4, D)}, adapter / PEFT_WEIGHTS)
    with pytest.raises(ArtifactError, match=re.escape(named)):
        import_peft(adapter)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
FIELDS = ["format", "format_version", "method", "config", "base_model", "hidden_size", "encoder_dim",
          "num_output_tokens", "task", "lopa_version"]
CONFIG_FIELDS = ["method", "num_virtual_tokens", "init", "init_text", "seed", "encoder", "pooling", "hidden_size",
                 "dropout", "rank", "combine", "gate_scale", "init_std", "train_encoder"]


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(where=st.sampled_from(["top", "config", "task"]), key=st.sampled_from(FIELDS + CONFIG_FIELDS + ["template",
                                                                                                    "label_words"]),
       value=JSON)
def test_any_json_in_any_field_loads_or_is_the_artifact_error(artifact_dir_for_fuzz, where, key, value):
    directory, original = artifact_dir_for_fuzz
    meta = json.loads(original)
    target = meta if where == "top" else meta[where]
    target[key] = value
    (directory / CONFIG_NAME).write_text(json.dumps(meta))
    try:
        load_artifact(directory)
    except ArtifactError as e:
        assert str(directory / CONFIG_NAME) in str(e) or str(directory / WEIGHTS_NAME) in str(e)


@pytest.fixture(scope="module")
def artifact_dir_for_fuzz(tmp_path_factory, tiny_base, tiny_encoder):
    """One artifact for every fuzzed example (hypothesis reruns the test body, not the fixtures)."""
    base, tok = tiny_base
    model = build_model(base, tok, tiny_encoder, "lopa", num_virtual_tokens=3, rank=2, hidden_size=8,
                        encoder="tiny-random-bert")
    model.task = {"template": "{text} It was", "label_words": [" terrible", " great"]}
    directory = model.save_pretrained(tmp_path_factory.mktemp("fuzz") / "art")
    return directory, (directory / CONFIG_NAME).read_text()
