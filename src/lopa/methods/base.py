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
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import nn

INITS = ("vocab", "text", "random")
POOLINGS = ("mean", "cls")
ENCODER_INPUTS = ("prompt", "fields", "auto")
FEATURE_NORMS = ("none", "l2", "rms")


class ConfigError(ValueError):
    """A method hyper-parameter out of range or unknown; the message names it."""


def _check_range(name: str, value: Any, lo: float, hi: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ConfigError(f"{name} must be a number {rng}, got {value!r}")


def choice(default: str, choices: Sequence[str]) -> Any:
    """A string field limited to ``choices``: the config checks it, and ``lopa train`` offers them."""
    return field(default=default, metadata={"choices": tuple(choices)})


@dataclass
class MethodConfig:
    """What every method's config shares: its registry name, its default learning rate, whether it
    needs weights on the server, and a seed. Fields with ``choices`` metadata are checked here; a
    field's attribute docstring is its ``--help`` text in ``lopa train``.
    """

    method: ClassVar[str] = ""
    default_lr: ClassVar[float] = 1e-3
    # True for the baselines (LoRA, full fine-tuning): they change the base model, so a server
    # would have to hold per-task weights; soft-prompt methods leave the server untouched
    server_weights: ClassVar[bool] = False
    # True where reloading the best checkpoint would need a second copy of the whole model (full
    # fine-tuning): the run is then scored as it ended
    scored_as_trained: ClassVar[bool] = False

    seed: int = field(default=0, metadata={"cli": False})
    """seeds the initialisation (``lopa train`` passes its --seed)"""

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        for f in dataclasses.fields(self):
            allowed = f.metadata.get("choices")
            if allowed and getattr(self, f.name) not in allowed:
                raise ConfigError(f"{f.name} must be one of {list(allowed)}, got {getattr(self, f.name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MethodConfig":
        d = dict(d)
        method = d.pop("method", cls.method)
        klass = get_method(method)[0] if cls in (MethodConfig, SoftPromptConfig) else cls
        known = {f.name for f in dataclasses.fields(klass)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown} for method {method!r}; known: {sorted(known)}")
        for f in dataclasses.fields(klass):
            # a config stored before a setting existed ran as the setting's "stored_default" says, which need
            # not be today's default: an old artifact must compute what it computed when it was trained
            if f.name not in d and "stored_default" in f.metadata:
                d[f.name] = f.metadata["stored_default"]
        return klass(**d)

    def for_task(self, task: Mapping[str, Any] | None) -> "MethodConfig":
        """This config with every ``auto`` setting decided for ``task`` (its recorded settings: kind,
        template, ...). A model resolves its config once, when it is built, so an artifact records what
        ran; with nothing set to ``auto`` the config is returned as it is."""
        return self

    def check_task(self, task: Mapping[str, Any] | None) -> None:
        """A ValueError (ConfigError or TemplateError) saying why this config cannot run on ``task``, raised
        before any work is done on it (``lopa train`` calls it before scoring the bare model); with ``auto``
        settings decided as :meth:`for_task` decides them. Nothing here depends on a model's weights."""


@dataclass
class SoftPromptConfig(MethodConfig):
    """Settings every soft-prompt method shares."""

    instance_dependent: ClassVar[bool] = False

    num_virtual_tokens: int = 10
    """m, the soft prompt's length in virtual tokens"""
    init: str = choice("vocab", INITS)
    """how the task-wide prompt starts: vocab (random rows of the embedding table), text (the embedded --init-text, cycled to m tokens) or random (N(0, init_std^2))"""
    init_text: str | None = None
    """the text for --init text"""
    init_std: float = 0.02
    """standard deviation of --init random (the LoPA reference code's Z_S starts at nn.Embedding's N(0, 1))"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.num_virtual_tokens, bool) or not isinstance(self.num_virtual_tokens, int) \
                or not 1 <= self.num_virtual_tokens <= 1024:
            raise ConfigError(f"num_virtual_tokens must be an integer in [1, 1024], got {self.num_virtual_tokens!r}")
        if self.init == "text" and not self.init_text:
            raise ConfigError("init='text' needs init_text, the text whose embeddings start the prompt")
        _check_range("init_std", self.init_std, 1e-8, 100.0)

    @property
    def num_output_tokens(self) -> int:
        """How many virtual tokens Z has (``concat`` doubles m)."""
        return self.num_virtual_tokens


@dataclass
class InstanceConfig(SoftPromptConfig):
    """Settings of methods that read the instance through an encoder (frozen unless train_encoder)."""

    instance_dependent: ClassVar[bool] = True

    encoder: str = "minilm-l6"
    """the instance encoder: a short name (minilm-l6), hub id, local path, or self (mean of the base model's own input embeddings; no second model)"""
    pooling: str = choice("mean", POOLINGS)
    """pooling of the encoder's last hidden states"""
    hidden_size: int = 256
    """h, the width of each head's hidden layer"""
    dropout: float = 0.1
    """dropout on the encoder features while training"""
    instance_dropout: float = field(default=0.0, metadata={"stored_default": 0.0})
    """while training, the probability that an example's features are replaced by its batch's mean features, so the prompt made from average features must work on its own and the instance part learns only what differs between inputs (0 = off)"""
    feature_norm: str = field(default="none", metadata={"choices": FEATURE_NORMS, "stored_default": "none"})
    """how the heads see the pooled features: none (as the encoder gives them), l2 (unit length) or rms (unit root-mean-square per coordinate); mean pooling shrinks features as texts grow, so without it heads trained on short texts meet longer ones at a scale they never saw"""
    encoder_input: str = field(default="auto", metadata={"choices": ENCODER_INPUTS, "stored_default": "prompt"})
    """what the encoder reads: prompt (the whole prompt, template words and all, as the paper), fields (each of the template's fields apart; for a two-field template (sentence pairs) their pair features [a*b, |a-b|], which show how alike the two texts are) or auto (default: fields for a classification task whose template has two fields with words or punctuation between them, prompt otherwise; chosen on MRPC dev for LoPA and S-IDPG, where the pooled features of the whole prompt show nothing of whether two sentences say the same thing)"""
    train_encoder: bool = False
    """fine-tune the encoder too (as the LoPA reference's GLUE code does); its weights are then part of the artifact and of the trainable count, and features are no longer cached"""
    encoder_lr_scale: float = 0.01
    """with --train-encoder: the encoder's learning rate relative to the generator's"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.encoder:
            raise ConfigError("encoder must name a model or be 'self'")
        if self.train_encoder and self.encoder == "self":
            raise ConfigError("train_encoder needs a separate encoder: 'self' shares the frozen base model's embeddings")
        _check_range("hidden_size", self.hidden_size, 1, 65536)
        _check_range("dropout", self.dropout, 0.0, 0.99)
        _check_range("instance_dropout", self.instance_dropout, 0.0, 1.0)
        _check_range("encoder_lr_scale", self.encoder_lr_scale, 0.0, 1e6)

    def for_task(self, task: Mapping[str, Any] | None) -> "InstanceConfig":
        """``encoder_input="auto"`` decided: ``fields`` for a classification task with a two-field
        template (sentence pairs) whose texts can be read back into their fields, ``prompt`` otherwise
        (one field, generation, or two slots with only whitespace between them).

        >>> cfg = InstanceConfig(encoder_input="auto")
        >>> cfg.for_task({"kind": "classification", "template": "{sentence1} ? {sentence2} Answer:"}).encoder_input
        'fields'
        >>> cfg.for_task({"kind": "classification", "template": "{sentence} It was"}).encoder_input
        'prompt'
        >>> cfg.for_task({"kind": "classification", "template": "{a} {b} Answer:"}).encoder_input
        'prompt'
        """
        if self.encoder_input != "auto":
            return self
        from ..encoders import field_layout
        task = task or {}
        try:
            pair = task.get("kind") == "classification" and len(field_layout(task.get("template") or "")[0]) == 2
        except ValueError:  # no slots, too many, or slots a filled-in text cannot be read back apart into
            pair = False
        return dataclasses.replace(self, encoder_input="fields" if pair else "prompt")

    def check_task(self, task: Mapping[str, Any] | None) -> None:
        """Reading the template's fields needs a template whose one or two fields a filled-in text can be
        read back into.

        >>> InstanceConfig(encoder_input="fields").check_task({"kind": "classification", "template": "{a} {b}"})
        Traceback (most recent call last):
        ...
        lopa.templates.TemplateError: the template '{a} {b}' has only whitespace between {a} and {b}, so a filled-in text cannot be read back into its fields; put words or punctuation between them, e.g. '{a} ? {b}'
        """
        if self.for_task(task).encoder_input != "fields":
            return
        from ..encoders import field_layout
        template = (task or {}).get("template")
        if not template:
            raise ConfigError("encoder_input 'fields' reads texts by their task's template, and none is recorded; "
                              "train with a template (--template) or with encoder_input 'prompt'")
        field_layout(template)


@dataclass(frozen=True)
class InitContext:
    """What a generator may look at when it initialises itself: the base model's embedding table
    and tokenizer (for ``vocab`` and ``text`` init) and the encoder's width.

    ``embedding_scale`` is what the base model's embedding module multiplies its table's rows by
    (Gemma's scaled embeddings: √d, about 25 for Gemma-3-270m; 1 for most models): a soft prompt sits
    next to the module's output, so rows taken from the table are scaled by it to start at the size
    of the tokens around them.
    """

    embedding_weight: torch.Tensor
    tokenizer: Any = None
    encoder_dim: int | None = None
    embedding_scale: float = 1.0

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

    def training_features(self, features: torch.Tensor) -> torch.Tensor:
        """What a training step feeds ``forward`` in place of the encoder's ``features``: for a method with
        instance features, its ``instance_dropout`` share of them replaced by the batch mean
        (:func:`drop_instances`); scoring and serving never call this."""
        if isinstance(self.config, InstanceConfig):
            return drop_instances(features, self.config.instance_dropout)
        return features

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups; ``lr_scale`` multiplies the trainer's learning rate. One group by default."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr_scale": 1.0}]


def initial_prompt(config: SoftPromptConfig, ctx: InitContext, m: int | None = None) -> torch.Tensor:
    """The starting m × d prompt for ``config.init`` (shared by every method with a task-wide part)."""
    m = m or config.num_virtual_tokens
    emb = ctx.embedding_weight.detach().float()
    g = torch.Generator().manual_seed(config.seed)
    if config.init == "random":
        return torch.randn(m, emb.shape[1], generator=g) * config.init_std
    if config.init == "text":
        if ctx.tokenizer is None:
            raise ConfigError("init='text' needs the base model's tokenizer")
        ids = ctx.tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError(f"init_text {config.init_text!r} tokenizes to nothing")
        ids = (ids * (m // len(ids) + 1))[:m]
        return emb[torch.tensor(ids)] * ctx.embedding_scale
    # vocab: rows of ordinary tokens; the first 5000 ids of a BPE vocabulary are the common ones
    hi = min(5000, emb.shape[0])
    return emb[torch.randint(0, hi, (m,), generator=g)] * ctx.embedding_scale


MethodEntry = tuple[type[MethodConfig], "type[SoftPromptGenerator] | None"]
METHODS: dict[str, MethodEntry] = {}


def register(config_cls: type[SoftPromptConfig]) -> Callable[[type[SoftPromptGenerator]], type[SoftPromptGenerator]]:
    """Class decorator on a generator: registers it with its config under ``config_cls.method``."""

    def deco(gen_cls: type[SoftPromptGenerator]) -> type[SoftPromptGenerator]:
        _add(config_cls, gen_cls)
        return gen_cls

    return deco


def register_config(config_cls: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator for a method with no generator: a baseline that tunes the base model's own
    weights (``server_weights = True``); the wrapper that trains it lives outside ``methods/``."""
    if not config_cls.server_weights:
        raise ValueError(f"method {config_cls.method!r} has no generator, so it must set server_weights = True")
    _add(config_cls, None)
    return config_cls


def _add(config_cls: type[MethodConfig], gen_cls: type[SoftPromptGenerator] | None) -> None:
    if config_cls.method in METHODS:
        raise ValueError(f"method {config_cls.method!r} registered twice")
    METHODS[config_cls.method] = (config_cls, gen_cls)


def get_method(name: str) -> MethodEntry:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; known methods: {sorted(METHODS)}") from None


def soft_prompt_methods() -> list[str]:
    """The registered methods that need nothing on the server (every method but the baselines).

    >>> soft_prompt_methods()
    ['idpg', 'lopa', 'lopt-1', 'lopt-2', 'prompt-tuning']
    """
    return sorted(name for name, (cfg, _) in METHODS.items() if not cfg.server_weights)


def make_config(method: str, **kwargs: Any) -> MethodConfig:
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
    gen_cls = get_method(config.method)[1]
    if gen_cls is None:
        raise ConfigError(f"method {config.method!r} tunes the base model's weights: it has no soft-prompt generator")
    return gen_cls(config, ctx)


def drop_instances(features: torch.Tensor, p: float) -> torch.Tensor:
    """Replace each row of ``features`` by the rows' mean with probability ``p`` (rows kept apart otherwise).

    With the mean in place of an example's own features, the generator makes the prompt it would make for
    an average input; training on both teaches that prompt to stand alone. The mean is taken over the
    batch, detached, so no gradient couples one example's features to another's. Under data parallelism
    the batch is each process's share of it, as for batch normalisation's statistics.

    >>> import torch
    >>> x = torch.tensor([[0.0, 2.0], [2.0, 4.0]])
    >>> drop_instances(x, 1.0).tolist()
    [[1.0, 3.0], [1.0, 3.0]]
    >>> drop_instances(x, 0.0).tolist()
    [[0.0, 2.0], [2.0, 4.0]]
    """
    if p <= 0.0:
        return features
    mean = features.detach().mean(0, keepdim=True).expand_as(features)
    drop = torch.rand(features.shape[0], 1, device=features.device) < p
    return torch.where(drop, mean, features)


class MLPHead(nn.Module):
    """W₂ tanh(W₁ dropout(x)) + b: the instance heads of S-IDPG and LoPA.

    W₁ and W₂ start N(0, 0.02) and W₂'s bias at ``out_bias`` (zero unless given), so an untrained
    head adds a small perturbation around its bias.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float, out_bias: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, feature_norm: str = "none"):
        super().__init__()
        if feature_norm not in FEATURE_NORMS:
            raise ValueError(f"feature_norm must be one of {list(FEATURE_NORMS)}, got {feature_norm!r}")
        self.feature_norm = feature_norm
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
        if self.feature_norm == "l2":
            x = torch.nn.functional.normalize(x, dim=-1)
        elif self.feature_norm == "rms":
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).clamp_min(1e-12))
        return self.fc2(torch.tanh(self.fc1(self.dropout(x))))
