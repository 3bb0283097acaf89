"""Code: pass@1 on CRUXEval-O, the LoPA paper's headline code task, scored by running tests.

The paper (DeepSeek-Coder-1.3B) reports CRUXEval-O pass@1 of prompt tuning 31.2, LoRA 36.0 and LoPA
34.5. This benchmark measures the bare model (zero-shot), prompt tuning and LoPA on ``smollm2-135m``
(encoder ``minilm-l6``) with the same training budget, then decodes greedily on the 400-item test
split and runs every completion in the sandbox (``lopa.sandbox``): pass@1 with a 95% Wilson
interval, and the generation and sandbox seconds per problem.

Parts (``zero-shot``, then one per trained method) are recorded in ``OUT/summary.json`` as they
finish, each with a hash of its settings: rerunning the same command skips finished parts, resumes
an interrupted training run from its last checkpoint (``OUT/runs/``), and redoes a part whose
settings changed. Per-problem completions and statuses go to ``OUT/METHOD-test.jsonl``. The report is
a section of ``docs/results.md`` between ``<!-- code:start -->`` and ``<!-- code:end -->`` (the rest
of the file is kept).

Example::

    $ lopa bench code --plan        # parts to run and an estimated wall time, nothing runs
    $ lopa bench code --steps 200   # the full benchmark (results/code, docs/results.md)
    $ lopa bench code --quick       # every code path on tiny random models, into a temp folder
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from lopa.benchmarks.common import (BenchmarkParser, ResultStore, command_line, interval_verdict, machine,
                                    parse_assignments, pct, prepare_benchmark, require_positive, settings_hash,
                                    method_settings, split_list, train_or_resume, write_section)

MARK_START, MARK_END = "<!-- code:start -->", "<!-- code:end -->"
TRAINABLE = ("prompt-tuning", "lopt-1", "lopt-2", "idpg", "lopa", "lora", "full")
LABELS = {"zero-shot": "zero-shot (bare model)", "prompt-tuning": "prompt tuning", "lopt-1": "LoPT-1",
          "lopt-2": "LoPT-2", "idpg": "S-IDPG", "lopa": "LoPA", "lora": "LoRA", "full": "full fine-tuning"}
# The LoPA paper, CRUXEval-O pass@1 (%), DeepSeek-Coder-1.3B.
PAPER = {"prompt-tuning": 31.2, "lora": 36.0, "lopa": 34.5}
PAPER_MODEL = "DeepSeek-Coder-1.3B"
# Cost model for --plan, measured on this project's 2 shared CPU cores (AMD EPYC, load 3-10, one
# torch thread, bf16): a training step of batch 8 (~80 prompt + ~10 target tokens), greedy decoding
# per problem at max_new_tokens 64 and batch 8, sandbox per problem, one dev-loss item.
SPEED = {"real": dict(step_s=6.0, lopa_factor=1.15, gen_s=0.5, sandbox_s=0.1, dev_item_s=0.3, overhead_s=20.0),
         "tiny": dict(step_s=0.05, lopa_factor=1.2, gen_s=0.05, sandbox_s=0.1, dev_item_s=0.01, overhead_s=2.0)}


# --------------------------------------------------------------------------- options

QUICK = "tiny-random-llama + tiny-random-bert, 2 training steps, 4 problems, 8 new tokens"
OUTPUT = "summary.json"


def build_parser() -> BenchmarkParser:
    p = BenchmarkParser(
        "code",
        "pass@1 on a code task (default CRUXEval-O) for the bare model, prompt tuning and LoPA with the same "
        "training budget: greedy decoding, every completion run in the sandbox, 95%% Wilson intervals, seconds "
        "per problem; writes OUT/summary.json and a section of docs/results.md beside the paper's "
        "DeepSeek-Coder-1.3B numbers. Resumable: parts finished with the same settings are skipped.",
        "lopa bench code --steps 200   (the full benchmark; --plan first to see its cost)", raw=True)
    p.add_models()
    p.add_outputs("results/code", "summary.json, METHOD-test.jsonl, runs/", quick_help=QUICK)
    p.add_resumable("the docs section")
    a = p.add_argument
    a("--task", default="cruxeval-o", choices=["cruxeval-o", "cruxeval-i", "mbpp"],
      help="code task with a train split (default cruxeval-o, the paper's headline code task)")
    a("--data-dir", default=None, help="where cruxeval/ and mbpp/ live (default $LOPA_DATA_DIR or ../shared/data)")
    a("--methods", default="zero-shot,prompt-tuning,lopa",
      help="comma-separated parts: zero-shot and any of " + ", ".join(TRAINABLE)
           + " (default zero-shot,prompt-tuning,lopa)")
    p.quick("--steps", 200, 2, "training steps of every trained method: the shared budget", type=int)
    a("--batch-size", type=int, default=8, help="training examples per optimiser step (default 8)")
    a("--lr", action="append", default=[], metavar="METHOD=LR",
      help="learning rate of a method, repeatable, e.g. --lr prompt-tuning=1e-2 (default: lopa train's "
           "per-method default: prompt tuning 3e-3, lopa 1e-3, lora 5e-4, ...)")
    a("--warmup", type=float, default=0.1, help="linear warm-up as a fraction of --steps (default 0.1)")
    a("--evals", type=int, default=4,
      help="dev evaluations (target-token loss) per training run, evenly spaced; the best one's "
           "checkpoint is scored on the test split (default 4)")
    p.quick("--dev-limit", None, 8, "dev items per evaluation; the dev split is a seeded tenth of train (40 for "
                                    "CRUXEval)", type=int, shown="all")
    p.quick("--limit", None, 4, "score the first N test problems", type=int, shown="all 400")
    p.quick("--max-new-tokens", 64, 8, "tokens generated at most per problem", type=int,
            shown="64, above every CRUXEval-O answer with the SmolLM2 tokenizer")
    a("--eval-batch-size", type=int, default=8, help="problems decoded together (default 8)")
    a("--timeout", type=float, default=10.0, help="sandbox wall-clock limit per program, seconds (default 10)")
    p.quick("--m", 10, 4, "soft prompt length m of every soft-prompt method", type=int)
    a("--rank", type=int, default=4, help="r of lopt-1, lopt-2 and lopa (default 4)")
    a("--hidden", type=int, default=256, help="h, width of the idpg/lopa heads (default 256)")
    a("--lora-r", type=int, default=8, help="LoRA rank, if lora is among --methods (default 8)")
    a("--precision", choices=["fp32", "bf16"], default="bf16",
      help="bf16 autocast or fp32, for training and decoding (default bf16: about 1.5x faster training "
           "on CPUs with AVX-512 BF16)")
    a("--threads", type=int, default=1,
      help="torch CPU threads; 0 keeps torch's default (all cores). Default 1: on a shared machine, two "
           "OpenMP threads that wait for each other at every op made decoding ~10x and training ~3x "
           "slower than one thread")
    a("--seed", type=int, default=0, help="seed of initialisation, data order and dropout (default 0)")
    a("--keep-checkpoints", action="store_true",
      help="keep each training run's checkpoints/ (deleted by default once its part is recorded)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse(argv)
    args.methods = split_list(args.methods)
    for m in args.methods:
        if m != "zero-shot" and m not in TRAINABLE:
            p.error(f"--methods: unknown {m!r}; choose from zero-shot, {', '.join(TRAINABLE)}")
    if not args.methods:
        p.error("--methods names nothing")
    require_positive(p, args, ("steps", "batch_size", "evals", "max_new_tokens", "eval_batch_size", "m", "rank",
                               "hidden", "lora_r"))
    require_positive(p, args, ("dev_limit", "limit"), optional=True)
    if not 0 <= args.warmup < 1 or args.timeout <= 0 or args.threads < 0:
        p.error("--warmup must be in [0, 1), --timeout > 0, --threads >= 0")
    args.lrs = parse_assignments(p, "--lr", args.lr, TRAINABLE)
    return p.finish(args, writes=[OUTPUT])


# --------------------------------------------------------------------------- parts and their settings

def eval_settings(cfg: argparse.Namespace) -> dict[str, Any]:
    return dict(task=cfg.task, model=cfg.model, limit=cfg.limit, max_new_tokens=cfg.max_new_tokens,
                decoding="greedy", eval_batch_size=cfg.eval_batch_size, timeout_s=cfg.timeout,
                precision=cfg.precision)


def train_settings(cfg: argparse.Namespace, method: str) -> dict[str, Any]:
    """Every lopa train setting the benchmark fixes (TrainArgs fields), so the hash covers them."""
    return dict(method=method, task=cfg.task, model=cfg.model, data_dir=cfg.data_dir,
                max_steps=cfg.steps, batch_size=cfg.batch_size, grad_accum=1, lr=cfg.lrs.get(method),
                weight_decay=0.0, warmup_steps=int(round(cfg.warmup * cfg.steps)), schedule="linear",
                eval_every=max(1, math.ceil(cfg.steps / cfg.evals)), eval_limit=cfg.dev_limit,
                seed=cfg.seed, precision=cfg.precision,
                **method_settings(method, encoder=cfg.encoder, num_virtual_tokens=cfg.m, rank=cfg.rank,
                                  hidden_size=cfg.hidden, combine="gate", init="vocab", dropout=0.1, r=cfg.lora_r))


def part_settings(cfg: argparse.Namespace, method: str) -> dict[str, Any]:
    s = {"eval": eval_settings(cfg)}
    if method != "zero-shot":
        s["train"] = train_settings(cfg, method)
    return s


# --------------------------------------------------------------------------- running

def test_examples(cfg: argparse.Namespace) -> tuple[Any, list[Any]]:
    from lopa.tasks import get_task
    task = get_task(cfg.task, data_dir=cfg.data_dir)
    test = task.split("test")
    return task, test[:cfg.limit] if cfg.limit else test


def decode_and_run(cfg: argparse.Namespace, model: Any, method: str) -> dict[str, Any]:
    """Greedy completions of the test problems, run in the sandbox: pass@1, its interval, timings."""
    from lopa.evaluate import evaluate_generation
    from lopa.tasks.metrics import proportion_ci95
    task, examples = test_examples(cfg)
    results_path = Path(cfg.out) / f"{method}-test.jsonl"
    started = time.time()
    res = evaluate_generation(model, task, examples, max_new_tokens=cfg.max_new_tokens,
                              batch_size=cfg.eval_batch_size, timeout_s=cfg.timeout, precision=cfg.precision,
                              results_path=results_path)
    rows = [json.loads(line) for line in results_path.read_text().splitlines()]
    passed = sum(r["passed"] for r in rows)
    statuses: dict[str, int] = {}
    for r in rows:
        for s in r["status"]:
            statuses[s] = statuses.get(s, 0) + 1
    p, lo, hi = proportion_ci95(passed, len(rows))
    return {"n": len(rows), "passed": passed, "pass@1": p, "ci95": [lo, hi],
            "generate_s_per_problem": res["generate_s_per_problem"],
            "sandbox_s_per_problem": res["sandbox_s_per_problem"], "eval_s": round(time.time() - started, 1),
            "statuses": statuses, "empty_completions": sum(not r["completions"][0].strip() for r in rows),
            "results": results_path.name}


def run_zero_shot(cfg: argparse.Namespace) -> dict[str, Any]:
    from lopa.baselines import BaselineModel
    from lopa.models import load_base
    base, tok = load_base(cfg.model)
    return {"trainable_params": 0, **decode_and_run(cfg, BaselineModel(base, tok), "zero-shot")}


def run_trained(cfg: argparse.Namespace, method: str, h: str) -> dict[str, Any]:
    from lopa.rundir import load_run_model
    from lopa.models import load_base
    out = Path(cfg.out) / "runs" / f"{method}-{h}"
    kw = dict(train_settings(cfg, method), progress=False, zero_shot=False, test=False)  # scored below
    if (out / "run_config.json").exists():
        print(f"  {method}: " + ("training already finished" if (out / "results.json").exists() else
                                 "resuming training") + f" in {out}", flush=True)
    res, _ = train_or_resume(kw, out)
    if not cfg.keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    base, tok = load_base(cfg.model)  # fresh: LoRA would wrap a shared base in place
    model = load_run_model(out, base, tok)
    scored = decode_and_run(cfg, model, method)
    return {"trainable_params": res.get("trainable_params"), "train_s": res.get("train_s"),
            "steps": res.get("steps"), "best_step": res.get("best_step"),
            "best_dev_neg_loss": res.get("best_dev_neg_loss"), "lr": kw["lr"] or default_lr(method),
            "run_dir": str(out), **scored}


def default_lr(method: str) -> float:
    from lopa.methods import get_method
    return get_method(method)[0].default_lr


def estimate(cfg: argparse.Namespace, method: str) -> float:
    sp = SPEED["tiny" if cfg.model.startswith("tiny-") else "real"]
    n_test = cfg.limit or 400
    s = sp["overhead_s"] + n_test * (sp["gen_s"] * cfg.max_new_tokens / 64 + sp["sandbox_s"])
    if method != "zero-shot":
        step = sp["step_s"] * cfg.batch_size / 8 * (sp["lopa_factor"] if method in ("lopa", "idpg") else 1.0)
        evals = math.ceil(cfg.steps / max(1, math.ceil(cfg.steps / cfg.evals)))
        s += cfg.steps * step + evals * (cfg.dev_limit or 40) * sp["dev_item_s"]
    return s


# --------------------------------------------------------------------------- report

def per_problem(out: Path, part: dict[str, Any]) -> dict[str, float] | None:
    """A part's per-problem pass rate by problem id, from its METHOD-test.jsonl (None if it is gone)."""
    path = out / part.get("results", "")
    if not part.get("results") or not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["id"]: r["passed"] / max(r["n"], 1) for r in rows}


