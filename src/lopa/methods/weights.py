"""The baselines as registered methods: LoRA and full fine-tuning change the base model's own
weights, so a server would have to hold per-task weights (``server_weights = True``). They are here
for comparison only; :mod:`lopa.baselines` trains them behind the same wrapper interface.

Example::

    >>> from lopa.methods import make_config
    >>> cfg = make_config("lora", r=4)
    >>> cfg.server_weights, cfg.target_modules
    (True, ['q_proj', 'v_proj'])
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import ConfigError, MethodConfig, _check_range, register_config


@register_config
@dataclass
class LoRAConfig(MethodConfig):
    """LoRA through Hugging Face PEFT on the attention projections."""

    method = "lora"
    default_lr = 5e-4
    server_weights = True

    r: int = 8
    """LoRA rank"""
    alpha: int = 16
    """LoRA alpha (the update is scaled by alpha / r)"""
    lora_dropout: float = 0.05
    """dropout on the LoRA input"""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """the modules that get LoRA layers"""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range("r", self.r, 1, 4096)
        _check_range("alpha", self.alpha, 1e-6, 1e6)
        _check_range("lora_dropout", self.lora_dropout, 0.0, 0.99)
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ConfigError(f"target_modules must be a non-empty list of module names, got {self.target_modules!r}")


@register_config
@dataclass
class FullConfig(MethodConfig):
    """Full fine-tuning: every weight of the base model trains."""

    method = "full"
    default_lr = 2e-5
    server_weights = True
    scored_as_trained = True
