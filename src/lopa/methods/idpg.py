"""S-IDPG (Wu et al. 2022): Z = reshape_{m×d}(W₂ tanh(W₁ dropout(x)) + b), x the pooled encoder output.

One head maps each instance's features straight to a whole prompt: e·h + h + h·m·d + m·d parameters.
The output bias b starts as prompt tuning's initial prompt, so an untrained generator starts where
prompt tuning starts.

Example::

    >>> import torch
    >>> from lopa.methods import InitContext, build_generator, make_config
    >>> cfg = make_config("idpg", num_virtual_tokens=4, hidden_size=16)
    >>> gen = build_generator(cfg, InitContext(torch.randn(100, 8), encoder_dim=12))
    >>> gen(torch.randn(3, 12), batch_size=3).shape
    torch.Size([3, 4, 8])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import InitContext, InstanceConfig, MLPHead, SoftPromptGenerator, initial_prompt, register


@dataclass
class IDPGConfig(InstanceConfig):
    """S-IDPG: a frozen encoder and one MLP head of width ``hidden_size`` (h = 256 by default)."""

    method = "idpg"
    default_lr = 1e-3


@register(IDPGConfig)
class IDPG(SoftPromptGenerator):
    def __init__(self, config: IDPGConfig, ctx: InitContext):
        super().__init__(config, ctx)
        m, d = config.num_virtual_tokens, ctx.embed_dim
        g = torch.Generator().manual_seed(config.seed + 1)
        self.head = MLPHead(ctx.encoder_dim, config.hidden_size, m * d, config.dropout,
                            out_bias=initial_prompt(config, ctx), generator=g, feature_norm=config.feature_norm)

    def forward(self, features: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        return self.head(features).view(batch_size, self.config.num_virtual_tokens, self.embed_dim)
