"""Frozen instance encoders for the instance-dependent methods (S-IDPG, LoPA), and their feature cache.

The encoder never trains, so a text's features are the same at every step: each distinct text is
encoded once per run and served from the cache afterwards (``Encoder.stats`` counts hits and misses).

Example::

    >>> from lopa.encoders import load_encoder
    >>> enc = load_encoder("tiny-random-bert")
    >>> enc.encode(["a film", "a film"]).shape, enc.stats["encoded"]
    (torch.Size([2, 32]), 1)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .models import load_encoder_model


class Encoder(nn.Module):
    """Texts → pooled features (B × dim), frozen, cached by text.

    Subclasses implement ``_encode_batch``. The cache holds float32 CPU tensors; ``max_cache`` bounds
    it (oldest entries go first) so a long-running client does not grow without end.
    """

    dim: int
    name: str

    def __init__(self, batch_size: int = 64, max_cache: int = 200_000):
        super().__init__()
        self.batch_size = batch_size
        self.max_cache = max_cache
        self._cache: dict[str, torch.Tensor] = {}
        self.stats = {"encoded": 0, "hits": 0}

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @property
    def trainable(self) -> bool:
        """Whether the encoder trains with the generator (then nothing is cached: features change)."""
        return any(p.requires_grad for p in self.parameters())

    def set_trainable(self, on: bool) -> "Encoder":
        """Fine-tune the encoder's own weights (``--train-encoder``); off by default."""
        if on == self.trainable:
            return self  # a shared frozen encoder keeps its cache
        if on and not any(True for _ in self.parameters()):
            raise ValueError(f"encoder {self.name!r} has no weights of its own to train")
        self.requires_grad_(on)
        self.clear_cache()
        return self

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Features of each text, in order. A frozen encoder computes only the texts not seen before;
        a trainable one computes every text, with gradients where autograd is on."""
        if self.trainable:
            return torch.cat([self._encode_batch(list(texts[i:i + self.batch_size]))
                              for i in range(0, len(texts), self.batch_size)]).float()
        with torch.no_grad():
            return self._encode_cached(list(texts))

    def check(self, texts: list[str]) -> None:
        """A ValueError naming the first text this encoder cannot read (every text can be read here), so a
        server can refuse one bad request before it is batched with others."""

    def warm(self, texts: list[str]) -> None:
        """Fill the cache with ``texts`` in a fixed order (nothing to do for a trainable encoder)."""
        if not self.trainable:
            self.encode(texts)

    def _encode_cached(self, texts: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        self.stats["hits"] += len(texts) - len(missing)
        for i in range(0, len(missing), self.batch_size):
            chunk = missing[i:i + self.batch_size]
            feats = self._encode_batch(chunk).float().cpu()
            self._cache.update(zip(chunk, feats))
            self.stats["encoded"] += len(chunk)
        out = torch.stack([self._cache[t] for t in texts])  # before eviction: this batch may exceed max_cache
        while len(self._cache) > self.max_cache:
            self._cache.pop(next(iter(self._cache)))
        return out.to(self._device())

    def _device(self) -> torch.device:
        return next(iter(self.parameters()), torch.empty(0)).device

    def clear_cache(self) -> None:
        self._cache.clear()

    @property
    def weights_owner(self) -> "Encoder":
        """The encoder whose ``state_dict`` is saved with a ``--train-encoder`` artifact (itself here)."""
        return self


class HFEncoder(Encoder):
    """A Hugging Face encoder (BERT-like) with mean or CLS pooling of its last hidden states."""

    def __init__(self, model: nn.Module, tokenizer: Any, name: str, pooling: str = "mean", max_length: int = 256,
                 **kw: Any):
        super().__init__(**kw)
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name, self.pooling, self.max_length = name, pooling, max_length
        self.dim = model.config.hidden_size

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self._device())
        hidden = self.model(**batch).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class SelfEncoder(Encoder):
    """``self``: the mean of the base model's own input embeddings of the text (no second model)."""

    def __init__(self, embeddings: nn.Embedding, tokenizer: Any, max_length: int = 512, **kw: Any):
        super().__init__(**kw)
        self.embeddings = embeddings  # shared with the base model, frozen there
        self.tokenizer, self.max_length, self.name = tokenizer, max_length, "self"
        self.dim = embeddings.weight.shape[1]

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        out = []
        for t in texts:
            ids = self.tokenizer(t, add_special_tokens=False, truncation=True, max_length=self.max_length)["input_ids"]
            ids = ids or [self.tokenizer.eos_token_id]
            out.append(self.embeddings.weight[torch.tensor(ids, device=self.embeddings.weight.device)].float().mean(0))
        return torch.stack(out)


