"""The LoPA paper's accuracy comparison on the paper's own tasks: SST-2 and MRPC (GLUE's dev set is
the test split, as in the paper) and rotten-tomatoes-3, every method next to zero-shot.

Protocol: each family's learning rate is chosen on the first task's dev split at the main runs'
budget (candidates trained with ``--no-test``: the test split is never read to choose). A family's grid
is widened while its best candidate sits on the grid's edge and strictly beats its neighbour: the next
rate one grid step further out is tried, at most ``--lr-extensions`` times, so that no family is judged
at a rate its own curve says is too low or too high. One seed's dev accuracy is noisy, so where a family
with several seeds has a runner-up within one standard error of its best, both rates run on every seed
(dev only) and the better mean over seeds is chosen. The chosen run is then scored on test, and the
other seeds and tasks reuse that LR. Differences between rows are paired (same test items; with several
seeds, each item's correctness averaged over seeds) with a 95% interval, and claimed only where the
interval excludes zero. Resumable: every run is a
``lopa train`` run directory under OUT/runs/, finished ones are read back, unfinished ones resume.

Writes ``docs/accuracy.json`` (``{task: {method: {mean, ci95, seeds, trainable}}}``), a markdown
section of docs/results.md, a PNG of every run's dev curve, and ``docs/accuracy_runs.jsonl``: what the
report needs of each finished run (figures, curve, per-item test correctness) with the settings it ran
with, committed, so that a fresh checkout continues the benchmark or adds a row without training the
finished runs again (see :mod:`lopa.benchmarks.run_log`).

    lopa bench accuracy --plan                 # the runs and their estimated time
    lopa bench accuracy --tasks sst2 --threads 2   # one part; run again to continue
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lopa.benchmarks.common import (BenchmarkParser, machine, method_settings, parse_assignments, prepare_benchmark,
                                    require_positive, write_section)
from lopa.benchmarks.run_log import RunLog, RunLogError, bits, unbits

MARK_START, MARK_END = "<!-- accuracy:start -->", "<!-- accuracy:end -->"
PROVENANCE = "provenance.json"  # in a run directory that was adopted from another study: where from, and why it is the same run
SUMMARY = "summary.json"  # in OUT: every row's figures, the LR choice and the paired differences
RUN_LOG = "accuracy_runs.jsonl"  # beside --doc: the finished runs, so a fresh checkout need not train them again
ENCODER_WIDTH = "the encoder's width"  # a row setting resolved when the run starts (the encoder is an option)

# The LoPA paper's Table 1 (RoBERTa-large, GLUE dev accuracy; MRPC as the paper reports it).
PAPER = {"prompt-tuning": {"sst2": 84.4, "mrpc": 72.4}, "idpg": {"sst2": 95.3, "mrpc": 78.6},
         "lora": {"sst2": 96.2, "mrpc": 90.8}, "lopa": {"sst2": 96.0, "mrpc": 91.1}}


@dataclass(frozen=True)
class Row:
    """One line of the table: a method plus the settings that make it a variant; ``family`` names
    whose learning rate it uses (a variant trains at its family's chosen rate)."""

    name: str
    label: str
    settings: dict[str, Any] = field(default_factory=dict)
    family: str = ""

    @property
    def method(self) -> str:
        return self.settings.get("method", self.name)

    @property
    def lr_family(self) -> str:
        return self.family or self.name


ROWS = [
    Row("prompt-tuning", "prompt tuning", {"method": "prompt-tuning"}),
    Row("lopt-1", "LoPT-1", {"method": "lopt-1"}),
    Row("lopt-2", "LoPT-2", {"method": "lopt-2"}),
    Row("idpg", "S-IDPG", {"method": "idpg"}),
    Row("lopa", "LoPA (library defaults)", {"method": "lopa"}),
    # the formulation of the authors' reference code: Z_S from nn.Embedding's N(0, 1), heads as wide as
    # the encoder, one rate for every parameter, constant after warm-up (a fraction of the steps), every
    # example with its own features, the encoder reading the whole prompt
    Row("lopa-paper", "LoPA (the reference code's formulation)",
        {"method": "lopa", "init": "random", "init_std": 1.0, "hidden_size": ENCODER_WIDTH, "shared_lr_scale": 1.0,
         "schedule": "constant", "warmup_fraction": 0.06, "instance_dropout": 0.0, "encoder_input": "prompt"},
        family="lopa"),
    Row("lopa-train-encoder", "LoPA, encoder trained too", {"method": "lopa", "train_encoder": True}, family="lopa"),
    Row("lora", "LoRA (r 8, q/v)", {"method": "lora"}),
    Row("full", "full fine-tuning", {"method": "full"}),
]
ROW_BY_NAME = {r.name: r for r in ROWS}
MULTI_SEED = ("prompt-tuning", "idpg", "lopa", "lora")
# each family's first grid; widened on the side where its best candidate sits (see lr_grid)
CANDIDATE_LRS = {"prompt-tuning": (3e-3, 1e-2), "lopt-1": (3e-3, 1e-2), "lopt-2": (1e-3, 3e-3),
                 "idpg": (3e-4, 1e-3), "lopa": (1e-3, 3e-3), "lora": (5e-4, 2e-3), "full": (2e-5, 1e-4)}
COMPARE = [("lopa", "prompt-tuning"), ("lopa", "lora"), ("lopa", "idpg"), ("lopa", "lopa-paper"),
           ("lopa-train-encoder", "lopa"), ("prompt-tuning", "zero-shot"), ("lopa", "zero-shot"),
           ("lora", "prompt-tuning")]
# 300 steps of batch 8: on SST-2 dev (the LoPA study) prompt tuning is then 24 points above zero-shot and
# LoPA's curve has flattened; longer budgets would not fit the whole benchmark in about three hours here.
TASK_STEPS = {"sst2": 300, "mrpc": 300, "rotten-tomatoes-3": 300}


@dataclass(frozen=True)
class Job:
    task: str
    row: str
    seed: int
    lr: float
    test: bool

    @property
    def key(self) -> str:
        return f"{self.task}/{self.row}/lr{self.lr:g}-s{self.seed}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = BenchmarkParser("accuracy", __doc__, "lopa bench accuracy --plan", raw=True)
    p.add_outputs("results/accuracy", "runs/ (one lopa train run each), zero-shot/",
                  quick_help="tiny random models, a few steps, every row and every code path")
    p.add_resumable("the summary, accuracy.json, the plot and the markdown")
    p.add_models()
    a = p.add_argument
    a("--tasks", default="sst2,mrpc,rotten-tomatoes-3",
      help="comma-separated tasks; the first chooses the learning rates and gets the extra seeds")
    a("--rows", default=",".join(r.name for r in ROWS), help="comma-separated rows: " + ", ".join(ROW_BY_NAME))
    p.quick("--seeds", 3, 2, f"seeds of {', '.join(MULTI_SEED)} on the first task", type=int)
    a("--steps", default=None, metavar="TASK=N,...",
      help="training steps per task (default " + ",".join(f"{k}={v}" for k, v in TASK_STEPS.items()) + "; --quick: 4)")
    p.quick("--lr-extensions", 2, 1, "times a family's learning-rate grid may be widened beyond its first "
            "candidates (" + ", ".join(f"{f} {'/'.join(f'{x:g}' for x in c)}" for f, c in CANDIDATE_LRS.items())
            + "), one step past the edge where its best candidate sits", type=int)
    p.quick("--evals", 6, 2, "dev evaluations per run, evenly spaced (the curves' points)", type=int)
    p.quick("--dev-limit", 500, 16, "dev items per evaluation", type=int)
    p.quick("--test-limit", None, 24, "test items per run", shown="all", type=int)
    a("--data-dir", default=None, help="folder holding glue/ (default $LOPA_DATA_DIR or ../shared/data)")
    a("--threads", type=int, default=None, help="torch threads (a shared machine may run faster with 1)")
    a("--max-minutes", type=float, default=None, help="start no new run after this many minutes (run in parts)")
    a("--run-log", default=None, metavar="FILE",
      help=f"the finished runs' record, committed so a fresh checkout continues without training them again "
           f"(default {RUN_LOG} beside --doc)")
    args = p.parse(argv)
    unknown = [r for r in args.rows.split(",") if r not in ROW_BY_NAME]
    if unknown:
        p.error(f"--rows: unknown {unknown}; known: {list(ROW_BY_NAME)}")
    steps = dict(TASK_STEPS)
    items = [x for x in (args.steps or "").split(",") if x]
    steps.update({t: int(n) for t, n in parse_assignments(p, "--steps", items, args.tasks.split(",")).items()})
    args.task_list, args.row_list = args.tasks.split(","), args.rows.split(",")
    args.task_steps = {t: (4 if args.quick else steps.get(t, 400)) for t in args.task_list}
    require_positive(p, args, ("seeds", "evals", "dev_limit"))
    if args.lr_extensions < 0:
        p.error(f"--lr-extensions must be >= 0, got {args.lr_extensions}")
    p.finish(args, writes=[SUMMARY])
    args.out, args.doc = Path(args.out), Path(args.doc)
    args.run_log = Path(args.run_log) if args.run_log else args.doc.parent / RUN_LOG
    if args.run_log.is_dir():
        p.error(f"--run-log takes a file; {args.run_log} is a folder")
    return args


def nice_lr(x: float) -> float:
    """``x`` rounded, in log space, to the nearest of 1, 2, 3 or 5 times a power of ten.

    >>> [nice_lr(x) for x in (3.3e-2, 1.25e-4, 9e-3, 6.7e-6)]
    [0.03, 0.0001, 0.01, 5e-06]
    """
    k = math.floor(math.log10(x))
    steps = [m * 10.0 ** e for e in (k, k + 1) for m in (1, 2, 3, 5)]
    return float(f"{min(steps, key=lambda v: abs(math.log(v / x))):.3g}")


def next_lr(dev: dict[float, float]) -> float | None:
    """The rate to try next, given each tried rate's best dev accuracy: one grid step beyond the edge
    where the best sits, if it strictly beats its neighbour there; None when the best is inside the
    grid (or level with its neighbour: a flat edge says nothing about further out).

    >>> next_lr({3e-3: 0.72, 1e-2: 0.83})       # best at the top edge: try higher
    0.03
    >>> next_lr({1e-3: 0.85, 3e-3: 0.84})       # best at the bottom edge: try lower
    0.0003
    >>> next_lr({3e-4: 0.8, 1e-3: 0.85, 3e-3: 0.84}) is None   # inside: decided
    True
    """
    lrs = sorted(dev)
    if len(lrs) < 2:
        return None
    best = min(lrs, key=lambda lr: (-dev[lr], lr))
    if best == lrs[-1] and dev[lrs[-1]] > dev[lrs[-2]]:
        return nice_lr(lrs[-1] * lrs[-1] / lrs[-2])
    if best == lrs[0] and dev[lrs[0]] > dev[lrs[1]]:
        return nice_lr(lrs[0] * lrs[0] / lrs[1])
    return None


def lr_families(cfg: argparse.Namespace) -> list[str]:
    """The families whose rates the chosen rows need, in :data:`CANDIDATE_LRS` order."""
    used = {ROW_BY_NAME[r].lr_family for r in cfg.row_list}
    return [fam for fam in CANDIDATE_LRS if fam in used]


def lr_grid(cfg: argparse.Namespace, family: str,
            dev_of: Any) -> tuple[list[Job], dict[float, float], float | None, dict[float, float]]:
    """A family's candidate runs called for so far (its first grid, each widening its finished candidates
    call for, and the confirmations below), the best dev accuracy of those finished on seed 0, its chosen
    rate (None while undecided), and the confirmed rates' mean dev accuracy over seeds.
    ``dev_of(job)`` gives a finished candidate's record or None; it may train the candidate
    (:class:`Runner`) or only look (``Runner.done``).

    Confirmation: one seed's best dev accuracy is noisy (a standard error of about 1.5 points on 500 items
    near 85%, more for a curve that swings). Where the runner-up of a multi-seed family is within one
    standard error of the best, both are run on the family's other seeds (the best's runs are its main
    runs there, so only the runner-up's cost anything) and the better mean over seeds is chosen."""
    task = cfg.task_list[0]
    grid, dev = list(CANDIDATE_LRS[family]), {}
    jobs = [Job(task, family, 0, lr, False) for lr in grid]
    while True:
        for lr in grid:
            if lr not in dev:
                rec = dev_of(Job(task, family, 0, lr, False))
                if rec is None:
                    return jobs, dev, None, {}
                dev[lr] = rec["best_dev_accuracy"]
        nxt = next_lr(dev) if len(grid) < len(CANDIDATE_LRS[family]) + cfg.lr_extensions else None
        if nxt is None or nxt in dev:
            break
        grid.append(nxt)
        jobs.append(Job(task, family, 0, nxt, False))
    ranked = sorted(dev, key=lambda lr: (-dev[lr], lr))  # ties: the smaller rate
    best = ranked[0]
    if family not in MULTI_SEED or cfg.seeds < 2 or len(ranked) < 2 \
            or dev[best] - dev[ranked[1]] >= math.sqrt(dev[best] * (1 - dev[best]) / cfg.dev_limit):
        return jobs, dev, best, {}
    confirm = {lr: [dev[lr]] for lr in ranked[:2]}
    jobs += [Job(task, family, s, lr, False) for s in range(1, cfg.seeds) for lr in confirm]
    for s in range(1, cfg.seeds):
        for lr in confirm:
            rec = dev_of(Job(task, family, s, lr, False))
            if rec is None:
                return jobs, dev, None, {}
            confirm[lr].append(rec["best_dev_accuracy"])
    means = {lr: statistics.fmean(v) for lr, v in confirm.items()}
    return jobs, dev, min(means, key=lambda lr: (-means[lr], lr)), means


def lr_jobs(cfg: argparse.Namespace, runner: "Runner | None" = None) -> list[Job]:
    """Dev-only candidates on the first task at the main budget: each family's first grid (seed 0), and
    the widenings and confirmations its finished candidates call for (known only from ``runner``'s
    finished runs)."""
    if runner is None:
        return [Job(cfg.task_list[0], fam, 0, lr, False) for fam in lr_families(cfg) for lr in CANDIDATE_LRS[fam]]
    return [j for fam in lr_families(cfg) for j in sorted(lr_grid(cfg, fam, runner.done)[0],
                                                            key=lambda j: (j.seed, j.lr))]


def main_jobs(cfg: argparse.Namespace, lrs: dict[str, float]) -> list[Job]:
    jobs = []
    for i, task in enumerate(cfg.task_list):
        # seed-major: every row's first seed, then every multi-seed row's second, ..., so a benchmark run
        # in parts has the rows' comparisons on equal footing whenever it stops
        for s in range(cfg.seeds if i == 0 else 1):
            jobs += [Job(task, name, s, lrs[ROW_BY_NAME[name].lr_family], True) for name in cfg.row_list
                     if (s == 0 or name in MULTI_SEED) and ROW_BY_NAME[name].lr_family in lrs]
    return jobs


class Runner:
    """Runs one job as a ``lopa train`` run directory, or reads it back: from the run log (a fresh
    checkout) or from its run directory (a run that finished before it was logged)."""

    def __init__(self, cfg: argparse.Namespace):
        self.cfg = cfg
        self.started = time.time()
        self.log = RunLog(cfg.run_log)
        self._tasks: dict[str, dict[str, Any]] = {}

    def run_dir(self, job: Job) -> Path:
        return self.cfg.out / "runs" / job.key

    def settings(self, job: Job) -> dict[str, Any]:
        """What makes two runs of one key the same run: a record with other settings is not read back."""
        import dataclasses
        from lopa.methods import get_method
        cfg, row = self.cfg, ROW_BY_NAME[job.row]
        klass = get_method(row.method)[0]
        # a setting added later is left out while its default is what runs recorded without it ran with
        # ("stored_default"), so adding a setting does not make every finished run look stale
        # an "auto" default is recorded as what it decides for this task: where that is what runs ran with
        # before the setting existed, the task's finished runs stay valid
        default = klass().for_task(self._task_settings(job.task))
        defaults = {f.name: getattr(default, f.name) for f in dataclasses.fields(klass)
                    if not ("stored_default" in f.metadata and getattr(default, f.name) == f.metadata["stored_default"])}
        return {"model": cfg.model, "encoder": cfg.encoder, "steps": cfg.task_steps[job.task], "evals": cfg.evals,
                "dev_limit": cfg.dev_limit, "test_limit": cfg.test_limit, "row": row.settings,
                "method_defaults": defaults}

    def _task_settings(self, name: str) -> dict[str, Any]:
        if name not in self._tasks:
            from lopa.tasks import get_task
            self._tasks[name] = get_task(name, data_dir=self.cfg.data_dir).settings()
        return self._tasks[name]

    def done(self, job: Job) -> dict[str, Any] | None:
        """The finished job's record (with ``test`` for a test job), or None."""
        settings = self.settings(job)
        rec = self.log.get(job.key, settings)
        # a test job shares its key with its dev-only twin, whose record lacks the test score it then gets
        if (rec is None or (job.test and "test" not in rec)) and (found := self._from_run_dir(job)) is not None:
            rec = found
            if not job.test or "test" in rec:
                self.log.put(job.key, settings, rec)
        return rec if rec is not None and (not job.test or "test" in rec) else None

    def settings_path(self, job: Job) -> Path:
        """Beside the run directory (``lopa train`` wants its folder to itself): the settings it was started with."""
        out = self.run_dir(job)
        return out.parent / f"{out.name}.settings.json"

    def dir_matches(self, job: Job) -> bool:
        """Whether the job's run directory was made with today's settings. A directory from before the settings
        file was kept beside it is trusted only through a log record with today's settings: a run trained under
        other defaults (a method's default changed since) must not be read back as today's."""
        settings = self.settings(job)
        path = self.settings_path(job)
        if path.exists():
            try:
                return json.loads(path.read_text()) == json.loads(json.dumps(settings))
            except ValueError:
                return False
        return self.log.get(job.key, settings) is not None

    def _from_run_dir(self, job: Job) -> dict[str, Any] | None:
        out = self.run_dir(job)
        if not (out / "results.json").exists() or not self.dir_matches(job):
            return None
        res = json.loads((out / "results.json").read_text())
        rec = {k: res[k] for k in ("best_dev_accuracy", "trainable_params", "train_s") if k in res}
        if (out / "metrics.jsonl").exists():
            rec["curve"] = [[h["step"], h["dev"]] for h in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
        if "test" in res:
            correct = _correct(out)
            if correct is None:  # scored, but its predictions are gone: not usable for paired differences
                return rec
            rec["test"] = {k: res["test"][k] for k in ("accuracy", "n", "macro_f1") if k in res["test"]}
            rec["correct"] = bits(correct)
        if (out / PROVENANCE).exists():
            rec["provenance"] = json.loads((out / PROVENANCE).read_text()).get("why", "")
        return rec

    def out_of_time(self) -> bool:
        return self.cfg.max_minutes is not None and time.time() - self.started > 60 * self.cfg.max_minutes

    def __call__(self, job: Job) -> dict[str, Any] | None:
        if (res := self.done(job)) is not None:
            return res
        if self.cfg.report_only or self.out_of_time():
            return None
        if self.log.stale(job.key, self.settings(job)):
            print(f"[accuracy] {job.key}: logged with other settings; running it again", file=sys.stderr)
        dev_twin = Job(job.task, job.row, job.seed, job.lr, False)
        if job.test and (self.run_dir(dev_twin) / "best").is_dir() and self.dir_matches(dev_twin):
            self._test_only(job, dev_twin)
        else:
            self._train(job)
        return self.done(job)

    def _train(self, job: Job) -> dict[str, Any]:
        from lopa.models import hidden_size_of
        from lopa.train import TrainArgs, train
        cfg, row, steps = self.cfg, ROW_BY_NAME[job.row], self.cfg.task_steps[job.task]
        out = self.run_dir(job)
        fresh = out.exists() and not self.dir_matches(job)
        if fresh:
            print(f"[accuracy] {job.key}: its run directory was made with other settings; training afresh",
                  file=sys.stderr)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.settings_path(job).write_text(json.dumps(self.settings(job)) + "\n")
        settings = dict(row.settings)
        warmup = max(1, round(steps * settings.pop("warmup_fraction", 0.1)))
        if settings.get("hidden_size") == ENCODER_WIDTH:
            settings["hidden_size"] = hidden_size_of(cfg.encoder)
        args = TrainArgs.from_flat(**{
            **method_settings(row.method, encoder=cfg.encoder), **settings, "task": job.task, "model": cfg.model,
            "data_dir": cfg.data_dir, "out": str(out), "max_steps": steps, "lr": job.lr, "seed": job.seed,
            "eval_every": max(1, steps // cfg.evals), "eval_limit": cfg.dev_limit, "test_limit": cfg.test_limit,
            "test": job.test, "zero_shot": False, "progress": False, "warmup_steps": warmup,
            "resume": not fresh and (out / "run_config.json").exists(), "overwrite": fresh})
        print(f"[accuracy] {job.key}: training {steps} steps", file=sys.stderr, flush=True)
        res = train(args)
        _drop_checkpoints(out)
        return res

    def _test_only(self, job: Job, twin: Job) -> dict[str, Any]:
        """The chosen LR's dev-only run, now scored on test from its best checkpoint (no retraining)."""
        import shutil
        src, out = self.run_dir(twin), self.run_dir(job)
        if not out.exists():
            shutil.copytree(src, out)
        from lopa.evaluate import score
        from lopa.rundir import load_run_model
        from lopa.tasks import get_task
        task = get_task(job.task, data_dir=self.cfg.data_dir)
        model = load_run_model(out)
        res = json.loads((out / "results.json").read_text())
        test = score(model, task, "test", limit=self.cfg.test_limit, precision=_precision(out), progress=False,
                     keep_predictions=True)
        preds = test.pop("predictions")
        labels = [e.label for e in task.split("test")[:test["n"]]]
        (out / "predictions.json").write_text(json.dumps({"test": preds, "labels": labels}) + "\n")
        res["test"] = test
        (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
        return res


def _precision(run_dir: Path) -> str:
    from lopa.rundir import run_precision
    return run_precision(str(run_dir)) or "fp32"


def _drop_checkpoints(out: Path) -> None:
    import shutil
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # best/ and the logs stay; full's are 1.6 GB


def zero_shot(cfg: argparse.Namespace, task_name: str, log: RunLog) -> dict[str, Any] | None:
    """The bare model on the task's test split: accuracy, its interval, macro-F1 and per-item
    correctness (logged; an older OUT/zero-shot/TASK.json is read back too)."""
    key, settings = f"{task_name}/zero-shot", {"model": cfg.model, "test_limit": cfg.test_limit}
    if (rec := log.get(key, settings)) is not None:
        return rec
    path = cfg.out / "zero-shot" / f"{task_name}.json"
    if path.exists():
        res = json.loads(path.read_text())
    elif cfg.report_only:
        return None
    else:
        from lopa.baselines import BaselineModel
        from lopa.evaluate import score
        from lopa.hardware import fast_precision
        from lopa.models import load_base
        from lopa.tasks import get_task
        task = get_task(task_name, data_dir=cfg.data_dir)
        base, tok = load_base(cfg.model)
        res = score(BaselineModel(base, tok), task, "test", limit=cfg.test_limit, precision=fast_precision(),
                    progress=False, keep_predictions=True)
        res["labels"] = [e.label for e in task.split("test")[:res["n"]]]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res) + "\n")
    rec = {"accuracy": res["accuracy"], "accuracy_ci95": res["accuracy_ci95"], "macro_f1": res["macro_f1"],
           "n": res["n"], "correct": bits(p == y for p, y in zip(res["predictions"], res["labels"]))}
    log.put(key, settings, rec)
    return rec


def choose_lrs(cfg: argparse.Namespace, runner: Runner) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Each family's LR: the candidate with the best dev accuracy (ties: the smaller LR), its grid widened
    and its two best confirmed on more seeds as :func:`lr_grid` says. A family is decided only once every
    candidate it calls for has finished, so a benchmark run in parts never trains its main runs at a rate
    that a later candidate would have beaten. The table has each rate's seed-0 dev accuracy, and under
    "mean over N seeds: LR" the confirmed rates' means."""
    table: dict[str, dict[str, float]] = {}
    chosen: dict[str, float] = {}
    for fam in lr_families(cfg):
        _, dev, lr, means = lr_grid(cfg, fam, runner)
        if dev:
            table[fam] = {f"{x:g}": dev[x] for x in sorted(dev)}
            table[fam].update({f"mean over {cfg.seeds} seeds: {x:g}": means[x] for x in sorted(means)})
        if lr is not None:
            chosen[fam] = lr
    return chosen, table


# --------------------------------------------------------------------------- summary

def _correct(run_dir: Path) -> list[float] | None:
    path = run_dir / "predictions.json"
    if not path.exists():
        return None
    p = json.loads(path.read_text())
    return [float(a == y) for a, y in zip(p["test"], p["labels"])]


def row_summary(cfg: argparse.Namespace, runner: Runner, jobs: list[Job]) -> dict[str, Any]:
    """Mean test accuracy over seeds, its 95% interval (t over seeds, or Wilson for one seed), the
    per-item correctness averaged over seeds (for paired differences), and the dev curves."""
    from lopa.tasks.metrics import mean_ci95, proportion_ci95
    results = [(j, r) for j in jobs if (r := runner.done(j)) is not None]
    if not results:
        return {}
    accs = [r["test"]["accuracy"] for _, r in results]
    per_item = [unbits(r["correct"]) for _, r in results if "correct" in r]
    items = [statistics.fmean(col) for col in zip(*per_item)] if per_item else None
    if len(accs) > 1:
        # the wider of the seeds' t-interval (training's randomness) and the test items' interval
        # (the test set's sampling): two seeds alone can give a zero-width or a beyond-100% interval
        mean, lo, hi = mean_ci95(accs)
        if items:
            _, ilo, ihi = mean_ci95(items)
            lo, hi = min(lo, ilo), max(hi, ihi)
        lo, hi = max(lo, 0.0), min(hi, 1.0)
    else:
        n = results[0][1]["test"]["n"]
        mean, lo, hi = proportion_ci95(round(accs[0] * n), n)
    return {"mean": mean, "ci95": [lo, hi], "seeds": len(accs), "accuracies": accs,
            "macro_f1": statistics.fmean(r["test"]["macro_f1"] for _, r in results),
            "trainable": results[0][1].get("trainable_params", 0), "lr": results[0][0].lr,
            "train_s": statistics.fmean(r.get("train_s", 0) for _, r in results), "items": items,
            "curves": [r["curve"] for _, r in results if r.get("curve")]}


def paired(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    from lopa.tasks.metrics import paired_difference_ci95
    if not a.get("items") or not b.get("items") or len(a["items"]) != len(b["items"]):
        return None
    d, lo, hi = paired_difference_ci95(a["items"], b["items"])
    verdict = "A > B" if lo > 0 else "B > A" if hi < 0 else "no difference claimed"
    return {"difference": d, "ci95": [lo, hi], "verdict": verdict}


def summarize(cfg: argparse.Namespace, runner: Runner, lrs: dict[str, float]) -> dict[str, Any]:
    jobs = main_jobs(cfg, lrs) if lrs else []
    summary: dict[str, Any] = {}
    for task in cfg.task_list:
        rows: dict[str, Any] = {}
        if (zs := zero_shot(cfg, task, runner.log)) is not None:
            rows["zero-shot"] = {"mean": zs["accuracy"], "ci95": zs["accuracy_ci95"], "seeds": 1, "trainable": 0,
                                 "macro_f1": zs["macro_f1"], "items": unbits(zs["correct"]), "curves": []}
        for name in cfg.row_list:
            s = row_summary(cfg, runner, [j for j in jobs if j.task == task and j.row == name])
            if s:
                rows[name] = s
        diffs = {f"{a} - {b}": d for a, b in COMPARE if a in rows and b in rows and (d := paired(rows[a], rows[b]))}
        summary[task] = {"rows": rows, "differences": diffs, "steps": cfg.task_steps[task]}
    return summary


def accuracy_json(summary: dict[str, Any]) -> dict[str, Any]:
    """``{task: {method: {mean, ci95, seeds, trainable}}}`` with tasks and methods as named by lopa."""
    return {task: {name: {"mean": round(r["mean"], 4), "ci95": [round(x, 4) for x in r["ci95"]],
                          "seeds": r["seeds"], "trainable": r["trainable"]}
                   for name, r in s["rows"].items()} for task, s in summary.items()}


def write_accuracy_json(path: Path, summary: dict[str, Any]) -> list[str]:
    """Write :func:`accuracy_json` of ``summary`` to ``path``, keeping the entries of tasks this run did
    not cover (a benchmark run in parts, one ``--tasks`` at a time, must not erase the others); returns
    the tasks kept from the earlier file. An unreadable earlier file is replaced, and said so.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "accuracy.json"
    >>> _ = p.write_text('{"mrpc": {"lopa": {"mean": 0.7, "ci95": [0.6, 0.8], "seeds": 1, "trainable": 5}}}')
    >>> write_accuracy_json(p, {"sst2": {"rows": {}}})
    ['mrpc']
    >>> sorted(json.loads(p.read_text()))
    ['mrpc', 'sst2']
    """
    new = accuracy_json(summary)
    old: dict[str, Any] = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            if not isinstance(old, dict) or not all(isinstance(v, dict) for v in old.values()):
                raise ValueError("not a {task: {method: ...}} object")
        except ValueError as e:
            print(f"[accuracy] {path} was not readable ({e}); writing it anew", file=sys.stderr)
            old = {}
    kept = sorted(t for t in old if t not in new)
    path.write_text(json.dumps({**{t: old[t] for t in kept}, **new}, indent=2) + "\n")
    return kept


def plot_curves(summary: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = list(summary)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for k, (name, r) in enumerate(summary[task]["rows"].items()):
            for i, curve in enumerate(r["curves"]):  # one colour per row, its other seeds paler
                if curve:
                    ax.plot(*zip(*[(s, 100 * d) for s, d in curve]), marker=".", color=f"C{k}",
                            alpha=0.8 if i == 0 else 0.35, label=name if i == 0 else None)
        ax.set(title=f"{task}: dev accuracy while training", xlabel="step", ylabel="dev accuracy %")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def render(cfg: argparse.Namespace, summary: dict[str, Any], lr_table: dict[str, dict[str, float]],
           lrs: dict[str, float], machine: str, wall_min: float, adopted: dict[str, str] | None = None,
           kept: list[str] | None = None) -> str:
    """The markdown section; ``adopted`` maps the keys of runs recorded rather than trained here to why;
    ``kept`` names the tasks whose figures ``accuracy.json`` keeps from an earlier run of the benchmark."""
    from lopa.tasks.classification import GLUE  # GLUE's own folder names are its task names: SST-2, MRPC
    tasks = [GLUE[t].folder if t in GLUE else t for t in cfg.task_list]
    listed = tasks[0] if len(tasks) == 1 else ", ".join(tasks[:-1]) + " and " + tasks[-1]
    out = [MARK_START, f"## Accuracy: the LoPA paper's comparison on {listed}, base `{cfg.model}`", "",
           f"- **Command**: `lopa bench accuracy {' '.join(cfg.argv)}` (resumable: run again to continue)",
           f"- **Machine**: {machine}; wall time of the recorded runs: {wall_min:.0f} min",
           f"- **Protocol**: base `{cfg.model}`; batch 8; AdamW; warm-up 10% then the method's schedule; "
           f"steps {', '.join(f'{t} {n}' for t, n in cfg.task_steps.items())}; {cfg.evals} dev evaluations per run "
           f"on {cfg.dev_limit} dev items (carved from GLUE train), the best one's checkpoint scored on test "
           f"(GLUE's dev set, as in the paper); seeds: {cfg.seeds} for {', '.join(MULTI_SEED)} on the first task; "
           f"a row's 95% CI is the wider of its seeds' t-interval and its test items' interval, within [0, 100].",
           "", "### Learning rates (chosen on the first task's dev split at the main budget; test never read)", "",
           "| family | candidates: best dev accuracy | chosen |", "|---|---|---|"]
    for fam, cands in lr_table.items():
        out.append(f"| {fam} | " + ", ".join(f"{lr}: {_pct(a)}" for lr, a in cands.items())
                   + f" | **{lrs.get(fam, float('nan')):g}** |")
    for task, s in summary.items():
        out += ["", f"### {task} ({s['steps']} steps)", "",
                "| row | test acc % | 95% CI | seeds | macro-F1 % | trainable | LR | train s / run | paper % |",
                "|---|---|---|---|---|---|---|---|---|"]
        for name, r in s["rows"].items():
            label = ROW_BY_NAME[name].label if name in ROW_BY_NAME else name
            paper = PAPER.get(name, {}).get(task)
            spread = f" ± {100 * statistics.stdev(r['accuracies']):.1f}" if len(r.get("accuracies", [])) > 1 else ""
            out.append(f"| {label} | {_pct(r['mean'])}{spread} | [{_pct(r['ci95'][0])}, {_pct(r['ci95'][1])}] | "
                       f"{r['seeds']} | {_pct(r.get('macro_f1'))} | {r['trainable']:,} | {r.get('lr', '—')} | "
                       f"{r.get('train_s', 0):.0f} | {paper if paper is not None else '—'} |")
        if s["differences"]:
            out += ["", "Paired differences (A − B, points, 95% interval over the same test items, each item's "
                    "correctness averaged over the seeds; the interval covers the test set's sampling, not the "
                    "spread between seeds, so with two or three seeds read it next to the rows' ± above):", ""]
            out += [f"- {k}: {100 * d['difference']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}] → "
                    f"{d['verdict']}" for k, d in s["differences"].items()]
    for why in sorted(set((adopted or {}).values())):
        out += ["", f"Runs recorded rather than trained here ({why}): "
                + ", ".join(f"`{k}`" for k in sorted(k for k, w in adopted.items() if w == why)) + "."]
    if kept:
        out += ["", f"`accuracy.json` keeps its figures for {', '.join(kept)} from an earlier run of this benchmark "
                "(not among the tasks of the command above, nor shown in this section)."]
    out += ["", "![dev curves](accuracy_curves.png)", "", MARK_END]
    return "\n".join(out) + "\n"


def _machine() -> str:
    m = machine()
    return f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')}, {m.get('torch_threads', '?')} threads"


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    prepare_benchmark(cfg.threads)
    try:
        runner = Runner(cfg)
    except RunLogError as e:
        print(f"lopa bench accuracy: {e}", file=sys.stderr)
        return 2
    if cfg.plan:
        return print_plan(cfg, runner)
    for task in cfg.task_list:
        zero_shot(cfg, task, runner.log)
    lrs, lr_table = choose_lrs(cfg, runner)
    missing = {ROW_BY_NAME[r].lr_family for r in cfg.row_list} - set(lrs)
    if not missing:
        for job in main_jobs(cfg, lrs):
            runner(job)
    summary = summarize(cfg, runner, lrs)
    slim = {t: {**s, "rows": {n: {k: v for k, v in r.items() if k != "items"} for n, r in s["rows"].items()}}
            for t, s in summary.items()}
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / SUMMARY).write_text(json.dumps({"learning_rates": lr_table, "chosen": lrs, "tasks": slim}) + "\n")
    docs = cfg.doc.parent
    docs.mkdir(parents=True, exist_ok=True)
    kept = write_accuracy_json(docs / "accuracy.json", summary)
    plot_curves(summary, docs / "accuracy_curves.png")
    wall = sum(r.get("train_s", 0) * r.get("seeds", 1) for s in summary.values() for r in s["rows"].values()) / 60
    jobs = lr_jobs(cfg, runner) + (main_jobs(cfg, lrs) if not missing else [])
    adopted = {j.key: rec["provenance"] for j in jobs if (rec := runner.done(j)) is not None and rec.get("provenance")}
    write_section(cfg.doc, render(cfg, summary, lr_table, lrs, _machine(), wall, adopted, kept), MARK_START, MARK_END)
    left = ([j.key for j in main_jobs(cfg, lrs) if runner.done(j) is None] if not missing
            else ["learning rate of " + ", ".join(sorted(missing))])
    print(json.dumps({"tasks": accuracy_json(summary), "left": left}, indent=1))
    return 0


def print_plan(cfg: argparse.Namespace, runner: Runner) -> int:
    """The runs still to do (the main runs at each decided family's rate, or as if its first candidate
    won; widenings of a grid appear once the candidates that call for them have finished) and their steps."""
    lrs = {}
    for fam in lr_families(cfg):  # an undecided family's guess: its best so far on seed 0, else its first rate
        _, dev, lr, _ = lr_grid(cfg, fam, runner.done)
        lrs[fam] = lr or (min(dev, key=lambda x: (-dev[x], x)) if dev else CANDIDATE_LRS[fam][0])
    # a main run whose key a confirmation run shares is that run, scored on test once the family is decided
    candidates = lr_jobs(cfg, runner)
    mains = main_jobs(cfg, lrs)
    main_keys = {j.key for j in mains}
    todo = [j for j in candidates if j.key not in main_keys and runner.done(j) is None] \
        + [j for j in mains if runner.done(j) is None]
    dev_keys = {j.key for j in candidates}
    # scored on test from its dev-only run's checkpoint (one that exists, or that the plan trains first)
    reused = [j for j in todo if j.test and j.key in dev_keys
              and ((runner.run_dir(j) / "best").is_dir() or runner.done(Job(j.task, j.row, j.seed, j.lr, False)) is None)]
    steps = sum(cfg.task_steps[j.task] for j in todo if j not in reused)
    print(f"{len(todo)} runs to do ({len(reused)} of them only scored on test), {steps} training steps")
    for j in todo:
        print(" ", j.key, "" if j.test else "(dev only: learning-rate choice)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
