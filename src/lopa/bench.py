"""``lopa bench NAME [ARGS...]``: run one of lopa's benchmarks (``lopa.benchmarks``).

Each benchmark is a module with ``main(argv) -> int``; this verb imports it and passes the remaining
arguments on, so it works from an installed package as from a checkout. ``lopa bench NAME --help``
shows the benchmark's own options.

Example::

    $ lopa bench accuracy --quick
    $ lopa bench train-speed --precision bf16 --out results
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field

from lopa.benchmarks import BENCHMARKS


def available() -> list[str]:
    """The names ``lopa bench`` takes.

    >>> available()
    ['accuracy', 'code', 'serving', 'train-speed']
    """
    return sorted(BENCHMARKS)


@dataclass
class BenchArgs:
    """Run a benchmark: accuracy, train-speed, serving, code (see each one's --help)."""

    name: str = field(default="", metadata={"positional": True})
    """the benchmark: accuracy, train-speed, serving or code"""
    args: list[str] = field(default_factory=list, metadata={"remainder": True})
    """options passed to the benchmark"""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError(f"name a benchmark: {', '.join(available())}")


def bench_cli(args: BenchArgs) -> int:
    module = BENCHMARKS.get(args.name) or BENCHMARKS.get(args.name.replace("_", "-"))
    if module is None:
        print(f"lopa bench: no benchmark {args.name!r}; available: {', '.join(available())}", file=sys.stderr)
        return 2
    return int(importlib.import_module(f"lopa.benchmarks.{module}").main(list(args.args)) or 0)
