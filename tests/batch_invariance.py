"""How far a classify answer moves with its batch neighbours, and what batch-invariance costs.

Each of ``n`` requests has its own random soft prompt and text. Every request is scored alone (a
batch of one), then all of them in shuffled batches of ``batch`` (what the batcher forms from 32
concurrent clients); the deviation is the largest log-probability difference between the two.
Throughput is rows per second of the batched pass, invariance off (rows of any length padded into
one pass) against on (a pass per distinct length: no padding).

    OMP_NUM_THREADS=1 python tests/batch_invariance.py --n 1000 --model tiny-random-llama
    OMP_NUM_THREADS=1 python tests/batch_invariance.py --n 256 --model smollm2-135m --dtypes bfloat16

Prints one JSON line per (dtype, mode). The server tests import :func:`make_rows` and :func:`deviation`.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any, Sequence

import torch

WORDS = ("the a film was great dull fine plot actor scene long short funny sad music ending story "
         "really not quite bright dark warm cold").split()
LABEL_SETS = [[" no", " yes"], [" negative", " positive"], [" bad", " okay", " good"]]


def make_rows(backend: Any, n: int, seed: int = 0, max_soft: int = 16) -> tuple[list[Any], list[list[str]]]:
    """``n`` classify rows, each with its own soft prompt (1 to ``max_soft`` tokens, N(0, σ²) with σ the
    embedding table's), a random text of 1-30 words and one of three label sets; and each row's label words."""
    from lopa.serve.protocol import ClassifyRow
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    sigma = float(backend.base.get_input_embeddings().weight.float().std())
    rows, words = [], []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
        z = (torch.randn(rng.randint(1, max_soft), backend.hidden_size, generator=g) * sigma).to(backend.dtype)
        words.append(rng.choice(LABEL_SETS))
        rows.append(ClassifyRow(backend.tokenize(text), z, backend.label_token_ids(words[-1])))
    return rows, words


def batched(backend: Any, rows: Sequence[Any], batch: int, seed: int = 1) -> tuple[list[list[float]], float]:
    """Answers of ``rows`` scored in shuffled batches of ``batch``, and the seconds the passes took."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    out: list[Any] = [None] * len(rows)
    start = time.perf_counter()
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        for i, lp in zip(idx, backend.classify([rows[i] for i in idx])):
            out[i] = lp
    return out, time.perf_counter() - start


def deviation(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], tol: float = 1e-5) -> dict[str, float]:
    """The largest absolute difference and how many rows differ by more than ``tol``."""
    per_row = [max(abs(x - y) for x, y in zip(p, q)) for p, q in zip(a, b)]
    return {"max": max(per_row), "rows_over_tol": sum(d > tol for d in per_row), "tol": tol}


def measure(model: str, dtype: str, n: int, batch: int, repeats: int) -> list[dict[str, Any]]:
    """Deviation and throughput of both modes; the timed passes alternate between the modes, so that
    a machine shared with other jobs slows both alike."""
    from lopa.serve.backends import TransformersBackend
    backends = {mode: TransformersBackend(model, dtype=dtype, device="cpu", batch_invariant=mode) for mode in ("off", "on")}
    rows, _ = make_rows(backends["off"], n)
    devs, seconds = {}, {mode: [] for mode in backends}
    for mode, be in backends.items():
        alone = [be.classify([r])[0] for r in rows]
        devs[mode] = deviation(alone, batched(be, rows, batch)[0])
    for k in range(repeats):
        for mode, be in backends.items():
            seconds[mode].append(batched(be, rows, batch, seed=2 + k)[1])
    return [{"model": model, "dtype": dtype, "batch_invariant": mode, "n": n, "batch": batch, "deviation": devs[mode],
             "rows_per_s": n / min(seconds[mode])} for mode in backends]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-random-llama")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed passes per mode, alternating; the fastest counts")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    for dtype in a.dtypes:
        results = measure(a.model, dtype, a.n, a.batch, a.repeats)
        for r in results:
            print(json.dumps(r), flush=True)
        print(json.dumps({"model": a.model, "dtype": dtype, "throughput_on_over_off":
                          results[1]["rows_per_s"] / results[0]["rows_per_s"]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
