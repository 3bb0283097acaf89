"""`lopa train` / `lopa eval` through the real CLI on the tiny model: round trip, kill-and-resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lopa.cli import main
from lopa.train import micro_batch

TINY = ["--model", "tiny-random-llama", "--no-progress", "--no-zero-shot"]


def _user_task(tmp_path: Path, rows: list[dict], name: str = "reviews.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _reviews(n: int = 60) -> list[dict]:
    good, bad = ["fine", "great", "lovely", "superb"], ["dull", "awful", "tedious", "bad"]
    return [{"text": f"a {(good if i % 2 else bad)[i % 4]} film number {i}", "label": i % 2} for i in range(n)]


def test_train_then_eval_round_trip(tmp_path, capsys):
    task = _user_task(tmp_path, _reviews())
    out = tmp_path / "run"
    rc = main(["train", "--method", "lopa", "--encoder", "tiny-random-bert", "--task", str(task), "--template",
               "{text} It was", "--label-words", " terrible, great", "--out", str(out), "--max-steps", "6",
               "--eval-every", "3", "--batch-size", "4", *TINY[:3], "--zero-shot"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "test accuracy:" in printed and "zero-shot accuracy:" in printed
    for f in ["run_config.json", "metrics.jsonl", "results.json", "curves.png", "best/soft_prompt_config.json",
              "best/soft_prompt.safetensors"]:
        assert (out / f).exists(), f
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000003", "step-0000006"]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [3, 6]
    config = json.loads((out / "run_config.json").read_text())
    assert config["method"] == "lopa" and config["max_steps"] == 6 and config["label_words"] == " terrible, great"
    results = json.loads((out / "results.json").read_text())
    assert results["test"]["n"] == 6 and results["trainable_params"] > 0

    assert main(["eval", str(out), "--split", "test"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["accuracy"] == results["test"]["accuracy"] and line["n"] == 6 and "macro_f1" in line
    # --results keeps each item's answer, the same ones training's own test scoring recorded
    per_item = tmp_path / "per-item.jsonl"
    assert main(["eval", str(out), "--split", "test", "--results", str(per_item)]) == 0
    assert "predictions" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    items = [json.loads(x) for x in per_item.read_text().splitlines()]
    assert [i["prediction"] for i in items] == json.loads((out / "predictions.json").read_text())["test"]
    assert sum(i["correct"] for i in items) / 6 == line["accuracy"]
    with pytest.raises(SystemExit) as refused:  # a folder: refused, as argparse refuses, before any scoring
        main(["eval", str(out), "--results", str(tmp_path)])
    assert refused.value.code == 2 and "--results takes a file" in capsys.readouterr().err

    assert main(["eval", "--zero-shot", "--model", "tiny-random-llama", "--task", str(task), "--template",
                 "{text} It was", "--label-words", " terrible, great"]) == 0
    zs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert zs["accuracy"] == results["zero_shot"]["accuracy"]
    # the paired difference is the two accuracies' difference, its interval around it; no predictions kept
    vs = results["vs_zero_shot"]
    assert abs(vs["difference"] - (results["test"]["accuracy"] - zs["accuracy"])) < 1e-9
    assert vs["ci95"][0] <= vs["difference"] <= vs["ci95"][1] or vs["difference"] == 0
    assert "predictions" not in results["test"] and "predictions" not in results["zero_shot"]
    preds = json.loads((out / "predictions.json").read_text())  # kept apart, for paired comparisons
    assert len(preds["test"]) == len(preds["zero_shot"]) == len(preds["labels"]) == 6
    assert sum(p == y for p, y in zip(preds["test"], preds["labels"])) / 6 == results["test"]["accuracy"]


def test_dry_run_prints_count(tmp_path, capsys):
    task = _user_task(tmp_path, _reviews())
    assert main(["train", "--method", "prompt-tuning", "--task", str(task), "--template", "{text} It was",
                 "--label-words", " terrible, great", "--out", str(tmp_path / "r"), "--dry-run", *TINY]) == 0
    out = capsys.readouterr().out
    assert "trainable params: 640 || all params:" in out  # m * d = 10 * 64
    assert not (tmp_path / "r").exists()


def test_threads_sets_torchs_cpu_threads_and_a_resume_must_keep_them(tmp_path, capsys):
    import torch
    task = _user_task(tmp_path, _reviews())
    out = tmp_path / "r"
    args = ["train", "--method", "prompt-tuning", "--task", str(task), "--template", "{text} It was",
            "--label-words", " terrible, great", "--out", str(out), "--max-steps", "2", "--eval-every", "2", *TINY]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main([*args, "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        assert json.loads((out / "run_config.json").read_text())["threads"] == 1
        capsys.readouterr()
        assert main([*args, "--max-steps", "4", "--resume", "--threads", "2"]) == 2
        assert "['threads']" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_micro_batches_cover_each_epoch_once():
    batches = [micro_batch(10, seed=3, micro_step=s, size=4) for s in range(5)]
    flat = sum(batches, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert batches == [micro_batch(10, seed=3, micro_step=s, size=4) for s in range(5)]


def _train_cmd(task: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lopa", "train", "--method", "lopa", "--encoder", "tiny-random-bert",
            "--task", str(task), "--template", "{text} It was", "--label-words", " terrible, great",
            "--out", str(out), "--max-steps", "40", "--eval-every", "5", "--batch-size", "8", "--dropout", "0.2",
            *TINY, *extra]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    task = _user_task(tmp_path, _reviews(200))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    whole = tmp_path / "whole"
    subprocess.run(_train_cmd(task, whole), check=True, env=env, capture_output=True, timeout=300)

    cut = tmp_path / "cut"
    proc = subprocess.Popen(_train_cmd(task, cut), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (cut / "checkpoints" / "step-0000010").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    steps = sorted(p.name for p in (cut / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert steps and steps[-1] < "step-0000040", steps

    refused = subprocess.run(_train_cmd(task, cut), env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    subprocess.run(_train_cmd(task, cut, "--resume"), check=True, env=env, capture_output=True, timeout=300)

    a = load_file(whole / "checkpoints" / "step-0000040" / "weights.safetensors")
    b = load_file(cut / "checkpoints" / "step-0000040" / "weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # bit-identical: same data order, same dropout masks, same optimiser state
        assert (a[k] == b[k]).all(), k
    steps_logged = [json.loads(x)["step"] for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(5, 41, 5))


@pytest.mark.parametrize("rows,extra,message", [
    ([{"review": "x", "label": 0}] * 20, [], "text"),  # template slot names a missing column
    ([{"text": "x", "label": "maybe"}] * 20, [], "maybe"),  # label not among the label words
    ([{"text": "x", "label": 0, "split": "train"}] * 20, [], "test"),  # empty test split
    (_reviews(), ["--template", "It was"], "slot"),  # template without a text slot
])
def test_bad_task_input_is_refused_before_training(tmp_path, capsys, rows, extra, message):
    task = _user_task(tmp_path, rows)
    args = ["train", "--method", "prompt-tuning", "--task", str(task), "--template", "{text} It was",
            "--label-words", " terrible, great", "--out", str(tmp_path / "run"), *TINY, *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error" in err and message in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_setting_the_task_cannot_take_is_refused_before_the_bare_model_is_scored(tmp_path, capsys):
    # the encoder cannot read "{a} {b}" back into its two fields; zero-shot scoring would come first, so the
    # refusal must come before it: nothing is written, no minutes of scoring are spent on a run that cannot start
    rows = [{"a": f"first {i}", "b": f"second {i}", "label": i % 2} for i in range(30)]
    task = _user_task(tmp_path, rows)
    out = tmp_path / "run"
    args = ["train", "--method", "lopa", "--encoder", "tiny-random-bert", "--task", str(task), "--template",
            "{a} {b} Answer:", "--label-words", " No, Yes", "--out", str(out), "--model", "tiny-random-llama",
            "--no-progress"]
    assert main([*args, "--encoder-input", "fields"]) == 2
    assert "only whitespace between {a} and {b}" in capsys.readouterr().err
    assert not out.exists()
    # under the default (auto) the same task trains, its encoder reading the whole prompt
    assert main([*args, "--no-zero-shot", "--max-steps", "2", "--eval-every", "2"]) == 0
    assert json.loads((out / "best" / "soft_prompt_config.json").read_text())["config"]["encoder_input"] == "prompt"


@pytest.mark.parametrize("flag,value,message", [("--rank", "0", "rank"), ("--num-virtual-tokens", "0",
                                                                          "num_virtual_tokens"),
                                                 ("--max-steps", "0", "max-steps"), ("--threads", "0", "threads")])
def test_out_of_range_settings_are_refused(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:
        main(["train", "--method", "lopa", flag, value, "--out", str(tmp_path / "r"), *TINY])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_out_dir_with_another_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_config.json").write_text("{}")
    task = _user_task(tmp_path, _reviews())
    args = ["train", "--method", "prompt-tuning", "--task", str(task), "--template", "{text} It was",
            "--label-words", " terrible, great", "--out", str(out), "--max-steps", "2", "--eval-every", "2", *TINY]
    assert main(args) == 2
    assert "another run" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert (out / "best").is_dir()


@pytest.mark.parametrize("method,extra", [("lora", ["--r", "4", "--lr", "0.05"]), ("full", ["--lr", "0.01"])])
def test_baselines_zero_shot_comes_from_the_unmodified_base(tmp_path, capsys, method, extra):
    """PEFT injects LoRA into the base in place and full fine-tuning trains it: a zero-shot line
    scored after training would score the trained model. It must equal a fresh bare model's score."""
    task = _user_task(tmp_path, _reviews(200))
    out = tmp_path / "run"
    common = ["--template", "{text} It was", "--label-words", " terrible, great"]
    assert main(["train", "--method", method, "--task", str(task), *common, "--out", str(out), "--max-steps", "6",
                 "--eval-every", "3", "--batch-size", "4", *TINY[:3], "--zero-shot", "--precision", "fp32",
                 *extra]) == 0
    results = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--zero-shot", "--model", "tiny-random-llama", "--task", str(task), *common,
                 "--precision", "fp32"]) == 0
    fresh = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    zs = results["zero_shot"]
    assert (zs["n"], zs["accuracy"], zs["macro_f1"]) == (fresh["n"], fresh["accuracy"], fresh["macro_f1"]) == (20, zs["accuracy"], zs["macro_f1"])
    assert json.loads((out / "run_config.json").read_text())["method"] == method
    assert (out / "zero_shot.json").is_file()


