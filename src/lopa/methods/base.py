"""The interface every soft-prompt method implements, and the registry that finds them by name.

A method is a config dataclass that validates itself plus an ``nn.Module`` generator that maps
instance features (or nothing) to Z of shape ``batch × tokens × d``. Nothing here knows about the
base model's forward pass, the trainer or the server: the wrapper asks only ``needs_features`` and
``num_output_tokens``.

Example::

    >>> from lopa.methods import make_config
    >>> cfg = make_config("lopt-1", num_virtual_tokens=10, rank=4)
    >>> cfg.method, cfg.rank
    ('lopt-1', 4)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

INITS = ("vocab", "text", "random")


class ConfigError(ValueError):
    """A method hyper-parameter out of range or unknown; the message names it."""


def _check_range(name: str, value: Any, lo: float, hi: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ConfigError(f"{name} must be a number {rng}, got {value!r}")


@dataclass
class SoftPromptConfig:
    """Settings every method shares.

    Attributes:
        num_virtual_tokens: m, the soft prompt's length in virtual tokens.
        init: how the task-wide prompt starts: ``vocab`` (random rows of the embedding table),
            ``text`` (the embedded ``init_text``, cycled to m tokens) or ``random`` (N(0, 0.02)).
        init_text: the text for ``init="text"``.
        seed: seeds the initialisation, so the same config gives the same generator.
    """

    method: ClassVar[str] = ""
    instance_dependent: ClassVar[bool] = False

    num_virtual_tokens: int = 10
    init: str = "vocab"
    init_text: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.num_virtual_tokens, bool) or not isinstance(self.num_virtual_tokens, int) \
                or not 1 <= self.num_virtual_tokens <= 1024:
            raise ConfigError(f"num_virtual_tokens must be an integer in [1, 1024], got {self.num_virtual_tokens!r}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise ConfigError("init='text' needs init_text, the text whose embeddings start the prompt")

    @property
    def num_output_tokens(self) -> int:
        """How many virtual tokens Z has (``concat`` doubles m)."""
        return self.num_virtual_tokens

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SoftPromptConfig":
        d = dict(d)
        method = d.pop("method", cls.method)
        klass = get_method(method)[0] if cls is SoftPromptConfig else cls
        known = {f.name for f in dataclasses.fields(klass)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown} for method {method!r}; known: {sorted(known)}")
        return klass(**d)


@dataclass
class InstanceConfig(SoftPromptConfig):
    """Settings of methods that read the instance through a frozen encoder.

    Attributes:
        encoder: the frozen encoder: a short name (``minilm-l6``), hub id, local path, or ``self``
            (mean of the base model's own input embeddings; no second model).
        pooling: ``mean`` or ``cls`` pooling of the encoder's last hidden states.
        hidden_size: h, the width of each head's hidden layer.
        dropout: dropout on the encoder features while training.
    """

    instance_dependent: ClassVar[bool] = True

    encoder: str = "minilm-l6"
    pooling: str = "mean"
    hidden_size: int = 256
    dropout: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.encoder:
            raise ConfigError("encoder must name a model or be 'self'")
        if self.pooling not in ("mean", "cls"):
            raise ConfigError(f"pooling must be 'mean' or 'cls', got {self.pooling!r}")
        _check_range("hidden_size", self.hidden_size, 1, 65536)
        _check_range("dropout", self.dropout, 0.0, 0.99)


@dataclass(frozen=True)
class InitContext:
    """What a generator may look at when it initialises itself: the base model's embedding table
    and tokenizer (for ``vocab`` and ``text`` init) and the encoder's width."""

    embedding_weight: torch.Tensor
    tokenizer: Any = None
    encoder_dim: int | None = None

    @property
    def embed_dim(self) -> int:
        return self.embedding_weight.shape[1]


class SoftPromptGenerator(nn.Module):
    """Maps instance features to Z (batch × num_output_tokens × d). Subclasses implement ``forward``."""

    config: SoftPromptConfig

    def __init__(self, config: SoftPromptConfig, ctx: InitContext):
        super().__init__()
        self.config = config
        self.embed_dim = ctx.embed_dim
        if config.instance_dependent and not ctx.encoder_dim:
            raise ConfigError(f"method {config.method!r} needs an encoder width (encoder_dim)")

    @property
    def needs_features(self) -> bool:
        return self.config.instance_dependent

    @property
    def num_output_tokens(self) -> int:
        return self.config.num_output_tokens

    def forward(self, features: torch.Tensor | None, batch_size: int) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups; ``lr_scale`` multiplies the trainer's learning rate. One group by default."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr_scale": 1.0}]


def initial_prompt(config: SoftPromptConfig, ctx: InitContext, m: int | None = None) -> torch.Tensor:
    """The starting m × d prompt for ``config.init`` (shared by every method with a task-wide part)."""
    m = m or config.num_virtual_tokens
    emb = ctx.embedding_weight.detach().float()
    g = torch.Generator().manual_seed(config.seed)
    if config.init == "random":
        return torch.randn(m, emb.shape[1], generator=g) * 0.02
    if config.init == "text":
        if ctx.tokenizer is None:
            raise ConfigError("init='text' needs the base model's tokenizer")
        ids = ctx.tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError(f"init_text {config.init_text!r} tokenizes to nothing")
        ids = (ids * (m // len(ids) + 1))[:m]
        return emb[torch.tensor(ids)].clone()
    # vocab: rows of ordinary tokens; the first 5000 ids of a BPE vocabulary are the common ones
    hi = min(5000, emb.shape[0])
    return emb[torch.randint(0, hi, (m,), generator=g)].clone()


MethodEntry = tuple[type[SoftPromptConfig], type[SoftPromptGenerator]]
METHODS: dict[str, MethodEntry] = {}


def register(config_cls: type[SoftPromptConfig]) -> Callable[[type[SoftPromptGenerator]], type[SoftPromptGenerator]]:
    """Class decorator on a generator: registers it with its config under ``config_cls.method``."""

    def deco(gen_cls: type[SoftPromptGenerator]) -> type[SoftPromptGenerator]:
        if config_cls.method in METHODS:
            raise ValueError(f"method {config_cls.method!r} registered twice")
        METHODS[config_cls.method] = (config_cls, gen_cls)
        return gen_cls

    return deco


def get_method(name: str) -> MethodEntry:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; known methods: {sorted(METHODS)}") from None


def make_config(method: str, **kwargs: Any) -> SoftPromptConfig:
    """Build and validate the config of a method by name.

    >>> make_config("lopa", num_virtual_tokens=10, rank=4, hidden_size=256, encoder="minilm-l6").combine
    'gate'
    """
    config_cls = get_method(method)[0]
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown} for method {method!r}; known: {sorted(known)}")
    return config_cls(**kwargs)


def build_generator(config: SoftPromptConfig, ctx: InitContext) -> SoftPromptGenerator:
    """Instantiate the generator registered for ``config.method``."""
    gen = get_method(config.method)[1](config, ctx)
    return gen


class MLPHead(nn.Module):
    """W₂ tanh(W₁ dropout(x)) + b: the instance heads of S-IDPG and LoPA.

    W₁ and W₂ start N(0, 0.02) and W₂'s bias at ``out_bias`` (zero unless given), so an untrained
    head adds a small perturbation around its bias.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float, out_bias: torch.Tensor | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)
        with torch.no_grad():
            for lin in (self.fc1, self.fc2):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=generator) * 0.02)
                lin.bias.zero_()
            if out_bias is not None:
                self.fc2.bias.copy_(out_bias.reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(self.dropout(x))))
