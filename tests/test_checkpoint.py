"""Resuming trusts no checkpoint: every corruption is named, the one before is used, and the run ends
exactly as an uninterrupted one would; with no usable checkpoint left, a clear error.

One tiny run (``--encoder self --method lopa``, 4 steps, a checkpoint every 2) is trained once; each
case restores it, damages its newest checkpoint (step 4) and resumes through the real CLI, in process.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lopa import checkpoint
from lopa.cli import main

STEPS, EVERY = 4, 2


def _reviews(n: int = 40) -> list[dict]:
    good, bad = ["fine", "great", "lovely", "superb"], ["dull", "awful", "tedious", "bad"]
    return [{"text": f"a {(good if i % 2 else bad)[i % 4]} film number {i}", "label": i % 2} for i in range(n)]


def _args(task: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--method", "lopa", "--encoder", "self", "--model", "tiny-random-llama", "--no-progress",
            "--no-zero-shot", "--task", str(task), "--template", "{text} It was", "--label-words", " terrible, great",
            "--out", str(out), "--max-steps", str(STEPS), "--eval-every", str(EVERY), "--batch-size", "4",
            "--dropout", "0.2", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(task file, run dir path, pristine copy of the finished uninterrupted run)."""
    root = tmp_path_factory.mktemp("ck")
    task = root / "reviews.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in _reviews()))
    out = root / "run"
    assert main(_args(task, out)) == 0
    pristine = root / "pristine"
    shutil.copytree(out, pristine)
    return task, out, pristine


@pytest.fixture
def run(reference):
    """The reference run restored in place (its settings record its path, so it must live there)."""
    task, out, pristine = reference
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(pristine, out)
    return task, out, pristine


def _ck(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:07d}"


def _reseal(ck: Path) -> None:
    """Rewrite the checksums, so only the value checks stand between the damage and the run."""
    lines = [f"{hashlib.sha256((ck / f).read_bytes()).hexdigest()}  {f}\n" for f in checkpoint.FILES]
    (ck / checkpoint.SUMS).write_text("".join(lines))


def _edit_state(ck: Path, edit) -> None:
    state = json.loads((ck / "state.json").read_text())
    edit(state)
    (ck / "state.json").write_text(json.dumps(state))
    _reseal(ck)


def _edit_tensors(ck: Path, name: str, edit) -> None:
    tensors = load_file(ck / name)
    edit(tensors)
    save_file(tensors, ck / name)
    _reseal(ck)


