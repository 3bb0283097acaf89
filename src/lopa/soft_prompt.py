"""Texts → soft prompts Z: the one piece the training wrapper (:mod:`lopa.model`) and the client
(:mod:`lopa.client`) share, so both compute the same numbers the same way.

Example::

    >>> import torch, lopa
    >>> from lopa.methods import InitContext, build_generator
    >>> gen = build_generator(lopa.make_config("prompt-tuning", num_virtual_tokens=3), InitContext(torch.randn(50, 8)))
    >>> compute(gen, None, ["a", "b"]).shape
    torch.Size([2, 3, 8])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .encoders import Encoder, FieldEncoder, load_encoder, load_encoder_weights
from .methods import SoftPromptConfig, SoftPromptGenerator


def compute(generator: SoftPromptGenerator, encoder: Encoder | None, texts: Sequence[str]) -> torch.Tensor:
    """Z for each text: B × n × d, in float32.

    The generator always computes in float32, also under a bf16 autocast of the base model: at
    initialisation LoPA's gate sigmoid(u vᵀ) lies within a few thousandths of 0.5, which bf16 rounds
    to exactly 0.5, erasing the instance part in the forward pass.
    """
    texts = list(texts)
    feats = encoder.encode(texts) if generator.needs_features else None
    if feats is not None and generator.training:
        feats = generator.training_features(feats)
    device = feats.device if feats is not None else next(generator.parameters(), torch.empty(0)).device
    with torch.autocast(device.type, enabled=False):
        return generator(feats.float() if feats is not None else None, len(texts)).float()


def load_instance_encoder(config: SoftPromptConfig, artifact_dir: str | Path | None = None, *, base: Any = None,
                          tokenizer: Any = None, encoder_dim: int | None = None,
                          task: Mapping[str, Any] | None = None) -> Encoder | None:
    """The encoder an instance-dependent config names (``None`` for the others), with the fine-tuned
    weights an artifact trained with ``--train-encoder`` carries; checks the recorded feature width.
    ``task`` is the task's settings (an artifact records them): ``encoder_input="fields"`` reads texts
    by its template."""
    if not config.instance_dependent:
        return None
    name = config.encoder  # type: ignore[attr-defined]
    enc = reading_as_configured(load_encoder(name, config.pooling, base=base, tokenizer=tokenizer),  # type: ignore[attr-defined]
                                config, task)
    if encoder_dim is not None and enc.dim != encoder_dim:
        raise ValueError(f"the artifact was trained on encoder features of width {encoder_dim}, "
                         f"but encoder {name!r} gives {enc.dim}"
                         + (" (reading the template's fields apart)" if isinstance(enc, FieldEncoder) else ""))
    if getattr(config, "train_encoder", False) and artifact_dir is not None:
        load_encoder_weights(enc, artifact_dir)
    return enc


def reading_as_configured(encoder: Encoder, config: SoftPromptConfig, task: Mapping[str, Any] | None) -> Encoder:
    """``encoder`` reading what ``config.encoder_input`` says for ``task`` (``auto`` decided by
    :meth:`~lopa.methods.MethodConfig.for_task`): as it is for whole prompts, inside a
    :class:`~lopa.encoders.FieldEncoder` for the template's fields (a ValueError without a template)."""
    config = config.for_task(task)
    if getattr(config, "encoder_input", "prompt") != "fields" or isinstance(encoder, FieldEncoder):
        return encoder
    config.check_task(task)
    return FieldEncoder(encoder, (task or {})["template"])
