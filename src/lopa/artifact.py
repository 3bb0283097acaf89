"""Trained generators on disk: ``soft_prompt_config.json`` + ``soft_prompt.safetensors``.

The config records the method and its hyper-parameters, the base model's name and embedding width,
the encoder and its width, the task's template and label words, and the library version. Tensors are
safetensors only: nothing is ever unpickled, and a PEFT adapter saved as a pickle is refused.

A PEFT prompt-tuning adapter (``adapter_config.json`` + ``adapter_model.safetensors``) can be
imported as a ``prompt-tuning`` artifact, and a ``prompt-tuning`` artifact exported to PEFT's format.

Example::

    >>> import tempfile, torch
    >>> from lopa.methods import InitContext, build_generator, make_config
    >>> gen = build_generator(make_config("prompt-tuning", num_virtual_tokens=4), InitContext(torch.randn(50, 8)))
    >>> d = tempfile.mkdtemp()
    >>> _ = save_artifact(d, gen, base_name="tiny", hidden_size=8)
    >>> load_artifact(d, expected_hidden_size=8).config.num_virtual_tokens
    4
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .methods import ConfigError, InitContext, SoftPromptConfig, SoftPromptGenerator, build_generator

CONFIG_NAME = "soft_prompt_config.json"
WEIGHTS_NAME = "soft_prompt.safetensors"
FORMAT = "lopa.soft-prompt"
FORMAT_VERSION = 1
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


class ArtifactError(ValueError):
    """An artifact that cannot be used: missing, corrupt, foreign, or made for another model."""


@dataclass
class Artifact:
    """A loaded artifact: the generator (weights loaded) and what was recorded beside it."""

    config: SoftPromptConfig
    generator: SoftPromptGenerator
    base_model: str
    hidden_size: int
    encoder_dim: int | None = None
    task: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_output_tokens(self) -> int:
        return self.generator.num_output_tokens


def _write_atomic(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_artifact(directory: str | Path, generator: SoftPromptGenerator, *, base_name: str, hidden_size: int,
                  encoder_dim: int | None = None, task: dict[str, Any] | None = None,
                  extra: dict[str, Any] | None = None) -> Path:
    """Write an artifact; each file is written to a temporary name and renamed, so a crash leaves
    either the old file or the new one, never half of one."""
    from . import __version__
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in generator.state_dict().items()}
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "lopa_version": __version__,
        "method": generator.config.method, "config": generator.config.to_dict(),
        "base_model": base_name, "hidden_size": int(hidden_size), "encoder_dim": encoder_dim,
        "num_output_tokens": generator.num_output_tokens, "task": dict(task or {}), **(extra or {}),
    }
    _write_atomic(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": FORMAT}))
    _write_atomic(directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The artifact's JSON config, checked to be ours."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory {directory} does not exist")
    if not path.exists():
        hint = " (it holds a PEFT adapter: use lopa.artifact.import_peft)" if (directory / PEFT_CONFIG).exists() else ""
        raise ArtifactError(f"{directory} is not a lopa artifact: {CONFIG_NAME} is missing{hint}")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is corrupt: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a lopa artifact config (no \"format\": \"{FORMAT}\")")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(f"{path} has format_version {meta['format_version']}; this lopa reads up to "
                            f"{FORMAT_VERSION}: upgrade lopa")
    for key in ("config", "hidden_size"):
        if key not in meta:
            raise ArtifactError(f"{path} is missing the field {key!r}")
    return meta


def load_artifact(directory: str | Path, expected_hidden_size: int | None = None) -> Artifact:
    """Load and check an artifact without the base model (the client needs only this).

    ``expected_hidden_size``, when given, must equal the recorded width of the base model.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    try:
        config = SoftPromptConfig.from_dict(meta["config"])
    except (ConfigError, TypeError) as e:
        raise ArtifactError(f"{directory / CONFIG_NAME}: {e}") from None
    d = int(meta["hidden_size"])
    if expected_hidden_size is not None and d != expected_hidden_size:
        raise ArtifactError(f"artifact {directory} was trained for a base model of width {d} "
                            f"({meta.get('base_model')!r}), but this model's width is {expected_hidden_size}")
    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        raise ArtifactError(f"{directory} is incomplete: {WEIGHTS_NAME} is missing")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{weights} is corrupt or not a safetensors file: {e}") from None
    enc_dim = meta.get("encoder_dim")
    # initialisation is overwritten by the saved weights, so build cheaply without the base model
    shell = dataclasses.replace(config, init="random")
    gen = build_generator(shell, InitContext(torch.zeros(1, d), None, enc_dim))
    gen.config = config
    expected = {k: tuple(v.shape) for k, v in gen.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise ArtifactError(f"{weights} does not match method {config.method!r} with the recorded settings: "
                            f"missing {missing}, unexpected {extra}, wrong shape {wrong}")
    if not all(torch.isfinite(v).all() for v in tensors.values()):
        raise ArtifactError(f"{weights} holds NaN or infinite values")
    gen.load_state_dict(tensors)
    gen.eval()
    return Artifact(config, gen, str(meta.get("base_model", "")), d, enc_dim, dict(meta.get("task") or {}), meta)


def export_peft(directory: str | Path, out: str | Path) -> Path:
    """Write a ``prompt-tuning`` artifact as a PEFT prompt-tuning adapter (loadable by ``PeftModel``)."""
    from peft import PromptTuningConfig, TaskType
    art = load_artifact(directory)
    if art.config.method != "prompt-tuning":
        raise ArtifactError(f"only prompt-tuning artifacts have a PEFT equivalent; {directory} is "
                            f"{art.config.method!r} (PEFT has no instance-dependent prompts)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=art.config.num_virtual_tokens,
                             token_dim=art.hidden_size, num_transformer_submodules=1,
                             base_model_name_or_path=art.base_model or None, inference_mode=True)
    cfg.save_pretrained(str(out))
    prompt = art.generator(None, 1)[0].detach().contiguous()
    _write_atomic(out / PEFT_WEIGHTS, lambda p: save_file({"prompt_embeddings": prompt}, p, metadata={"format": "pt"}))
    return out


def import_peft(directory: str | Path, out: str | Path | None = None, task: dict[str, Any] | None = None) -> Artifact:
    """Read a PEFT prompt-tuning adapter as a ``prompt-tuning`` artifact (saved to ``out`` if given)."""
    from .methods import make_config
    directory = Path(directory)
    cfg_path = directory / PEFT_CONFIG
    if not cfg_path.exists():
        raise ArtifactError(f"{directory} is not a PEFT adapter: {PEFT_CONFIG} is missing")
    try:
        pcfg = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{cfg_path} is corrupt: {e}") from None
    if pcfg.get("peft_type") != "PROMPT_TUNING":
        raise ArtifactError(f"{directory} holds a PEFT {pcfg.get('peft_type')!r} adapter; only PROMPT_TUNING "
                            f"adapters are soft prompts")
    weights = directory / PEFT_WEIGHTS
    if not weights.exists():
        pickled = [p.name for p in directory.glob("adapter_model.bin")]
        raise ArtifactError(f"{weights} is missing" + (" (adapter_model.bin is a pickle; lopa never unpickles: "
                                                         "re-save it with safe_serialization=True)" if pickled else ""))
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{weights} is corrupt: {e}") from None
    prompt = tensors.get("prompt_embeddings")
    m, d = int(pcfg.get("num_virtual_tokens", 0)), int(pcfg.get("token_dim", 0))
    if prompt is None or tuple(prompt.shape) != (m * int(pcfg.get("num_transformer_submodules") or 1), d):
        raise ArtifactError(f"{weights} has no prompt_embeddings of shape ({m}, {d})")
    config = make_config("prompt-tuning", num_virtual_tokens=m, init="random")
    gen = build_generator(config, InitContext(torch.zeros(1, d)))
    with torch.no_grad():
        gen.prompt.copy_(prompt[:m].float())
    art = Artifact(config, gen, str(pcfg.get("base_model_name_or_path") or ""), d, None, dict(task or {}))
    if out is not None:
        save_artifact(out, gen, base_name=art.base_model, hidden_size=d, task=art.task)
    return art
