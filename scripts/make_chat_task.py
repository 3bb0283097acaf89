"""Write a chat-style generation task made from GLUE SST-2, for showing that a trained soft prompt beats
the zero-shot model on the user's own prompt/completion data (with and without the chat template).

Each row asks, in words, for the sentiment of a review and expects one word back::

    {"prompt": "Review: a gorgeous, witty, seductive movie.\\nIs this review positive or negative? Answer with one word.",
     "completion": " positive", "split": "train"}

Splits: ``train`` and ``dev`` are drawn (seeded, disjoint) from GLUE's train file; ``test`` is GLUE's dev
file, as in the paper, so nothing is tuned on test items. The completion starts with a space so that
the plain format reads naturally; with the chat template the trainer strips nothing and the model
learns " positive" as the assistant's turn.

    python scripts/make_chat_task.py --data-dir ../shared/data --out results/chat-task/sst2-chat.jsonl
    for m in lopa prompt-tuning; do for ct in auto none; do
      lopa train --method $m --task results/chat-task/sst2-chat.jsonl --chat-template $ct \
        --dev-metric exact_match --max-steps 300 --eval-every 100 --out results/chat-task/runs/$m-$ct
    done; done

Each run scores the bare model zero-shot on the same test rows in the same format first, and ends with
the paired difference (exact match, ROUGE-L) against it. docs/results.md has the figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

QUESTION = "Is this review positive or negative? Answer with one word."
WORDS = {"0": " negative", "1": " positive"}


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def row(sentence: str, label: str, split: str) -> dict[str, str]:
    return {"prompt": f"Review: {sentence.strip()}\n{QUESTION}", "completion": WORDS[label], "split": split}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data", help="folder holding glue/SST-2/{train,dev}.tsv")
    p.add_argument("--out", default="results/chat-task/sst2-chat.jsonl", help="the JSONL to write")
    p.add_argument("--train", type=int, default=4000, help="training rows drawn from GLUE train")
    p.add_argument("--dev", type=int, default=300, help="dev rows drawn from GLUE train (disjoint from train)")
    p.add_argument("--test", type=int, default=400, help="test rows: the first N of GLUE dev (all: 872)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    glue = Path(a.data_dir) / "glue" / "SST-2"
    train = read_tsv(glue / "train.tsv")
    random.Random(a.seed).shuffle(train)
    picked = train[:a.train + a.dev]
    rows = [row(r["sentence"], r["label"], "train") for r in picked[:a.train]]
    rows += [row(r["sentence"], r["label"], "dev") for r in picked[a.train:]]
    rows += [row(r["sentence"], r["label"], "test") for r in read_tsv(glue / "dev.tsv")[:a.test]]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "dev", "test")}
    print(f"wrote {out}: {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
