"""Training checkpoints that survive SIGKILL and are never unpickled.

A checkpoint is a directory ``checkpoints/step-NNNNNNN`` holding the trainable weights and the
optimiser's tensors (safetensors) and everything else (step, scheduler, RNG, best metric) as JSON. It
is written under a temporary name and renamed into place, so a killed run leaves only complete
checkpoints; :func:`latest` finds the newest. Older ones are pruned.

Each checkpoint carries ``SHA256SUMS`` (``sha256sum -c`` reads it). :func:`load_resumable` trusts
nothing it reads: checksums, the step, finiteness, every key and shape against the live run, the
RNG state; a checkpoint that fails is named with what is wrong and the one before it is tried.

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

import hashlib
import math
from collections.abc import Callable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-"
SUMS = "SHA256SUMS"
FILES = ("weights.safetensors", "optimizer.safetensors", "state.json")
# state.json holds a step, a few numbers, the scheduler and a 5 KB RNG state: far below this
MAX_STATE_BYTES = 64 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names it and what is wrong."""


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
    remove_stale_tmp(root)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=root))
    try:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / "weights.safetensors")
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        rng = torch.get_rng_state()
        (tmp / "state.json").write_text(json.dumps({
            "step": step, "optimizer": opt_meta, "trainer": trainer_state,
            "torch_rng": rng.tolist(),
        }))
        (tmp / SUMS).write_text("".join(f"{_sha256(tmp / f)}  {f}\n" for f in FILES))
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def remove_stale_tmp(root: str | Path) -> list[Path]:
    """Delete the half-written checkpoints a killed run left under ``root``; return them."""
    root = Path(root)
    stale = [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)] if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    return stale


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


# ------------------------------------------------------------------------------ verified resume


def load_resumable(root: str | Path, *, max_steps: int, weights: Mapping[str, torch.Tensor], optimizer: Any,
                   trainer: Mapping[str, Any] | None = None,
                   log: Callable[[str], Any] = print) -> Checkpoint | None:
    """The newest checkpoint under ``root`` that passes :func:`verify`, or None if there is none at all.

    ``weights``, ``optimizer`` (the live torch optimiser) and ``trainer`` (the trainer state as it
    would be saved now) describe the run that resumes: a checkpoint must match their keys, shapes
    and types. Each rejected checkpoint is logged with the reason, then the one before it is tried
    (and ``log`` says which one the run resumes from); if every one is rejected, a CheckpointError
    lists them all. Half-written ``.tmp-*`` directories are removed first.

    >>> import tempfile, torch
    >>> p = torch.nn.Parameter(torch.ones(2))
    >>> opt = torch.optim.AdamW([p], lr=0.1)
    >>> p.sum().backward(); opt.step()
    >>> root = Path(tempfile.mkdtemp())
    >>> _ = save(root, 1, {"p": p.detach()}, opt.state_dict(), {"best": 0.5})
    >>> _ = save(root, 2, {"p": p.detach() * float("nan")}, opt.state_dict(), {"best": 0.5})
    >>> load_resumable(root, max_steps=5, weights={"p": p}, optimizer=opt, log=print).step
    checkpoint ...step-0000002 is unusable: weights.safetensors: tensor 'p' holds NaN or infinite values
    resuming from ...step-0000001 (step 1), the newest usable checkpoint
    1
    """
    root = Path(root)
    for stale in remove_stale_tmp(root):
        log(f"removed {stale}, a checkpoint left half-written by a killed run")
    candidates = _step_dirs(root)
    rejected: list[str] = []
    for path in reversed(candidates):
        try:
            ck = verify(path, max_steps=max_steps, weights=weights, optimizer=optimizer, trainer=trainer, log=log)
        except CheckpointError as e:
            log(str(e))
            rejected.append(str(e))
            continue
        if rejected:
            log(f"resuming from {path} (step {ck.step}), the newest usable checkpoint")
        return ck
    if rejected:
        raise CheckpointError(f"no usable checkpoint under {root}:\n  " + "\n  ".join(rejected)
                              + "\nrepair or delete them, or start again with --overwrite")
    return None


def _step_dirs(root: Path) -> list[Path]:
    """Every ``step-N`` entry, oldest first, complete or not (verify says what is wrong with it)."""
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))] if root.is_dir() else []
    return [p for _, p in sorted(found)]


