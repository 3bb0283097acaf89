"""Training-step speed: lopa's prompt tuning against PEFT's, and LoPA, side by side.

One timed step is everything from a batch's texts to updated weights: tokenisation, forward,
backward and the AdamW step, on the same frozen model, the same fixed batches (so the same shapes
for every contender: new shapes cost first-call kernel set-up, which must not land in one column
only) and the same thread count. Contenders run interleaved, batch by batch, in an order that
rotates every repetition, so a noisy neighbour slows them all alike; each column is the median of
``repeats × num_batches`` steps after ``warmup`` untimed passes over the batches.

Contenders (``NAME/PRECISION``):

* ``lopa-pt``: ``SoftPromptModel`` with prompt tuning, ``forward(texts, label_ids=...)``; the LM head
  runs at the answer position only.
* ``peft-pt``: ``peft.get_peft_model(base, PromptTuningConfig(task_type=CAUSAL_LM, ...))`` trained the
  way a PEFT user would: input = prompt + answer token (right padded, as the tokenizer pads), labels
  -100 everywhere but the answer, ``model(input_ids, attention_mask, labels).loss``, so the LM head
  and the loss cover every position. It always runs in fp32 too, the baseline of the bf16 ratios.
* ``lopa``: LoPA (the paper's settings, m = 10, r = 4, h = 256) with the frozen ``minilm-l6``
  encoder; every text was encoded once before timing, as ``lopa train`` does, so steps hit the cache.
* ``lopa-reencode``: the same, with its feature cache emptied before every step: what LoPA would
  cost if the frozen encoder ran at every step (``encoder.encode_batch_median_s/PRECISION`` is the
  encoder's own time per batch).

Ratios (``ratios`` in the JSON; numerator / denominator step time, so > 1 means the denominator is
faster): ``peft_over_lopa_pt/fp32`` and ``/bf16`` compare like with like; ``peft_fp32_over_lopa_pt_bf16``
is the mixed one, PEFT in fp32 against lopa in bf16 autocast; ``lopa_over_lopa_pt/P`` is LoPA's cost
over prompt tuning. ``value`` (the one checked against the targets) is the median of step-by-step
ratios, two steps on the same batch run back to back; ``per_batch`` takes each batch's median step
time (each shape separately) and averages the per-batch ratios geometrically; ``cpu_value`` is
``per_batch`` on process CPU time, which other processes cannot inflate when ``--threads 1``. On a machine shared with other jobs use ``--threads 1``: with more threads than free
cores, every parallel region waits for a descheduled thread and steps take 5-20x longer.

Output: ``OUT/train_speed.json`` (``--out``, default ``results``; ``--quick``: a temporary folder).

Example::

    $ lopa bench train-speed --precision both          # smollm2-135m, batch 8, rotten-tomatoes
    $ lopa bench train-speed --quick                   # tiny random models, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from lopa.benchmarks.common import BenchmarkParser, machine, require_positive, write_json

OUTPUT = "train_speed.json"

TARGETS = {  # ratio name -> (comparison, bound): the goals these ratios are held to
    "peft_over_lopa_pt/fp32": (">=", 1.3),
    "peft_fp32_over_lopa_pt_bf16": (">=", 1.8),
    "lopa_over_lopa_pt/fp32": ("<=", 1.1),
    "lopa_over_lopa_pt/bf16": ("<=", 1.1),
}


QUICK = "tiny-random-llama, tiny-random-bert, batch size 4, 2 batches, 1 warm-up pass, 2 repeats"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = BenchmarkParser(
        "train-speed",
        "Time one training step (tokenise + forward + backward + AdamW) of lopa's prompt tuning, PEFT's prompt "
        "tuning and LoPA on the same model and fixed batches, interleaved, and print the step-time ratios. "
        "Writes OUT/train_speed.json.",
        "lopa bench train-speed --precision both   (--quick for a smoke run on tiny models)")
    a = p.add_argument
    p.add_outputs("results", OUTPUT, quick_help=QUICK, doc=False)
    p.add_models()
    a("--task", default="rotten-tomatoes", help="classification task whose train prompts form the batches "
                                                 "(default rotten-tomatoes)")
    p.quick("--batch-size", 8, 4, "examples per step", type=int)
    p.quick("--num-batches", 3, 2, "distinct fixed batches (drawn with --seed); every contender steps on each of "
                                   "them", type=int)
    p.quick("--warmup", 2, 1, "untimed passes over all batches per contender before timing (first calls set "
                              "kernels up)", type=int)
    p.quick("--repeats", 5, 2, "timed passes over all batches; each column is the median of repeats × num-batches "
                               "steps", type=int)
    a("--num-virtual-tokens", type=int, default=10, help="m, the soft prompt length, for every method (default 10)")
    a("--precision", choices=["fp32", "bf16", "both"], default="fp32",
      help="fp32, bf16 autocast (PEFT then also runs in fp32 as the baseline), or both in one run (default fp32)")
    a("--pad-to-multiple", type=int,
      help="round lengths up to a multiple of N to limit the number of distinct shapes (lopa: the total length, "
           "prefix.assemble's pad_to_multiple; PEFT: the token part, the tokenizer's pad_to_multiple_of)")
    a("--probe-shapes", type=int, default=0,
      help="after timing, step lopa-pt twice on each of N unseen batches (new lengths) per precision: "
           "the first-call cost of a new shape is the first step minus the second (default 0)")
    a("--no-reencode", action="store_true", help="skip lopa-reencode (the encoder-every-step column)")
    a("--threads", type=int,
      help="torch intra-op threads (default: torch's own, one per core); 1 is steadier on a busy machine")
    a("--seed", type=int, default=0, help="seeds batch choice and initialisation (default 0)")
    args = p.parse(argv)
    require_positive(p, args, ("batch_size", "num_batches", "repeats", "num_virtual_tokens"))
    require_positive(p, args, ["pad_to_multiple"], optional=True)
    if args.warmup < 0 or args.probe_shapes < 0:
        p.error("--warmup and --probe-shapes must be >= 0")
    return p.finish(args, writes=[OUTPUT])


# -- the contenders: each is a callable (texts, answer token ids) -> loss that does a whole step ----------

@contextlib.contextmanager
def _assemble_padding(multiple: int | None):
    """``SoftPromptModel`` calls ``prefix.assemble`` without options; pass ``pad_to_multiple`` for it."""
    from lopa import prefix
    if multiple is None:
        yield
        return
    original = prefix.assemble
    prefix.assemble = functools.partial(original, pad_to_multiple=multiple)
    try:
        yield
    finally:
        prefix.assemble = original


def _optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-3)


def lopa_step(model: Any, pad_to_multiple: int | None) -> Callable[[list[str], list[int], str], float]:
    from lopa.hardware import autocast
    opt = _optimizer(model.generator.parameters())
    model.train()

    def step(texts: list[str], answers: list[int], precision: str) -> float:
        with autocast(precision), _assemble_padding(pad_to_multiple):
            loss = model(texts, label_ids=torch.tensor(answers))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step


def peft_step(peft_model: Any, tokenizer: Any, pad_to_multiple: int | None) -> Callable[[list[str], list[int], str], float]:
    from lopa.hardware import autocast
    opt = _optimizer(peft_model.parameters())
    peft_model.train()

    def step(texts: list[str], answers: list[int], precision: str) -> float:
        rows = [ids + [a] for ids, a in zip(tokenizer(texts, add_special_tokens=False)["input_ids"], answers)]
        batch = tokenizer.pad({"input_ids": rows}, padding=True, pad_to_multiple_of=pad_to_multiple,
                              return_tensors="pt")
        mask = batch["attention_mask"]
        # the answer is each row's last real token, wherever the tokenizer put the padding
        last = (mask * torch.arange(mask.shape[1])).argmax(1)
        labels = torch.full_like(batch["input_ids"], -100)
        labels[torch.arange(len(rows)), last] = torch.tensor(answers)
        with autocast(precision):
            loss = peft_model(input_ids=batch["input_ids"], attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step


def build(args: argparse.Namespace) -> tuple[dict[str, Callable], dict[str, Any], Any]:
    """The step functions by method name, facts about each (trainable params, ...), and the tokenizer."""
    import lopa
    from lopa.encoders import HFEncoder
    from peft import PromptTuningConfig, TaskType, get_peft_model

    torch.manual_seed(args.seed)
    base, tok = lopa.load_base(args.model)
    m = args.num_virtual_tokens
    pt = lopa.SoftPromptModel(base, tok, lopa.make_config("prompt-tuning", num_virtual_tokens=m, seed=args.seed))
    lopa_cfg = lopa.make_config("lopa", num_virtual_tokens=m, encoder=args.encoder, seed=args.seed)
    lp = lopa.SoftPromptModel(base, tok, lopa_cfg)
    steps = {"lopa-pt": lopa_step(pt, args.pad_to_multiple), "lopa": lopa_step(lp, args.pad_to_multiple)}
    info: dict[str, Any] = {"lopa-pt": {"trainable_params": pt.num_trainable_parameters()},
                            "lopa": {"trainable_params": lp.num_trainable_parameters(), "encoder": lp.encoder}}
    if not args.no_reencode:
        # its own cache (the frozen BERT weights are shared): emptying it must not turn lopa's hits into misses
        enc = HFEncoder(lp.encoder.model, lp.encoder.tokenizer, name=lp.encoder.name, pooling=lp.encoder.pooling)
        lr = lopa.SoftPromptModel(base, tok, lopa_cfg, encoder=enc)
        inner = lopa_step(lr, args.pad_to_multiple)
        encode_times: dict[str, list[float]] = {"fp32": [], "bf16": []}

        def reencode(texts: list[str], answers: list[int], precision: str) -> float:
            from lopa.hardware import autocast
            enc.clear_cache()
            t0 = time.perf_counter()
            with autocast(precision):  # what forward would do on a miss, timed on its own
                enc.encode(texts)
            encode_times[precision].append(time.perf_counter() - t0)
            return inner(texts, answers, precision)
        steps["lopa-reencode"] = reencode
        info["lopa-reencode"] = {"trainable_params": lr.num_trainable_parameters(), "encode_times": encode_times}
    # PEFT wraps its base in place: give it a copy of its own
    peft_base, _ = lopa.load_base(args.model)
    peft_model = get_peft_model(peft_base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=m))
    steps["peft-pt"] = peft_step(peft_model, tok, args.pad_to_multiple)
    info["peft-pt"] = {"trainable_params": sum(p.numel() for p in peft_model.parameters() if p.requires_grad)}
    return steps, info, tok


def contenders(precision: str, with_reencode: bool) -> list[tuple[str, str]]:
    """(method, precision) pairs; bf16 runs also time PEFT in fp32, the baseline a PEFT user has."""
    methods = ["lopa-pt", "peft-pt", "lopa"] + (["lopa-reencode"] if with_reencode else [])
    precisions = ["fp32", "bf16"] if precision == "both" else [precision]
    out = [(m, p) for p in precisions for m in methods]
    if precision == "bf16":
        out.append(("peft-pt", "fp32"))
    return out


# -- timing ----------------------------------------------------------------------------------------------

def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): with one thread, CPU time is what a busy machine's
    neighbours cannot inflate; with more, it also counts threads spinning at barriers."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def _stats(times: list[float]) -> dict[str, Any]:
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {"median_s": statistics.median(times), "q1_s": q[0], "q3_s": q[2], "min_s": min(times),
            "max_s": max(times), "n": len(times)}


def _per_batch_ratio(a: list[float], b: list[float], nb: int) -> float:
    """Geometric mean over batches of (median of a on the batch) / (median of b on it)."""
    logs = [math.log(statistics.median(a[i::nb]) / statistics.median(b[i::nb])) for i in range(nb)]
    return math.exp(sum(logs) / nb)


def _ratio(wall: dict[str, list[float]], cpu: dict[str, list[float]], num: str, den: str, nb: int) -> dict[str, Any]:
    """``value``: the median of step-by-step ratios, each of two steps run back to back on the same batch
    (the load of a shared machine drifts over minutes, hardly between two neighbouring steps).
    ``per_batch``: each batch's (so each shape's) ratio of medians, averaged geometrically over batches.
    ``ratio_of_medians``: the two columns' overall medians. ``cpu_value``: ``per_batch`` on CPU time."""
    a, b = wall[num], wall[den]
    paired = statistics.median(x / y for x, y in zip(a, b))
    return {"numerator": num, "denominator": den, "value": paired, "paired_median": paired,
            "per_batch": _per_batch_ratio(a, b, nb), "ratio_of_medians": statistics.median(a) / statistics.median(b),
            "cpu_value": _per_batch_ratio(cpu[num], cpu[den], nb)}


