"""Baselines with the wrapper's interface: LoRA and full fine-tuning (they need server-side weights,
so they are here for comparison only), and the bare model zero-shot.

They share :class:`~lopa.model.PromptedModel`'s forward, classify and generate with the soft-prompt
methods, with an empty soft prompt, so every method is trained and scored by exactly the same code.

Example::

    >>> import lopa
    >>> from lopa.baselines import BaselineModel
    >>> base, tok = lopa.load_base("tiny-random-llama")
    >>> BaselineModel(base, tok, lopa.make_config("lora", r=2)).num_trainable_parameters()
    896
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .methods import MethodConfig
from .model import PromptedModel

BASELINE_CONFIG = "baseline_config.json"


class BaselineModel(PromptedModel):
    """A method that changes the base model's weights (``lora``: PEFT LoRA on the attention
    projections; ``full``: every weight trains), or, with no config, the bare model zero-shot."""

    def __init__(self, base: nn.Module, tokenizer: Any, config: MethodConfig | None = None,
                 task: dict[str, Any] | None = None, peft_model: nn.Module | None = None):
        super().__init__()  # no generator: the soft prompt is empty
        if config is not None and not config.server_weights:
            raise ValueError(f"method {config.method!r} is a soft-prompt method: use SoftPromptModel")
        self.config, self.tokenizer, self.task, self.encoder = config, tokenizer, dict(task or {}), None
        self.kind = config.method if config is not None else "zero-shot"
        self.peft = None
        if self.kind == "lora":
            if peft_model is None:
                from peft import LoraConfig, get_peft_model
                peft_model = get_peft_model(base, LoraConfig(
                    r=config.r, lora_alpha=config.alpha, lora_dropout=config.lora_dropout,  # type: ignore[union-attr]
                    target_modules=list(config.target_modules), task_type="CAUSAL_LM"))  # type: ignore[union-attr]
            self.peft = peft_model
            self.base = peft_model.base_model.model  # the HF model with LoRA layers injected in place
        elif self.kind == "full":
            self.base = base.requires_grad_(True)
        else:
            self.base = base.eval().requires_grad_(False)

    def soft_prompts(self, texts: Sequence[str]) -> torch.Tensor:
        w = self.base.get_input_embeddings().weight
        return w.new_zeros(len(texts), 0, w.shape[1])

    def trainable_param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.base.parameters() if p.requires_grad], "lr_scale": 1.0}]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.base.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.base.named_parameters())
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.base.parameters() if p.requires_grad)

    def save_pretrained(self, directory: str | Path) -> Path:
        """LoRA: PEFT's adapter files; full: the whole model; both with ``baseline_config.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.kind == "lora":
            self.peft.save_pretrained(str(directory))
        elif self.kind == "full":
            self.base.save_pretrained(str(directory))
            self.tokenizer.save_pretrained(str(directory))
        settings = self.config.to_dict() if self.config is not None else {"method": "zero-shot"}
        (directory / BASELINE_CONFIG).write_text(json.dumps(
            {**settings, "base_model": self.base_name, "task": self.task}, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, base: nn.Module | None = None, tokenizer: Any = None,
                        **_: Any) -> "BaselineModel":
        """Reload a saved baseline (``base`` is needed for LoRA; full loads its own weights)."""
        from .models import load_base
        directory = Path(directory)
        refuse_pickled_weights(directory)
        meta = json.loads((directory / BASELINE_CONFIG).read_text())
        base_model, task = meta.pop("base_model", None), meta.pop("task", None)
        if "kind" in meta:  # older runs wrote {"kind": ..., "lora_r": ...}
            meta = {"method": meta["kind"]}
        config = MethodConfig.from_dict(meta) if meta.get("method") != "zero-shot" else None
        if config is not None and config.method == "full":
            base, tokenizer = load_base(str(directory))
            base.config.name_or_path = base_model or str(directory)
            model = cls(base, tokenizer, config, task=task)
            return model
        if base is None:
            base, tokenizer = load_base(base_model)
        if config is not None and config.method == "lora":
            from peft import PeftModel
            peft_model = PeftModel.from_pretrained(base, str(directory))
            return cls(base, tokenizer, config, task=task, peft_model=peft_model)
        return cls(base, tokenizer, config, task=task)


# pickled weight files and the safetensors file each loader would prefer in their place
PICKLED = {"adapter_model.bin": "adapter_model.safetensors", "pytorch_model.bin": "model.safetensors"}


def refuse_pickled_weights(directory: str | Path) -> None:
    """Raise a ValueError if ``directory``'s weights exist only as pickles (``*.bin``): lopa never
    unpickles, not even with ``weights_only=True``; the message says how to convert them.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); _ = (d / "adapter_model.bin").write_bytes(b"")
    >>> refuse_pickled_weights(d)
    Traceback (most recent call last):
    ...
    ValueError: ...adapter_model.bin is a pickle and lopa never unpickles; if you trust it, convert it once ...
    """
    directory = Path(directory)
    shards = sorted(p.name for p in directory.glob("pytorch_model-*.bin"))
    for name in [*PICKLED, *shards]:
        safe = PICKLED.get(name, "model-*.safetensors")
        if (directory / name).exists() and not list(directory.glob(safe)):
            raise ValueError(
                f"{directory / name} is a pickle and lopa never unpickles; if you trust it, convert it once "
                f"with: python -c \"import torch; from safetensors.torch import save_file; "
                f"save_file(torch.load('{name}', weights_only=True), '{PICKLED.get(name, name[:-4] + '.safetensors')}')\" "
                f"(for a whole model, transformers' save_pretrained(dir, safe_serialization=True) does it)")