def test_method_options_come_from_the_registry(tmp_path, capsys):
    task = _user_task(tmp_path, _reviews())
    common = ["--task", str(task), "--template", "{text} It was", "--label-words", " terrible, great", *TINY,
              "--dry-run"]
    assert main(["train", "--method", "lopt-2", "--activation", "relu", "--rank", "3", *common]) == 0
    assert main(["train", "--method", "idpg", "--pooling", "cls", "--encoder", "tiny-random-bert", *common]) == 0
    assert main(["train", "--method", "lora", "--r", "2", "--target-modules", "q_proj", *common]) == 0
    with pytest.raises(SystemExit):  # an option of another method is refused by name
        main(["train", "--method", "prompt-tuning", "--activation", "relu", *common])
    assert "--activation" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--method", "lopt-2", "--activation", "gelu", *common])
    assert "gelu" in capsys.readouterr().err


def test_train_args_from_flat_splits_run_and_method_settings():
    from lopa.train import TrainArgs
    args = TrainArgs.from_flat(method="lopa", rank=2, hidden_size=16, lr=0.01, precision="fp32")
    assert args.options == {"rank": 2, "hidden_size": 16} and args.learning_rate == 0.01
    assert TrainArgs(method="lora", precision="fp32").learning_rate == 5e-4  # the method's own default
    with pytest.raises(ValueError, match="unknown setting"):
        TrainArgs.from_flat(method="prompt-tuning", rank=2, precision="fp32")


def test_from_flat_refuses_an_option_the_method_does_not_have():
    from lopa.train import TrainArgs
    with pytest.raises(ValueError, match="num_virtual_token"):
        TrainArgs.from_flat(method="lopa", task="sst2", precision="fp32", out="unused", num_virtual_token=20)