def field_layout(template: str) -> tuple[list[str], Callable[[str], list[str]]]:
    """The slots a :class:`FieldEncoder` reads for ``template`` and the function that reads a filled-in text
    back into them; a ValueError where it cannot (no slot, more than two, or slots a text cannot be read
    back apart into: :func:`lopa.templates.field_reader`).

    >>> field_layout("{sentence1} ? {sentence2} Answer:")[0]
    ['sentence1', 'sentence2']
    """
    from .templates import field_reader, template_slots
    slots = template_slots(template)
    if not 1 <= len(slots) <= 2:
        raise ValueError(f"encoder_input 'fields' reads one or two template fields; {template[:200]!r} "
                         f"has {len(slots)}: {slots}")
    return slots, field_reader(template)


class FieldEncoder(Encoder):
    """Reads a template's fields apart (``encoder_input="fields"``): each field is encoded by ``inner`` on
    its own, without the template's fixed words.

    A text is read back into its fields with the template (:func:`lopa.templates.field_reader`). Each
    field's features are scaled to unit root-mean-square per coordinate (unit length times √dim), so a
    field's length does not set their size. One field gives its features (width dim). Two fields
    (sentence pairs: MRPC, QQP, RTE, ...) give ``[a ⊙ b, |a − b|]`` (width 2·dim), the pair features
    of sentence-embedding classifiers: the mean of ``a ⊙ b`` is the fields' cosine similarity, which
    the pooled features of the two texts run together do not show. More fields are refused.

    Example::

        >>> enc = FieldEncoder(load_encoder("tiny-random-bert"), "{sentence1} ? {sentence2} Answer:")
        >>> enc.encode(["A cat. ? A dog. Answer:"]).shape, enc.dim
        (torch.Size([1, 64]), 64)
    """

    def __init__(self, inner: Encoder, template: str):
        super().__init__(batch_size=inner.batch_size, max_cache=inner.max_cache)
        self.inner, self.template = inner, template
        self.fields, self._read = field_layout(template)
        self.name, self.dim = inner.name, inner.dim * len(self.fields)
        self.stats = inner.stats  # the fields are cached (and counted) by the encoder that reads them

    @property
    def trainable(self) -> bool:
        return self.inner.trainable

    def set_trainable(self, on: bool) -> "FieldEncoder":
        self.inner.set_trainable(on)
        return self

    def clear_cache(self) -> None:
        self.inner.clear_cache()

    @property
    def weights_owner(self) -> Encoder:
        return self.inner

    def _fields(self, texts: list[str]) -> list[list[str]]:
        from .templates import TemplateError
        try:
            return [self._read(t) for t in texts]
        except TemplateError as e:
            raise ValueError(f"encoder_input 'fields' reads each text as its task's template filled in: {e}") from None

    def check(self, texts: list[str]) -> None:
        self._fields(texts)

    def encode(self, texts: list[str]) -> torch.Tensor:
        parts = self._fields(texts)
        k = len(self.fields)
        x = self.inner.encode([f for p in parts for f in p]).view(len(texts), k, self.inner.dim)
        x = torch.nn.functional.normalize(x, dim=-1) * self.inner.dim ** 0.5
        if k == 1:
            return x[:, 0]
        a, b = x[:, 0], x[:, 1]
        return torch.cat([a * b, (a - b).abs()], dim=-1)


ENCODER_WEIGHTS = "encoder.safetensors"


def save_encoder_weights(encoder: Encoder, directory: str | Path) -> Path:
    """Write a fine-tuned encoder's weights next to an artifact (``encoder.safetensors``)."""
    from safetensors.torch import save_file
    path = Path(directory) / ENCODER_WEIGHTS
    state = encoder.weights_owner.state_dict()
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))
    return path


def load_encoder_weights(encoder: Encoder, directory: str | Path) -> None:
    """Load the fine-tuned weights an artifact trained with ``--train-encoder`` carries."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(directory) / ENCODER_WEIGHTS
    if not path.is_file():
        raise ValueError(f"{directory} was trained with --train-encoder but holds no {ENCODER_WEIGHTS}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    try:
        encoder.weights_owner.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit encoder {encoder.name!r}: {str(e).splitlines()[0]}") from None
    encoder.clear_cache()


def load_encoder(name: str, pooling: str = "mean", base: nn.Module | None = None, tokenizer: Any = None) -> Encoder:
    """An encoder by name: a short name, hub id or path, or ``self`` (needs ``base`` and ``tokenizer``)."""
    if name == "self":
        if base is None or tokenizer is None:
            raise ValueError("encoder 'self' needs the base model and its tokenizer")
        return SelfEncoder(base.get_input_embeddings(), tokenizer)
    model, tok = load_encoder_model(name)
    return HFEncoder(model, tok, name=name, pooling=pooling)
