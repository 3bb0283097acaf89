"""Scoring a model on a task: label-word classification, or generation checked in the sandbox.

``lopa eval RUN_DIR`` reloads the run's artifact and task settings (template, label words, data dir);
``lopa eval --zero-shot --model M --task T`` scores the bare model with the same template.

Example::

    $ lopa eval runs/rotten-tomatoes-lopa --split test
    {"task": "rotten-tomatoes", "split": "test", "n": 1000, "accuracy": 0.85, "macro_f1": 0.85, ...}
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .hardware import PRECISION_CHOICES, autocast, precision_name
from .rundir import load_run_model, run_precision
from .tasks import Example, GenerationTask, Task, generation_inputs, get_task
from .tasks.metrics import (accuracy, exact_match, macro_f1, mean_ci95, pass_at_k, perplexity,
                            proportion_ci95, rouge_l)

def _batches_by_length(examples: Sequence[Example], batch_size: int) -> list[list[int]]:
    # similar lengths together waste less compute on padding; results are put back in input order
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def evaluate_classification(model: Any, examples: Sequence[Example], label_words: Sequence[str],
                            batch_size: int = 32, precision: str = "fp32", progress: bool = False,
                            desc: str = "eval") -> dict[str, Any]:
    """Accuracy and macro-F1 of ``model.classify`` (argmax over the label words)."""
    was_training = model.training
    model.eval()
    preds = [0] * len(examples)
    batches = _batches_by_length(examples, batch_size)
    with autocast(precision):
        for idx in tqdm(batches, desc=desc, disable=not progress, leave=False, file=sys.stderr):
            logp = model.classify([examples[i].prompt for i in idx], label_words)
            for i, p in zip(idx, logp.argmax(-1).tolist()):
                preds[i] = p
    model.train(was_training)
    labels = [e.label for e in examples]
    correct = sum(p == y for p, y in zip(preds, labels))
    _, lo, hi = proportion_ci95(correct, len(examples))
    return {"n": len(examples), "accuracy": accuracy(preds, labels),
            "accuracy_ci95": [lo, hi], "macro_f1": macro_f1(preds, labels),
            "predictions": preds}


@torch.no_grad()
def generation_dev_loss(model: Any, examples: Sequence[Example], batch_size: int = 8,
                        precision: str = "fp32") -> float:
    """Mean target-token loss: the cheap dev metric for generation tasks during training."""
    was_training = model.training
    model.eval()
    total = 0.0
    with autocast(precision):
        for idx in _batches_by_length(examples, batch_size):
            total += float(model([examples[i].prompt for i in idx], **generation_inputs([examples[i] for i in idx]))) * len(idx)
    model.train(was_training)
    return total / max(len(examples), 1)


def _trained_tokens(tokenizer: Any, e: Example) -> int:
    """How many tokens of a row the loss covers: its target, the EOS after it, earlier assistant turns."""
    n = len(tokenizer(e.target or "", add_special_tokens=False)["input_ids"]) + 1
    if e.meta.get("loss_spans"):
        from .prompt_format import token_loss_mask
        n += sum(token_loss_mask(tokenizer, e.prompt, e.meta["loss_spans"]))
    return n


@torch.no_grad()
def completion_log_likelihood(model: Any, examples: Sequence[Example], batch_size: int = 8,
                              precision: str = "fp32") -> tuple[float, int]:
    """Total log-likelihood of the trained tokens (completions + EOS) and their count.

    Batches group rows of similar total length, so padding stays small.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt) + len(examples[i].target or ""))
    total, count = 0.0, 0
    with autocast(precision):
        for b in range(0, len(order), batch_size):
            rows = [examples[i] for i in order[b:b + batch_size]]
            n = sum(_trained_tokens(model.tokenizer, e) for e in rows)
            total -= float(model([e.prompt for e in rows], **generation_inputs(rows))) * n
            count += n
    model.train(was_training)
    return total, count


