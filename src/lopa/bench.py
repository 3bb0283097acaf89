"""``lopa bench NAME [ARGS...]``: run one of the repository's benchmarks (``benchmarks/NAME.py``).

Each benchmark is a script with ``main(argv) -> int``; this verb finds it beside the source tree (or
in ``$LOPA_BENCHMARKS``) and passes the remaining arguments on. ``lopa bench NAME --help`` shows the
benchmark's own options.

Example::

    $ lopa bench accuracy --quick
    $ lopa bench train-speed --precision bf16
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path


def benchmarks_dir() -> Path:
    env = os.environ.get("LOPA_BENCHMARKS")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[2] / "benchmarks"  # src/lopa/bench.py -> repo/benchmarks
    return here if here.is_dir() else Path.cwd() / "benchmarks"


def available() -> list[str]:
    d = benchmarks_dir()
    return sorted(p.stem.replace("_", "-") for p in d.glob("*.py") if not p.name.startswith("_")) if d.is_dir() else []


@dataclass
class BenchArgs:
    """Run a benchmark from benchmarks/: accuracy, train-speed, serving, code (see each one's --help)."""

    name: str = field(default="", metadata={"positional": True})
    """the benchmark: the name of a script in benchmarks/ (accuracy, train-speed, serving, code)"""
    args: list[str] = field(default_factory=list, metadata={"remainder": True})
    """options passed to the benchmark"""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError(f"name a benchmark: {', '.join(available()) or '(none found)'}")


def bench_cli(args: BenchArgs) -> int:
    path = benchmarks_dir() / f"{args.name.replace('-', '_')}.py"
    if not path.exists():
        print(f"lopa bench: no benchmark {args.name!r} in {benchmarks_dir()}; available: {', '.join(available())}",
              file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location(f"lopa_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there while the script loads
    spec.loader.exec_module(module)
    return int(module.main(list(args.args)) or 0)
