"""The run log of long benchmarks: records read back only with the settings they ran with, written
whole so an interruption never leaves half a line, and a foreign or corrupt file refused by name."""

from __future__ import annotations

import json

import pytest

from lopa.benchmarks.run_log import RunLog, RunLogError, bits, unbits


def test_records_survive_a_new_process_and_the_last_write_wins(tmp_path):
    path = tmp_path / "runs.jsonl"
    log = RunLog(path)
    log.put("a", {"steps": 3}, {"acc": 0.5, "correct": bits([1, 0])})
    log.put("b", {"steps": 3}, {"acc": 0.7})
    log.put("a", {"steps": 3}, {"acc": 0.6, "correct": bits([1, 1])})
    again = RunLog(path)
    assert again.get("a", {"steps": 3})["acc"] == 0.6 and unbits(again.get("a", {"steps": 3})["correct"]) == [1, 1]
    assert again.get("b", {"steps": 3}) == {"acc": 0.7}
    assert again.get("b", {"steps": 4}) is None and again.stale("b", {"steps": 4}) and not again.stale("c", {})
    assert not (tmp_path / "runs.jsonl.tmp").exists()
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"format": "lopa-run-log", "version": 1} and len(lines) == 3


def test_settings_compare_as_json_so_tuples_and_lists_are_one(tmp_path):
    log = RunLog(tmp_path / "r.jsonl")
    log.put("a", {"rows": ("x", "y")}, {"v": 1})
    assert RunLog(log.path).get("a", {"rows": ("x", "y")}) == {"v": 1}


@pytest.mark.parametrize("text, says", [
    ('{"format": "lopa-run-log", "version": 1}\n{"key": "a", "set\n', ":2: not a JSON line"),
    ('{"format": "lopa-run-log", "version": 1}\n{"key": "a"}\n', ":2: a run record needs"),
    ('{"format": "lopa-run-log", "version": 9}\n', "version 9"),
    ('{"results": []}\n', "not a lopa run log"),
    ("\xff\xfe", "cannot read"),
])
def test_a_foreign_or_corrupt_file_is_refused_by_name_and_left_alone(tmp_path, text, says):
    path = tmp_path / "r.jsonl"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(RunLogError, match=says) as e:
        RunLog(path)
    assert str(path) in str(e.value) and path.read_bytes() == text.encode("latin-1")


def test_correctness_strings_hold_only_zeros_and_ones():
    assert unbits(bits([0.0, 1.0, 1.0])) == [0.0, 1.0, 1.0]
    with pytest.raises(RunLogError):
        unbits("10x")
