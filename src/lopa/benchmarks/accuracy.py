"""Accuracy: the LoPA paper's comparison, reproduced honestly on our models.

The paper (RoBERTa-large, GLUE) reports SST-2 / RTE / MRPC accuracy of prompt tuning 84.4 / 53.1 /
72.4, S-IDPG 95.3 / 77.3 / 78.6, LoRA 96.2 / 85.7 / 90.8 and LoPA 96.0 / 83.4 / 91.1; LoPT claims
prompt tuning's accuracy with about 5x fewer parameters. No GLUE data is available offline, so this
benchmark runs every method on ``rotten-tomatoes`` (binary sentiment, the source of SST-2's
sentences) and ``rotten-tomatoes-3`` (negative / positive review / plot synopsis), with base
``smollm2-135m`` and encoder ``minilm-l6``, on a CPU budget of about an hour on 2 cores.

Protocol (every number below is an option; ``--plan`` prints the grid and an estimated time):

1. **Learning rates** come from a pilot on the first task's dev split: every method family trains
   ``--pilot-steps`` steps (seed 0) at each of its candidate LRs (``--pilot-lrs``) and keeps the one
   with the best dev accuracy on ``--dev-limit`` items (ties: the smaller LR). Variants inherit their
   family's LR (``lopa`` add / max / concat: LoPA's; ``lopa (gate×2)``: LoPA's, with Z_S at prompt
   tuning's LR through ``shared_lr_scale``). Other tasks reuse these LRs. Pilots are cached in
   ``runs.json`` like every run, so they are never repeated.
2. **Main runs**: the same steps, batch size, warm-up, schedule and seeds for every method of a
   task; ``--seeds`` seeds for the main methods (prompt tuning, S-IDPG, LoPA, LoRA) on the first
   task, one for the rest; the best dev checkpoint (evaluated ``--evals`` times) is scored on
   ``--test-limit`` test items. Zero-shot is scored once per task.
3. **Sweep**: LoPA with m x r on the first task (one seed).
4. **Report**: ``OUT/summary.json``, a section of ``--doc`` (default ``docs/results.md``) between
   ``<!-- accuracy:start -->`` and ``<!-- accuracy:end -->`` (the rest of the file is kept) and the
   plots beside it. A
   difference is claimed only where the 95% intervals do not overlap (t-interval over seeds; a
   single run's Wilson interval).

Every run is appended to ``OUT/runs.json`` as it finishes, keyed by task, row, seed and a hash of
its settings: rerunning the same command skips what is done, so an interrupted benchmark resumes.

Example::

    $ lopa bench accuracy --plan      # the grid and an estimated wall time, nothing runs
    $ lopa bench accuracy             # the full benchmark (results/accuracy, docs/results.md)
    $ lopa bench accuracy --quick     # every code path on tiny random models, into a temp folder
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lopa.benchmarks.common import (BenchmarkParser, ResultStore, command_line, interval_verdict, machine,
                                    parse_assignments, pct, prepare_benchmark, require_positive, settings_hash,
                                    split_list, train_or_resume, write_section)

MARK_START, MARK_END = "<!-- accuracy:start -->", "<!-- accuracy:end -->"

# The LoPA paper's Table (RoBERTa-large, GLUE dev accuracy), for the rows that it reports.
PAPER = {"prompt-tuning": {"SST-2": 84.4, "RTE": 53.1, "MRPC": 72.4},
         "idpg": {"SST-2": 95.3, "RTE": 77.3, "MRPC": 78.6},
         "lora": {"SST-2": 96.2, "RTE": 85.7, "MRPC": 90.8},
         "lopa": {"SST-2": 96.0, "RTE": 83.4, "MRPC": 91.1}}


@dataclass(frozen=True)
class Row:
    """One line of the results table: a method plus the settings that make it a variant."""

    slug: str
    label: str
    method: str
    extra: tuple[tuple[str, Any], ...] = ()


ROWS = [
    Row("prompt-tuning", "prompt tuning", "prompt-tuning"),
    Row("lopt-1", "LoPT-1", "lopt-1"),
    Row("lopt-2", "LoPT-2", "lopt-2"),
    Row("idpg", "S-IDPG", "idpg"),
    Row("lopa", "LoPA (gate, paper)", "lopa"),
    Row("lopa-gate2", "LoPA (gate×2, Z_S at PT's lr)", "lopa", (("gate_scale", 2.0),)),
    Row("lopa-add", "LoPA add", "lopa", (("combine", "add"),)),
    Row("lopa-max", "LoPA max", "lopa", (("combine", "max"),)),
    Row("lopa-concat", "LoPA concat", "lopa", (("combine", "concat"),)),
    Row("lora", "LoRA", "lora"),
    Row("full", "full fine-tuning", "full"),
]
ROW_BY_SLUG = {r.slug: r for r in ROWS}
MAIN_ROWS = ("prompt-tuning", "idpg", "lopa", "lora")
FAMILIES = ("prompt-tuning", "lopt-1", "lopt-2", "idpg", "lopa", "lora", "full")
PILOT_LRS = {"prompt-tuning": (3e-3, 1e-2, 3e-2), "lopt-1": (3e-3, 1e-2), "lopt-2": (1e-3, 3e-3),
             "idpg": (3e-4, 1e-3), "lopa": (3e-4, 1e-3, 3e-3), "lora": (3e-4, 1e-3), "full": (1e-5, 5e-5)}
# Pairs whose difference the report states (or declines to state) for every task.
COMPARE = [("lopa", "prompt-tuning"), ("lopa", "idpg"), ("lopa", "lora"), ("idpg", "prompt-tuning"),
           ("lora", "prompt-tuning"), ("lopa-gate2", "lopa"), ("lopa-gate2", "prompt-tuning"),
           ("lopt-1", "prompt-tuning"), ("lopt-2", "prompt-tuning"), ("full", "lora"),
           ("lopa-add", "lopa"), ("lopa-max", "lopa"), ("lopa-concat", "lopa"), ("prompt-tuning", "zero-shot")]

# Cost model for the printed estimate, measured on 2 idle cores of an AMD EPYC with AVX-512 BF16:
# SmolLM2-135M, batch 8 of ~41 tokens (a 10-token soft prompt and a ~31-token review). Replaced by
# the measured ratio as runs finish.
SPEED = {"real": dict(step_s={"fp32": 0.72, "bf16": 0.62}, eval_items_s={"fp32": 30.0, "bf16": 33.0},
                      full_factor=3.0, lora_factor=1.1, encode_items_s=250.0, overhead_s=6.0,
                      full_ckpt_s=6.0, ref_tokens=41.0),
         "tiny": dict(step_s={"fp32": 0.03, "bf16": 0.04}, eval_items_s={"fp32": 600.0, "bf16": 500.0},
                      full_factor=1.5, lora_factor=1.2, encode_items_s=5000.0, overhead_s=1.5,
                      full_ckpt_s=0.1, ref_tokens=41.0)}


# --------------------------------------------------------------------------- options

QUICK = ("tiny-random-llama + tiny-random-bert, a few steps, every code path (all methods, pilots, sweep, "
         "plots, markdown)")
COUNTS = ("steps", "other_steps", "seeds", "other_seeds", "batch_size", "evals", "dev_limit", "pilot_dev_limit",
          "test_limit", "pilot_steps", "sweep_steps", "sweep_evals", "sweep_test_limit")


def build_parser() -> BenchmarkParser:
    p = BenchmarkParser(
        "accuracy",
        "Reproduce the LoPA paper's accuracy comparison on our models: every method on rotten-tomatoes and "
        "rotten-tomatoes-3, learning rates from a dev pilot, 95% intervals, a LoPA m x r sweep, plots and a "
        "docs/results.md section. Resumable: finished runs in OUT/runs.json are skipped.",
        "lopa bench accuracy --plan   (print the grid and the estimated time only)", raw=True)
    a = p.add_argument
    p.add_outputs("results/accuracy", "runs.json, summary.json, runs/<key>/", quick_help=QUICK)
    p.add_resumable("summary.json, the plots and the markdown")
    p.add_models()
    a("--tasks", default="rotten-tomatoes,rotten-tomatoes-3",
      help="comma-separated tasks; the first one gets the pilots, the extra seeds and the sweep")
    a("--rows", default=",".join(r.slug for r in ROWS),
      help="comma-separated rows to run (zero-shot always runs): " + ", ".join(r.slug for r in ROWS))
    p.quick("--main-rows", ",".join(MAIN_ROWS), "prompt-tuning,lopa",
            "rows that get --seeds seeds on the first task, the others get one")
    a("--other-rows", default=None,
      help="rows run on the tasks after the first (zero-shot always runs), e.g. the main rows only to fit a "
           "time budget (default: --rows)")
    p.quick("--steps", 80, 4, "training steps of every main run on the first task", type=int)
    p.quick("--other-steps", 40, 3, "training steps of every run on the other tasks", type=int)
    p.quick("--seeds", 3, 2, "seeds for --main-rows on the first task", type=int)
    a("--other-seeds", type=int, default=1, help="seeds for --main-rows on the other tasks (default 1)")
    a("--batch-size", type=int, default=8, help="examples per optimiser step, every run (default 8)")
    a("--warmup", type=float, default=0.1, help="linear warm-up as a fraction of the steps (default 0.1)")
    p.quick("--evals", 4, 2, "dev evaluations per main run, evenly spaced; the best one's checkpoint is tested; "
                             "they are also the points of the convergence plot", type=int)
    p.quick("--dev-limit", 100, 16, "dev items per evaluation of a main or sweep run: checkpoint choice and "
                                    "convergence plot", type=int)
    p.quick("--pilot-dev-limit", 200, 16, "dev items scored by each LR pilot", type=int)
    p.quick("--test-limit", 1000, 40, "test items scored per run", type=int)
    a("--precision", choices=["fp32", "bf16"], default="bf16", help="bf16 autocast or fp32, every run (default bf16)")
    a("--m", type=int, default=10, help="soft prompt length m of every soft-prompt method (default 10)")
    a("--rank", type=int, default=4, help="r of lopt-1, lopt-2 and lopa (default 4)")
    a("--hidden", type=int, default=256, help="h, width of the idpg/lopa heads (default 256)")
    a("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    p.quick("--pilot-steps", 30, 2, "training steps of each LR pilot", type=int)
    a("--pilot-lrs", action="append", default=[], metavar="FAMILY=LR,LR",
      help="candidate LRs of a family, repeatable, e.g. --pilot-lrs lora=1e-4,1e-3 (defaults: "
           + "; ".join(f"{k} {','.join(f'{x:g}' for x in v)}" for k, v in PILOT_LRS.items()) + ")")
    a("--lr", action="append", default=[], metavar="FAMILY=LR",
      help="fix a family's LR and skip its pilot, repeatable, e.g. --lr full=2e-5")
    a("--no-sweep", action="store_true", help="skip the LoPA m x r sweep")
    a("--sweep-m", default="5,10,25", help="sweep values of m (default 5,10,25)")
    a("--sweep-r", default="1,2,4", help="sweep values of r (default 1,2,4)")
    p.quick("--sweep-steps", 40, 4, "training steps of each sweep run", type=int)
    p.quick("--sweep-evals", 1, 2, "dev evaluations per sweep run", type=int, shown="1: the final model")
    a("--sweep-test-limit", type=int,
      help="test items per sweep run (default: 500, or --test-limit if smaller)")
    p.quick("--threads", None, 1, "torch threads; on a machine shared with other jobs, 1 can be several times "
                                  "faster than 2 (threads that wait for each other)", type=int,
            shown="torch's choice, one per core")
    a("--keep-checkpoints", action="store_true",
      help="keep each run's checkpoints/ (deleted by default once the run is recorded; full fine-tuning's "
           "are 1.6 GB)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse(argv)
    quick = args.quick
    if args.sweep_test_limit is None:
        args.sweep_test_limit = args.test_limit if quick else min(args.test_limit, 500)
    if quick and args.sweep_m == "5,10,25" and args.sweep_r == "1,2,4":
        args.sweep_m, args.sweep_r = "5,10", "2,4"  # (10, 4) is the main config: exercises run reuse
    args.tasks, args.rows, args.main_rows = split_list(args.tasks), split_list(args.rows), split_list(args.main_rows)
    args.other_rows = split_list(args.other_rows) if args.other_rows else list(args.rows)
    if set(args.other_rows) - set(args.rows):
        p.error(f"--other-rows {sorted(set(args.other_rows) - set(args.rows))} are not among --rows")
    for r in args.rows + args.main_rows:
        if r not in ROW_BY_SLUG:
            p.error(f"unknown row {r!r}; rows: {', '.join(ROW_BY_SLUG)}")
    if not args.tasks:
        p.error("--tasks names no task")
    require_positive(p, args, COUNTS)
    args.sweep_m = [int(x) for x in split_list(args.sweep_m)]
    args.sweep_r = [int(x) for x in split_list(args.sweep_r)]
    # --quick: two candidates for one family exercise the choice; one for the rest keeps it fast
    grid = {k: list(v[:2] if k == "prompt-tuning" else v[:1]) if quick else list(v) for k, v in PILOT_LRS.items()}
    args.pilot_grid = {**grid, **parse_assignments(p, "--pilot-lrs", args.pilot_lrs, FAMILIES, many=True)}
    args.fixed_lr = parse_assignments(p, "--lr", args.lr, FAMILIES)
    return p.finish(args, writes=["runs.json", "summary.json"])


# --------------------------------------------------------------------------- jobs and the run store

@dataclass
class Job:
    """One call of lopa.train.train: kind is pilot, main or sweep."""

    kind: str
    task: str
    row: str
    label: str
    seed: int
    args: dict[str, Any]
    est_s: float = 0.0

    @property
    def hash(self) -> str:
        return settings_hash(self.args)

    @property
    def key(self) -> str:
        return f"{self.task}__{self.row}__s{self.seed}__{self.hash}"


def base_args(cfg: argparse.Namespace, task: str, method: str, seed: int, steps: int, evals: int,
              test_limit: int, lr: float | None) -> dict[str, Any]:
    """Every TrainArgs setting that the benchmark fixes, spelled out so that the key hash covers them."""
    return dict(method=method, task=task, model=cfg.model, encoder=cfg.encoder, max_steps=steps,
                batch_size=cfg.batch_size, grad_accum=1, lr=lr, weight_decay=0.0,
                warmup_steps=int(round(cfg.warmup * steps)), schedule="linear",
                eval_every=max(1, math.ceil(steps / evals)), eval_limit=cfg.dev_limit, test_limit=test_limit,
                seed=seed, precision=cfg.precision, num_virtual_tokens=cfg.m, rank=cfg.rank,
                hidden_size=cfg.hidden, combine="gate", gate_scale=1.0, shared_lr_scale=1.0, init="vocab",
                dropout=0.1, lora_r=cfg.lora_r)


def pilot_jobs(cfg: argparse.Namespace) -> list[Job]:
    task = cfg.tasks[0]
    wanted = {ROW_BY_SLUG[r].method for r in cfg.rows}
    if "lopa-gate2" in cfg.rows:
        wanted.add("prompt-tuning")  # its Z_S learns at prompt tuning's LR
    jobs = []
    for fam in FAMILIES:
        if fam not in wanted or fam in cfg.fixed_lr:
            continue
        for lr in cfg.pilot_grid[fam]:
            # the test score of a pilot is never read: one item keeps train() from scoring the split
            args = base_args(cfg, task, fam, 0, cfg.pilot_steps, 1, 1, lr)
            args["eval_limit"] = cfg.pilot_dev_limit
            jobs.append(Job("pilot", task, f"pilot-{fam}-lr{lr:g}", f"pilot {fam} lr {lr:g}", 0, args))
    return jobs


def row_args(cfg: argparse.Namespace, row: Row, task: str, seed: int, steps: int, evals: int, test_limit: int,
             lrs: dict[str, float] | None) -> dict[str, Any]:
    lr = lrs.get(row.method) if lrs else None
    args = base_args(cfg, task, row.method, seed, steps, evals, test_limit, lr)
    args.update(dict(row.extra))
    if row.slug == "lopa-gate2" and lrs:
        args["shared_lr_scale"] = lrs["prompt-tuning"] / lrs["lopa"]
    return args


def main_jobs(cfg: argparse.Namespace, lrs: dict[str, float] | None) -> list[Job]:
    jobs = []
    for ti, task in enumerate(cfg.tasks):
        steps = cfg.steps if ti == 0 else cfg.other_steps
        for slug in (cfg.rows if ti == 0 else cfg.other_rows):
            row = ROW_BY_SLUG[slug]
            n = (cfg.seeds if ti == 0 else cfg.other_seeds) if slug in cfg.main_rows else 1
            for seed in range(n):
                jobs.append(Job("main", task, slug, row.label, seed,
                                row_args(cfg, row, task, seed, steps, cfg.evals, cfg.test_limit, lrs)))
    return jobs


def sweep_jobs(cfg: argparse.Namespace, lrs: dict[str, float] | None) -> list[Job]:
    if cfg.no_sweep or "lopa" not in cfg.rows:
        return []
    jobs = []
    for m in cfg.sweep_m:
        for r in cfg.sweep_r:
            args = row_args(cfg, ROW_BY_SLUG["lopa"], cfg.tasks[0], 0, cfg.sweep_steps, cfg.sweep_evals,
                            cfg.sweep_test_limit, lrs)
            args.update(num_virtual_tokens=m, rank=r)
            jobs.append(Job("sweep", cfg.tasks[0], f"sweep-m{m}-r{r}", f"LoPA m={m} r={r}", 0, args))
    return jobs


# --------------------------------------------------------------------------- estimate

def prompt_tokens(task_name: str, model: str) -> float:
    """Mean template-filled prompt length in tokens over 300 training items (tokenizer only)."""
    from lopa.models import load_tokenizer
    from lopa.tasks import get_task
    tok = load_tokenizer(model)
    items = get_task(task_name).split("train")[:300]
    return statistics.fmean(len(tok(e.prompt).input_ids) for e in items)


def estimate(job: Job, tokens: float, speed: dict[str, Any]) -> float:
    a = job.args
    method = a["method"]
    m_eff = 0 if method in ("lora", "full") else a["num_virtual_tokens"] * (2 if a["combine"] == "concat" else 1)
    scale = (m_eff + tokens) / speed["ref_tokens"]
    step = speed["step_s"][a["precision"]] * a["batch_size"] / 8 * scale
    step *= speed["full_factor"] if method == "full" else speed["lora_factor"] if method == "lora" else 1.0
    rate = speed["eval_items_s"][a["precision"]] / scale
    evals = math.ceil(a["max_steps"] / a["eval_every"])
    s = speed["overhead_s"] + a["max_steps"] * step + (evals * a["eval_limit"] + a["test_limit"]) / rate
    if method in ("idpg", "lopa"):
        s += (a["max_steps"] * a["batch_size"] + a["eval_limit"] + a["test_limit"]) / speed["encode_items_s"]
    if method == "full":
        s += evals * speed["full_ckpt_s"]
    return s


def print_plan(cfg, groups: dict[str, list[Job]], store: ResultStore, tokens: dict[str, float], speed) -> float:
    total_runs = total_s = 0.0
    print(f"accuracy benchmark: base {cfg.model}, encoder {cfg.encoder}, {cfg.precision}, batch {cfg.batch_size}, "
          f"m={cfg.m} r={cfg.rank} h={cfg.hidden}; dev {cfg.dev_limit} items, test {cfg.test_limit} items")
    print("  prompt tokens (mean): " + ", ".join(f"{t} {n:.0f}" for t, n in tokens.items()))
    for name, jobs in groups.items():
        todo = [j for j in jobs if store.by_hash(j.hash) is None]
        s = sum(j.est_s for j in todo)
        total_runs += len(todo)
        total_s += s
        print(f"  {name:<28} {len(jobs):3d} runs, {len(jobs) - len(todo):3d} done, est {s / 60:5.1f} min")
    print(f"planned: {int(total_runs)} runs to do, estimated {total_s / 60:.0f} min on 2 idle cores "
          f"({speed['step_s'][cfg.precision]:.2f} s/step at batch 8, {speed['eval_items_s'][cfg.precision]:.0f} "
          f"items/s eval; re-estimated from measured times as runs finish)", flush=True)
    return total_s


# --------------------------------------------------------------------------- running

class Runner:
    def __init__(self, cfg, store: ResultStore, remaining_s: float):
        self.cfg, self.store = cfg, store
        self.done_est = self.done_real = 0.0
        self.remaining = remaining_s
        self.count = 0
        self.failed: list[str] = []

    def _eta(self, est: float) -> str:
        self.remaining = max(0.0, self.remaining - est)
        ratio = self.done_real / self.done_est if self.done_est > 0 else 1.0
        return f"~{self.remaining * ratio / 60:.0f} min left"

    def run(self, job: Job) -> dict[str, Any] | None:
        found = self.store.by_hash(job.hash)
        if found is not None:
            if job.key not in self.store.entries:  # the same settings under another row (a sweep point)
                self.store.add(job.key, {**found, "key": job.key, "row": job.row, "label": job.label,
                                         "kind": job.kind, "reused_from": found["key"]})
            return self.store.entries[job.key]
        out = Path(self.cfg.out) / "runs" / job.key
        started = time.time()
        try:
            res, _ = train_or_resume(dict(job.args, progress=False, zero_shot=False), out)
        except Exception:  # noqa: BLE001 - one failed run must not cost the hour of the others
            traceback.print_exc()
            self.failed.append(job.key)
            print(f"FAILED {job.key} (rerun the command to retry it)", flush=True)
            return None
        finally:
            gc.collect()
        wall = time.time() - started
        if not self.cfg.keep_checkpoints:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            if job.args["method"] == "full":
                shutil.rmtree(out / "best", ignore_errors=True)
        test = res.get("test", {})
        record = {"key": job.key, "hash": job.hash, "kind": job.kind, "task": job.task, "row": job.row,
                  "label": job.label, "method": job.args["method"], "seed": job.seed, "lr": job.args["lr"],
                  "settings": job.args, "best_dev_accuracy": res.get("best_dev_accuracy"),
                  "best_step": res.get("best_step"), "trainable_params": res.get("trainable_params"),
                  "train_s": res.get("train_s"), "wall_s": round(wall, 1),
                  "test": {k: test.get(k) for k in ("n", "accuracy", "accuracy_ci95", "macro_f1", "eval_s")},
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.store.add(job.key, record)
        self.count += 1
        self.done_est += job.est_s
        self.done_real += wall
        if job.kind == "pilot":
            what = f"dev acc {record['best_dev_accuracy']:.3f} ({job.args['eval_limit']} items)"
        else:
            lo, hi = test["accuracy_ci95"]
            what = f"test acc {test['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]  dev {record['best_dev_accuracy']:.3f}"
        print(f"[{job.kind}] {job.task:<18} {job.label:<32} seed {job.seed}  lr {job.args['lr']:g}  {what}  "
              f"params {record['trainable_params']:,}  {wall:.0f} s  ({self._eta(job.est_s)})", flush=True)
        return record


def zero_shot(cfg, store: ResultStore, task_name: str) -> dict[str, Any]:
    from lopa.baselines import BaselineModel
    from lopa.evaluate import score
    from lopa.models import load_base
    from lopa.tasks import get_task
    settings = {"kind": "zero-shot", "task": task_name, "model": cfg.model, "test_limit": cfg.test_limit,
                "precision": cfg.precision}
    h = settings_hash(settings)
    found = store.by_hash(h)
    if found is not None:
        return found
    started = time.time()
    base, tok = load_base(cfg.model)
    res = score(BaselineModel(base, tok, "zero-shot"), get_task(task_name), "test", limit=cfg.test_limit,
                precision=cfg.precision, progress=False)
    record = {"key": f"{task_name}__zero-shot__s0__{h}", "hash": h, "kind": "zero-shot", "task": task_name,
              "row": "zero-shot", "label": "zero-shot", "method": "zero-shot", "seed": 0, "lr": None,
              "settings": settings, "trainable_params": 0, "wall_s": round(time.time() - started, 1),
              "test": {k: res.get(k) for k in ("n", "accuracy", "accuracy_ci95", "macro_f1", "eval_s")},
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    store.add(record["key"], record)
    lo, hi = res["accuracy_ci95"]
    print(f"[zero-shot] {task_name:<18} test acc {res['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]  "
          f"{record['wall_s']:.0f} s", flush=True)
    return record


def choose_lrs(cfg, store: ResultStore, pilots: list[Job]) -> tuple[dict[str, float], dict[str, Any]]:
    """The pilot's choice per family: best dev accuracy, ties to the smaller LR."""
    lrs, table = dict(cfg.fixed_lr), {}
    for fam, lr in cfg.fixed_lr.items():
        table[fam] = {"chosen": lr, "fixed": True, "candidates": {}}
    for fam in FAMILIES:
        mine = [j for j in pilots if j.args["method"] == fam]
        if not mine:
            continue
        scores = {}
        for j in mine:
            rec = store.by_hash(j.hash)
            if rec is not None and rec.get("best_dev_accuracy") is not None:
                scores[j.args["lr"]] = rec["best_dev_accuracy"]
        if not scores:
            continue
        best = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        lrs[fam] = best
        table[fam] = {"chosen": best, "fixed": False,
                      "candidates": {f"{lr:g}": acc for lr, acc in sorted(scores.items())}}
    return lrs, table


