"""How much of a classification task the instance encoder's pooled features tell on their own.

A logistic-regression probe (L2-regularised, full-batch L-BFGS) on the frozen encoder's features of
the first ``--train`` training texts, scored on the dev split (never the test split). It bounds what
an instance-dependent method's heads can read from the features with a linear map, next to the
methods' own dev accuracy; the LoPA study (docs/lopa_study.md) uses it.

    python scripts/encoder_probe.py --task sst2 --data-dir ../shared/data --train 2400 --threads 1
    python scripts/encoder_probe.py --task mrpc --data-dir ../shared/data --train 3302 --encoder-input fields

``--encoder-input`` reads the texts as ``lopa train --encoder-input`` does: the whole prompt, or the
template's fields apart (a sentence pair's ``[a*b, |a-b|]``, :class:`lopa.encoders.FieldEncoder`).
"""

from __future__ import annotations

import argparse
import json

import torch

from lopa.encoders import FieldEncoder, load_encoder
from lopa.tasks import get_task


def probe(train_x: torch.Tensor, train_y: torch.Tensor, dev_x: torch.Tensor, dev_y: torch.Tensor,
          classes: int, l2: float, standardise: bool = True) -> float:
    """Dev accuracy of a logistic regression fitted on (standardised) training features."""
    mean, std = (train_x.mean(0), train_x.std(0).clamp_min(1e-6)) if standardise else (0.0, 1.0)
    tx, dx = (train_x - mean) / std, (dev_x - mean) / std
    linear = torch.nn.Linear(tx.shape[1], classes)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(tx), train_y) + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((linear(dx).argmax(1) == dev_y).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="sst2", help="a classification task")
    p.add_argument("--data-dir", default=None, help="where glue/ lives (default: ../shared/data)")
    p.add_argument("--encoder", default="minilm-l6", help="the instance encoder, as lopa train names it")
    p.add_argument("--train", type=int, default=2400, help="training texts to fit on (300 steps of batch 8 see 2,400)")
    p.add_argument("--l2", default="1e-3,1e-2,1e-1", help="comma-separated L2 weights; each is reported")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--encoder-input", choices=("prompt", "fields"), default="prompt",
                   help="what the encoder reads: the whole prompt, or the template's fields apart")
    p.add_argument("--no-standardise", action="store_true",
                   help="fit on the features as they are (standardising weighs a*b's coordinates unequally, "
                        "where their plain mean is the pair's cosine)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    task = get_task(a.task, data_dir=a.data_dir)
    train, dev = task.split("train")[:a.train], task.split("dev")
    encoder = load_encoder(a.encoder)
    if a.encoder_input == "fields":
        encoder = FieldEncoder(encoder, task.template)
    with torch.no_grad():
        tx = encoder.encode([e.prompt for e in train]).float()
        dx = encoder.encode([e.prompt for e in dev]).float()
    ty = torch.tensor([e.label for e in train])
    dy = torch.tensor([e.label for e in dev])
    classes = int(max(ty.max(), dy.max())) + 1
    majority = float((dy == torch.bincount(ty, minlength=classes).argmax()).float().mean())
    out = {"task": a.task, "encoder": a.encoder, "encoder_input": a.encoder_input, "train": len(train),
           "dev": len(dev), "majority": majority, "standardised": not a.no_standardise,
           "probe_dev_accuracy": {l2: probe(tx, ty, dx, dy, classes, float(l2), not a.no_standardise)
                                  for l2 in a.l2.split(",")}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
