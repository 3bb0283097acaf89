"""LoPT-1 (Guo et al. 2024): the prompt itself is low rank, Z = U V with U (m × r) and V (r × d).

r(m + d) parameters instead of m·d. With ``init="vocab"`` or ``"text"`` U V starts as the best rank-r
approximation (truncated SVD) of the prompt that prompt tuning would start from.

Example::

    >>> import torch
    >>> from lopa.methods import InitContext, build_generator, make_config
    >>> gen = build_generator(make_config("lopt-1", num_virtual_tokens=4, rank=2), InitContext(torch.randn(100, 8)))
    >>> sum(p.numel() for p in gen.parameters())  # r(m + d)
    24
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import InitContext, SoftPromptConfig, SoftPromptGenerator, _check_range, initial_prompt, register


@dataclass
class LoPT1Config(SoftPromptConfig):
    """LoPT-1: Z = U V, r(m + d) parameters."""

    method = "lopt-1"
    default_lr = 3e-3
    rank: int = 4
    """r, the rank of Z"""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range("rank", self.rank, 1, 4096)


@register(LoPT1Config)
class LoPT1(SoftPromptGenerator):
    def __init__(self, config: LoPT1Config, ctx: InitContext):
        super().__init__(config, ctx)
        p = initial_prompt(config, ctx)
        r = config.rank
        if config.init == "random":
            g = torch.Generator().manual_seed(config.seed)
            # N(0, 0.02) entries in Z need U, V entries of std sqrt(0.02 / sqrt(r))
            s = (0.02 / r ** 0.5) ** 0.5
            u, v = torch.randn(p.shape[0], r, generator=g) * s, torch.randn(r, p.shape[1], generator=g) * s
        else:
            uu, ss, vh = torch.linalg.svd(p, full_matrices=False)
            k = min(r, ss.numel())
            root = ss[:k].sqrt()
            u = torch.zeros(p.shape[0], r)
            v = torch.zeros(r, p.shape[1])
            u[:, :k], v[:k] = uu[:, :k] * root, root[:, None] * vh[:k]
        self.u = nn.Parameter(u)
        self.v = nn.Parameter(v)

    def forward(self, features: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        return (self.u @ self.v).unsqueeze(0).expand(batch_size, -1, -1)