# --------------------------------------------------------------------------- summary

def row_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    from lopa.tasks.metrics import mean_ci95
    records = sorted(records, key=lambda r: r["seed"])
    accs = [r["test"]["accuracy"] for r in records]
    if len(accs) > 1:
        mean, lo, hi = mean_ci95(accs)
        ci_kind, std = "t over seeds", statistics.stdev(accs)
    else:
        mean, (lo, hi), ci_kind, std = accs[0], records[0]["test"]["accuracy_ci95"], "Wilson", None
    devs = [r["best_dev_accuracy"] for r in records if r.get("best_dev_accuracy") is not None]
    r0 = records[0]
    return {"row": r0["row"], "label": r0["label"], "method": r0["method"], "lr": r0.get("lr"),
            "seeds": [r["seed"] for r in records], "accuracy": accs, "mean": mean, "std": std,
            "ci95": [lo, hi], "ci_kind": ci_kind, "wilson": [r["test"]["accuracy_ci95"] for r in records],
            "macro_f1": statistics.fmean(r["test"]["macro_f1"] for r in records),
            "dev_accuracy": statistics.fmean(devs) if devs else None,
            "dev_per_seed": {str(r["seed"]): r.get("best_dev_accuracy") for r in records},
            "trainable_params": r0.get("trainable_params"),
            "wall_s": statistics.fmean(r["wall_s"] for r in records),
            "settings": {k: v for k, v in (r0.get("settings") or {}).items() if k not in ("task", "seed")},
            "paper": PAPER.get(r0["row"]), "keys": [r["key"] for r in records]}


