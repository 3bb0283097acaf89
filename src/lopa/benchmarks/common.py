"""Small helpers the benchmarks share: one marked section of ``docs/results.md`` each, and quiet logs.

Example::

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "results.md"
    >>> write_section(p, "<!-- a:start -->\\nA\\n<!-- a:end -->\\n", "<!-- a:start -->", "<!-- a:end -->")
    >>> write_section(p, "<!-- a:start -->\\nB\\n<!-- a:end -->\\n", "<!-- a:start -->", "<!-- a:end -->")
    >>> p.read_text()
    '# Results\\n\\n<!-- a:start -->\\nB\\n<!-- a:end -->\\n'
"""

from __future__ import annotations

import os
from pathlib import Path


def write_section(path: Path, section: str, start: str, end: str) -> None:
    """Put ``section`` (which begins with ``start`` and ends with ``end``) into the markdown file at
    ``path``, replacing the previous one and keeping every other benchmark's section."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        text = path.read_text()
        i, j = text.find(start), text.find(end)
        if i != -1 and j != -1 and j > i:
            text = text[:i] + section.rstrip("\n") + text[j + len(end):]
        else:
            text = text.rstrip("\n") + "\n\n" + section
    else:
        text = "# Results\n\n" + section
    path.write_text(text)


def quiet_transformers() -> None:
    """No download or loading progress bars and only errors from transformers: a benchmark's own
    lines are its output."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def prepare_benchmark(threads: int | None = None) -> None:
    """What every benchmark's ``main`` does first: quiet transformers and tokenizers, and pin torch to
    ``threads`` threads when given (on a small shared machine, the same count for every contender)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_transformers()
    if threads:
        import torch
        torch.set_num_threads(threads)