def verdicts(parts: dict[str, dict[str, Any]], out: Path | None = None) -> list[str]:
    """A difference is claimed only where the paired 95% interval (the same problems, per-problem
    differences) excludes zero; without the per-problem files, only where the Wilson intervals part."""
    from lopa.tasks.metrics import paired_difference_ci95
    res = []
    for a, b in [("lopa", "prompt-tuning"), ("prompt-tuning", "zero-shot"), ("lopa", "zero-shot"),
                 ("lora", "prompt-tuning"), ("lopa", "lora")]:
        if a not in parts or b not in parts:
            continue
        pa, pb = parts[a], parts[b]
        diff = 100 * (pa["pass@1"] - pb["pass@1"])
        ra, rb = (per_problem(out, pa), per_problem(out, pb)) if out is not None else (None, None)
        common = sorted(set(ra) & set(rb)) if ra and rb else []
        if len(common) >= 2:
            d, lo, hi = paired_difference_ci95([ra[i] for i in common], [rb[i] for i in common])
            ci = f"paired 95% CI {100 * lo:+.1f} to {100 * hi:+.1f} over {len(common)} problems"
            text = (f"{LABELS[a]} > {LABELS[b]}" if lo > 0 else f"{LABELS[b]} > {LABELS[a]}" if hi < 0
                    else "no difference claimed")
            res.append(f"- {LABELS[a]} − {LABELS[b]}: {diff:+.1f} points ({ci}); {text}.")
            continue
        text = interval_verdict(LABELS[a], pa["ci95"], LABELS[b], pb["ci95"])
        res.append(f"- {LABELS[a]} − {LABELS[b]}: {diff:+.1f} points; {text}.")
    return res


