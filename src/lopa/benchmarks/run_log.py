"""A long benchmark's finished runs, one small JSON line each, in a file committed beside its report.

Run directories (checkpoints, logs) live under ``results/`` and never go into the repository, so a
fresh checkout would have to train every run again to rewrite a report or to add one row to it. The
run log keeps what the report needs of each finished run (its figures, its dev curve, its per-item
test correctness) and the settings it ran with; a run whose settings differ from today's is not read
back, so a changed budget or model never passes for the old one.

>>> import tempfile, pathlib
>>> log = RunLog(pathlib.Path(tempfile.mkdtemp()) / "runs.jsonl")
>>> log.put("sst2/lopa/lr0.001-s0", {"steps": 300}, {"best_dev_accuracy": 0.85, "correct": bits([1, 0, 1])})
>>> log.get("sst2/lopa/lr0.001-s0", {"steps": 300})["best_dev_accuracy"]
0.85
>>> log.get("sst2/lopa/lr0.001-s0", {"steps": 600}) is None   # other settings: not the same run
True
>>> unbits(RunLog(log.path).get("sst2/lopa/lr0.001-s0", {"steps": 300})["correct"])
[1.0, 0.0, 1.0]
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

FORMAT = "lopa-run-log"
VERSION = 1


class RunLogError(ValueError):
    """The run log file is not one, or a line of it cannot be read; the message names the file and line."""


def bits(values: Iterable[float]) -> str:
    """Per-item correctness (0/1) as a compact string of '0' and '1'.

    >>> bits([1.0, 0.0, True])
    '101'
    """
    return "".join("1" if v else "0" for v in values)


def unbits(text: str) -> list[float]:
    """The inverse of :func:`bits`.

    >>> unbits("10")
    [1.0, 0.0]
    """
    if set(text) - {"0", "1"}:
        raise RunLogError(f"per-item correctness must be a string of 0 and 1, got {text[:20]!r}...")
    return [float(c == "1") for c in text]


class RunLog:
    """Finished runs by key; each record carries the ``settings`` it ran with. Every write rewrites
    the file whole (through a temporary file), so an interrupted benchmark never leaves half a line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise RunLogError(f"{self.path}: cannot read the run log ({e})") from e
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise RunLogError(f"{self.path}:{n}: not a JSON line ({e}); fix or delete that line") from e
            if n == 1:
                if not isinstance(rec, dict) or rec.get("format") != FORMAT:
                    raise RunLogError(f"{self.path}: not a lopa run log (its first line should name format "
                                      f"{FORMAT!r}); move it away or pass another path")
                if rec.get("version") != VERSION:
                    raise RunLogError(f"{self.path}: run log version {rec.get('version')!r}; this lopa reads "
                                      f"version {VERSION}")
                continue
            if not (isinstance(rec, dict) and isinstance(rec.get("key"), str)
                    and isinstance(rec.get("settings"), dict) and isinstance(rec.get("record"), dict)):
                raise RunLogError(f"{self.path}:{n}: a run record needs 'key', 'settings' and 'record'")
            self.records[rec["key"]] = rec

    def get(self, key: str, settings: dict[str, Any]) -> dict[str, Any] | None:
        """The record of ``key`` if it ran with exactly these ``settings``, else None."""
        rec = self.records.get(key)
        if rec is None or rec["settings"] != json.loads(json.dumps(settings)):
            return None
        return rec["record"]

    def stale(self, key: str, settings: dict[str, Any]) -> bool:
        """Whether ``key`` is logged, but with other settings (so it will be run again)."""
        return key in self.records and self.get(key, settings) is None

    def put(self, key: str, settings: dict[str, Any], record: dict[str, Any]) -> None:
        self.records[key] = {"key": key, "settings": settings, "record": record}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        lines = [json.dumps({"format": FORMAT, "version": VERSION})]
        lines += [json.dumps(self.records[k], separators=(",", ":")) for k in sorted(self.records)]
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)
