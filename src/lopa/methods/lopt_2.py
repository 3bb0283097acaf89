"""LoPT-2: Z = σ(X₀ U) V with X₀ (m × d) fixed, U (d × r) and V (r × d) trained: 2rd parameters.

X₀ starts as prompt tuning's initial prompt and is a buffer, not a parameter. σ is ``tanh`` by default
(the paper does not say). With ``init="vocab"`` or ``"text"``, U and V start from X₀'s top-r right
singular vectors, scaled so that σ stays near its linear part: Z then starts close to X₀'s best
rank-r approximation instead of near zero.

Example::

    >>> import torch
    >>> from lopa.methods import InitContext, build_generator, make_config
    >>> gen = build_generator(make_config("lopt-2", num_virtual_tokens=4, rank=2), InitContext(torch.randn(100, 8)))
    >>> sum(p.numel() for p in gen.parameters())  # 2rd
    32
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import InitContext, SoftPromptConfig, SoftPromptGenerator, _check_range, choice, initial_prompt, register

ACTIVATIONS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu, "identity": lambda x: x}


@dataclass
class LoPT2Config(SoftPromptConfig):
    """LoPT-2: Z = σ(X₀ U) V, 2rd parameters."""

    method = "lopt-2"
    default_lr = 1e-3
    rank: int = 4
    """r, the width of the bottleneck"""
    activation: str = choice("tanh", ACTIVATIONS)
    """σ (the paper does not say which; tanh by default)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range("rank", self.rank, 1, 4096)


@register(LoPT2Config)
class LoPT2(SoftPromptGenerator):
    def __init__(self, config: LoPT2Config, ctx: InitContext):
        super().__init__(config, ctx)
        x0 = initial_prompt(config, ctx)
        d, r = x0.shape[1], config.rank
        self.register_buffer("x0", x0)
        if config.init == "random":
            g = torch.Generator().manual_seed(config.seed)
            u, v = torch.randn(d, r, generator=g) / d ** 0.5, torch.randn(r, d, generator=g) * 0.02
        else:
            _, _, vh = torch.linalg.svd(x0, full_matrices=False)
            basis = torch.zeros(d, r)
            k = min(r, vh.shape[0])
            basis[:, :k] = vh[:k].T
            c = 0.5 / (x0 @ basis).abs().max().clamp_min(1e-6)  # keeps |X₀U| <= 0.5
            u, v = basis * c, basis.T / c
        self.u = nn.Parameter(u)
        self.v = nn.Parameter(v)

    def forward(self, features: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        z = ACTIVATIONS[self.config.activation](self.x0 @ self.u) @ self.v
        return z.unsqueeze(0).expand(batch_size, -1, -1)
