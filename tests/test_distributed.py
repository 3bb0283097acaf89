"""Training across processes: `accelerate launch` with 2 CPU processes (gloo) ends with the same soft
prompt as one process with the same global batch and seed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

TOLERANCE = 1e-6  # the all-reduce sums gradients in another order: float32 rounding, nothing more


def _cmd(task: Path, out: Path, batch: int, method: str) -> list[str]:
    return ["-m", "lopa", "train", "--method", method, "--encoder", "tiny-random-bert", "--task", str(task),
            "--template", "{text} It was", "--label-words", " terrible, great", "--model", "tiny-random-llama",
            "--max-steps", "6", "--eval-every", "3", "--eval-limit", "8", "--test-limit", "8", "--dropout", "0",
            # instance dropout draws its own random rows in each process, and averages over that process's
            # share of the batch: like dropout, it is off where the two runs must agree to float rounding
            "--instance-dropout", "0",
            "--no-progress", "--no-zero-shot", "--batch-size", str(batch), "--out", str(out),
            "--precision", "fp32"]  # bf16 kernels may block a batch of 4 and one of 8 differently


@pytest.mark.skipif(shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None,
                    reason="the accelerate launcher is not installed beside this Python")
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps({"text": f"a {'fine' if i % 2 else 'dull'} film number {i}", "label": i % 2})
                            + "\n" for i in range(120)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = str(Path(sys.executable).parent / "accelerate")
    subprocess.run([sys.executable, *_cmd(task, tmp_path / "one", 8, "lopa")], check=True, env=env,
                   capture_output=True, timeout=600)
    # --multi_gpu is accelerate's name for its torchrun launcher; without CUDA the processes use gloo on CPU
    two = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no",
                          *_cmd(task, tmp_path / "two", 4, "lopa")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(tmp_path / "one" / "checkpoints" / "step-0000006" / "weights.safetensors")
    b = load_file(tmp_path / "two" / "checkpoints" / "step-0000006" / "weights.safetensors")
    start = load_file(tmp_path / "one" / "checkpoints" / "step-0000003" / "weights.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-4  # it trained
    for k in a:
        assert float((a[k] - b[k]).abs().max()) <= TOLERANCE, k
    assert json.loads((tmp_path / "two" / "results.json").read_text())["steps"] == 6