@torch.no_grad()
def decode_completions(model: Any, task: Task, examples: Sequence[Example], *, max_new_tokens: int = 128,
                       batch_size: int = 8, precision: str = "fp32", progress: bool = False) -> list[str]:
    """Greedy completions, cut at the task's stop strings (EOS ends them otherwise)."""
    was_training = model.training
    model.eval()
    outs = [""] * len(examples)
    with autocast(precision):
        for idx in tqdm(_batches_by_length(examples, batch_size), desc="generate", disable=not progress,
                        leave=False, file=sys.stderr):
            texts = model.generate([examples[i].prompt for i in idx], max_new_tokens=max_new_tokens,
                                   stop=task.stop or None)
            for i, o in zip(idx, texts):
                outs[i] = task.postprocess(o)
    model.train(was_training)
    return outs


def print_samples(examples: Sequence[Example], completions: Sequence[str], k: int = 3, width: int = 160) -> None:
    """A few generations beside their references, on stderr (between a progress bar's updates)."""
    def short(t: str) -> str:
        t = t.replace("\n", "\\n")
        return t if len(t) <= width else t[:width - 3] + "..."
    for e, c in list(zip(examples, completions))[:k]:
        tqdm.write(f"  prompt    ...{short(e.prompt[-80:])}\n  generated {short(c)}\n  reference {short(e.target or '')}",
                   file=sys.stderr)


def evaluate_text_generation(model: Any, task: Task, examples: Sequence[Example], *, max_new_tokens: int = 128,
                             batch_size: int = 8, precision: str = "fp32", progress: bool = False,
                             samples: int = 3, results_path: str | Path | None = None,
                             **_ignored: Any) -> dict[str, Any]:
    """A generation user task scored against its references: mean completion log-likelihood per token
    and perplexity (teacher-forced), then greedy decoding scored by exact match and ROUGE-L, each with
    a 95% interval; ``samples`` generations are printed beside their references."""
    started = time.time()
    ll, n_tok = completion_log_likelihood(model, examples, batch_size, precision)
    outs = decode_completions(model, task, examples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              precision=precision, progress=progress)
    refs = [e.target or "" for e in examples]
    em, rl = exact_match(outs, refs), rouge_l(outs, refs)
    if samples:
        print_samples(examples, outs, samples)
    if results_path is not None:
        Path(results_path).parent.mkdir(parents=True, exist_ok=True)
        with open(results_path, "w") as f:
            for e, o, m, r in zip(examples, outs, em, rl):
                f.write(json.dumps({"row": e.meta.get("row"), "completion": o, "reference": e.target,
                                    "exact_match": m, "rouge_l": r}) + "\n")
    _, em_lo, em_hi = proportion_ci95(sum(em), len(em))
    rl_mean, rl_lo, rl_hi = mean_ci95(rl)
    return {"n": len(examples), "completion_tokens": n_tok, "mean_log_likelihood": ll / n_tok,
            "perplexity": perplexity(ll, n_tok), "exact_match": sum(em) / len(em), "exact_match_ci95": [em_lo, em_hi],
            "rouge_l": rl_mean, "rouge_l_ci95": [rl_lo, rl_hi], "exact_match_items": em, "rouge_l_items": rl,
            "generate_s": round(time.time() - started, 2)}


# generation metrics scored per item, so two models on the same items can be compared pairwise
ITEM_METRICS = ("pass@1", "exact_match", "rouge_l")

DEV_METRICS = ("auto", "accuracy", "macro_f1", "loss", "log_likelihood", "exact_match", "rouge_l")