def verify(path: str | Path, *, max_steps: int, weights: Mapping[str, torch.Tensor], optimizer: Any,
           trainer: Mapping[str, Any] | None = None, log: Callable[[str], Any] = print) -> Checkpoint:
    """Load checkpoint ``path`` and check all of it against the live run (see :func:`load_resumable`)."""
    path = Path(path)

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path} is unusable: {why}")

    if not path.is_dir() or path.is_symlink():
        raise bad("not a directory")
    for name in FILES:
        f = path / name
        if not f.is_file() or f.is_symlink():
            raise bad(f"{name} is missing or not a regular file")
    _check_sums(path, bad, log)
    if (path / "state.json").stat().st_size > MAX_STATE_BYTES:
        raise bad(f"state.json is larger than {MAX_STATE_BYTES >> 20} MiB")
    try:
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"state.json is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(meta, dict):
        raise bad("state.json is not a JSON object")
    missing = [k for k in ("step", "optimizer", "trainer", "torch_rng") if k not in meta]
    if missing:
        raise bad(f"state.json lacks {missing}")
    step = meta["step"]
    named = int(_STEP_DIR.match(path.name).group(1)) if _STEP_DIR.match(path.name) else step
    if type(step) is not int or not 0 <= step <= max_steps:
        raise bad(f"state.json: step {step!r} is not an integer in [0, max_steps={max_steps}]")
    if step != named:
        raise bad(f"state.json: step {step} disagrees with the directory name")
    tensors = {}
    for name in FILES[:2]:
        try:
            tensors[name] = load_file(path / name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise bad(f"{name} is truncated or not a safetensors file ({str(e)[:200]})") from None
        for key, t in tensors[name].items():
            if not t.is_floating_point() and name == FILES[0]:
                raise bad(f"{name}: tensor {key!r} has dtype {t.dtype}, not a floating type")
            if not torch.isfinite(t).all():
                raise bad(f"{name}: tensor {key!r} holds NaN or infinite values")
    _check_weights(tensors[FILES[0]], weights, bad)
    opt_meta = meta["optimizer"]
    if not isinstance(opt_meta, dict) or not {"param_groups", "scalars"} <= set(opt_meta):
        raise bad("state.json: optimizer is not an object with param_groups and scalars")
    _check_optimizer(tensors[FILES[1]], opt_meta, optimizer, step, bad)
    if trainer is not None:
        problem = _structure_mismatch(dict(trainer), meta["trainer"], "trainer")
        if problem:
            raise bad(f"state.json: {problem}")
    _check_trainer(meta["trainer"], step, bad)
    rng = _check_rng(meta["torch_rng"], bad)
    out = dict(meta["trainer"])
    out["torch_rng"] = rng
    opt = _unflatten_optimizer(tensors[FILES[1]], opt_meta)
    return Checkpoint(step, tensors[FILES[0]], opt, out, path)


def _check_sums(path: Path, bad: Callable[[str], CheckpointError], log: Callable[[str], Any]) -> None:
    sums = path / SUMS
    if not os.path.lexists(sums):  # written before checksums existed: the value checks below still run
        log(f"checkpoint {path} has no {SUMS} (written by an older lopa): its values are checked, its bytes cannot be")
        return
    if not sums.is_file() or sums.is_symlink():
        raise bad(f"{SUMS} is not a regular file")
    try:
        text = sums.read_text(encoding="ascii") if sums.stat().st_size < 4096 else ""
        listed = dict(reversed(line.split("  ", 1)) for line in text.splitlines())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise bad(f"{SUMS} is unreadable ({e})") from None
    if sorted(listed) != sorted(FILES):
        raise bad(f"{SUMS} does not list exactly {list(FILES)}")
    for name in FILES:
        if _sha256(path / name) != listed[name]:
            raise bad(f"{name} does not match its checksum in {SUMS} (the file changed after it was written)")


def _check_weights(got: dict[str, torch.Tensor], live: Mapping[str, torch.Tensor],
                   bad: Callable[[str], CheckpointError]) -> None:
    missing, extra = sorted(set(live) - set(got)), sorted(set(got) - set(live))
    if missing or extra:
        raise bad(f"weights.safetensors: missing keys {missing[:5]}, unexpected keys {extra[:5]}")
    for key, t in got.items():
        if tuple(t.shape) != tuple(live[key].shape):
            raise bad(f"weights.safetensors: {key!r} has shape {tuple(t.shape)}, the model has {tuple(live[key].shape)}")


def _check_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any], optimizer: Any, step: int,
                     bad: Callable[[str], CheckpointError]) -> None:
    live = optimizer.state_dict()
    problem = _structure_mismatch(live["param_groups"], meta["param_groups"], "optimizer.param_groups")
    if problem:
        raise bad(f"state.json: {problem}")
    for i, (want, got) in enumerate(zip(live["param_groups"], meta["param_groups"])):
        if got["params"] != list(want["params"]):
            raise bad(f"state.json: optimizer.param_groups[{i}].params is {got['params']!r:.100}, "
                      f"the run has {list(want['params'])!r:.100}")
    shapes = {idx: tuple(p.shape) for group, live_group in zip(optimizer.param_groups, live["param_groups"])
              for idx, p in zip(live_group["params"], group["params"])}
    scalars = meta["scalars"]
    if not isinstance(scalars, dict):
        raise bad("state.json: optimizer.scalars is not an object")
    for flat, value in list(tensors.items()) + list(scalars.items()):
        idx, _, key = flat.partition(".")
        if not (idx.isdigit() and key and int(idx) in shapes):
            raise bad(f"optimizer state {flat!r} names no parameter of the run (it has {len(shapes)})")
        if isinstance(value, torch.Tensor):
            if value.dim() == 0:
                if key == "step" and not 0 <= float(value) <= step:
                    raise bad(f"optimizer.safetensors: {flat!r} is {float(value):g}, outside [0, {step}]")
            elif tuple(value.shape) != shapes[int(idx)]:
                raise bad(f"optimizer.safetensors: {flat!r} has shape {tuple(value.shape)}, "
                          f"its parameter has {shapes[int(idx)]}")
        elif not _is_number(value) or (isinstance(value, float) and not math.isfinite(value)):
            raise bad(f"state.json: optimizer scalar {flat!r} is {value!r:.100}, not a finite number")


