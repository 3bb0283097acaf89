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
from .evaluate import (DEV_METRICS, RUN_CONFIG, autocast, dev_score, load_run_model, resolve_dev_metric, score)
from .methods import METHODS, ConfigError, make_config
from .tasks import GenerationTask, Task, TaskError, describe_task, generation_inputs, get_task
from .tasks.metrics import paired_difference_ci95

BASELINES = ("lora", "full")
DEFAULT_LR = {"prompt-tuning": 3e-3, "lopt-1": 3e-3, "lopt-2": 1e-3, "idpg": 1e-3, "lopa": 1e-3,
              "lora": 5e-4, "full": 2e-5}
# settings that may change between a run and its --resume without changing the result
RESUMABLE = {"resume", "overwrite", "dry_run", "progress", "max_steps", "patience"}


@dataclass
class TrainArgs:
    """Train a soft-prompt generator (or a LoRA / full fine-tuning baseline) on a task.

    Ends by scoring the best checkpoint on the test split next to the bare model's zero-shot score.
    """

    method: str = field(default="lopa", metadata={"choices": sorted(METHODS) + list(BASELINES)})
    """the method: prompt-tuning, lopt-1, lopt-2, idpg, lopa; or lora / full (baselines)"""
    task: str = "rotten-tomatoes"
    """built-in task name (rotten-tomatoes, sst2, mrpc, rte, qnli, qqp, mnli, mbpp, cruxeval-o, ...), a .jsonl/.csv file (classification with --label-words; generation with prompt/completion or messages columns, or --target-template) or hf:OWNER/NAME"""
    model: str = "smollm2-135m"
    """base causal LM: short name, hub id or local path"""
    encoder: str | None = None
    """instance encoder for idpg/lopa: short name, hub id, path or 'self' (default minilm-l6)"""
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
    num_virtual_tokens: int = 10
    """m, soft prompt length"""
    rank: int = 4
    """r for lopt-1, lopt-2 and lopa"""
    hidden_size: int = 256
    """h, the width of the idpg/lopa heads"""
    combine: str = field(default="gate", metadata={"choices": ["gate", "add", "max", "concat"]})
    """lopa: how the task and instance parts combine"""
    gate_scale: float = 1.0
    """lopa: the gate is gate_scale * sigmoid(u v^T); 1 is the paper's, 2 starts at Z = Z_S"""
    shared_lr_scale: float = 1.0
    """lopa: learning-rate multiplier of the task-wide part Z_S"""
    init: str = field(default="vocab", metadata={"choices": ["vocab", "text", "random"]})
    """initialisation of the task-wide prompt"""
    init_text: str | None = None
    """text for --init text"""
    dropout: float = 0.1
    """dropout on encoder features (idpg, lopa)"""
    lora_r: int = 8
    """lora baseline: rank"""
    lr: float | None = None
    """peak learning rate (default per method: prompt tuning 3e-3, lopa 1e-3, lora 5e-4, full 2e-5, ...)"""
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
    patience: int | None = None
    """stop after this many evaluations without a better dev metric"""
    zero_shot: bool = True
    """also score the bare model on the test split with the same template"""
    seed: int = 0
    """seeds initialisation, data order and dropout"""
    precision: str = field(default="auto", metadata={"choices": ["auto", "fp32", "bf16"]})
    """bf16 autocast or fp32; auto = bf16 on a GPU with bf16 or a CPU where native bf16 beats fp32 (AMX; AVX512-BF16 if a timed matmul says so), else fp32"""
    resume: bool = False
    """continue the run in --out from its newest checkpoint"""
    overwrite: bool = False
    """delete a previous run in --out first"""
    dry_run: bool = False
    """print the model summary and trainable parameter count, then exit"""
    progress: bool = True
    """show a progress bar"""

    def __post_init__(self) -> None:
        known = set(METHODS) | set(BASELINES)
        if self.method not in known:
            raise ValueError(f"unknown method {self.method!r}; choose from {sorted(known)}")
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError("--warmup-steps must be >= 0")
        if self.lr is not None and not 0 < self.lr < 1:
            raise ValueError(f"--lr must be in (0, 1), got {self.lr}")
        if self.precision == "auto":  # recorded resolved, so a resumed run on another machine keeps it
            from .hardware import fast_precision
            self.precision = fast_precision()
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other")
        if self.out is None:
            slug = Path(self.task).stem if self.task.endswith((".jsonl", ".csv")) else self.task.split("/")[-1]
            self.out = str(Path("runs") / f"{slug}-{self.method}")
        if self.method in METHODS:
            self.method_config()  # range errors (rank, m, ...) surface before anything loads

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def method_config(self) -> Any:
        entry_fields = {f.name for f in dataclasses.fields(METHODS[self.method][0])}
        wanted = dict(num_virtual_tokens=self.num_virtual_tokens, rank=self.rank, hidden_size=self.hidden_size,
                      combine=self.combine, gate_scale=self.gate_scale, shared_lr_scale=self.shared_lr_scale,
                      init=self.init, init_text=self.init_text, dropout=self.dropout, seed=self.seed,
                      encoder=self.encoder or "minilm-l6")
        try:
            return make_config(self.method, **{k: v for k, v in wanted.items() if k in entry_fields})
        except ConfigError as e:
            raise ValueError(str(e)) from None


