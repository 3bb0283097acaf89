"""The training loop: any method (or the LoRA / full baselines) on any task, built on accelerate so
the same loop runs under ``accelerate launch`` on many processes.

A run directory holds ``run_config.json`` (every hyper-parameter, written first), ``metrics.jsonl``,
``checkpoints/step-N`` (atomic; ``--resume`` continues from the newest, bit-for-bit as if never
stopped), ``best/`` (the artifact with the best dev metric), ``results.json`` and ``curves.png``.

Example::

    $ lopa train --method lopa --task rotten-tomatoes
    $ lopa train --method prompt-tuning --task reviews.jsonl --template '{text} It was' \\
          --label-words ' terrible, great' --max-steps 300
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .hardware import autocast
from .evaluate import DEV_METRICS, ITEM_METRICS, dev_score, resolve_dev_metric, score
from .rundir import PREDICTIONS, RUN_CONFIG, ZERO_SHOT, load_run_model
from .methods import METHODS, ConfigError, MethodConfig, get_method, make_config
from .tasks import GenerationTask, Task, TaskError, describe_task, generation_inputs, get_task
from .tasks.metrics import paired_difference_ci95

# settings that may change between a run and its --resume without changing the result
HEADLINE = ("accuracy", "pass@1", "rouge_l")  # the test metric a run's last line reports, by kind of task
RESUMABLE = {"resume", "overwrite", "dry_run", "progress", "max_steps", "patience"}


@dataclass
class TrainArgs:
    """Train a soft-prompt generator (or a LoRA / full fine-tuning baseline) on a task.

    Ends by scoring the best checkpoint on the test split next to the bare model's zero-shot score.
    Each method has options of its own (its config's fields, from the method registry):
    `lopa train --method M --help` lists M's.
    """

    method: str = field(default="lopa", metadata={"choices": sorted(METHODS)})
    """the method: a soft-prompt method (prompt-tuning, lopt-1, lopt-2, idpg, lopa) or a baseline that changes the model's weights (lora, full)"""
    task: str = "rotten-tomatoes"
    """built-in task name (rotten-tomatoes, sst2, mrpc, rte, qnli, qqp, mnli, mbpp, cruxeval-o, ...), a .jsonl/.csv file (classification with --label-words; generation with prompt/completion or messages columns, or --target-template) or hf:OWNER/NAME"""
    model: str = "smollm2-135m"
    """base causal LM: short name, hub id or local path"""
    out: str | None = None
    """run directory (default runs/TASK-METHOD)"""
    template: str | None = None
    """prompt template whose {slots} name the data's columns, e.g. '{text} It was'"""
    label_words: str | None = None
    """comma-separated label words, class i = word i, leading spaces kept: ' terrible, great'"""
    target_template: str | None = None
    """generation user task: the completion, whose {slots} name columns, e.g. '{answer}' (default: the completion column)"""
    chat_template: str = field(default="auto", metadata={"choices": ["auto", "none"]})
    """generation user task: build the text with the tokenizer's chat template (auto: where it has one) or as plain text"""
    system_prompt: str | None = None
    """generation user task: a system prompt put before every row"""
    split_map: str | None = None
    """hf: dataset: our splits to its splits, e.g. 'train=train,dev=validation,test=test' (default: its own)"""
    max_length: int | None = None
    """generation user task: tokens per row at most (prompt + completion); longer rows lose the start of their prompt (default 1024)"""
    dev_metric: str = field(default="auto", metadata={"choices": list(DEV_METRICS)})
    """dev metric that picks the best checkpoint: auto (accuracy; generation: loss), accuracy, macro_f1, loss, log_likelihood, exact_match, rouge_l"""
    data_dir: str | None = None
    """where mbpp/, cruxeval/, glue/ live (default $LOPA_DATA_DIR or ../shared/data)"""
    max_steps: int = 600
    """optimiser steps"""
    lr: float | None = None
    """peak learning rate (default: the method's own, from its config: prompt tuning 3e-3, lopa 1e-3, lora 5e-4, full 2e-5, ...)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    batch_size: int = 8
    """examples per optimiser step and process (times --grad-accum)"""
    grad_accum: int = 1
    """micro-batches accumulated per optimiser step"""
    warmup_steps: int = 30
    """linear warm-up steps"""
    schedule: str = field(default="linear", metadata={"choices": ["linear", "constant"]})
    """after warm-up: linear decay to 0, or constant"""
    eval_every: int = 100
    """evaluate on the dev split (and checkpoint) every N steps"""
    eval_limit: int | None = 500
    """dev items scored at each evaluation (all if unset)"""
    test_limit: int | None = None
    """test items scored at the end (all if unset)"""
    test: bool = True
    """score the best checkpoint (and the bare model) on the test split; --no-test keeps a study of settings on dev data alone"""
    patience: int | None = None
    """stop after this many evaluations without a better dev metric"""
    zero_shot: bool = True
    """also score the unmodified bare model on the test split with the same template (before training, so a baseline that changes the model's weights cannot leak into it)"""
    seed: int = 0
    """seeds initialisation, data order and dropout"""
    precision: str = field(default="auto", metadata={"choices": ["auto", "fp32", "bf16", "float32", "bfloat16"]})
    """the base model's autocast: bf16 (bfloat16) or fp32 (float32); the soft-prompt generator always computes in fp32; auto = bf16 on a GPU with bf16 or a CPU where native bf16 beats fp32 (AMX; AVX512-BF16 if a timed matmul says so), else fp32 (the names are lopa serve --dtype's)"""
    threads: int | None = None
    """torch CPU threads for this run (default: torch's own, one per core); on a shared machine, give each concurrent run its share. Recorded with the run: a resume with another count could round differently, so it must match"""
    resume: bool = False
    """continue the run in --out from its newest checkpoint"""
    overwrite: bool = False
    """delete a previous run in --out first"""
    dry_run: bool = False
    """print the model summary and trainable parameter count, then exit"""
    progress: bool = True
    """show a progress bar"""
    options: dict[str, Any] = field(default_factory=dict, metadata={"cli": False})
    """the method's own settings: fields of its config (e.g. rank, hidden_size, init for lopa)"""

    def __post_init__(self) -> None:
        get_method(self.method)  # a clear error that lists the known methods
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        if self.warmup_steps < 0:
            raise ValueError("--warmup-steps must be >= 0")
        if self.lr is not None and not 0 < self.lr < 1:
            raise ValueError(f"--lr must be in (0, 1), got {self.lr}")
        from .hardware import fast_precision, precision_name
        if precision_name(self.precision) == "float16":
            raise ValueError("--precision float16 is not offered for training (it needs loss scaling): use bf16 or fp32")
        # recorded resolved and short, so a resumed run on another machine keeps it
        self.precision = fast_precision() if self.precision == "auto" else {"float32": "fp32", "bfloat16": "bf16"}.get(
            self.precision, self.precision)
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other")
        if self.out is None:
            slug = Path(self.task).stem if self.task.endswith((".jsonl", ".csv")) else self.task.split("/")[-1]
            self.out = str(Path("runs") / f"{slug}-{self.method}")
        self.method_config()  # range errors (rank, m, ...) surface before anything loads

    @classmethod
    def from_flat(cls, **kwargs: Any) -> "TrainArgs":
        """Run settings and the method's own settings in one flat list of keywords.

        >>> args = TrainArgs.from_flat(method="lopt-2", activation="relu", max_steps=5, precision="fp32")
        >>> args.options, args.method_config().activation
        ({'activation': 'relu'}, 'relu')
        """
        own = {f.name for f in dataclasses.fields(cls)}
        run = {k: v for k, v in kwargs.items() if k in own}
        options = {**run.pop("options", {}), **{k: v for k, v in kwargs.items() if k not in own}}
        return cls(**run, options=options)

    @staticmethod
    def method_options(method: str) -> type:
        """The dataclass whose fields are ``method``'s own options (for the command line)."""
        return get_method(method)[0]

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else get_method(self.method)[0].default_lr

    def method_config(self) -> MethodConfig:
        try:
            return make_config(self.method, **{**self.options, "seed": self.seed})
        except (ConfigError, TypeError) as e:
            raise ValueError(str(e)) from None


def load_task(args: TrainArgs) -> Task:
    return get_task(args.task, data_dir=args.data_dir, template=args.template, label_words=args.label_words,
                    seed=0, target_template=args.target_template, chat_template=args.chat_template,
                    system_prompt=args.system_prompt, split_map=args.split_map, max_length=args.max_length)


def build_model(args: TrainArgs, base: Any, tokenizer: Any, task: Task) -> Any:
    from .model import build_model as wrap
    return wrap(base, tokenizer, args.method_config(), task={**task.settings(), "data_dir": args.data_dir})


def _prepare_out(args: TrainArgs) -> Path:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if args.overwrite:
            shutil.rmtree(out)
        elif not args.resume:
            what = "another run" if (out / RUN_CONFIG).exists() else "other files"
            raise ValueError(f"{out} holds {what}: pass --resume to continue it, --overwrite to replace it, "
                             f"or choose another --out")
        elif (out / RUN_CONFIG).exists():
            before = json.loads((out / RUN_CONFIG).read_text())
            now = dataclasses.asdict(args)
            changed = sorted(k for k in now if k not in RESUMABLE and before.get(k) != now[k])
            if changed:
                raise ValueError(f"--resume with settings different from the run in {out}: {changed} "
                                 f"(was {[before.get(k) for k in changed]}); resume with the same settings")
    elif args.resume:
        raise ValueError(f"--resume: {out} holds no run to resume")
    return out


def _check_task(task: Task, tokenizer: Any, args: TrainArgs) -> dict[str, list]:
    if isinstance(task, GenerationTask):
        task.prepare(tokenizer)  # the model's text, and the length limit, need the tokenizer
    splits = {name: task.split(name) for name in ("train", "dev", "test") if name in task.splits()}
    if "train" not in splits:
        raise TaskError(f"task {task.name!r} has no train split: it can only be evaluated (lopa eval)")
    if "dev" not in splits:  # carve a seeded dev split out of train
        train = list(splits["train"])
        random.Random(args.seed).shuffle(train)
        k = max(1, min(500, len(train) // 10))
        splits["dev"], splits["train"] = train[:k], train[k:]
    if task.kind == "classification":
        from .prefix import label_token_ids
        label_token_ids(tokenizer, task.label_words)
    return splits


def _schedule(args: TrainArgs) -> Any:
    def factor(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / (args.warmup_steps + 1)
        if args.schedule == "constant":
            return 1.0
        return max(0.0, (args.max_steps - step) / max(1, args.max_steps - args.warmup_steps))
    return factor


def _order(n: int, seed: int, epoch: int) -> list[int]:
    idx = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(idx)
    return idx


def micro_batch(n: int, seed: int, micro_step: int, size: int) -> list[int]:
    """Indices of micro-batch ``micro_step``: a pure function of the step, so a resumed run sees the
    same data as one that never stopped."""
    start = micro_step * size
    out = []
    while len(out) < size:
        epoch, pos = divmod(start + len(out), n)
        order = _order(n, seed, epoch)
        take = min(size - len(out), n - pos)
        out.extend(order[pos:pos + take])
    return out


def _plot(out: Path, history: list[dict[str, Any]], metric_name: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [h for h in history if "loss" in h]
    dev = [h for h in history if "dev" in h]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot([h["step"] for h in train], [h["loss"] for h in train])
    a.set(xlabel="step", ylabel="training loss", title="loss")
    b.plot([h["step"] for h in dev], [h["dev"] for h in dev], marker="o")
    b.set(xlabel="step", ylabel=f"dev {metric_name}", title=f"dev {metric_name}")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=80)
    plt.close(fig)


@dataclass
class _Run:
    """What one training run holds while it runs (built by :func:`_setup`)."""

    args: TrainArgs
    out: Path
    task: Task
    splits: dict[str, list]
    accelerator: Any
    base: Any
    tokenizer: Any
    model: Any
    inner: Any
    optimizer: Any
    scheduler: Any
    label_ids: list[int] | None
    metric_name: str
    state: dict[str, Any] = field(default_factory=lambda: {"best": -math.inf, "best_step": 0, "bad_evals": 0,
                                                          "elapsed_s": 0.0})
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def dev_set(self) -> list:
        dev = self.splits["dev"]
        return dev[:self.args.eval_limit] if self.args.eval_limit else dev

    def log(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        if self.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")


def train(args: TrainArgs) -> dict[str, Any]:
    """Run training end to end; returns the results (also written to ``results.json``)."""
    run = _setup(args)
    if isinstance(run, dict):  # --dry-run
        return run
    _resume(run)
    _warm_encoder(run)
    _fit(run)
    return _finish(run)


def _setup(args: TrainArgs) -> "_Run | dict[str, Any]":
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from .models import load_base

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = _prepare_out(args)
    task = load_task(args)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    base, tokenizer = load_base(args.model)
    splits = _check_task(task, tokenizer, args)  # every data error is raised before training starts
    args.method_config().check_task(task.settings())  # and a setting the task cannot take, before zero-shot
    metric_name = resolve_dev_metric(task, args.dev_metric)
    main = accelerator.is_main_process
    if not args.dry_run and main:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_CONFIG).write_text(json.dumps(dataclasses.asdict(args), indent=2) + "\n")
        if args.zero_shot and args.test and "test" in splits:
            _zero_shot(out, base, tokenizer, task, args)  # the base is still unmodified here
    set_seed(args.seed)
    model = build_model(args, base, tokenizer, task)
    if main:
        print(f"method: {args.method}  task: {task.name} ({task.kind})  splits: "
              + ", ".join(f"{k} {len(v)}" for k, v in splits.items()), file=sys.stderr)
        print(describe_task(task), file=sys.stderr)
    if args.dry_run:
        if main:
            print(model)
            model.print_trainable_parameters()
        return {"trainable_params": model.num_trainable_parameters()}
    lr = args.learning_rate
    groups = [{"params": g["params"], "lr": lr * g["lr_scale"]} for g in model.trainable_param_groups() if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(args))
    # the scheduler stays unwrapped: accelerate would step it once per process, but our steps are global
    model, optimizer = accelerator.prepare(model, optimizer)
    label_ids = None
    if task.kind == "classification":
        from .prefix import label_token_ids
        label_ids = label_token_ids(tokenizer, task.label_words)
    return _Run(args, out, task, splits, accelerator, base, tokenizer, model, accelerator.unwrap_model(model),
                optimizer, scheduler, label_ids, metric_name)


def _zero_shot(out: Path, base: Any, tokenizer: Any, task: Task, args: TrainArgs) -> None:
    """Score the bare model once per run, before any method can change its weights in place (PEFT
    injects LoRA into the base; full fine-tuning trains it), and keep the score for --resume."""
    path = out / ZERO_SHOT
    if path.exists():
        return
    from .baselines import BaselineModel
    path.write_text(json.dumps(_final_scores(BaselineModel(base, tokenizer), task, args)) + "\n")


def _resume(run: _Run) -> None:
    """Continue from the newest checkpoint (``--resume``) and drop what was logged after it."""
    if run.args.resume and (ck := checkpoint.load_resumable(
            run.out / "checkpoints", max_steps=run.args.max_steps, weights=run.inner.trainable_state_dict(),
            optimizer=run.optimizer, trainer={**run.state, "scheduler": run.scheduler.state_dict()},
            log=lambda msg: run.main and print(msg, file=sys.stderr))) is not None:
        run.inner.load_trainable_state_dict(ck.weights)
        run.optimizer.load_state_dict(ck.optimizer)
        run.scheduler.load_state_dict(ck.trainer.pop("scheduler"))
        torch.set_rng_state(ck.trainer.pop("torch_rng"))
        run.state.update(ck.trainer)
        run.step = ck.step
    metrics_path = run.out / "metrics.jsonl"
    if metrics_path.exists():
        run.history = [h for h in map(json.loads, metrics_path.read_text().splitlines()) if h["step"] <= run.step]
        if run.main:
            metrics_path.write_text("".join(json.dumps(h) + "\n" for h in run.history))


def _warm_encoder(run: _Run) -> None:
    """Encode every text this run will touch once now, in a fixed order: a feature must not depend on
    which texts shared its encoder batch, or a resumed run would drift from an unbroken one."""
    encoder, args = getattr(run.inner, "encoder", None), run.args
    if encoder is None:
        return
    train_set, global_batch = run.splits["train"], args.batch_size * run.accelerator.num_processes
    used = {i for s in range(args.max_steps * args.grad_accum)
            for i in micro_batch(len(train_set), args.seed, s, global_batch)}
    texts = [train_set[i].prompt for i in used] + [e.prompt for e in run.dev_set]
    if args.test:
        texts += [e.prompt for e in run.splits.get("test", [])[:args.test_limit]]
    encoder.warm(sorted(set(texts), key=lambda t: (len(t), t)))


def _train_step(run: _Run) -> float:
    args, rank = run.args, run.accelerator.process_index
    train_set, global_batch = run.splits["train"], args.batch_size * run.accelerator.num_processes
    loss_sum = 0.0
    for micro in range(args.grad_accum):
        idx = micro_batch(len(train_set), args.seed, run.step * args.grad_accum + micro, global_batch)
        rows = [train_set[i] for i in idx[rank * args.batch_size:(rank + 1) * args.batch_size]]
        texts = [r.prompt for r in rows]
        with autocast(args.precision):
            if run.label_ids is not None:
                loss = run.model(texts, label_ids=torch.tensor([run.label_ids[r.label] for r in rows]))
            else:
                loss = run.model(texts, **generation_inputs(rows))
        run.accelerator.backward(loss / args.grad_accum)
        loss_sum += float(loss.detach()) / args.grad_accum
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return loss_sum


def _dev_metric(run: _Run) -> float:
    return dev_score(run.inner, run.task, run.dev_set, run.metric_name, run.args.batch_size, run.args.precision,
                     samples=3 if run.main else 0)


def _fit(run: _Run) -> None:
    from tqdm.auto import tqdm
    args, state = run.args, run.state
    bar = tqdm(total=args.max_steps, initial=run.step, desc=f"{args.method} on {run.task.name}", file=sys.stderr,
               disable=not (args.progress and run.main), dynamic_ncols=True)
    run.model.train()
    t0, running, seen, last_dev = time.time() - state["elapsed_s"], 0.0, 0, None
    while run.step < args.max_steps:
        running += _train_step(run)
        seen += 1
        bar.update(1)
        bar.set_postfix(loss=f"{running / seen:.4f}", **({"dev": f"{last_dev:.4f}"} if last_dev is not None else {}))
        if run.step % args.eval_every == 0 or run.step == args.max_steps:
            last_dev = _dev_metric(run)
            _evaluated(run, last_dev, running / seen, time.time() - t0)
            running, seen = 0.0, 0
            if args.patience is not None and state["bad_evals"] >= args.patience:
                bar.write(f"early stop at step {run.step}: no better dev {run.metric_name} in {args.patience} evaluations")
                break
    bar.close()
    state["train_s"] = round(time.time() - t0, 1)
    run.accelerator.wait_for_everyone()


def _evaluated(run: _Run, dev: float, loss: float, elapsed_s: float) -> None:
    """Keep the best artifact, log the evaluation and write a checkpoint."""
    state = run.state
    if dev > state["best"]:
        state.update(best=dev, best_step=run.step, bad_evals=0)
        if run.main:
            run.inner.save_pretrained(run.out / "best")
    else:
        state["bad_evals"] += 1
    state["elapsed_s"] = elapsed_s
    run.log({"step": run.step, "loss": loss, "lr": run.scheduler.get_last_lr()[0], "dev": dev,
             "dev_metric": run.metric_name, "elapsed_s": round(elapsed_s, 2)})
    if run.main:
        checkpoint.save(run.out / "checkpoints", run.step, run.inner.trainable_state_dict(),
                        run.optimizer.state_dict(), {**state, "scheduler": run.scheduler.state_dict()})
    run.accelerator.wait_for_everyone()


def _finish(run: _Run) -> dict[str, Any]:
    """Score the best checkpoint on test, next to the zero-shot score taken before training."""
    args, state, metric_name = run.args, run.state, run.metric_name
    results: dict[str, Any] = {"method": args.method, "task": run.task.name, "steps": run.step,
                               "best_step": state["best_step"], f"best_dev_{metric_name}": state["best"],
                               "trainable_params": run.inner.num_trainable_parameters(),
                               "train_s": state.get("train_s", 0.0)}
    if not run.main:
        return results
    _plot(run.out, run.history, metric_name)
    if args.test and "test" in run.splits:
        scored_as_trained = get_method(args.method)[0].scored_as_trained
        best = run.inner if scored_as_trained else load_run_model(run.out, run.base, run.tokenizer)
        results["test"] = _final_scores(best, run.task, args)
        if (run.out / ZERO_SHOT).exists():
            results["zero_shot"] = json.loads((run.out / ZERO_SHOT).read_text())
            results.update(_paired_with_zero_shot(run.task, results["test"], results["zero_shot"], run.metric_name))
        _write_predictions(run, results)
    (run.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _write_predictions(run: _Run, results: dict[str, Any]) -> None:
    """Move the per-item results out of results.json into predictions.json, so two runs scored on the
    same items can be compared pairwise (classification: predicted classes and the labels)."""
    keys = ("predictions", *(f"{m}_items" for m in ITEM_METRICS))
    preds: dict[str, Any] = {}
    for name in ("test", "zero_shot"):
        r = results.get(name) or {}
        for k in keys:
            if k in r:
                value = r.pop(k)
                if k == "predictions":
                    preds[name] = value
                else:
                    preds.setdefault(f"{name}_items", {})[k[:-len("_items")]] = value
    if "test" in preds:
        preds["labels"] = [e.label for e in run.task.split("test")[:results["test"]["n"]]]
    if preds:
        (run.out / PREDICTIONS).write_text(json.dumps(preds) + "\n")


def _final_scores(model: Any, task: Task, args: TrainArgs) -> dict[str, Any]:
    gen = {} if task.kind == "classification" else {"max_new_tokens": 128, "ks": (1,)}
    return score(model, task, "test", limit=args.test_limit, precision=args.precision, progress=args.progress,
                 keep_predictions=True, **gen)


def _per_item(task: Task, res: dict[str, Any]) -> dict[str, list[float]]:
    """Each item's score under every metric that has one: accuracy (classification) or ITEM_METRICS."""
    if "predictions" in res:
        labels = [e.label for e in task.split("test")[:res["n"]]]
        return {"accuracy": [float(p == y) for p, y in zip(res["predictions"], labels)]}
    return {m: res[f"{m}_items"] for m in ITEM_METRICS if f"{m}_items" in res}


def _paired_with_zero_shot(task: Task, test: dict[str, Any], zero_shot: dict[str, Any],
                           dev_metric: str | None = None) -> dict[str, Any]:
    """The trained model minus the zero-shot model on the same test items, with a paired 95% interval:
    ``{"vs_zero_shot": {"metric", "difference", "ci95"}}`` for the headline metric (the dev metric the
    user chose where the test split has it per item, e.g. exact match; else accuracy, pass@1 or
    ROUGE-L), and ``"vs_zero_shot_by_metric"`` for each per-item metric of a generation task."""
    a, b = _per_item(task, test), _per_item(task, zero_shot)
    diffs = {}
    for m in a:
        if m in b and len(a[m]) == len(b[m]) > 0:
            d, lo, hi = paired_difference_ci95(a[m], b[m])
            diffs[m] = {"metric": m, "difference": d, "ci95": [lo, hi]}
    if not diffs:
        return {}
    headline = next(m for m in (dev_metric, *HEADLINE, *diffs) if m in diffs)
    out: dict[str, Any] = {"vs_zero_shot": diffs[headline]}
    if task.kind != "classification":
        out["vs_zero_shot_by_metric"] = diffs
    return out


def train_cli(args: TrainArgs) -> int:
    try:
        results = train(args)
    except (TaskError, ValueError, FileNotFoundError) as e:
        print(f"lopa train: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    test, zs = results.get("test"), results.get("zero_shot")
    if test:
        vs = results.get("vs_zero_shot") or {}
        key = vs["metric"] if vs.get("metric") in test else next(k for k in HEADLINE if k in test)
        line = f"test {key}: {test[key]:.4f}"
        if "macro_f1" in test:
            line += f"  macro-F1: {test['macro_f1']:.4f}"
        if zs:
            line += f"  |  zero-shot {key}: {zs[key]:.4f}"
        if vs and vs.get("metric", key) == key:
            lo, hi = vs["ci95"]
            line += (f"  |  {100 * vs['difference']:+.1f} points over zero-shot "
                     f"(paired 95% CI {100 * lo:+.1f} to {100 * hi:+.1f})")
        line += f"  |  trainable params: {results['trainable_params']:,d}  train time: {results['train_s']:.0f}s"
        print(line)
    print(json.dumps({k: v for k, v in results.items()}))
    return 0
