"""Prompt tuning (Lester et al. 2021): Z = P, one trainable m × d matrix shared by every instance.

Example::

    >>> import torch
    >>> from lopa.methods import InitContext, build_generator, make_config
    >>> gen = build_generator(make_config("prompt-tuning", num_virtual_tokens=4), InitContext(torch.randn(100, 8)))
    >>> gen(None, batch_size=3).shape
    torch.Size([3, 4, 8])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import InitContext, SoftPromptConfig, SoftPromptGenerator, initial_prompt, register


@dataclass
class PromptTuningConfig(SoftPromptConfig):
    """Prompt tuning: m·d parameters. ``init="random"`` is known to cost a lot of accuracy."""

    method = "prompt-tuning"
    default_lr = 3e-3


@register(PromptTuningConfig)
class PromptTuning(SoftPromptGenerator):
    def __init__(self, config: PromptTuningConfig, ctx: InitContext):
        super().__init__(config, ctx)
        self.prompt = nn.Parameter(initial_prompt(config, ctx))

    def forward(self, features: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        return self.prompt.unsqueeze(0).expand(batch_size, -1, -1)
