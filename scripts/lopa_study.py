"""The LoPA study: which settings let LoPA learn, chosen on dev data only (never a test split).

Each variant is one ``lopa train`` run on a task's dev split (``--no-test``: the test split is never
scored); the table ranks variants by their best dev accuracy and the curves show whether each run
had flattened. Resumable: a variant whose run finished is read back, not trained again, so the study
can run in parts. Writes ``OUT/study.json`` and, with ``--docs``, the table of ``docs/lopa_study.md`` + a PNG.

    python scripts/lopa_study.py --task sst2 --workers 2 --only lopa-current,prompt-tuning
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# one run's settings on top of the shared protocol; names say what differs from "lopa-current"
VARIANTS: dict[str, dict] = {
    # the library's defaults as they are when the study runs; the variants before lead 29 ran with instance_dropout 0
    "lopa-current": dict(method="lopa"),
    "lopa-idrop0": dict(method="lopa", instance_dropout=0.0),  # the defaults before lead 29
    "lopa-shared1x": dict(method="lopa", shared_lr_scale=1.0),  # the defaults before: Z_S at the heads' rate
    "lopa-zs-normal1": dict(method="lopa", shared_lr_scale=1.0, init="random", init_std=1.0),
    "lopa-lr3e-3": dict(method="lopa", shared_lr_scale=1.0, lr=3e-3),
    "lopa-lr3e-4": dict(method="lopa", shared_lr_scale=1.0, lr=3e-4),
    "lopa-h384": dict(method="lopa", shared_lr_scale=1.0, hidden_size=384),
    "lopa-constant": dict(method="lopa", shared_lr_scale=1.0, schedule="constant"),
    "lopa-gate2": dict(method="lopa", shared_lr_scale=1.0, gate_scale=2.0),
    "lopa-zs-lr10x": dict(method="lopa", shared_lr_scale=10.0),
    # Z_S at prompt tuning's best rate (1e-2 at 10x) or beyond: the gate can only rescale Z_S, and under
    # Adam Z_S moves about lr per step while S-IDPG's head moves its whole prompt h times faster
    "lopa-zs-lr30x": dict(method="lopa", shared_lr_scale=30.0),
    # prompt tuning's own rate, once its grid was widened on dev, rose to 1e-1 (100x LoPA's heads' 1e-3): does
    # LoPA's task-wide part want as much?
    "lopa-zs-lr100x": dict(method="lopa", shared_lr_scale=100.0),
    "lopa-zs-lr300x": dict(method="lopa", shared_lr_scale=300.0),
    "lopa-zs-normal1-h384": dict(method="lopa", shared_lr_scale=1.0, init="random", init_std=1.0, hidden_size=384),
    "lopa-zs-normal1-lr3e-3": dict(method="lopa", shared_lr_scale=1.0, init="random", init_std=1.0, lr=3e-3),
    "lopa-zs-lr10x-lr3e-3": dict(method="lopa", shared_lr_scale=10.0, lr=3e-3),
    "lopa-fp32": dict(method="lopa", shared_lr_scale=1.0, precision="fp32"),
    # features normalised before the heads: mean pooling shrinks them as texts grow (SST-2's train split,
    # and so the dev split carved from it, is mostly phrases; its test split is whole sentences)
    "lopa-fn-rms": dict(method="lopa", feature_norm="rms"),
    "lopa-fn-l2": dict(method="lopa", feature_norm="l2"),
    "lopa-fn-rms-lr3e-3": dict(method="lopa", feature_norm="rms", lr=3e-3),
    "lopa-lr3e-3-zs100x": dict(method="lopa", lr=3e-3),
    "idpg-fn-rms": dict(method="idpg", feature_norm="rms"),
    # the gate starts at 1/2, so LoPA's task-wide prompt for an average input is about Z_S / 2 and moves at
    # half Z_S's rate; gate scale 2 starts it at Z_S (ruled out at Z_S's old 1x rate and at 100x, lead 13)
    "lopa-gate2-zs100x": dict(method="lopa", gate_scale=2.0),
    # the paper's additive combination, Z_S + u v^T: the task-wide part at its full size (the gate halves it at
    # initialisation and can only shrink it), the instance part an offset rather than a mask
    "lopa-add": dict(method="lopa", combine="add"),
    "lopa-r8": dict(method="lopa", rank=8),  # a richer instance part: twice the rank of u v^T
    # rank 8 learnt slower than 4 in 300 steps (lead 15): does a leaner instance part learn faster still?
    "lopa-r2": dict(method="lopa", rank=2),
    # a stronger encoder: the reference's GLUE code encodes with a model as large as its backbone, ours with a
    # 22M MiniLM; the base model itself (mean of its last hidden states, e = 576) tests whether the encoder's
    # capacity is what limits the instance part. Its features are about 6x MiniLM's scale, hence the rms twin
    "lopa-enc-base": dict(method="lopa", encoder="smollm2-135m"),
    "lopa-enc-base-fn-rms": dict(method="lopa", encoder="smollm2-135m", feature_norm="rms"),
    # the encoder fine-tuned with the generator, as the reference's GLUE code does (freeze_base=False): its own
    # rate relative to the heads' 1e-3 (0.01 is the option's default, 1e-5; 0.03 and 0.1 are 3e-5 and 1e-4)
    "lopa-train-enc": dict(method="lopa", train_encoder=True),
    "lopa-train-enc-x0.03": dict(method="lopa", train_encoder=True, encoder_lr_scale=0.03),
    "lopa-train-enc-x0.1": dict(method="lopa", train_encoder=True, encoder_lr_scale=0.1),
    # Z_S at prompt tuning's best rate (1e-1) as in the defaults, the heads 3x slower (3e-4): lets Z_S learn as a
    # plain prompt would while the gate moves less of what is learnt for every input into the heads (lead 13)
    "lopa-heads3e-4": dict(method="lopa", lr=3e-4, shared_lr_scale=1e-1 / 3e-4),
    # the paper's concatenation, [Z_S ; u v^T] (2m tokens): the task-wide part keeps its full size as in prompt
    # tuning, and the instance part gets tokens of its own instead of gating Z_S (leads 13-14: LoPA's task-wide
    # part, read as one prompt, is weaker than prompt tuning's)
    "lopa-concat": dict(method="lopa", combine="concat"),
    # the other way round from lead 19: slower heads made the instance part add less, so faster heads (3e-3),
    # with Z_S kept at prompt tuning's best rate (1e-1), should let it add more
    "lopa-heads3e-3": dict(method="lopa", lr=3e-3, shared_lr_scale=1e-1 / 3e-3),
    "prompt-tuning": dict(method="prompt-tuning"),
    "prompt-tuning-lr1e-2": dict(method="prompt-tuning", lr=1e-2),
    "prompt-tuning-lr1e-3": dict(method="prompt-tuning", lr=1e-3),
    "prompt-tuning-lr1e-1": dict(method="prompt-tuning", lr=1e-1),
    # for a base whose token embeddings are larger (Gemma-3-270m's are ~8x SmolLM2's in root-mean-square), a
    # prompt moves proportionally less per Adam step: both families' grids go further up there
    "prompt-tuning-lr3e-1": dict(method="prompt-tuning", lr=3e-1),
    "prompt-tuning-lr9e-1": dict(method="prompt-tuning", lr=0.9),  # SST-2's 1e-1 scaled to Gemma's larger embeddings
    "lopa-zs-lr1000x": dict(method="lopa", shared_lr_scale=1000.0),
    # on Gemma the instance part carries far more of the answer than on SmolLM2 (lead 23), so the reference's
    # trained encoder, which bought nothing beyond noise on SmolLM2 (lead 18), may buy more there; Z_S at
    # Gemma's best rate, the encoder at 3e-5
    "lopa-zs-lr300x-train-enc-x0.03": dict(method="lopa", shared_lr_scale=300.0, train_encoder=True,
                                            encoder_lr_scale=0.03),
    "idpg": dict(method="idpg"),
    # where the soft prompt sits (a probe of the study, not a library option): on SST-2's test split the soft
    # prompts lose to LoRA on the long sentences only, as if a prefix's effect thinned as the text between it
    # and the answer grows; placed right before the template's cue (" It was"), its distance to the answer no
    # longer depends on the text's length
    "lopa-zs-lr300x-before-cue": dict(method="lopa", shared_lr_scale=300.0, placement="before-cue"),
    "prompt-tuning-lr3e-1-before-cue": dict(method="prompt-tuning", lr=3e-1, placement="before-cue"),
    "idpg-lr3e-4": dict(method="idpg", lr=3e-4),
    # the prompt's length: every lead so far kept the reference's m = 10; twice as many tokens give the gate twice
    # the positions to write the instance part into, and prompt tuning twice the room, so both move together
    "lopa-m20": dict(method="lopa", num_virtual_tokens=20),
    "prompt-tuning-lr1e-1-m20": dict(method="prompt-tuning", lr=1e-1, num_virtual_tokens=20),
    # longer budgets on Gemma at its own best soft-prompt rates (its 300-step curves had not flattened), with
    # LoRA beside them at the benchmark's chosen rate
    "lora-lr2e-3": dict(method="lora", lr=2e-3),
    # instance dropout: LoPA's task-wide part, read as one prompt, is weaker than prompt tuning's (lead 13), and
    # the instance part falls furthest on the long test sentences, whose features training rarely saw; giving
    # some training examples the batch's mean features makes the average prompt stand alone and the heads learn
    # only what differs between inputs
    "lopa-idrop25": dict(method="lopa", instance_dropout=0.25),
    "lopa-idrop50": dict(method="lopa", instance_dropout=0.5),
    # the same on S-IDPG, at the benchmark's rate for it: whether instance dropout is a LoPA default or a
    # default for every method with an instance part
    "idpg-lr3e-3": dict(method="idpg", lr=3e-3),
    "idpg-lr3e-3-idrop25": dict(method="idpg", lr=3e-3, instance_dropout=0.25),
    # sentence pairs (MRPC): the encoder's pooled features of the whole prompt carry no sign of whether the two
    # sentences say the same thing (a linear probe on them scores below the majority class on MRPC dev), while
    # the cosine of the two sentences' own features alone scores about four points above it; reading each
    # field apart gives the heads the pair features [a*b, |a-b|]
    "lopa-fields": dict(method="lopa", encoder_input="fields"),
    "idpg-lr3e-3-fields": dict(method="idpg", lr=3e-3, encoder_input="fields"),
    # LoRA at the accuracy benchmark's chosen rate, so that MRPC's LoPA - LoRA comparison, which the benchmark
    # runs on one seed, can be repeated on more seeds under one protocol
    "lora-lr5e-4": dict(method="lora", lr=5e-4),
}


TABLE_START, TABLE_END = "<!-- table:start -->", "<!-- table:end -->"


PLACEMENT_FILE = "study_placement.json"  # a probe run's placement, read back wherever the study scores it
PLACEMENTS = ("before-cue",)  # where the probe can put a soft prompt other than in front


@contextlib.contextmanager
def placed(run_dir: Path, info: dict | None = None):
    """Inside, every soft prompt sits where the run at ``run_dir`` was trained with it.

    ``placement="before-cue"`` puts it between the input text and the template's last fixed words (SST-2's
    " It was"), ``[pad][text][soft prompt][cue]``, rather than in front (``[pad][soft prompt][text][cue]``).
    The rows of an ordinary batch are reordered; positions and mask are unchanged. The placement is a probe:
    ``lopa eval`` and the server know only the prefix, so such a run is scored here and nowhere else.
    ``info`` is the placement (``{"placement", "cue"}``); by default it is read from the run's
    ``PLACEMENT_FILE``, written once the run is trained (``lopa train`` refuses an ``--out`` that holds
    other files).
    """
    marker = run_dir / PLACEMENT_FILE
    if info is None and marker.exists():
        info = json.loads(marker.read_text())
    if info is None:
        yield
        return
    import torch
    from lopa import prefix
    from lopa.model import SoftPromptModel
    original = SoftPromptModel._batch
    cue = info["cue"]

    def batch_before_cue(self, texts, suffix_ids=None):
        if suffix_ids is not None or not all(t.endswith(cue) for t in texts):
            raise ValueError(f"placement 'before-cue' needs classification texts that end with {cue!r}")
        def tok(text: str) -> list[int]:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

        heads, tail = [tok(t[:-len(cue)]) for t in texts], tok(cue)
        z = self.soft_prompts(texts)
        b = prefix.assemble(self.base, z, [h + tail for h in heads])
        length, m = b.inputs_embeds.shape[1], z.shape[1]
        order = []
        for h in heads:  # [pad][Z][text][cue] -> [pad][text][Z][cue]
            pad = length - m - len(h) - len(tail)
            order.append(list(range(pad)) + list(range(pad + m, pad + m + len(h))) + list(range(pad, pad + m))
                         + list(range(pad + m + len(h), length)))
        idx = torch.tensor(order, device=b.inputs_embeds.device)[..., None].expand(-1, -1, b.inputs_embeds.shape[2])
        return prefix.PrefixBatch(b.inputs_embeds.gather(1, idx), b.attention_mask, b.position_ids)

    SoftPromptModel._batch = batch_before_cue
    try:
        yield
    finally:
        SoftPromptModel._batch = original


def run_variant(name: str, settings: dict, proto: dict, out_root: str) -> dict:
    import torch
    torch.set_num_threads(proto.pop("threads"))
    from lopa.train import TrainArgs, train
    out = Path(out_root) / name
    done = out / "results.json"
    if done.exists():
        return json.loads(done.read_text())
    settings = dict(settings)
    placement = settings.pop("placement", None)
    info = None
    if placement is not None:
        from lopa.tasks import get_task
        template = get_task(proto["task"], data_dir=proto["data_dir"]).template
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r}; the study knows {list(PLACEMENTS)}")
        cue = template.rsplit("}", 1)[1]
        if not cue.strip():
            raise ValueError(f"placement 'before-cue' needs a template that ends in fixed words, got {template!r}")
        info = {"placement": placement, "cue": cue}
    kw = {**proto, **settings, "out": str(out), "test": False, "zero_shot": False, "progress": False}
    kw["resume"] = (out / "run_config.json").exists()
    with placed(out, info):
        result = train(TrainArgs.from_flat(**kw))
    if info is not None:
        (out / PLACEMENT_FILE).write_text(json.dumps(info) + "\n")
    return result


def dev_by_length(run_dir: Path, min_words: int, threads: int = 1) -> dict:
    """Accuracy of a run's best checkpoint on its task's whole dev split, apart for texts of fewer and of
    at least ``min_words`` words (cached in the run directory). SST-2's dev split is carved from GLUE's
    train split, mostly short phrases; this says how a setting fares on the longer texts among them. For an
    instance-dependent run, also with the instance part switched off (every text given the mean features):
    what the instance part adds over the one prompt it makes for an average input."""
    cached = run_dir / f"dev_by_length_{min_words}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    import torch
    torch.set_num_threads(threads)
    from lopa.evaluate import load_run_model, score
    from lopa.hardware import precision_name
    from lopa.rundir import run_precision
    from lopa.tasks import task_from_settings
    with placed(run_dir):
        model = load_run_model(str(run_dir))
        task = task_from_settings(model.task)
        examples = task.split("dev")
        precision = precision_name(run_precision(str(run_dir)) or "auto")

        def scored() -> tuple[float, dict[str, list[bool]]]:
            res = score(model, task, "dev", keep_predictions=True, progress=False, precision=precision)
            parts: dict[str, list[bool]] = {"short": [], "long": []}
            for p, e in zip(res["predictions"], examples):
                parts["short" if len(e.prompt.split()) < min_words else "long"].append(p == e.label)
            return res["accuracy"], parts

        accuracy, parts = scored()
        out: dict = {"min_words": min_words, "n": len(examples), "accuracy": accuracy}
        out.update({k: {"n": len(h), "accuracy": sum(h) / max(1, len(h))} for k, h in parts.items()})
        enc = getattr(model, "encoder", None)
        if enc is not None:
            # the instance part switched off: every text gets the dev split's mean features, so the prompt is
            # the one task-wide prompt the generator makes for an average instance
            mean = enc.encode([e.prompt for e in examples]).mean(0, keepdim=True)
            enc.encode = lambda texts: mean.expand(len(texts), -1)
            accuracy, parts = scored()
            out["mean_features"] = {"accuracy": accuracy, **{k: sum(h) / max(1, len(h)) for k, h in parts.items()}}
        cached.write_text(json.dumps(out) + "\n")
        return out


def curves(out_root: Path, name: str) -> list[dict]:
    path = out_root / name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def write_docs(summary: dict, proto: dict, docs: Path) -> None:
    """``docs/lopa_study.md`` (variants ranked by best dev accuracy, with their curves) and the PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ranked = sorted(summary.items(), key=lambda kv: -(kv[1]["best_dev_accuracy"] or 0))
    rows = ["| variant | settings | best dev acc % | at step | dev curve (% at each evaluation) | trainable |",
            "|---|---|---|---|---|---|"]
    for n, v in ranked:
        settings = ", ".join(f"{k}={x}" for k, x in v["settings"].items())
        curve = " → ".join(f"{100 * d:.1f}" for _, d in v["dev_curve"])
        rows.append(f"| {n} | {settings} | {100 * (v['best_dev_accuracy'] or 0):.1f} | {v['best_step']} | {curve} | "
                    f"{v['trainable']:,} |")
    fig, ax = plt.subplots(figsize=(7, 4))
    for n, v in ranked:
        if v["dev_curve"]:
            ax.plot(*zip(*[(st, 100 * d) for st, d in v["dev_curve"]]), marker="o", label=n)
    ax.set(xlabel="step", ylabel="dev accuracy %", title=f"{proto['task']}: dev accuracy while training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "lopa_study.png", dpi=90)
    plt.close(fig)
    doc = docs / "lopa_study.md"  # the table goes between its markers; the prose around it is kept
    text = doc.read_text()
    head, rest = text.split(TABLE_START, 1)
    doc.write_text(head + TABLE_START + "\n" + "\n".join(rows) + "\n" + TABLE_END + rest.split(TABLE_END, 1)[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="sst2")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-limit", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None, help="comma-separated variant names (default: all, in order)")
    p.add_argument("--workers", type=int, default=1, help="runs at once (each with --threads torch threads)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/lopa-study")
    p.add_argument("--docs", action="store_true", help="write docs/lopa_study.md and docs/lopa_study.png")
    p.add_argument("--by-length", type=int, default=0, metavar="WORDS",
                   help="also score each run's best checkpoint on the whole dev split, apart for texts under and "
                        "at least WORDS words (the prompt's words, template included)")
    p.add_argument("--score-runs", default=None, metavar="DIR,...",
                   help="with --by-length: only score these finished run directories (of any method) by length, "
                        "train nothing")
    a = p.parse_args(argv)
    if a.score_runs:
        if not a.by_length:
            p.error("--score-runs needs --by-length")
        with ProcessPoolExecutor(a.workers) as pool:
            jobs = {d: pool.submit(dev_by_length, Path(d), a.by_length, a.threads) for d in a.score_runs.split(",")}
            for d, j in jobs.items():
                b = j.result()
                print(f"{d}: whole dev {100 * b['accuracy']:.1f} (n={b['n']}); under {a.by_length} words "
                      f"{100 * b['short']['accuracy']:.1f} (n={b['short']['n']}); at least "
                      f"{100 * b['long']['accuracy']:.1f} (n={b['long']['n']})")
                if "mean_features" in b:
                    m = b["mean_features"]
                    print(f"  with every text given the mean features: whole dev {100 * m['accuracy']:.1f}; "
                          f"short {100 * m['short']:.1f}; long {100 * m['long']:.1f}")
        return 0
    names = a.only.split(",") if a.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    proto = dict(task=a.task, data_dir=a.data_dir, model=a.model, max_steps=a.max_steps, eval_every=a.eval_every,
                 eval_limit=a.eval_limit, seed=a.seed, threads=a.threads)
    out_root = Path(a.out) / f"{a.task}-s{a.seed}"
    with ProcessPoolExecutor(a.workers) as pool:
        futures = {n: pool.submit(run_variant, n, VARIANTS[n], dict(proto), str(out_root)) for n in names}
        results = {}
        for n, f in futures.items():
            try:
                results[n] = f.result()
            except Exception as e:  # one failed variant must not lose the others' results
                print(f"{n}: failed: {e}", file=sys.stderr)
        by_length = {}
        if a.by_length:
            jobs = {n: pool.submit(dev_by_length, out_root / n, a.by_length, a.threads) for n in results}
            by_length = {n: j.result() for n, j in jobs.items()}
    summary = {n: {"settings": VARIANTS[n], "best_dev_accuracy": r.get("best_dev_accuracy"),
                   "best_step": r.get("best_step"), "train_s": r.get("train_s"),
                   "trainable": r.get("trainable_params"),
                   "dev_curve": [(h["step"], h["dev"]) for h in curves(out_root, n)],
                   **({"dev_by_length": by_length[n]} if n in by_length else {})}
               for n, r in results.items()}
    # merged with what earlier invocations on this task and seed recorded: a run with --only must not drop
    # the other variants' summaries (their run directories stay, but their by-length scores took minutes)
    study = out_root / "study.json"
    earlier = json.loads(study.read_text()).get("variants", {}) if study.exists() else {}
    study.write_text(json.dumps({"protocol": proto, "variants": {**earlier, **summary}}, indent=2) + "\n")
    if a.docs:
        write_docs(summary, proto, Path("docs"))
    for n, s in sorted(summary.items(), key=lambda kv: -(kv[1]["best_dev_accuracy"] or 0)):
        if "dev_by_length" in s:
            b = s["dev_by_length"]
            print(f"{n:28s} whole dev {100 * b['accuracy']:5.1f} (n={b['n']}); under {b['min_words']} words "
                  f"{100 * b['short']['accuracy']:5.1f} (n={b['short']['n']}); at least "
                  f"{100 * b['long']['accuracy']:5.1f} (n={b['long']['n']})")
        print(f"{n:28s} dev {100 * (s['best_dev_accuracy'] or 0):5.1f}  curve "
              + " ".join(f"{100 * d:.1f}" for _, d in s["dev_curve"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
