"""A run directory's files, and loading what a run (or an artifact) holds.

``lopa train --out DIR`` writes:

* ``run_config.json``: every hyper-parameter, written first (``--resume`` checks it);
* ``metrics.jsonl`` and ``curves.png``: one line per evaluation, and its plot;
* ``checkpoints/step-N/``: resumable states (see :mod:`lopa.checkpoint`);
* ``best/``: the best evaluation's artifact, which also holds the task's one record (``"task"``);
* ``zero_shot.json``: the bare model's test scores, taken before training;
* ``results.json`` and ``predictions.json``: the test scores, and the per-item results behind them.

>>> run_precision("/nonexistent") is None
True
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RUN_CONFIG = "run_config.json"
ZERO_SHOT = "zero_shot.json"  # the bare model's test scores, taken before training
PREDICTIONS = "predictions.json"  # per-item test results (and labels), for paired comparisons


def load_run_model(run_dir: str | Path, base: Any = None, tokenizer: Any = None) -> Any:
    """The best model of a run (or an artifact / saved baseline directory), loaded for evaluation."""
    from .artifact import CONFIG_NAME, load_artifact
    from .baselines import BASELINE_CONFIG, BaselineModel
    from .model import SoftPromptModel
    from .models import load_base
    run_dir = Path(run_dir)
    d = run_dir / "best" if (run_dir / "best").is_dir() else run_dir
    if (d / BASELINE_CONFIG).exists():
        return BaselineModel.from_pretrained(d, base, tokenizer)
    if not (d / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{run_dir} holds neither a finished run (best/) nor an artifact ({CONFIG_NAME})")
    if base is None:
        base, tokenizer = load_base(load_artifact(d).base_model)
    return SoftPromptModel.from_pretrained(d, base, tokenizer)


def run_precision(run_dir: str | None) -> str | None:
    """The precision a run trained with (its run_config.json), for scoring it the same way."""
    path = Path(run_dir) / RUN_CONFIG if run_dir else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("precision")
    except (OSError, ValueError, AttributeError):
        return None