def _flip_byte(path: Path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _first_key(tensors: dict) -> str:
    return sorted(tensors)[0]


def _set_nan(t: dict) -> None:
    k = _first_key(t)
    t[k] = t[k].clone()
    t[k].view(-1)[0] = float("nan")


def _wrong_shape(t: dict) -> None:
    k = _first_key(t)
    t[k] = torch.zeros(*t[k].shape[:-1], t[k].shape[-1] + 1)


def _missing_key(t: dict) -> None:
    del t[_first_key(t)]


def _optimizer_nan(t: dict) -> None:
    k = next(k for k in sorted(t) if k.endswith("exp_avg"))
    t[k] = t[k].clone()
    t[k].view(-1)[0] = float("inf")


def _bad_rng(s: dict) -> None:
    s["torch_rng"] = [0] * len(s["torch_rng"])  # the right size, but not a valid mt19937 state


# (id, damage to step 4, what the message must say)
DAMAGE = [
    ("flipped-weight-byte", lambda ck: _flip_byte(ck / "weights.safetensors"), "weights.safetensors does not match its checksum"),
    ("flipped-optimizer-byte", lambda ck: _flip_byte(ck / "optimizer.safetensors"), "optimizer.safetensors does not match"),
    ("flipped-state-byte", lambda ck: _flip_byte(ck / "state.json", 12), "state.json does not match"),
    ("nan-weight", lambda ck: _edit_tensors(ck, "weights.safetensors", _set_nan), "NaN or infinite"),
    ("inf-optimizer", lambda ck: _edit_tensors(ck, "optimizer.safetensors", _optimizer_nan), "NaN or infinite"),
    ("step-negative", lambda ck: _edit_state(ck, lambda s: s.update(step=-5)), "step -5 is not an integer in [0, max_steps=4]"),
    ("step-huge", lambda ck: _edit_state(ck, lambda s: s.update(step=10 ** 12)), "step 1000000000000"),
    ("step-not-int", lambda ck: _edit_state(ck, lambda s: s.update(step="4")), "step '4'"),
    ("truncated-weights", lambda ck: ((ck / "weights.safetensors").write_bytes((ck / "weights.safetensors").read_bytes()[:100]),
                                      _reseal(ck)), "weights.safetensors is truncated"),
    ("garbage-state", lambda ck: ((ck / "state.json").write_bytes(b"\x00garbage{"), _reseal(ck)), "state.json is not valid JSON"),
    ("deep-state", lambda ck: ((ck / "state.json").write_text("[" * 100_000 + "]" * 100_000), _reseal(ck)),
     "state.json is not valid JSON"),
    ("wrong-shape", lambda ck: _edit_tensors(ck, "weights.safetensors", _wrong_shape), "the model has"),
    ("missing-key", lambda ck: _edit_tensors(ck, "weights.safetensors", _missing_key), "missing keys"),
    ("missing-file", lambda ck: (ck / "optimizer.safetensors").unlink(), "optimizer.safetensors is missing"),
    ("bad-rng", lambda ck: _edit_state(ck, _bad_rng), "torch_rng is not a valid generator state"),
    ("short-rng", lambda ck: _edit_state(ck, lambda s: s.update(torch_rng=s["torch_rng"][:10])), "torch_rng is not a list"),
    ("missing-trainer-key", lambda ck: _edit_state(ck, lambda s: s["trainer"].pop("best_step")), "best_step"),
    ("bad-best-step", lambda ck: _edit_state(ck, lambda s: s["trainer"].update(best_step=99)), "best_step"),
    ("scheduler-elsewhere", lambda ck: _edit_state(ck, lambda s: s["trainer"]["scheduler"].update(last_epoch=1)),
     "scheduler is at step 1"),
    ("bad-lr", lambda ck: _edit_state(ck, lambda s: s["optimizer"]["param_groups"][0].update(lr="fast")), "lr is 'fast'"),
    ("foreign-param", lambda ck: _edit_tensors(ck, "optimizer.safetensors",
                                               lambda t: t.update({"999.exp_avg": torch.zeros(1)})), "names no parameter"),
]


@pytest.mark.parametrize("damage,message", [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_damaged_checkpoint_is_named_and_the_one_before_resumes_to_the_same_result(run, capsys, damage, message):
    task, out, pristine = run
    damage(_ck(out, 4))
    assert main(_args(task, out, "--resume")) == 0
    err = capsys.readouterr().err
    assert f"checkpoint {_ck(out, 4)} is unusable" in err and message in err, err
    assert f"resuming from {_ck(out, 2)} (step 2)" in err
    # resumed from step 2, the run retrains steps 3-4 exactly as the uninterrupted run did
    a, b = load_file(_ck(pristine, 4) / "weights.safetensors"), load_file(_ck(out, 4) / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "results.json").read_text())["steps"] == STEPS
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [2, 4]


def test_no_usable_checkpoint_is_a_clear_error(run, capsys):
    task, out, _ = run
    _edit_state(_ck(out, 4), lambda s: s.update(step=-5))
    _flip_byte(_ck(out, 2) / "weights.safetensors")
    before = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    assert main(_args(task, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and str(_ck(out, 4)) in err and str(_ck(out, 2)) in err
    assert "Traceback" not in err
    # nothing was deleted or rewritten: the damaged checkpoints stay for whoever wants to look
    assert {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()} == before


def test_stale_tmp_dirs_are_removed_on_resume(run, capsys):
    task, out, _ = run
    stale = out / "checkpoints" / ".tmp-killed"
    stale.mkdir()
    (stale / "weights.safetensors").write_bytes(b"half")
    assert main(_args(task, out, "--resume")) == 0  # the newest is step 4 = max_steps: nothing to train
    assert not stale.exists() and f"removed {stale}" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]


def test_a_good_resume_says_nothing_and_checksums_match_sha256sum_format(run, capsys):
    task, out, _ = run
    sums = (_ck(out, 4) / checkpoint.SUMS).read_text().splitlines()
    assert sorted(line.split("  ")[1] for line in sums) == sorted(checkpoint.FILES)
    for line in sums:
        digest, name = line.split("  ")
        assert hashlib.sha256((_ck(out, 4) / name).read_bytes()).hexdigest() == digest
    assert main(_args(task, out, "--resume")) == 0
    assert "unusable" not in capsys.readouterr().err


def test_checkpoint_from_before_checksums_still_resumes_after_its_values_are_checked(tmp_path):
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.sum().backward()
    opt.step()
    path = checkpoint.save(tmp_path, 1, {"p": p.detach()}, opt.state_dict(), {"best": 0.5})
    (path / checkpoint.SUMS).unlink()
    logged: list[str] = []
    ck = checkpoint.load_resumable(tmp_path, max_steps=3, weights={"p": p}, optimizer=opt, log=logged.append)
    assert ck is not None and ck.step == 1 and "no SHA256SUMS" in logged[0]
    assert checkpoint.load_resumable(tmp_path / "none", max_steps=3, weights={}, optimizer=opt) is None
