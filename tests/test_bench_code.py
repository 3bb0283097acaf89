"""`lopa bench code --quick` on the tiny models: summary, per-problem files, the docs section, resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lopa.cli import main

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OTHER = "# Results\n\nintro\n\n<!-- accuracy:start -->\nACCURACY\n<!-- accuracy:end -->\n\ntail\n"


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()  # the benchmark sets --threads for its process
    yield
    torch.set_num_threads(before)


def test_quick_benchmark_writes_summary_and_doc_then_resumes(tmp_path, capsys):
    out, doc = tmp_path / "out", tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text(OTHER)
    argv = ["bench", "code", "--quick", "--out", str(out), "--doc", str(doc), "--data-dir", str(DATA)]
    assert main(argv) == 0
    printed = capsys.readouterr().out

    summary = json.loads((out / "summary.json").read_text())
    parts = summary["parts"]
    assert list(parts) == ["zero-shot", "prompt-tuning", "lopa"]
    for name, p in parts.items():
        assert p["n"] == 4 and 0 <= p["passed"] <= 4 and p["pass@1"] == p["passed"] / 4
        lo, hi = p["ci95"]
        assert 0.0 <= lo <= p["pass@1"] <= hi <= 1.0
        assert p["generate_s_per_problem"] > 0 and p["sandbox_s_per_problem"] > 0
        assert sum(p["statuses"].values()) == 4
        rows = [json.loads(line) for line in (out / f"{name}-test.jsonl").read_text().splitlines()]
        assert len(rows) == 4 and all(len(r["status"]) == 1 for r in rows)
        assert f"[{name}] pass@1" in printed
    assert parts["zero-shot"]["trainable_params"] == 0
    assert 0 < parts["prompt-tuning"]["trainable_params"] < parts["lopa"]["trainable_params"]
    assert parts["lopa"]["steps"] == 2 and not (Path(parts["lopa"]["run_dir"]) / "checkpoints").exists()
    assert summary["command"].startswith("lopa bench code --quick") and summary["machine"]["cores"] >= 1
    assert summary["paper"]["pass@1_percent"] == {"prompt-tuning": 31.2, "lora": 36.0, "lopa": 34.5}

    text = doc.read_text()
    assert text.startswith("# Results\n\nintro\n\n<!-- accuracy:start -->\nACCURACY\n<!-- accuracy:end -->\n\ntail")
    section = text[text.index("<!-- code:start -->"):text.index("<!-- code:end -->")]
    for needle in ["zero-shot (bare model)", "| prompt tuning |", "| LoPA |", "31.2", "34.5", "36.0", "not run",
                   "Command: `lopa bench code --quick", "Machine:", "Wall time:", "generate s/problem",
                   "paired 95% CI", "over 4 problems"]:  # verdicts pair the per-problem results
        assert needle in section, needle

    # rerun: every part is recorded with the same settings, so nothing runs again
    stamp = (out / "lopa-test.jsonl").stat().st_mtime_ns
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "starting" not in printed and printed.count("done (recorded in summary.json)") == 3
    assert (out / "lopa-test.jsonl").stat().st_mtime_ns == stamp
    assert doc.read_text().count("<!-- code:start -->") == 1 and "ACCURACY" in doc.read_text()
    assert main(argv + ["--report-only"]) == 0  # the report keeps the command that ran the parts
    assert json.loads((out / "summary.json").read_text())["command"] == summary["command"]
    capsys.readouterr()

    # a part lost from the summary after training: scored again without retraining
    summary["parts"].pop("lopa")
    (out / "summary.json").write_text(json.dumps(summary))
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "[lopa] starting" in printed and "training already finished" in printed
    assert "[prompt-tuning] starting" not in printed
    assert "lopa" in json.loads((out / "summary.json").read_text())["parts"]

    # changed settings are a different part: --plan lists it as to do and runs nothing
    assert main([*argv, "--steps", "3", "--plan"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("to do") == 2 and "zero-shot      done" in printed


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "code", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ["--quick", "--plan", "--out", "--doc", "--steps", "--limit", "--methods", "--max-new-tokens",
                   "--threads", "--precision", "--lr", "--report-only"]:
        assert option in text, option
    from lopa.benchmarks import code
    assert all(a.help for a in code.build_parser()._actions), "an option without help"