def resolve_dev_metric(task: Task, name: str = "auto") -> str:
    """The dev metric a run selects its best checkpoint by (higher is better; ``loss`` is logged as
    ``neg_loss``): ``auto`` is accuracy for classification and the dev loss for generation.

    >>> from lopa.tasks import get_task
    >>> resolve_dev_metric(get_task("mbpp", data_dir="."), "auto")
    'neg_loss'
    >>> resolve_dev_metric(get_task("mbpp", data_dir="."), "accuracy")
    Traceback (most recent call last):
    ...
    ValueError: --dev-metric accuracy does not apply to generation task 'mbpp'; choose from auto, loss, log_likelihood, exact_match, rouge_l
    >>> resolve_dev_metric(get_task("mbpp", data_dir="."), "rouge_l")   # built-in code tasks have references too
    'rouge_l'
    """
    cls_metrics, gen_metrics = ("accuracy", "macro_f1"), ("loss", "log_likelihood", "exact_match", "rouge_l")
    if name not in DEV_METRICS:
        raise ValueError(f"--dev-metric must be one of {', '.join(DEV_METRICS)}, got {name!r}")
    allowed = cls_metrics if task.kind == "classification" else gen_metrics
    if name == "auto":
        return "accuracy" if task.kind == "classification" else "neg_loss"
    if name not in allowed:
        raise ValueError(f"--dev-metric {name} does not apply to {task.kind} task {task.name!r}; "
                         f"choose from auto, {', '.join(allowed)}")
    return "neg_loss" if name == "loss" else name


def dev_score(model: Any, task: Task, examples: Sequence[Example], metric: str, batch_size: int = 8,
              precision: str = "fp32", samples: int = 3, max_new_tokens: int = 64) -> float:
    """One dev evaluation during training: ``metric`` (from :func:`resolve_dev_metric`, higher is
    better). For a generation user task a few greedy samples are printed beside their references."""
    if task.kind == "classification":
        res = evaluate_classification(model, examples, task.label_words, 32, precision)
        return res[metric]
    if metric in ("exact_match", "rouge_l"):
        outs = decode_completions(model, task, examples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                  precision=precision)
        refs = [e.target or "" for e in examples]
        items = exact_match(outs, refs) if metric == "exact_match" else rouge_l(outs, refs)
        if samples:
            print_samples(examples, outs, samples)
        return sum(items) / len(items)
    if samples and isinstance(task, GenerationTask):
        print_samples(examples, decode_completions(model, task, examples[:samples], max_new_tokens=max_new_tokens,
                                                   batch_size=batch_size, precision=precision), samples)
    if metric == "log_likelihood":
        ll, n = completion_log_likelihood(model, examples, batch_size, precision)
        return ll / n
    return -generation_dev_loss(model, examples, batch_size, precision)