def render(summary: dict[str, Any]) -> str:
    parts, st, mach = summary["parts"], summary["settings"], summary["machine"]
    L = [MARK_START, f"## Code generation: {st['task']} pass@1", ""]
    L.append(f"Command: `{summary['command']}`  ")
    where = mach["cpu"] + (f" + {mach['gpu']}" if mach.get("gpu") else "")
    L.append(f"Machine: {where}, {mach['cores']} cores ({mach['torch_threads']} torch threads), "
             f"torch {mach['torch']}, Python {mach['python']}; load average at start "
             f"{mach['load_avg_at_start']} (the cores are shared, so timings are upper bounds).  ")
    wall = summary["wall_s"]
    L.append(f"Wall time: {wall['all_parts'] / 60:.1f} min over all parts "
             f"(this invocation {wall['this_invocation'] / 60:.1f} min).")
    L.append("")
    L.append(f"| method | trainable params | pass@1 (%) | 95% CI (%) | passed / n | generate s/problem | "
             f"sandbox s/problem | train s | paper, {PAPER_MODEL} (%) |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    order = list(dict.fromkeys(st["methods"] + [m for m in PAPER]))
    for m in order:
        p = parts.get(m)
        paper = f"{PAPER[m]:.1f}" if m in PAPER else "—"
        if p is None:
            if m in PAPER:
                L.append(f"| {LABELS[m]} | — | not run | | | | | | {paper} |")
            continue
        lo, hi = p["ci95"]
        train_s = f"{p['train_s']:.0f}" if p.get("train_s") is not None else "—"
        L.append(f"| {LABELS[m]} | {p['trainable_params']:,} | {pct(p['pass@1'])} | {pct(lo)}–{pct(hi)} | "
                 f"{p['passed']} / {p['n']} | {p['generate_s_per_problem']:.2f} | {p['sandbox_s_per_problem']:.2f} | "
                 f"{train_s} | {paper} |")
    L.append("")
    vs = verdicts(parts, Path(st["out"]))
    if vs:
        L += vs + [""]
    lr = ", ".join(f"{LABELS[m]} {p['lr']:g}" for m, p in parts.items() if p.get("lr") is not None)
    n_evals = math.ceil(st["steps"] / max(1, math.ceil(st["steps"] / st["evals"])))
    L.append(f"Setup: base `{st['model']}`, encoder `{st['encoder']}` (LoPA), every trained method "
             f"{st['steps']} steps × batch {st['batch_size']} (linear warm-up {st['warmup']:.0%} then decay), "
             f"m = {st['m']}, r = {st['rank']}, h = {st['hidden']}, {st['precision']}; learning rates: "
             f"{lr or 'lopa train defaults'}; the checkpoint with the lowest dev target loss "
             f"({n_evals} evaluations on a seeded tenth of train) is scored. Test: "
             f"{st['n_test']} problems, greedy decoding, at most {st['max_new_tokens']} new tokens, cut at the "
             f"task's stop strings; each completion runs in the sandbox (separate process, {st['timeout']:g} s, "
             f"no network) and passes when the program exits 0.")
    L.append("")
    L.append(f"Prompt (CRUXEval-O): the function's code, then `assert f(<input>) == `; the model writes the "
             f"output and the program checks `assert f(<input>) == (<completion>)`. Per-problem completions "
             f"and statuses: `{st['out']}/METHOD-test.jsonl`.")
    L.append("")
    L.append(f"Caveats: the paper's numbers come from {PAPER_MODEL}, a code model (ten times the size of "
             f"SmolLM2-135M) trained for longer; ours come from `{st['model']}` on a CPU budget, so compare the "
             f"ordering of the methods, not the levels. The Wilson interval covers test-set sampling only "
             f"(one seed).")
    return "\n".join(L + ["", MARK_END]) + "\n"


# --------------------------------------------------------------------------- main

def print_plan(cfg: argparse.Namespace, todo: list[str], est: dict[str, float]) -> None:
    import torch
    print(f"code benchmark: {cfg.task}, base {cfg.model}, {cfg.steps} steps per trained method, "
          f"{cfg.limit or 'all'} test problems, greedy, max {cfg.max_new_tokens} new tokens, {cfg.precision}, "
          f"{torch.get_num_threads()} torch threads; out {Path(cfg.out)}")
    for m in cfg.methods:
        state = f"to do, est {est[m] / 60:.1f} min" if m in todo else "done (recorded in summary.json)"
        print(f"  {m:<14} {state}")
    print(f"estimated: {sum(est.values()) / 60:.0f} min", flush=True)


def run_parts(cfg: argparse.Namespace, summary: ResultStore, todo: list[str], hashes: dict[str, str]) -> list[str]:
    """Run and record every part still to do, one at a time; the parts that failed."""
    failed = []
    if todo:  # the machine that ran (the last of) the parts
        summary.data["machine"] = machine()
    for m in todo:
        print(f"[{m}] starting", flush=True)
        t0 = time.time()
        try:
            part = run_zero_shot(cfg) if m == "zero-shot" else run_trained(cfg, m, hashes[m])
        except Exception:  # noqa: BLE001 - one failed part must not cost the others
            traceback.print_exc()
            failed.append(m)
            print(f"FAILED {m} (rerun the command to retry it)", flush=True)
            continue
        finally:
            gc.collect()
        part.update(method=m, hash=hashes[m], settings=part_settings(cfg, m), wall_s=round(time.time() - t0, 1),
                    finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        summary.add(m, part)
        lo, hi = part["ci95"]
        print(f"[{m}] pass@1 {part['pass@1']:.3f} [{lo:.3f}, {hi:.3f}] ({part['passed']}/{part['n']})  "
              f"generate {part['generate_s_per_problem']:.2f} s/problem, sandbox "
              f"{part['sandbox_s_per_problem']:.2f} s/problem  ({part['wall_s']:.0f} s)", flush=True)
    return failed


def record_settings(cfg: argparse.Namespace, summary: ResultStore, current: dict[str, Any], started: float) -> None:
    """The command, settings, wall time and paper figures the report is written from, saved with the parts."""
    n_test = next(iter(current.values()))["n"] if current else (cfg.limit or 0)
    # --report-only keeps the command that ran the parts (minus the flag), not its own
    summary.data.update(
        benchmark="code", command=command_line("code", cfg.argv, drop=["--report-only"]),
        settings=dict(task=cfg.task, model=cfg.model, encoder=cfg.encoder, methods=cfg.methods, steps=cfg.steps,
                      batch_size=cfg.batch_size, warmup=cfg.warmup, evals=cfg.evals, dev_limit=cfg.dev_limit,
                      limit=cfg.limit, n_test=n_test, max_new_tokens=cfg.max_new_tokens,
                      eval_batch_size=cfg.eval_batch_size, timeout=cfg.timeout, m=cfg.m, rank=cfg.rank,
                      hidden=cfg.hidden, lora_r=cfg.lora_r, precision=cfg.precision, threads=cfg.threads,
                      seed=cfg.seed, lrs=cfg.lrs, quick=cfg.quick, out=str(Path(cfg.out))),
        wall_s={"this_invocation": round(time.time() - started, 1),
                "all_parts": round(sum(p["wall_s"] for p in current.values()), 1)},
        paper={"model": PAPER_MODEL, "pass@1_percent": PAPER})
    summary.data.setdefault("machine", machine())
    summary.save()


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    prepare_benchmark(cfg.threads)
    started = time.time()
    summary = ResultStore(Path(cfg.out) / OUTPUT, "parts")
    hashes = {m: settings_hash(part_settings(cfg, m)) for m in cfg.methods}
    todo = [m for m in cfg.methods if not summary.done(m, hashes[m])]
    print_plan(cfg, todo, {m: estimate(cfg, m) for m in todo})
    if cfg.plan:
        return 0
    failed = [] if cfg.report_only else run_parts(cfg, summary, todo, hashes)
    if not summary.entries:
        print("nothing recorded yet: nothing to report", file=sys.stderr)
        return 1
    # the report covers this command's methods, finished with this command's settings
    current = {m: summary.entries[m] for m in cfg.methods if summary.done(m, hashes[m])}
    record_settings(cfg, summary, current, started)
    if current:
        write_section(Path(cfg.doc), render({**summary.data, "parts": current}), MARK_START, MARK_END)
        print(f"wrote {summary.path} and the {MARK_START} section of {cfg.doc} "
              f"({(time.time() - started) / 60:.1f} min this invocation)", flush=True)
    if failed:
        print(f"{len(failed)} parts failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