def load_task(args: TrainArgs) -> Task:
    return get_task(args.task, data_dir=args.data_dir, template=args.template, label_words=args.label_words,
                    seed=0, target_template=args.target_template, chat_template=args.chat_template,
                    system_prompt=args.system_prompt, split_map=args.split_map, max_length=args.max_length)


def build_model(args: TrainArgs, base: Any, tokenizer: Any, task: Task) -> Any:
    from .baselines import BaselineModel
    from .model import SoftPromptModel
    settings = {**task.settings(), "data_dir": args.data_dir}
    if args.method in BASELINES:
        return BaselineModel(base, tokenizer, args.method, lora_r=args.lora_r, task=settings)
    return SoftPromptModel(base, tokenizer, args.method_config(), task=settings)


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


def train(args: TrainArgs) -> dict[str, Any]:
    """Run training end to end; returns the results (also written to ``results.json``)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from .models import load_base

    out = _prepare_out(args)
    task = load_task(args)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    base, tokenizer = load_base(args.model)
    splits = _check_task(task, tokenizer, args)  # every data error is raised before training starts
    metric_name = resolve_dev_metric(task, args.dev_metric)
    if accelerator.is_main_process:
        print(describe_task(task), file=sys.stderr)
    set_seed(args.seed)
    model = build_model(args, base, tokenizer, task)
    main = accelerator.is_main_process
    if args.dry_run:
        if main:
            print(model)
            print(f"method: {args.method}  task: {task.name} ({task.kind})  splits: "
                  + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
            model.print_trainable_parameters()
        return {"trainable_params": model.num_trainable_parameters()}
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_CONFIG).write_text(json.dumps(dataclasses.asdict(args), indent=2) + "\n")

    lr = args.learning_rate
    groups = [{"params": g["params"], "lr": lr * g["lr_scale"]} for g in model.trainable_param_groups() if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(args))
    # the scheduler stays unwrapped: accelerate would step it once per process, but our steps are global
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)

    classification = task.kind == "classification"
    train_set, dev_set = splits["train"], splits["dev"][:args.eval_limit] if args.eval_limit else splits["dev"]
    label_ids = None
    if classification:
        from .prefix import label_token_ids
        label_ids = label_token_ids(tokenizer, task.label_words)
    state: dict[str, Any] = {"best": -math.inf, "best_step": 0, "bad_evals": 0, "elapsed_s": 0.0}
    start_step = 0
    if args.resume and (ck_path := checkpoint.latest(out / "checkpoints")) is not None:
        ck = checkpoint.load(ck_path)
        inner.load_trainable_state_dict(ck.weights)
        optimizer.load_state_dict(ck.optimizer)
        scheduler.load_state_dict(ck.trainer.pop("scheduler"))
        torch.set_rng_state(ck.trainer.pop("torch_rng"))
        state.update(ck.trainer)
        start_step = ck.step
    history = []
    metrics_path = out / "metrics.jsonl"
    if metrics_path.exists():  # drop what was logged after the checkpoint we resume from
        history = [h for h in map(json.loads, metrics_path.read_text().splitlines()) if h["step"] <= start_step]
        if main:
            metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history))

    def log(entry: dict[str, Any]) -> None:
        history.append(entry)
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def dev_metric() -> float:
        return dev_score(inner, task, dev_set, metric_name, args.batch_size, args.precision,
                         samples=3 if main else 0)

    nproc, rank = accelerator.num_processes, accelerator.process_index
    global_batch = args.batch_size * nproc
    if getattr(inner, "encoder", None) is not None:
        # every text this run will touch, encoded once now in a fixed order: a feature must not depend
        # on which texts shared its encoder batch, or a resumed run would drift from an unbroken one
        used = {i for s in range(args.max_steps * args.grad_accum) for i in micro_batch(len(train_set), args.seed, s, global_batch)}
        texts = [train_set[i].prompt for i in used] + [e.prompt for e in dev_set]
        texts += [e.prompt for e in splits.get("test", [])[:args.test_limit]]
        inner.encoder.encode(sorted(set(texts), key=lambda t: (len(t), t)))
    bar = tqdm(total=args.max_steps, initial=start_step, desc=f"{args.method} on {task.name}", file=sys.stderr,
               disable=not (args.progress and main), dynamic_ncols=True)
    model.train()
    t0, running, seen = time.time() - state["elapsed_s"], 0.0, 0
    step = start_step
    last_dev = None
    while step < args.max_steps:
        for micro in range(args.grad_accum):
            idx = micro_batch(len(train_set), args.seed, step * args.grad_accum + micro, global_batch)
            rows = [train_set[i] for i in idx[rank * args.batch_size:(rank + 1) * args.batch_size]]
            texts = [r.prompt for r in rows]
            with autocast(args.precision):
                if classification:
                    loss = model(texts, label_ids=torch.tensor([label_ids[r.label] for r in rows]))
                else:
                    loss = model(texts, **generation_inputs(rows))
            accelerator.backward(loss / args.grad_accum)
            running += float(loss.detach()) / args.grad_accum
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seen += 1
        bar.update(1)
        bar.set_postfix(loss=f"{running / seen:.4f}", **({"dev": f"{last_dev:.4f}"} if last_dev is not None else {}))
        if step % args.eval_every == 0 or step == args.max_steps:
            last_dev = dev_metric()
            improved = last_dev > state["best"]
            if improved:
                state.update(best=last_dev, best_step=step, bad_evals=0)
                if main:
                    inner.save_pretrained(out / "best")
            else:
                state["bad_evals"] += 1
            state["elapsed_s"] = time.time() - t0
            log({"step": step, "loss": running / seen, "lr": scheduler.get_last_lr()[0], "dev": last_dev,
                 "dev_metric": metric_name, "elapsed_s": round(state["elapsed_s"], 2)})
            running, seen = 0.0, 0
            if main:
                checkpoint.save(out / "checkpoints", step, inner.trainable_state_dict(), optimizer.state_dict(),
                                {**state, "scheduler": scheduler.state_dict()})
            accelerator.wait_for_everyone()
            if args.patience is not None and state["bad_evals"] >= args.patience:
                bar.write(f"early stop at step {step}: no better dev {metric_name} in {args.patience} evaluations")
                break
    bar.close()
    accelerator.wait_for_everyone()
    results: dict[str, Any] = {"method": args.method, "task": task.name, "steps": step,
                               "best_step": state["best_step"], f"best_dev_{metric_name}": state["best"],
                               "trainable_params": inner.num_trainable_parameters(),
                               "train_s": round(time.time() - t0, 1)}
    if main:
        _plot(out, history, metric_name)
        if "test" in splits:
            best = load_run_model(out, base, tokenizer) if args.method != "full" else inner
            results["test"] = _final_scores(best, task, args)
            if args.zero_shot:
                from .baselines import BaselineModel
                results["zero_shot"] = _final_scores(BaselineModel(base, tokenizer, "zero-shot"), task, args)
                results.update(_paired_with_zero_shot(task, results["test"], results["zero_shot"]))
            for r in (results.get("test"), results.get("zero_shot")):
                if r:
                    r.pop("predictions", None)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _final_scores(model: Any, task: Task, args: TrainArgs) -> dict[str, Any]:
    if task.kind == "classification":
        return score(model, task, "test", limit=args.test_limit, precision=args.precision, progress=args.progress,
                     keep_predictions=True)
    return score(model, task, "test", limit=args.test_limit, precision=args.precision, progress=args.progress,
                 max_new_tokens=128, ks=(1,))


def _paired_with_zero_shot(task: Task, test: dict[str, Any], zero_shot: dict[str, Any]) -> dict[str, Any]:
    """The trained model's accuracy minus the zero-shot accuracy on the same test items, with a
    paired 95% interval: ``{"vs_zero_shot": {"difference", "ci95"}}`` (classification only)."""
    if "predictions" not in test or "predictions" not in zero_shot:
        return {}
    limit = test["n"]
    labels = [e.label for e in task.split("test")[:limit]]
    d, lo, hi = paired_difference_ci95([p == y for p, y in zip(test["predictions"], labels)],
                                       [p == y for p, y in zip(zero_shot["predictions"], labels)])
    return {"vs_zero_shot": {"difference": d, "ci95": [lo, hi]}}


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
        key = next(k for k in ("accuracy", "pass@1", "rouge_l") if k in test)
        line = f"test {key}: {test[key]:.4f}"
        if "macro_f1" in test:
            line += f"  macro-F1: {test['macro_f1']:.4f}"
        if zs:
            line += f"  |  zero-shot {key}: {zs[key]:.4f}"
        vs = results.get("vs_zero_shot")
        if vs:
            lo, hi = vs["ci95"]
            line += (f"  |  {100 * vs['difference']:+.1f} points over zero-shot "
                     f"(paired 95% CI {100 * lo:+.1f} to {100 * hi:+.1f})")
        line += f"  |  trainable params: {results['trainable_params']:,d}  train time: {results['train_s']:.0f}s"
        print(line)
    print(json.dumps({k: v for k, v in results.items()}))
    return 0