@torch.no_grad()
def evaluate_generation(model: Any, task: Task, examples: Sequence[Example], *, n_samples: int = 1,
                        temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 128,
                        batch_size: int = 8, ks: Sequence[int] = (1,), timeout_s: float = 10.0,
                        memory_mb: int = 512, precision: str = "fp32", seed: int = 0, progress: bool = False,
                        results_path: str | Path | None = None) -> dict[str, Any]:
    """Decode (greedy when temperature is 0), run each program in the sandbox, report pass@k.

    With one sample per problem the result also holds ``pass@1_ci95``, the 95% Wilson interval.
    """
    from .sandbox import run_many
    was_training = getattr(model, "training", False)
    model.eval()
    do_sample = temperature > 0
    completions: list[list[str]] = [[] for _ in examples]
    started = time.time()
    batches = _batches_by_length(examples, batch_size)
    # greedy decoding gives every sample the same text: decode once, then copy
    decodes = n_samples if do_sample else 1
    with autocast(precision):
        for s in range(decodes):
            for idx in tqdm(batches, desc=f"generate {s + 1}/{n_samples}", disable=not progress, leave=False,
                            file=sys.stderr):
                outs = model.generate([examples[i].prompt for i in idx], max_new_tokens=max_new_tokens,
                                      do_sample=do_sample, temperature=temperature or 1.0, top_p=top_p,
                                      stop=task.stop or None, seed=seed + s * 100_003 + idx[0])
                for i, o in zip(idx, outs):
                    completions[i].append(task.postprocess(o))
    model.train(was_training)
    if decodes < n_samples:
        completions = [cs * n_samples for cs in completions]
    gen_s = time.time() - started
    programs = [task.program(e, c) for e, cs in zip(examples, completions) for c in cs]
    results = run_many(programs, timeout_s=timeout_s, memory_mb=memory_mb)
    run_s = time.time() - started - gen_s
    rows, passed = [], []
    for j, (e, cs) in enumerate(zip(examples, completions)):
        rs = results[j * n_samples:(j + 1) * n_samples]
        c = sum(r.passed for r in rs)
        passed.append(c)
        rows.append({"id": e.meta.get("id", e.meta.get("task_id", j)), "completions": cs,
                     "status": [r.status for r in rs], "passed": c, "n": len(rs)})
    if results_path is not None:
        Path(results_path).parent.mkdir(parents=True, exist_ok=True)
        with open(results_path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    out: dict[str, Any] = {"n": len(examples), "samples_per_problem": n_samples,
                           "generate_s_per_problem": gen_s / max(len(examples), 1),
                           "sandbox_s_per_problem": run_s / max(len(examples), 1)}
    for k in ks:
        if k <= n_samples:
            out[f"pass@{k}"] = sum(pass_at_k(n_samples, c, k) for c in passed) / max(len(passed), 1)
    if n_samples == 1 and passed:
        out["pass@1_ci95"] = list(proportion_ci95(sum(passed), len(passed))[1:])
        out["pass@1_items"] = [float(c) for c in passed]  # for paired comparisons on the same problems
    return out


def score(model: Any, task: Task, split: str, *, limit: int | None = None, batch_size: int = 32,
          precision: str = "fp32", progress: bool = True, keep_predictions: bool = False,
          **gen: Any) -> dict[str, Any]:
    """Evaluate on one split of a task; the dict is what ``lopa eval`` prints. ``keep_predictions``
    keeps the per-item results for paired comparisons: a classification's predicted class indices under
    ``"predictions"``, a generation's ``ITEM_METRICS`` scores under ``"<metric>_items"``."""
    examples = task.split(split)[:limit] if limit else task.split(split)
    started = time.time()
    if task.kind == "classification":
        res = evaluate_classification(model, examples, task.label_words, batch_size, precision, progress)
        if not keep_predictions:
            res.pop("predictions")
    elif isinstance(task, GenerationTask):
        res = evaluate_text_generation(model, task, examples, batch_size=min(batch_size, 8), precision=precision,
                                       progress=progress, **gen)
        if not keep_predictions:
            res.pop("exact_match_items"), res.pop("rouge_l_items")
    else:
        res = evaluate_generation(model, task, examples, batch_size=batch_size, precision=precision,
                                  progress=progress, **gen)
        if not keep_predictions:
            res.pop("pass@1_items", None)
    return {"task": task.name, "split": split, **res, "eval_s": round(time.time() - started, 2)}


def write_predictions(path: str | Path, predictions: list[int], examples: list[Example]) -> None:
    """A classification's per-item results as JSONL: ``{"item", "prediction", "label", "correct"}``, in the
    split's order, so two runs scored on the same split can be compared item by item.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "preds.jsonl"
    >>> write_predictions(p, [1, 0], [Example("good. It was", label=1), Example("bad. It was", label=1)])
    >>> [json.loads(line)["correct"] for line in p.read_text().splitlines()]
    [True, False]
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i, (pred, e) in enumerate(zip(predictions, examples)):
            f.write(json.dumps({"item": i, "prediction": pred, "label": e.label, "correct": pred == e.label}) + "\n")


@dataclass
class EvalArgs:
    """Evaluate a run directory or artifact on a task split, or the bare model zero-shot.

    A run's task settings (task, template, label words, data dir) are reused unless given here.
    Prints one JSON line.
    """

    run_dir: str | None = field(default=None, metadata={"positional": True})
    """a run directory (uses its best/ artifact) or an artifact directory; omit with --zero-shot"""
    task: str | None = None
    """task name or .jsonl/.csv file (default: the run's task)"""
    split: str = "test"
    """which split to score: train, dev or test"""
    zero_shot: bool = False
    """score the bare model (no soft prompt) with the task's template, instead of a run"""
    model: str | None = None
    """base model for --zero-shot, or to override the run's recorded base model"""
    template: str | None = None
    """template override, e.g. '{text} It was'"""
    label_words: str | None = None
    """comma-separated label words, leading spaces kept, e.g. ' terrible, great'"""
    data_dir: str | None = None
    """where mbpp/, cruxeval/, glue/ live (default: the run's, $LOPA_DATA_DIR or ../shared/data)"""
    limit: int | None = None
    """score only the first N items of the split"""
    batch_size: int = 32
    """items per forward pass"""
    precision: str | None = field(default=None, metadata={"choices": list(PRECISION_CHOICES)})
    """autocast precision: auto, float32 (fp32), bfloat16 (bf16), float16 (fp16), as lopa serve --dtype (default: the run's own; else auto = bf16 where the hardware runs it faster than fp32)"""
    n_samples: int = 1
    """generation: samples per problem (pass@k for every k <= n)"""
    temperature: float = 0.0
    """generation: 0 is greedy"""
    top_p: float = 1.0
    """generation: nucleus sampling threshold"""
    max_new_tokens: int = 128
    """generation: tokens to generate at most"""
    results: str | None = None
    """write per-item results to this JSONL file, for paired comparisons of two runs on the same items
    (generation: default RUN_DIR/eval-SPLIT.jsonl; classification: only when given, one line per item with
    its predicted and gold class index)"""

    def __post_init__(self) -> None:
        if self.zero_shot == (self.run_dir is not None):
            raise ValueError("give a RUN_DIR, or --zero-shot with --model and --task (not both)")
        if self.zero_shot and not self.task:
            raise ValueError("--zero-shot needs --task")
        if self.results and Path(self.results).is_dir():  # checked before scoring, so no scoring is thrown away
            raise ValueError(f"--results takes a file; {self.results} is a folder")
        for name in ("batch_size", "n_samples", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")


def eval_cli(args: EvalArgs) -> int:
    try:
        return _eval(args)
    except (ValueError, FileNotFoundError) as e:  # a bad task (TaskError), run, artifact or data file: one line
        print(f"lopa eval: error: {e}", file=sys.stderr)
        return 2


def _eval(args: EvalArgs) -> int:
    from .models import DEFAULT_BASE, load_base
    from .tasks import task_from_settings
    if args.zero_shot:
        from .baselines import BaselineModel
        task = get_task(args.task, data_dir=args.data_dir, template=args.template, label_words=args.label_words)
        base, tok = load_base(args.model or DEFAULT_BASE)
        model = BaselineModel(base, tok)
    else:
        base = tok = None
        if args.model:
            base, tok = load_base(args.model)
        model = load_run_model(args.run_dir, base, tok)
        # the one record of the task: what the artifact (a run's best/) says, overridden by the options
        task = task_from_settings(model.task, task=args.task, data_dir=args.data_dir, template=args.template,
                                  label_words=args.label_words)
    if isinstance(task, GenerationTask):
        task.prepare(model.tokenizer)  # the same text as in training: the format is rebuilt from the settings
        print(task.describe(), file=sys.stderr)
    gen: dict[str, Any] = {}
    if isinstance(task, GenerationTask):
        default = Path(args.run_dir) / f"eval-{args.split}.jsonl" if args.run_dir else None
        gen = dict(max_new_tokens=args.max_new_tokens, results_path=args.results or default)
    elif task.kind == "generation":
        default = Path(args.run_dir) / f"eval-{args.split}.jsonl" if args.run_dir else None
        gen = dict(n_samples=args.n_samples, temperature=args.temperature, top_p=args.top_p,
                   max_new_tokens=args.max_new_tokens, ks=sorted({1, args.n_samples}),
                   results_path=args.results or default)
    precision = precision_name(args.precision or run_precision(args.run_dir) or "auto")
    per_item = task.kind == "classification" and args.results is not None
    res = score(model, task, args.split, limit=args.limit, batch_size=args.batch_size, precision=precision,
                keep_predictions=per_item, **gen)
    if per_item:
        write_predictions(args.results, res.pop("predictions"), task.split(args.split))
    res["model"] = "zero-shot " + (args.model or DEFAULT_BASE) if args.zero_shot else str(args.run_dir)
    print(json.dumps(res))
    return 0