def pick_batches(task: Any, tok: Any, args: argparse.Namespace) -> tuple[list, list]:
    """Seeded fixed batches of (prompts, answer token ids) from the task's train split: the timed ones and
    the ``--probe-shapes`` ones."""
    from lopa import prefix
    answer_ids = prefix.label_token_ids(tok, task.label_words)
    train = list(task.split("train"))
    nb = args.num_batches
    picked = random.Random(args.seed).sample(range(len(train)), (nb + args.probe_shapes) * args.batch_size)
    rows = [train[i] for i in picked]
    batches = [rows[i * args.batch_size:(i + 1) * args.batch_size] for i in range(nb + args.probe_shapes)]
    batches = [([e.prompt for e in b], [answer_ids[e.label] for e in b]) for b in batches]
    return batches[:nb], batches[nb:]


def time_steps(steps: dict[str, Callable], cols: list[tuple[str, str]], batches: list,
               args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Step every contender on every batch, interleaved, ``warmup`` untimed passes then ``repeats`` timed
    ones; per key (``METHOD/PRECISION``): warm-up, wall and CPU seconds, and the losses."""
    keys = [f"{m}/{p}" for m, p in cols]
    times: dict[str, dict[str, list[float]]] = {w: {k: [] for k in keys} for w in ("warmup", "wall", "cpu", "loss")}
    nb = len(batches)
    total = (args.warmup + args.repeats) * nb
    # every key's timed steps are stored in the same (repetition, batch) order: entry i is batch i % nb,
    # and the paired ratios compare steps run back to back on the same batch
    for r in range(args.warmup + args.repeats):
        warm = r < args.warmup
        for b, (texts, answers) in enumerate(batches):
            k = (r * nb + b) % len(cols)  # rotate who goes first
            for (method, precision), key in zip(cols[k:] + cols[:k], keys[k:] + keys[:k]):
                out: list[float] = []
                w, c = _timed(lambda: out.append(steps[method](texts, answers, precision)))
                times["warmup" if warm else "wall"][key].append(w)
                if not warm:
                    times["cpu"][key].append(c)
                times["loss"][key].append(out[0])
            last = times["warmup" if warm else "wall"]
            print(f"  [{r * nb + b + 1}/{total}] {'warm-up' if warm else 'timed'} pass {r + 1}, batch {b + 1}: "
                  + "  ".join(f"{key} {last[key][-1]:.3f}s" for key in keys), file=sys.stderr, flush=True)
    return times


def ratios(wall: dict[str, list[float]], cpu: dict[str, list[float]], nb: int) -> dict[str, Any]:
    """Every ratio whose two columns ran, with its target where it has one."""
    out: dict[str, Any] = {}

    def add(name: str, num: str, den: str, what: str) -> None:
        if num in wall and den in wall:
            r = _ratio(wall, cpu, num, den, nb)
            r["what"] = what
            if name in TARGETS:
                op, bound = TARGETS[name]
                r["target"] = f"{op} {bound}"
                r["meets_target"] = r["value"] >= bound if op == ">=" else r["value"] <= bound
            out[name] = r

    for p in ("fp32", "bf16"):
        add(f"peft_over_lopa_pt/{p}", f"peft-pt/{p}", f"lopa-pt/{p}",
            f"PEFT prompt tuning / lopa prompt tuning, both {p}: higher = lopa faster")
        add(f"lopa_over_lopa_pt/{p}", f"lopa/{p}", f"lopa-pt/{p}",
            f"LoPA (cached features) / lopa prompt tuning, both {p}: LoPA's overhead")
        add(f"reencode_over_cached/{p}", f"lopa-reencode/{p}", f"lopa/{p}",
            f"LoPA encoding every step / LoPA with cached features, both {p}")
    add("peft_fp32_over_lopa_pt_bf16", "peft-pt/fp32", "lopa-pt/bf16",
        "PEFT prompt tuning in fp32 / lopa prompt tuning in bf16 autocast: mixed precisions")
    return out


def encoder_report(info: dict[str, Any], times: dict[str, dict[str, list[float]]],
                   before: tuple[int, int]) -> dict[str, Any]:
    """What LoPA's encoder did while timed (cache hits only, if the one-off encoding covered every text),
    and what re-encoding at every step cost."""
    encoder, wall = info["lopa"]["encoder"], times["wall"]
    steps_timed = sum(len(wall[k]) + len(times["warmup"][k]) for k in wall if k.startswith("lopa/"))
    report: dict[str, Any] = {
        "name": encoder.name,
        "cached_run": {"steps": steps_timed, "hits": encoder.stats["hits"] - before[0],
                       "encoded": encoder.stats["encoded"] - before[1],
                       "note": "lopa's steps after the one-off encoding: every feature came from the cache"},
    }
    if "lopa-reencode" in info:
        for p, enc_t in info["lopa-reencode"]["encode_times"].items():
            if enc_t:
                report[f"encode_batch_median_s/{p}"] = statistics.median(enc_t)
        for p in ("fp32", "bf16"):
            if f"lopa/{p}" in wall and f"lopa-reencode/{p}" in wall:
                report[f"reencode_extra_s/{p}"] = (statistics.median(wall[f"lopa-reencode/{p}"])
                                                  - statistics.median(wall[f"lopa/{p}"]))
    return report


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lopa.tasks import get_task

    task = get_task(args.task)
    if task.kind != "classification":
        raise SystemExit(f"train-speed times classification steps; {args.task!r} is a {task.kind} task")
    steps, info, tok = build(args)
    timed_batches, probe_batches = pick_batches(task, tok, args)
    encoder = info["lopa"]["encoder"]
    # every text encoded once before timing, as lopa train does
    encoder.encode(sorted({t for texts, _ in timed_batches + probe_batches for t in texts}))
    before = (encoder.stats["hits"], encoder.stats["encoded"])

    cols = contenders(args.precision, not args.no_reencode)
    t_start = time.time()
    times = time_steps(steps, cols, timed_batches, args)
    wall, cpu, nb = times["wall"], times["cpu"], len(timed_batches)
    lens = [lengths(tok, texts, args) for texts, _ in timed_batches]
    result: dict[str, Any] = {
        "benchmark": "train_speed",
        "settings": {**vars(args), "threads_used": torch.get_num_threads()},
        "environment": {**machine(),
                        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name()},
        "step": "tokenise + forward + backward + AdamW step, from a batch's texts",
        "batches": [{"batch_size": len(texts), **l} for (texts, _), l in zip(timed_batches, lens)],
        "contenders": {},
        "ratios": ratios(wall, cpu, nb),
        "encoder": encoder_report(info, times, before),
        "wall_s": round(time.time() - t_start, 1),
    }
    for method, precision in cols:
        key = f"{method}/{precision}"
        result["contenders"][key] = {
            "method": method, "precision": precision, "trainable_params": info[method]["trainable_params"],
            **_stats(wall[key]), "cpu_median_s": statistics.median(cpu[key]),
            "batch_median_s": [statistics.median(wall[key][i::nb]) for i in range(nb)],
            "times_s": wall[key], "cpu_times_s": cpu[key], "warmup_s": times["warmup"][key],
            "first_loss": times["loss"][key][0]}
    if probe_batches:
        result["shape_probe"] = probe(steps["lopa-pt"], probe_batches, tok, args, timed_batches)
    return result


def lengths(tok: Any, texts: list[str], args: argparse.Namespace) -> dict[str, int]:
    """The sequence lengths a batch runs at, soft prompt included (PEFT's input also holds the answer)."""
    def up(n: int) -> int:
        return n if args.pad_to_multiple is None else -(-n // args.pad_to_multiple) * args.pad_to_multiple
    t = max(len(tok(x, add_special_tokens=False)["input_ids"]) for x in texts)
    return {"prompt_len": t, "lopa_len": up(t + args.num_virtual_tokens),
            "peft_len": up(t + 1) + args.num_virtual_tokens}


def probe(step: Callable, batches: list, tok: Any, args: argparse.Namespace, seen: list) -> dict[str, Any]:
    """First call vs second call of lopa-pt on batches not timed before: a length the kernels have not
    seen pays its set-up in the first call only."""
    seen_lens = {lengths(tok, texts, args)["lopa_len"] for texts, _ in seen}
    out: dict[str, Any] = {}
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    for p in precisions:
        rows = []
        for texts, answers in batches:
            n = lengths(tok, texts, args)["lopa_len"]
            first = _timed(lambda: step(texts, answers, p))[0]
            second = _timed(lambda: step(texts, answers, p))[0]
            rows.append({"lopa_len": n, "new_length": n not in seen_lens, "first_s": first, "second_s": second})
            seen_lens.add(n)
        new = [r["first_s"] - r["second_s"] for r in rows if r["new_length"]]
        out[p] = {"steps": rows, "median_first_minus_second_s": statistics.median(r["first_s"] - r["second_s"]
                                                                                for r in rows),
                  "median_first_minus_second_new_lengths_s": statistics.median(new) if new else None}
    return out


def table(result: dict[str, Any]) -> str:
    lines = [f"{'contender':<22}{'median s':>10}{'q1 s':>9}{'q3 s':>9}{'CPU s':>9}{'steps':>7}{'trainable':>12}"]
    for key, c in result["contenders"].items():
        lines.append(f"{key:<22}{c['median_s']:>10.3f}{c['q1_s']:>9.3f}{c['q3_s']:>9.3f}{c['cpu_median_s']:>9.3f}"
                     f"{c['n']:>7d}{c['trainable_params']:>12,d}")
    lines.append("")
    for name, r in result["ratios"].items():
        goal = f"  target {r['target']}: {'met' if r['meets_target'] else 'NOT met'}" if "target" in r else ""
        lines.append(f"{name:<30}{r['value']:>6.2f}x  (per-batch medians {r['per_batch']:.2f}x, "
                     f"CPU time {r['cpu_value']:.2f}x){goal}")
        lines.append(f"    {r['what']}")
    e = result["encoder"]
    lines.append("")
    lines.append(f"encoder {e['name']}: cached steps {e['cached_run']['steps']}, cache hits {e['cached_run']['hits']}, "
                 f"encoded during steps {e['cached_run']['encoded']}")
    for p in ("fp32", "bf16"):
        if f"encode_batch_median_s/{p}" in e:
            lines.append(f"  re-encoding every step ({p}): the encoder takes {e[f'encode_batch_median_s/{p}']:.3f}s per "
                         f"batch; step medians differ by {e[f'reencode_extra_s/{p}']:+.3f}s")
    for p, probe_res in result.get("shape_probe", {}).items():
        lines.append(f"shape probe {p}: first - second call, median {probe_res['median_first_minus_second_s']:+.3f}s "
                     f"over {len(probe_res['steps'])} new batches")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = run(args)
    finally:  # main may run inside a longer process (lopa bench, tests)
        torch.set_num_threads(threads)
    out = Path(args.out) / OUTPUT
    write_json(out, result)
    print(table(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