def _check_trainer(trainer: Any, step: int, bad: Callable[[str], CheckpointError]) -> None:
    if not isinstance(trainer, dict):
        raise bad("state.json: trainer is not an object")
    for key in ("best_step", "bad_evals"):
        if key in trainer and not (type(trainer[key]) is int and 0 <= trainer[key] <= step):
            raise bad(f"state.json: trainer.{key} is {trainer[key]!r:.100}, not an integer in [0, {step}]")
    if "best" in trainer and not (_is_number(trainer["best"]) and trainer["best"] == trainer["best"]):
        raise bad(f"state.json: trainer.best is {trainer['best']!r:.100}, not a number")
    if "elapsed_s" in trainer and not (_is_number(trainer["elapsed_s"]) and 0 <= trainer["elapsed_s"] < math.inf):
        raise bad(f"state.json: trainer.elapsed_s is {trainer['elapsed_s']!r:.100}, not a finite time")
    sched = trainer.get("scheduler")
    if isinstance(sched, dict) and "last_epoch" in sched and sched["last_epoch"] != step:
        raise bad(f"state.json: the scheduler is at step {sched['last_epoch']!r:.100}, the checkpoint at {step}")


def _check_rng(rng: Any, bad: Callable[[str], CheckpointError]) -> torch.Tensor:
    size = torch.get_rng_state().numel()
    if not (isinstance(rng, list) and len(rng) == size and all(type(b) is int and 0 <= b <= 255 for b in rng)):
        raise bad(f"state.json: torch_rng is not a list of {size} bytes")
    state = torch.tensor(rng, dtype=torch.uint8)
    try:
        torch.Generator().set_state(state)  # a throwaway generator: the live one is set by the trainer
    except RuntimeError as e:
        raise bad(f"state.json: torch_rng is not a valid generator state ({e})") from None
    return state


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _structure_mismatch(want: Any, got: Any, where: str) -> str | None:
    """Where ``got`` (read from JSON) differs in structure or type from ``want`` (the live value), or None.

    >>> _structure_mismatch({"lr": 0.1, "betas": (0.9, 0.99)}, {"lr": "x", "betas": [0.9, 0.99]}, "g")
    "g.lr is 'x', expected a number"
    """
    if isinstance(want, Mapping):
        if not isinstance(got, dict):
            return f"{where} is {type(got).__name__}, expected an object"
        missing, extra = sorted(map(str, set(want) - set(got))), sorted(map(str, set(got) - set(want)))
        if missing or extra:
            return f"{where} lacks keys {missing[:5]} / has unexpected keys {extra[:5]}"
        for k in want:
            if (problem := _structure_mismatch(want[k], got[k], f"{where}.{k}")) is not None:
                return problem
        return None
    if isinstance(want, (list, tuple)):
        if not isinstance(got, list) or len(got) != len(want):
            return f"{where} is {got!r:.100}, expected a list of {len(want)}"
        for i, (w, g) in enumerate(zip(want, got)):
            if (problem := _structure_mismatch(w, g, f"{where}[{i}]")) is not None:
                return problem
        return None
    if isinstance(want, bool) or want is None or isinstance(want, str):
        ok = type(got) is type(want)
    elif _is_number(want):
        ok = _is_number(got) and not (isinstance(got, float) and math.isnan(got))
    else:
        return None
    return None if ok else f"{where} is {got!r:.100}, expected {'a number' if _is_number(want) else type(want).__name__}"
