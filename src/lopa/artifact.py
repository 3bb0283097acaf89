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
import math
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .methods import ConfigError, InitContext, SoftPromptConfig, SoftPromptGenerator, build_generator
from .methods.base import get_method
from .templates import TemplateError, template_slots

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


# Bounds that hold long before anything is allocated: no config is anywhere near a megabyte, no
# language model is wider than 65,536, and a generator's weights stay far below 2 GiB.
MAX_CONFIG_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 2 << 30
MAX_WIDTH = 1 << 16
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _regular_size(path: Path, cap: int, what: str) -> int:
    """The size of ``path`` if it is a regular file (a link to one is fine) of at most ``cap`` bytes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing ({what})") from None
    except OSError as e:
        raise ArtifactError(f"{path} cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"{path} is not a regular file (it is a {_kind(st.st_mode)}); refusing to read it")
    if st.st_size > cap:
        raise ArtifactError(f"{path} is {st.st_size:,d} bytes, more than the {cap:,d} a {what} may have")
    return st.st_size


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"


def _read_json(path: Path, what: str) -> Any:
    """Parse a small JSON file that must be a regular file; every failure is an ArtifactError.

    The file is opened non-blocking and checked on the open descriptor, so a FIFO cannot hang the
    reader and a link to /dev/zero cannot feed it forever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing ({what})") from None
    except OSError as e:
        raise ArtifactError(f"{path} cannot be read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"{path} is not a regular file (it is a {_kind(st.st_mode)}); refusing to read it")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ArtifactError(f"{path} cannot be read: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ArtifactError(f"{path} is larger than {MAX_CONFIG_BYTES:,d} bytes; no {what} is that large")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: also ints of 5,000 digits
        raise ArtifactError(f"{path} is corrupt: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None


def _int_field(meta: dict[str, Any], key: str, path: Path, lo: int, hi: int, optional: bool = False) -> int | None:
    value = meta.get(key)
    if value is None and optional:
        return None
    if type(value) is not int or not lo <= value <= hi:
        raise ArtifactError(f"{path}: field {key!r} must be an integer in [{lo}, {hi}], not {value!r:.100}")
    return value


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The artifact's JSON config, checked to be ours and every recorded field of the right type and range."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory {directory} does not exist")
    if not os.path.lexists(path):
        hint = " (it holds a PEFT adapter: use lopa.artifact.import_peft)" if (directory / PEFT_CONFIG).exists() else ""
        raise ArtifactError(f"{directory} is not a lopa artifact: {CONFIG_NAME} is missing{hint}")
    meta = _read_json(path, "soft-prompt config")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a lopa artifact config (no \"format\": \"{FORMAT}\")")
    version = meta.get("format_version", 0)
    if type(version) is not int or version < 0:
        raise ArtifactError(f"{path}: field 'format_version' must be a non-negative integer, not {version!r:.100}")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{path} has format_version {version}; this lopa reads up to {FORMAT_VERSION}: upgrade lopa")
    for key in ("config", "hidden_size"):
        if key not in meta:
            raise ArtifactError(f"{path} is missing the field {key!r}")
    if not isinstance(meta["config"], dict):
        raise ArtifactError(f"{path}: field 'config' must be an object, not {type(meta['config']).__name__}")
    _int_field(meta, "hidden_size", path, 1, MAX_WIDTH)
    _int_field(meta, "encoder_dim", path, 1, MAX_WIDTH, optional=True)
    _int_field(meta, "num_output_tokens", path, 1, 1 << 16, optional=True)
    for key in ("method", "base_model", "lopa_version"):
        if key in meta and not isinstance(meta[key], str):
            raise ArtifactError(f"{path}: field {key!r} must be a string, not {meta[key]!r:.100}")
    method = meta["config"].get("method", meta.get("method"))
    if not isinstance(method, str) or ("method" in meta and meta["method"] != method):
        raise ArtifactError(f"{path}: field 'config.method' must be a string equal to 'method', not {method!r:.100}")
    _check_task(meta.get("task"), path)
    return meta


def _check_task(task: Any, path: Path) -> None:
    """The recorded task: flat settings (one level of objects allowed: the prompt format, a split
    map), label words a list of strings, a template with plain slots."""
    if task is None:
        return
    if not isinstance(task, dict):
        raise ArtifactError(f"{path}: field 'task' must be an object, not {type(task).__name__}")
    for key, value in task.items():
        where = f"{path}: field 'task.{key}'"
        if key == "label_words" and not isinstance(value, list):
            raise ArtifactError(f"{where} must be a list of strings, not {value!r:.100}")
        if isinstance(value, dict):
            for k, v in value.items():
                _check_task_value(v, f"{where[:-1]}.{k}'")
        else:
            _check_task_value(value, where)
    if task.get("template"):
        try:
            template_slots(task["template"])
        except TemplateError as e:
            raise ArtifactError(f"{path}: field 'task.template': {e}") from None


def _check_task_value(value: Any, where: str) -> None:
    """A recorded task setting: a string, number, boolean, null or list of strings (label words, stops)."""
    if isinstance(value, list):
        if not all(isinstance(w, str) for w in value):
            raise ArtifactError(f"{where} must be a list of strings, not {value!r:.100}")
    elif value is not None and not isinstance(value, (str, int, float)):
        raise ArtifactError(f"{where} must be a string, a number, a list of strings or an object of those, "
                            f"not {type(value).__name__}")
    for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ArtifactError(f"{where} is not valid Unicode ({e.reason})") from None


# what each annotation of a method config's fields admits from JSON
_JSON_TYPES: dict[str, Any] = {
    "int": lambda v: type(v) is int, "bool": lambda v: type(v) is bool, "str": lambda v: isinstance(v, str),
    "str | None": lambda v: v is None or isinstance(v, str),
    "float": lambda v: type(v) in (int, float) and math.isfinite(v),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
}


def _method_config(meta: dict[str, Any], path: Path) -> SoftPromptConfig:
    raw = meta["config"]
    try:
        klass = get_method(raw.get("method", meta.get("method")))[0]
    except ConfigError as e:
        raise ArtifactError(f"{path}: field 'config.method': {e}") from None
    for f in dataclasses.fields(klass):
        ok = _JSON_TYPES.get(str(f.type))
        if f.name in raw and ok is not None and not ok(raw[f.name]):
            raise ArtifactError(f"{path}: field 'config.{f.name}' must be {f.type}, not {raw[f.name]!r:.100}")
    try:
        return SoftPromptConfig.from_dict(raw)
    except (ConfigError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: field 'config': {e}") from None


def expected_shapes(config: SoftPromptConfig, hidden_size: int, encoder_dim: int | None) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes a generator for ``config`` has, found without allocating any of it.

    >>> from lopa.methods import make_config
    >>> expected_shapes(make_config("lopt-1", num_virtual_tokens=1024, rank=4096), 65536, None)
    {'u': (1024, 4096), 'v': (4096, 65536)}
    """
    shell = dataclasses.replace(config, init="random")  # initialisation is overwritten by the saved weights
    with torch.device("meta"):  # shapes without storage: a 1 TiB config costs nothing to inspect
        gen = build_generator(shell, InitContext(torch.zeros(1, hidden_size), None, encoder_dim))
    return {k: tuple(v.shape) for k, v in gen.state_dict().items()}


def _header(weights: Path, max_bytes: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from a safetensors header, without reading the tensors."""
    _regular_size(weights, max_bytes, "soft-prompt weights file")
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{weights} is corrupt or not a safetensors file: {str(e)[:200]}") from None


def load_artifact(directory: str | Path, expected_hidden_size: int | None = None, *,
                  max_bytes: int = MAX_WEIGHTS_BYTES) -> Artifact:
    """Load and check an artifact without the base model (the client needs only this).

    ``expected_hidden_size``, when given, must equal the recorded width of the base model. Every
    recorded size is checked against the tensors' header before any tensor is read or built.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    path = directory / CONFIG_NAME
    config = _method_config(meta, path)
    d, enc_dim = meta["hidden_size"], meta.get("encoder_dim")
    if expected_hidden_size is not None and d != expected_hidden_size:
        raise ArtifactError(f"artifact {directory} was trained for a base model of width {d} "
                            f"({meta.get('base_model')!r}), but this model's width is {expected_hidden_size}")
    if "num_output_tokens" in meta and meta["num_output_tokens"] != config.num_output_tokens:
        raise ArtifactError(f"{path}: field 'num_output_tokens' is {meta['num_output_tokens']}, but the method "
                            f"settings give {config.num_output_tokens}")
    weights = directory / WEIGHTS_NAME
    if not os.path.lexists(weights):
        raise ArtifactError(f"{directory} is incomplete: {WEIGHTS_NAME} is missing")
    header = _header(weights, max_bytes)
    try:
        expected = expected_shapes(config, d, enc_dim)
    except (ConfigError, ValueError, TypeError, RuntimeError) as e:
        raise ArtifactError(f"{path}: the method settings cannot build a generator: {e}") from None
    got = {k: shape for k, (_, shape) in header.items()}
    if expected != got:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        wrong = sorted(f"{k} {got[k]} (settings say {expected[k]})" for k in set(expected) & set(got)
                       if expected[k] != got[k])
        raise ArtifactError(f"{weights} does not match method {config.method!r} with the recorded settings "
                            f"(hidden_size {d}, encoder_dim {enc_dim}): missing {missing[:5]}, unexpected "
                            f"{extra[:5]}, wrong shape {wrong[:5]}")
    odd = sorted(k for k, (dtype, _) in header.items() if dtype not in FLOAT_DTYPES)
    if odd:
        raise ArtifactError(f"{weights}: tensors {odd[:5]} are not floating point ({header[odd[0]][0]})")
    # from here every allocation is bounded by the weights file, itself bounded by max_bytes
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{weights} is corrupt or not a safetensors file: {e}") from None
    if not all(torch.isfinite(v).all() for v in tensors.values()):
        raise ArtifactError(f"{weights} holds NaN or infinite values")
    shell = dataclasses.replace(config, init="random")
    gen = build_generator(shell, InitContext(torch.zeros(1, d), None, enc_dim))
    gen.config = config
    gen.load_state_dict({k: v.float() for k, v in tensors.items()})
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
    if not os.path.lexists(cfg_path):
        raise ArtifactError(f"{directory} is not a PEFT adapter: {PEFT_CONFIG} is missing")
    pcfg = _read_json(cfg_path, "PEFT adapter config")
    if not isinstance(pcfg, dict):
        raise ArtifactError(f"{cfg_path} is not a JSON object")
    if pcfg.get("peft_type") != "PROMPT_TUNING":
        raise ArtifactError(f"{directory} holds a PEFT {pcfg.get('peft_type')!r} adapter; only PROMPT_TUNING "
                            f"adapters are soft prompts")
    m = _int_field(pcfg, "num_virtual_tokens", cfg_path, 1, 1024)
    d = _int_field(pcfg, "token_dim", cfg_path, 1, MAX_WIDTH)
    subs = _int_field(pcfg, "num_transformer_submodules", cfg_path, 1, 2, optional=True) or 1
    base_name = pcfg.get("base_model_name_or_path") or ""
    if not isinstance(base_name, str):
        raise ArtifactError(f"{cfg_path}: field 'base_model_name_or_path' must be a string, not {base_name!r:.100}")
    weights = directory / PEFT_WEIGHTS
    if not os.path.lexists(weights):
        pickled = [p.name for p in directory.glob("adapter_model.bin")]
        raise ArtifactError(f"{weights} is missing" + (" (adapter_model.bin is a pickle; lopa never unpickles: "
                                                         "re-save it with safe_serialization=True)" if pickled else ""))
    header = _header(weights, MAX_WEIGHTS_BYTES)
    dtype, shape = header.get("prompt_embeddings", ("", ()))
    if shape != (m * subs, d) or dtype not in FLOAT_DTYPES:
        raise ArtifactError(f"{weights} has no floating-point prompt_embeddings of shape ({m * subs}, {d}) "
                            f"(it has {sorted(header)[:5]}, prompt_embeddings {dtype or 'absent'} {shape})")
    try:
        prompt = load_file(weights)["prompt_embeddings"]
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{weights} is corrupt: {e}") from None
    if not torch.isfinite(prompt).all():
        raise ArtifactError(f"{weights} holds NaN or infinite values")
    config = make_config("prompt-tuning", num_virtual_tokens=m, init="random")
    gen = build_generator(config, InitContext(torch.zeros(1, d)))
    with torch.no_grad():
        gen.prompt.copy_(prompt[:m].float())
    art = Artifact(config, gen, base_name, d, None, dict(task or {}))
    if out is not None:
        save_artifact(out, gen, base_name=art.base_model, hidden_size=d, task=art.task)
    return art
