"""The allocator tuning: freed activations' pages are reused, not faulted in again on every pass."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest

from lopa.allocator import retain_freed_memory

# the server's case: smollm2-135m's forward in bf16 (batch 32, 42 positions, the answer position's logits) in a worker
# thread, as the backend's thread runs it; minor page faults in each of 8 passes. With glibc's defaults that thread's
# arena often hands the freed activations back and faults them in again: 80,000-110,000 in every pass, measured, though
# in some runs glibc's own adaptive thresholds settle it after a few passes. Tuned, the first two passes fault the
# activations in (about 10,000 and 1,000) and later passes fault next to none
PROBE = """
import json, resource, threading
import torch
from lopa.allocator import retain_freed_memory
state = retain_freed_memory()
torch.set_num_threads(1)
import lopa
model, _ = lopa.load_base("smollm2-135m", torch.bfloat16)
ids = torch.randint(5, 5000, (32, 42), generator=torch.Generator().manual_seed(0))
def forward():
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, logits_to_keep=torch.tensor([41]))
out = {"passes": []}
def work():
    torch.set_num_threads(1)
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        forward()
        out["passes"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=work)
t.start(); t.join()
print(json.dumps({"state": state, **out}))
"""


def without_malloc_settings(**env: str) -> dict[str, str]:
    """This environment less the user's MALLOC_ settings (the tuning would stand aside for them), plus ``env``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **env}


def probe() -> dict:
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                         env=without_malloc_settings())
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.real_model
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_tuned_allocator_stops_the_page_faults_of_freed_tensors():
    tuned = probe()
    if tuned["state"] == "not glibc":
        pytest.skip("not glibc")
    assert tuned["state"] == "tuned"
    # the steady state, past the passes that fault the activations in for the first time: a pass that refaults its
    # activations costs ~100,000 faults; 1,000 is 4 MiB, a stray scratch buffer at most (the median takes one such)
    steady = statistics.median(tuned["passes"][2:])
    assert steady < 1_000, tuned


STATE = "from lopa.allocator import retain_freed_memory; print(retain_freed_memory())"


def state(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", STATE], capture_output=True, text=True, timeout=60,
                          env=without_malloc_settings(**env))


def test_the_user_can_keep_glibcs_defaults():
    assert state(LOPA_MALLOC="system").stdout.strip() == "LOPA_MALLOC=system"
    assert state(MALLOC_TRIM_THRESHOLD_="131072").stdout.strip() == "MALLOC_ set by the user"
    assert state(MALLOC_TOP_PAD_="131072").stdout.strip() == "MALLOC_ set by the user"
    assert state(GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072").stdout.strip() == "MALLOC_ set by the user"
    assert state(GLIBC_TUNABLES="glibc.cpu.hwcaps=-AVX2").stdout.strip() in ("tuned", "not glibc")  # not malloc's


def test_an_unknown_choice_is_refused():
    run = state(LOPA_MALLOC="jemalloc")
    assert run.returncode != 0 and "LOPA_MALLOC must be 'retain' (the default) or 'system', got 'jemalloc'" in run.stderr


def test_once_per_process():
    first = retain_freed_memory()
    assert retain_freed_memory() == ("already tuned" if first in ("tuned", "already tuned") else first)


def test_the_command_refuses_an_unknown_choice_before_any_work():
    run = subprocess.run([sys.executable, "-m", "lopa", "train", "--help"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "LOPA_MALLOC": "tcmalloc"})
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip() == "lopa: LOPA_MALLOC must be 'retain' (the default) or 'system', got 'tcmalloc'"
