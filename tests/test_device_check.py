"""``scripts/device_check.sh``: where there is no GPU it must stop at once with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "device_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run its steps")
def test_fails_fast_and_clearly_without_a_gpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    start = time.monotonic()
    r = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, env=env,
                       timeout=90)
    seconds = time.monotonic() - start
    assert r.returncode == 3, r.stdout + r.stderr
    assert "gpu: FAILED, no usable CUDA GPU" in r.stdout and "sees no CUDA GPU" in r.stdout
    assert seconds < 60  # importing torch on a busy machine; no step ran
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert summary.count("\n") == 1 and "no usable CUDA GPU" in summary
    assert not (tmp_path / "out" / "train.log").exists()


def test_refuses_bad_settings(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable, "DEVICE": "tpu"}, timeout=30)
    assert r.returncode == 2 and "DEVICE must be cuda, cuda:N or cpu (got 'tpu')" in r.stderr


def test_the_whole_run_keeps_to_its_budget(tmp_path):
    """Each step gets at most what is left of BUDGET: with 2 s, the first step is cut off and the rest are
    not started, each saying why, so the script ends in seconds instead of after its steps' own limits."""
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "BUDGET": "2"}
    start = time.monotonic()
    r = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, env=env,
                       timeout=120)
    assert time.monotonic() - start < 60, r.stdout
    assert r.returncode == 1, r.stdout + r.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "train: FAILED, not run: the whole run's budget of 2 s is spent" in summary
    assert "bench_serving: FAILED, not run" in summary and "device_check: FAILED" in summary
    assert not (tmp_path / "out" / "train.log").exists()


def test_refuses_a_budget_that_is_not_a_number(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable, "BUDGET": "8m"}, timeout=30)
    assert r.returncode == 2 and "'8m'" in r.stderr
