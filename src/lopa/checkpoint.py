"""Training checkpoints that survive SIGKILL and are never unpickled.

A checkpoint is a directory ``checkpoints/step-NNNNNNN`` holding the trainable weights and the
optimiser's tensors (safetensors) and everything else (step, scheduler, RNG, best metric) as JSON. It
is written under a temporary name and renamed into place, so a killed run leaves only complete
checkpoints; :func:`latest` finds the newest. Older ones are pruned.

Example::

    >>> import tempfile, torch
    >>> p = torch.nn.Parameter(torch.ones(2))
    >>> opt = torch.optim.AdamW([p], lr=0.1)
    >>> p.sum().backward(); opt.step()
    >>> root = tempfile.mkdtemp()
    >>> _ = save(root, 1, {"p": p.detach()}, opt.state_dict(), {"best": 0.5})
    >>> ck = load(latest(root))
    >>> ck.step, ck.trainer["best"], ck.weights["p"].tolist() == p.tolist()
    (1, 0.5, True)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Checkpoint:
    step: int
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    trainer: dict[str, Any]
    path: Path


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save(root: str | Path, step: int, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
         trainer_state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically under ``root`` and keep only the newest ``keep``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / "weights.safetensors")
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        rng = torch.get_rng_state()
        (tmp / "state.json").write_text(json.dumps({
            "step": step, "optimizer": opt_meta, "trainer": trainer_state,
            "torch_rng": rng.tolist(),
        }))
        for f in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in _steps(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _steps(root: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and
             (p / "state.json").exists()] if root.is_dir() else []
    return [p for _, p in sorted(found)]


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    steps = _steps(Path(root))
    return steps[-1] if steps else None


def load(path: str | Path) -> Checkpoint:
    """Read a checkpoint (restoring nothing yet: the trainer decides what to restore)."""
    path = Path(path)
    try:
        meta = json.loads((path / "state.json").read_text())
        weights = load_file(path / "weights.safetensors")
        opt = _unflatten_optimizer(load_file(path / "optimizer.safetensors"), meta["optimizer"])
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"checkpoint {path} is unreadable ({e}); delete it to resume from the one before") from None
    trainer = dict(meta["trainer"])
    trainer["torch_rng"] = torch.tensor(meta["torch_rng"], dtype=torch.uint8)
    return Checkpoint(int(meta["step"]), weights, opt, trainer, path)
