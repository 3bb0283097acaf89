"""Write the built-in ``mbpp`` task as a user's prompt/completion JSONL, to check that the generic path
(``lopa train --task FILE.jsonl``) trains exactly as the built-in task does.

Each row is the built-in task's prompt and reference code, with its ``split`` (the built-in seeded
50/50 split), so both runs see the same examples in the same splits::

    python scripts/make_mbpp_jsonl.py --data-dir ../shared/data --out results/mbpp-generic/mbpp.jsonl
    lopa train --method lopa --task mbpp --max-steps 60 --eval-every 30 --test-limit 20 \\
        --out results/mbpp-generic/builtin
    lopa train --method lopa --task results/mbpp-generic/mbpp.jsonl --chat-template none --max-steps 60 \\
        --eval-every 30 --test-limit 20 --out results/mbpp-generic/generic
    lopa eval results/mbpp-generic/generic --task mbpp --limit 20     # pass@1 of the generic run

The dev losses of the two runs should agree; pass@1 needs MBPP's tests, which a JSONL does not carry,
so the generic run's artifact is scored on ``--task mbpp``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from lopa.tasks import get_task
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data", help="folder holding mbpp/sanitized-mbpp.json")
    p.add_argument("--out", default="results/mbpp-generic/mbpp.jsonl", help="the JSONL to write")
    p.add_argument("--seed", type=int, default=0, help="the built-in task's split seed")
    a = p.parse_args(argv)
    splits = get_task("mbpp", data_dir=a.data_dir, seed=a.seed).splits()
    rows = [{"prompt": e.prompt, "completion": e.target, "split": split}
            for split, examples in splits.items() for e in examples]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {out}: " + ", ".join(f"{s} {len(x)}" for s, x in splits.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
