"""LoPA (Jain et al. 2024): Z = Z_S ⊙ sigmoid(u vᵀ), a task-wide prompt gated by a low-rank instance part.

u = reshape_{m×r}(W₂ᵘ tanh(W₁ᵘ dropout(x))) and v = reshape_{d×r}(W₂ᵛ tanh(W₁ᵛ dropout(x))), x the
frozen encoder's pooled output. Trainable parameters (encoder width e):

    (e·h + h) + (h·m·r + m·r) + (e·h + h) + (h·d·r + d·r) + m·d

``combine`` picks how Z_S and Z_I = u vᵀ meet (the paper's ablation): ``gate`` (above, default),
``add`` (Z_S + Z_I), ``max`` (elementwise) or ``concat`` ([Z_S ; Z_I], 2m tokens). ``gate_scale``
multiplies the gate: the paper's formulation is 1.0; 2.0 makes Z = Z_S exactly at initialisation
(sigmoid(0) = ½), so LoPA starts where prompt tuning starts. ``shared_lr_scale`` lets Z_S learn at a
different rate from the heads (the trainer multiplies its learning rate by it); its default, 100, was
chosen on SST-2's dev split over three seeds (docs/lopa_study.md): at 1× Z_S barely moves in a few
hundred steps, and 100× puts Z_S at the rate prompt tuning itself does best at there (1e-1).
``instance_dropout`` (0.25 by default, also chosen on SST-2 dev) gives a quarter of the training examples
their batch's mean features: the prompt for an average input then has to work alone, and the heads learn
what differs between inputs; scoring and serving always read each text's own features.
``encoder_input`` says what the encoder reads. The paper's encoder reads the whole prompt; by default
(``auto``) a classification task whose template has two fields (sentence pairs such as MRPC) has each
field read apart, and the heads see their pair features ``[a ⊙ b, |a − b|]``
(:class:`~lopa.encoders.FieldEncoder`): pooled over the whole prompt, the features show nothing of
whether the two sentences say the same thing (chosen on MRPC dev, docs/lopa_study.md; S-IDPG shares it).

Example::

    >>> import torch
    >>> from lopa.methods import InitContext, build_generator, make_config
    >>> cfg = make_config("lopa", num_virtual_tokens=10, rank=4, hidden_size=256)
    >>> gen = build_generator(cfg, InitContext(torch.randn(100, 1024), encoder_dim=1024))
    >>> sum(p.numel() for p in gen.parameters())  # the reference code's 1.60M
    1597992
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .base import (InitContext, InstanceConfig, MLPHead, SoftPromptGenerator, _check_range, choice,
                   initial_prompt, register)

COMBINES = ("gate", "add", "max", "concat")


@dataclass
class LoPAConfig(InstanceConfig):
    """LoPA: a task-wide Z_S gated (or combined) with a rank-r instance part from two heads."""

    method = "lopa"
    default_lr = 1e-3
    rank: int = 4
    """r, the rank of the instance part u v^T"""
    combine: str = choice("gate", COMBINES)
    """how Z_S and Z_I = u v^T meet: gate (the paper's), add, max or concat ([Z_S ; Z_I], 2m tokens)"""
    gate_scale: float = 1.0
    """the gate is gate_scale * sigmoid(u v^T); 1 is the paper's, 2 starts at Z = Z_S exactly"""
    shared_lr_scale: float = 100.0
    """learning-rate multiplier of the task-wide part Z_S relative to the heads (default 100: Z_S at prompt tuning's best rate; the gate can only rescale Z_S, which under Adam moves about one rate per step)"""
    instance_dropout: float = field(default=0.25, metadata={"stored_default": 0.0})
    """while training, the probability that an example's features are replaced by its batch's mean features, so the prompt made from average features must work on its own and the heads learn only what differs between inputs (default 0.25, chosen on SST-2 dev: without it LoPA's task-wide part is weaker than prompt tuning's prompt, and the instance part falls furthest on long texts; 0 = off, the paper's)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range("rank", self.rank, 1, 4096)
        _check_range("gate_scale", self.gate_scale, 1e-6, 100.0)
        _check_range("shared_lr_scale", self.shared_lr_scale, 0.0, 1e6)

    @property
    def num_output_tokens(self) -> int:
        return 2 * self.num_virtual_tokens if self.combine == "concat" else self.num_virtual_tokens


@register(LoPAConfig)
class LoPA(SoftPromptGenerator):
    def __init__(self, config: LoPAConfig, ctx: InitContext):
        super().__init__(config, ctx)
        m, d, r, h = config.num_virtual_tokens, ctx.embed_dim, config.rank, config.hidden_size
        g = torch.Generator().manual_seed(config.seed + 1)
        self.shared = nn.Parameter(initial_prompt(config, ctx))  # Z_S
        self.u_head = MLPHead(ctx.encoder_dim, h, m * r, config.dropout, generator=g, feature_norm=config.feature_norm)
        self.v_head = MLPHead(ctx.encoder_dim, h, d * r, config.dropout, generator=g, feature_norm=config.feature_norm)

    def forward(self, features: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        m, d, r = self.config.num_virtual_tokens, self.embed_dim, self.config.rank
        u = self.u_head(features).view(batch_size, m, r)
        v = self.v_head(features).view(batch_size, d, r)
        z_i = u @ v.transpose(1, 2)  # B × m × d, rank r per instance
        z_s = self.shared.unsqueeze(0).expand(batch_size, -1, -1)
        combine = self.config.combine
        if combine == "gate":
            return z_s * (self.config.gate_scale * torch.sigmoid(z_i))
        if combine == "add":
            return z_s + z_i
        if combine == "max":
            return torch.maximum(z_s, z_i)
        return torch.cat([z_s, z_i], dim=1)

    def param_groups(self) -> list[dict[str, Any]]:
        heads = [p for n, p in self.named_parameters() if n != "shared"]
        return [{"params": [self.shared], "lr_scale": self.config.shared_lr_scale},
                {"params": heads, "lr_scale": 1.0}]