def verdict(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {"a": a["row"], "b": b["row"], "diff": a["mean"] - b["mean"],
            "verdict": interval_verdict(a["row"], a["ci95"], b["row"], b["ci95"])}


def class_counts(task_name: str) -> dict[str, dict[str, int]]:
    from lopa.tasks import get_task
    task = get_task(task_name)
    names = [w.strip() for w in task.label_words]
    return {split: {n: sum(e.label == c for e in rows) for c, n in enumerate(names)}
            for split, rows in task.splits().items()}


def gate_choice(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The paper's gate against gate×2 on the first task: the dev winner (on the seeds both rows ran) and
    the library default it suggests; None unless both rows ran."""
    by = {r["row"]: r for r in rows}
    if "lopa" not in by or "lopa-gate2" not in by:
        return None
    a, b = by["lopa"], by["lopa-gate2"]
    # compare on the seeds both rows ran, so that a 1-seed row meets the same seed of a 3-seed row
    common = sorted(set(a["dev_per_seed"]) & set(b["dev_per_seed"]), key=int)
    dev_a = statistics.fmean(a["dev_per_seed"][k] for k in common)
    dev_b = statistics.fmean(b["dev_per_seed"][k] for k in common)
    winner = "lopa-gate2" if dev_b > dev_a else "lopa"
    return {"dev": {"lopa": dev_a, "lopa-gate2": dev_b},
            "test": {"lopa": a["mean"], "lopa-gate2": b["mean"]},
            "dev_seeds": [int(k) for k in common],
            "dev_winner": winner, "test_verdict": verdict(b, a)["verdict"],
            "candidate_default": ({"gate_scale": 2.0, "shared_lr_scale": b["settings"]["shared_lr_scale"]}
                                  if winner == "lopa-gate2" else {"gate_scale": 1.0, "shared_lr_scale": 1.0})}


def summarize(cfg, store: ResultStore, groups: dict[str, list[Job]], lr_table: dict[str, Any],
              invocation_s: float) -> dict[str, Any]:
    def records(jobs: list[Job]) -> list[dict[str, Any]]:
        return [store.entries[j.key] for j in jobs if j.key in store.entries]

    main = records(groups.get("main", []))
    tasks = {}
    for ti, task in enumerate(cfg.tasks):
        rows = []
        zs = [r for r in store.entries.values() if r["kind"] == "zero-shot" and r["task"] == task
              and r["settings"]["model"] == cfg.model and r["settings"]["test_limit"] == cfg.test_limit
              and r["settings"]["precision"] == cfg.precision]
        if zs:
            rows.append(row_summary(zs[:1]))
        for slug in cfg.rows:
            mine = [r for r in main if r["task"] == task and r["row"] == slug]
            if mine:
                rows.append(row_summary(mine))
        by = {r["row"]: r for r in rows}
        comps = [verdict(by[a], by[b]) for a, b in COMPARE if a in by and b in by]
        tasks[task] = {"steps": cfg.steps if ti == 0 else cfg.other_steps,
                       "class_counts": class_counts(task), "rows": rows, "comparisons": comps}
    sweep = []
    for j in groups.get("sweep", []):
        rec = store.entries.get(j.key)
        if rec is None:
            continue
        sweep.append({"m": j.args["num_virtual_tokens"], "r": j.args["rank"], "accuracy": rec["test"]["accuracy"],
                      "ci95": rec["test"]["accuracy_ci95"], "macro_f1": rec["test"]["macro_f1"],
                      "dev_accuracy": rec["best_dev_accuracy"], "trainable_params": rec["trainable_params"],
                      "wall_s": rec["wall_s"], "key": rec["key"]})
    default = gate_choice(tasks.get(cfg.tasks[0], {"rows": []})["rows"])
    all_s = sum(r.get("wall_s") or 0 for r in store.entries.values() if not r.get("reused_from"))
    settings = {k: getattr(cfg, k) for k in ("model", "encoder", "tasks", "rows", "other_rows", "main_rows", "steps",
                                             "other_steps", "seeds", "other_seeds", "batch_size", "warmup",
                                             "evals", "dev_limit", "test_limit", "precision", "m", "rank",
                                             "hidden", "lora_r", "threads", "pilot_steps", "pilot_dev_limit",
                                             "no_sweep", "sweep_m", "sweep_r",
                                             "sweep_steps", "sweep_evals", "sweep_test_limit", "quick")}
    settings["pilot_grid"] = {k: v for k, v in cfg.pilot_grid.items()}
    return {"command": command_line("accuracy", cfg.argv, drop=["--report-only"]),  # the command that ran the runs
            "machine": machine(), "settings": settings,
            "wall_s": {"this_invocation": round(invocation_s, 1), "all_runs": round(all_s, 1)},
            "counts": {"runs": sum(not r.get("reused_from") for r in store.entries.values()),
                       "records": len(store.entries), "ran_now": getattr(cfg, "ran_now", 0)},
            "lr": lr_table, "tasks": tasks,
            "sweep": {"task": cfg.tasks[0], "steps": cfg.sweep_steps, "points": sweep},
            "lopa_default": default}


# --------------------------------------------------------------------------- plots

def plots(cfg, summary: dict[str, Any], store: ResultStore, docs: Path) -> list[str]:
    """The PNG plots, written into ``docs``; their file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    docs.mkdir(parents=True, exist_ok=True)
    made = []
    for name, draw in (("accuracy_vs_params.png", lambda: plot_accuracy(plt, summary)),
                       ("lopa_sweep.png", lambda: plot_sweep(plt, summary)),
                       ("convergence.png", lambda: plot_convergence(plt, cfg, summary, store))):
        fig = draw()
        if fig is not None:
            fig.tight_layout()
            fig.savefig(docs / name, dpi=80)
            plt.close(fig)
            made.append(name)
    return made


def plot_accuracy(plt: Any, summary: dict[str, Any]) -> Any:
    """Test accuracy against trainable parameters, a panel per task."""
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    tasks = list(summary["tasks"].items())
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(5.2 * max(1, len(tasks)), 4.2), squeeze=False)
    for ax, (task, t) in zip(axes[0], tasks):
        for i, r in enumerate(t["rows"]):
            if r["row"] == "zero-shot":
                ax.axhline(r["mean"], color="grey", ls="--", lw=0.8, label="zero-shot")
                continue
            lo, hi = r["ci95"]
            ok = lo is not None and not math.isnan(lo)
            yerr = [[max(0.0, r["mean"] - lo)], [max(0.0, hi - r["mean"])]] if ok else None
            ax.errorbar(r["trainable_params"], r["mean"], yerr=yerr, fmt="o", color=colors[i % len(colors)],
                        ms=4, capsize=2)
            ax.annotate(r["row"], (r["trainable_params"], r["mean"]), fontsize=6, xytext=(3, 2 + 5 * (i % 3)),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set(xlabel="trainable parameters (log)", ylabel="test accuracy", title=f"{task} ({t['steps']} steps)")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("test accuracy vs trainable parameters (bars: 95% CI)", fontsize=9)
    return fig


def plot_sweep(plt: Any, summary: dict[str, Any]) -> Any:
    """The sweep's test accuracy on the m × r grid (None where no sweep ran)."""
    pts = summary["sweep"]["points"]
    if not pts:
        return None
    ms, rs = sorted({p["m"] for p in pts}), sorted({p["r"] for p in pts})
    grid = [[math.nan] * len(rs) for _ in ms]
    for p in pts:
        grid[ms.index(p["m"])][rs.index(p["r"])] = p["accuracy"]
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    for p in pts:
        ax.text(rs.index(p["r"]), ms.index(p["m"]), f"{p['accuracy']:.3f}\n{p['trainable_params'] / 1e6:.2f}M",
                ha="center", va="center", fontsize=7, color="w")
    ax.set_xticks(range(len(rs)), [str(r) for r in rs])
    ax.set_yticks(range(len(ms)), [str(m) for m in ms])
    ax.set(xlabel="rank r", ylabel="prompt length m",
           title=f"LoPA sweep on {summary['sweep']['task']}: test acc")
    fig.colorbar(im, ax=ax)
    return fig


def plot_convergence(plt: Any, cfg, summary: dict[str, Any], store: ResultStore) -> Any:
    """Training loss and dev accuracy of the main soft-prompt rows on the first task, every seed."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    task = cfg.tasks[0]
    first = summary["tasks"].get(task, {"rows": []})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ci, slug in enumerate(("prompt-tuning", "idpg", "lopa", "lopa-gate2")):
        row = next((r for r in first["rows"] if r["row"] == slug), None)
        if row is None:
            continue
        for si, key in enumerate(row["keys"]):
            path = Path(cfg.out) / "runs" / store.entries[key].get("reused_from", key) / "metrics.jsonl"
            if not path.exists():
                continue
            hist = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            lab = row["label"] if si == 0 else None
            a.plot([h["step"] for h in hist], [h["loss"] for h in hist], color=colors[ci], alpha=0.8, lw=1,
                   marker=".", label=lab)
            b.plot([h["step"] for h in hist], [h["dev"] for h in hist], color=colors[ci], alpha=0.8, lw=1,
                   marker=".", label=lab)
    a.set(xlabel="step", ylabel="training loss", title=f"training loss ({task}, every seed)")
    b.set(xlabel="step", ylabel="dev accuracy", title=f"dev accuracy ({task})")
    b.legend(fontsize=7)
    return fig


# --------------------------------------------------------------------------- markdown

def _params(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def notes(summary: dict[str, Any], cfg) -> list[str]:
    """Where our numbers agree or disagree with the paper, stated only as far as the intervals allow."""
    out = []
    first = summary["tasks"].get(cfg.tasks[0])
    if not first:
        return out
    by = {r["row"]: r for r in first["rows"]}
    comp = {(c["a"], c["b"]): c for c in first["comparisons"]}

    def say(a: str, b: str, paper_gap: float | None) -> None:
        c = comp.get((a, b))
        if c is None:
            return
        p = f"paper (SST-2): {a} − {b} = {paper_gap:+.1f} pts; " if paper_gap is not None else ""
        out.append(f"{p}here: {a} − {b} = {100 * c['diff']:+.1f} pts ({c['verdict']}).")

    say("lopa", "prompt-tuning", 96.0 - 84.4)
    say("lopa", "idpg", 96.0 - 95.3)
    say("lopa", "lora", 96.0 - 96.2)
    say("idpg", "prompt-tuning", 95.3 - 84.4)
    say("lopa-gate2", "lopa", None)
    say("lopa-gate2", "prompt-tuning", None)
    if "lopt-1" in by and "prompt-tuning" in by:
        for k in ("lopt-1", "lopt-2"):
            if k in by:
                ratio = by["prompt-tuning"]["trainable_params"] / max(1, by[k]["trainable_params"])
                c = comp.get((k, "prompt-tuning"))
                out.append(f"LoPT's claim (prompt tuning's accuracy with ~5x fewer parameters): {k} has "
                           f"{ratio:.1f}x fewer parameters than prompt tuning and "
                           f"{100 * c['diff']:+.1f} pts of accuracy ({c['verdict']}).")
    if "zero-shot" in by:
        k = len(first["class_counts"].get("test", {})) or 2
        out.append(f"Zero-shot, the bare model already scores {pct(by['zero-shot']['mean'])}% (chance "
                   f"{100 / k:.0f}%, majority class {pct(_majority(first))}%); every trained method's gain "
                   f"is measured against that, not against chance.")
    return out


def _majority(task_summary: dict[str, Any]) -> float | None:
    test = task_summary["class_counts"].get("test")
    return max(test.values()) / sum(test.values()) if test else None


def render(cfg, summary: dict[str, Any], images: list[str]) -> str:
    """The markdown section: setup, learning rates, a table per task, the sweep, LoPA's gate, plots, notes."""
    s = summary
    L = render_setup(cfg, s) + render_lrs(cfg, s)
    for task, t in s["tasks"].items():
        L += render_task(task, t)
    L += render_sweep(s) + render_gate(s) + render_notes(cfg, s, images)
    return "\n".join(L + ["", MARK_END]) + "\n"


def render_setup(cfg, s: dict[str, Any]) -> list[str]:
    """The command, the machine, the wall time and the protocol."""
    st = s["settings"]
    mach = s["machine"]
    L = [MARK_START, "## Accuracy", ""]
    L.append("The LoPA paper's comparison reproduced on our models. Base "
             f"`{cfg.model}`, encoder `{cfg.encoder}`; no GLUE data is available offline, so the tasks are "
             + ", ".join(f"`{t}`" for t in cfg.tasks) + " (built in; `rotten-tomatoes-3` adds plot synopses "
             "as a third class).")
    L.append("")
    L.append(f"- **Command**: `{s['command']}` (resumable: finished runs in `{cfg.out}/runs.json` are skipped)")
    L.append(f"- **Machine**: {mach['cores']} cores ({mach['torch_threads']} torch threads), {mach['cpu']} "
             f"({mach['bf16_flags'] or 'no bf16 flags'}), torch {mach['torch']}, Python {mach['python']}; "
             f"load average at start {mach['load_avg_at_start']}")
    L.append(f"- **Wall time**: {s['wall_s']['all_runs'] / 60:.1f} min summed over all {s['counts']['runs']} "
             f"recorded runs (this invocation: {s['wall_s']['this_invocation'] / 60:.1f} min)")
    L.append(f"- **Protocol**: batch {st['batch_size']}, AdamW (no weight decay), linear warm-up "
             f"{st['warmup']:.0%} then linear decay, {st['precision']}; {st['steps']} steps on `{cfg.tasks[0]}`"
             + (f", {st['other_steps']} on the others" if len(cfg.tasks) > 1 else "")
             + f"; soft prompts m={st['m']}, r={st['rank']}, h={st['hidden']}, vocab init; LoRA r={st['lora_r']} "
             f"on q/v; dev evaluated {st['evals']}x per run on {st['dev_limit']} items, the best checkpoint "
             f"scored on {st['test_limit']} test items; seeds: {st['seeds']} for "
             f"{', '.join(st['main_rows'])} on `{cfg.tasks[0]}`, {st['other_seeds']} elsewhere, 1 for the rest.")
    L.append("")
    return L


def render_lrs(cfg, s: dict[str, Any]) -> list[str]:
    """How the learning rates were chosen, and the pilots' scores."""
    st = s["settings"]
    L: list[str] = []
    L.append("### Learning rates")
    L.append("")
    L.append(f"Chosen on `{cfg.tasks[0]}`'s dev split by a pilot: each family trains {st['pilot_steps']} steps "
             f"(seed 0, the same batch, warm-up fraction and schedule as the main runs) at each candidate LR; "
             f"the LR with the best dev accuracy on {st['pilot_dev_limit']} items wins (ties: the smaller LR). The "
             "pilot's test score is never read (it scores a single test item). Variants use their family's LR "
             "(LoPA add/max/concat: LoPA's; gate×2: LoPA's for the heads and prompt tuning's for Z_S via "
             "`shared_lr_scale`); the other tasks reuse these LRs. A short pilot favours larger LRs, and "
             f"{st['pilot_dev_limit']} dev items resolve only gaps of several points, so a close call may not be "
             "the best LR for the full run.")
    L.append("")
    L.append("| family | candidates: dev accuracy | chosen |")
    L.append("|---|---|---|")
    for fam, t in s["lr"].items():
        cands = ", ".join(f"{lr}: {pct(acc)}" for lr, acc in t["candidates"].items()) or "fixed by --lr"
        L.append(f"| {fam} | {cands} | **{t['chosen']:g}** |")
    L.append("")
    return L


def render_task(task: str, t: dict[str, Any]) -> list[str]:
    """One task's table of methods and the differences claimed."""
    L: list[str] = []
    counts = "; ".join(f"{sp} " + ", ".join(f"{k} {v}" for k, v in c.items())
                       for sp, c in t["class_counts"].items())
    L.append(f"### {task} ({t['steps']} steps)")
    L.append("")
    L.append(f"Class counts: {counts}.")
    L.append("")
    L.append("| method | test acc % (mean ± std) | 95% CI | macro-F1 % | trainable params | LR | wall / run | "
             "seeds | paper SST-2 / RTE / MRPC |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for r in t["rows"]:
        std = f" ± {100 * r['std']:.1f}" if r["std"] is not None else ""
        ci = f"[{pct(r['ci95'][0])}, {pct(r['ci95'][1])}] ({r['ci_kind']})"
        paper = " / ".join(f"{v:.1f}" for v in r["paper"].values()) if r["paper"] else "—"
        lr = f"{r['lr']:g}" if r["lr"] else "—"
        L.append(f"| {r['label']} | {pct(r['mean'])}{std} | {ci} | {pct(r['macro_f1'])} | "
                 f"{_params(r['trainable_params'])} | {lr} | {r['wall_s']:.0f} s | {len(r['seeds'])} | {paper} |")
    L.append("")
    if t["comparisons"]:
        L.append("Differences (A − B, points; claimed only where the 95% intervals do not overlap): "
                 + "; ".join(f"{c['a']} − {c['b']} {100 * c['diff']:+.1f} → {c['verdict']}"
                             for c in t["comparisons"]) + ".")
        L.append("")
    return L


def render_sweep(s: dict[str, Any]) -> list[str]:
    """The LoPA m × r sweep, where it ran."""
    sweep = s["sweep"]
    if not sweep["points"]:
        return []
    return ([f"### LoPA sweep: m × r on {sweep['task']} ({sweep['steps']} steps, seed 0)", "",
             "| m | r | test acc % | 95% CI (Wilson) | trainable params |", "|---|---|---|---|---|"]
            + [f"| {p['m']} | {p['r']} | {pct(p['accuracy'])} | [{pct(p['ci95'][0])}, {pct(p['ci95'][1])}] | "
               f"{_params(p['trainable_params'])} |" for p in sweep["points"]] + [""])


def render_gate(s: dict[str, Any]) -> list[str]:
    """The paper's gate against gate×2, where both ran."""
    d = s["lopa_default"]
    if not d:
        return []
    return ["### LoPA's formulation: the paper's gate or gate×2", "",
            f"Dev accuracy ({s['settings']['dev_limit']} items, best evaluation; mean over the seeds both ran: "
            f"{d['dev_seeds']}): "
            f"paper's gate {pct(d['dev']['lopa'])}, gate×2 with Z_S at prompt tuning's LR "
            f"{pct(d['dev']['lopa-gate2'])} → dev winner **{d['dev_winner']}**; on test: "
            f"{pct(d['test']['lopa'])} vs {pct(d['test']['lopa-gate2'])} ({d['test_verdict']}). "
            f"Candidate library default: `{json.dumps(d['candidate_default'])}` (library defaults are "
            "unchanged by this benchmark).", ""]


def render_notes(cfg, s: dict[str, Any], images: list[str]) -> list[str]:
    """The plots, and where this setting differs from the paper's."""
    st = s["settings"]
    L: list[str] = []
    L.append("### Plots")
    L.append("")
    for img in images:
        L.append(f"![{img[:-4]}]({img})")
    L.append("")
    L.append("### Notes: where this differs from the paper")
    L.append("")
    for n in notes(s, cfg):
        L.append(f"- {n}")
    what = ("SmolLM2-135M-Instruct, a 135M decoder whose weights are dequantised from a 4-bit GGUF"
            if cfg.model == "smollm2-135m" else f"`{cfg.model}`")
    L.append(f"- Different setting: {what}, instead of RoBERTa-large (355M, encoder); Rotten Tomatoes snippets "
             "instead of SST-2/RTE/MRPC; "
             f"{st['steps']} steps × {st['batch_size']} examples (well under one epoch) instead of the paper's "
             "many epochs. Soft-prompt methods are known to converge more slowly than LoRA, so a short "
             "budget can favour LoRA and full fine-tuning; the convergence plot shows whether the curves "
             "had flattened.")
    L.append("- Full fine-tuning is scored at its last step (`lopa.train` reloads the best dev checkpoint "
             "for every other method); its row is one seed.")
    L.append("- A single run's interval (Wilson) covers only test-set sampling, not seed-to-seed variation, so "
             "single-seed rows look more certain than they are; with 3 seeds the t-interval is wide "
             "(t = 4.30), so only large gaps are claimed.")
    return L


# --------------------------------------------------------------------------- main

def plan(cfg, store: ResultStore, tokens: dict[str, float],
         speed: dict[str, Any]) -> tuple[dict[str, list[Job]], dict[str, Any], float]:
    """The jobs (main and sweep ones only once every LR they need is known), the LR table so far, and
    the estimated seconds of what is left, printed as the plan."""
    pilots = pilot_jobs(cfg)
    lrs, lr_table = choose_lrs(cfg, store, pilots)
    known = (all(ROW_BY_SLUG[r].method in lrs for r in cfg.rows)
             and ("lopa-gate2" not in cfg.rows or "prompt-tuning" in lrs))
    groups = {"pilot": pilots, "main": main_jobs(cfg, lrs if known else None),
              "sweep": sweep_jobs(cfg, lrs if known else None)}
    for jobs in groups.values():
        for j in jobs:
            j.est_s = estimate(j, tokens[j.task], speed)
    zs_s = sum(cfg.test_limit / speed["eval_items_s"][cfg.precision] + speed["overhead_s"] for _ in cfg.tasks)
    named = {f"LR pilots ({cfg.pilot_steps} steps)": groups["pilot"]}
    for ti, task in enumerate(cfg.tasks):
        steps = cfg.steps if ti == 0 else cfg.other_steps
        named[f"{task} ({steps} steps)"] = [j for j in groups["main"] if j.task == task]
    named[f"sweep ({cfg.sweep_steps} steps)"] = groups["sweep"]
    total = print_plan(cfg, named, store, tokens, speed) + zs_s
    load, cores = (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0), os.cpu_count() or 1
    if load > 0.5 * cores and not cfg.threads:
        print(f"note: load average {load:.1f} on {cores} cores; other jobs are running, so the times will be "
              f"longer, and --threads 1 may be several times faster than torch's {cores} threads", flush=True)
    return groups, lr_table, total


def run_jobs(cfg, store: ResultStore, runner: Runner, groups: dict[str, list[Job]], tokens: dict[str, float],
             speed: dict[str, Any]) -> dict[str, Any] | None:
    """Zero-shot, the pilots, then the main and sweep runs at the chosen LRs (``groups`` updated); the LR
    table, or None when a pilot failed and left a family without an LR."""
    for task in cfg.tasks:
        zero_shot(cfg, store, task)
    for job in groups["pilot"]:
        runner.run(job)
    lrs, lr_table = choose_lrs(cfg, store, groups["pilot"])
    missing = sorted({ROW_BY_SLUG[r].method for r in cfg.rows} - set(lrs))
    if missing:
        print(f"no learning rate for {missing}: their pilots failed; fix and rerun", file=sys.stderr)
        return None
    print("chosen learning rates: " + ", ".join(f"{k} {v:g}" for k, v in lrs.items()), flush=True)
    groups["main"], groups["sweep"] = main_jobs(cfg, lrs), sweep_jobs(cfg, lrs)
    for j in groups["main"] + groups["sweep"]:
        j.est_s = estimate(j, tokens[j.task], speed)
    for job in groups["main"] + groups["sweep"]:
        runner.run(job)
    return lr_table


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    prepare_benchmark(cfg.threads)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")  # reloading best/ onto the base
    started = time.time()
    out = Path(cfg.out)
    store = ResultStore(out / "runs.json")
    speed = SPEED["tiny" if cfg.model.startswith("tiny-") else "real"]
    tokens = {t: prompt_tokens(t, cfg.model) for t in cfg.tasks}
    groups, lr_table, total = plan(cfg, store, tokens, speed)
    if cfg.plan:
        return 0
    runner = Runner(cfg, store, total)
    if not cfg.report_only:
        lr_table = run_jobs(cfg, store, runner, groups, tokens, speed)
        if lr_table is None:
            return 1
    cfg.ran_now = runner.count
    summary = summarize(cfg, store, groups, lr_table, time.time() - started)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    doc = Path(cfg.doc)
    images = plots(cfg, summary, store, doc.parent)
    write_section(doc, render(cfg, summary, images), MARK_START, MARK_END)
    print(f"wrote {out / 'summary.json'}, {doc} and {', '.join(images)} beside it "
          f"({(time.time() - started) / 60:.1f} min, {runner.count} runs now, {len(store.entries)} recorded)")
    if runner.failed:
        print(f"{len(runner.failed)} runs failed: {', '.join(runner.failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
