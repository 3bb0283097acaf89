"""``SoftPromptModel``: a frozen causal LM plus one soft-prompt generator.

The wrapper never asks which method it holds. It asks the generator only whether it needs instance
features, computes them with the frozen (cached) encoder if so, and puts Z in front of the tokens
through :mod:`lopa.prefix`. The base model's weights never change and never get gradients.

Example::

    >>> import lopa
    >>> base, tok = lopa.load_base("tiny-random-llama")
    >>> config = lopa.make_config("lopa", num_virtual_tokens=4, rank=2, hidden_size=16, encoder="tiny-random-bert")
    >>> model = lopa.SoftPromptModel(base, tok, config)
    >>> model.classify(["Review: fine\\nSentiment:"], [" negative", " positive"]).shape
    torch.Size([1, 2])
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from . import prefix, soft_prompt
from .encoders import Encoder, load_encoder_weights, save_encoder_weights
from .methods import InitContext, MethodConfig, SoftPromptConfig, build_generator

if TYPE_CHECKING:
    from .prompt_format import PromptFormat


ENCODER_PREFIX = "encoder."  # trainable-state keys of a fine-tuned encoder (generator keys never start so)


class PromptedModel(nn.Module):
    """What every wrapper shares: a base model run on ``[soft prompts ; tokens]`` for the training
    loss, classification and generation. Subclasses say what the soft prompt is (:meth:`soft_prompts`,
    possibly empty) and what trains; the trainer and the scorers talk to this interface only."""

    base: nn.Module
    tokenizer: Any
    task: dict[str, Any]

    @property
    def hidden_size(self) -> int:
        return self.base.get_input_embeddings().weight.shape[1]

    @property
    def base_name(self) -> str:
        return str(getattr(self.base.config, "name_or_path", "") or "")

    def soft_prompts(self, texts: Sequence[str]) -> torch.Tensor:
        """Z for each text: B × n × d (n may be 0)."""
        raise NotImplementedError

    # -- the recorded prompt format --------------------------------------------------------------
    @property
    def prompt_format(self) -> "PromptFormat":
        """The format the task was trained in (plain or chat template, system prompt), as recorded."""
        from .prompt_format import PromptFormat
        return PromptFormat.from_settings(self.task.get("prompt_format"))

    def build_prompt(self, prompt: str | None = None, *,
                     messages: Sequence[dict[str, str]] | None = None) -> str:
        """The model's whole text for a user's ``prompt`` or ``messages`` in the recorded format, built
        by :func:`lopa.prompt_format.build_text` as in training; give it to :meth:`generate`."""
        from .prompt_format import build_text
        return build_text(self.tokenizer, self.prompt_format, prompt=prompt, messages=messages).prompt

    def chat(self, conversations: Sequence[Sequence[dict[str, str]]], **generate_kwargs: Any) -> list[str]:
        """The assistant's next turn for each conversation (a list of ``{"role", "content"}``), in the
        recorded format; ``generate_kwargs`` as for :meth:`generate`."""
        return self.generate([self.build_prompt(messages=m) for m in conversations], **generate_kwargs)

    def _batch(self, texts: Sequence[str], suffix_ids: Sequence[Sequence[int]] | None = None) -> prefix.PrefixBatch:
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        if suffix_ids is not None:
            ids = [a + list(b) for a, b in zip(ids, suffix_ids)]
        z = self.soft_prompts(texts)
        return prefix.assemble(self.base, z, ids)

    # -- training --------------------------------------------------------------------------------
    def forward(self, texts: Sequence[str], label_ids: torch.Tensor | None = None,
                targets: Sequence[str] | None = None,
                prompt_loss_spans: Sequence[Sequence[Sequence[int]] | None] | None = None) -> torch.Tensor:
        """The training loss.

        Classification: ``label_ids`` holds each row's answer token id (B); the loss is cross-entropy
        over the vocabulary at the answer position. Generation: ``targets`` are the completions; the
        loss covers the target tokens only, plus, where ``prompt_loss_spans`` gives them, the prompt
        tokens inside those character spans (a conversation's earlier assistant turns).
        """
        if (label_ids is None) == (targets is None):
            raise ValueError("pass exactly one of label_ids (classification) or targets (generation)")
        if label_ids is not None:
            return prefix.classification_loss(self.base, self._batch(texts), label_ids)
        tgt = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in targets]
        tgt = [t + [self.tokenizer.eos_token_id] for t in tgt]  # learn to stop
        batch = self._batch(texts, tgt)
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] + s for t, s in zip(texts, tgt)]
        masks = None
        if prompt_loss_spans is not None:
            from .prompt_format import token_loss_mask
            masks = [token_loss_mask(self.tokenizer, t, sp) if sp else [] for t, sp in zip(texts, prompt_loss_spans)]
        return prefix.generation_loss(self.base, batch, ids, [len(t) for t in tgt], masks)

    # -- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def classify(self, texts: Sequence[str], label_words: Sequence[str]) -> torch.Tensor:
        """Log-probabilities of each label word's first token at the answer position: B × C."""
        label_ids = prefix.label_token_ids(self.tokenizer, label_words)
        return prefix.classify(self.base, self._batch(texts), label_ids)

    @torch.no_grad()
    def generate(self, texts: Sequence[str], max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, stop: Sequence[str] | None = None,
                 seed: int | None = None) -> list[str]:
        """Greedy (default) or sampled completions, batched, each row with its own soft prompt."""
        return prefix.generate(self.base, self.tokenizer, self._batch(texts), max_new_tokens=max_new_tokens,
                               do_sample=do_sample, temperature=temperature, top_p=top_p, stop=stop, seed=seed)

    # -- bookkeeping -----------------------------------------------------------------------------
    def num_trainable_parameters(self) -> int:
        raise NotImplementedError

    def num_all_parameters(self) -> int:
        seen = {id(p): p for p in self.parameters()}  # the self encoder shares the base's embeddings
        return sum(p.numel() for p in seen.values())

    def print_trainable_parameters(self) -> None:
        """PEFT's line: ``trainable params: … || all params: … || trainable%: …``."""
        t, a = self.num_trainable_parameters(), self.num_all_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")


class SoftPromptModel(PromptedModel):
    """A frozen base model and a trainable soft-prompt generator.

    Args:
        base: a Hugging Face causal LM (frozen here, whatever its state).
        tokenizer: its tokenizer.
        config: a method config from :func:`lopa.make_config`.
        encoder: a ready :class:`~lopa.encoders.Encoder`; loaded from ``config.encoder`` when omitted.
        task: the task's settings (template, label words, ...) to record in saved artifacts.
    """

    def __init__(self, base: nn.Module, tokenizer: Any, config: SoftPromptConfig, encoder: Encoder | None = None,
                 task: dict[str, Any] | None = None):
        super().__init__()
        self.base = base.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.task = dict(task or {})
        # "auto" settings are decided for the task here, once, so a saved artifact records what ran
        self.config = config = config.for_task(self.task)
        if config.instance_dependent and encoder is None:
            encoder = soft_prompt.load_instance_encoder(config, base=base, tokenizer=tokenizer,
                                                        task=self.task)
        elif encoder is not None and config.instance_dependent:
            encoder = soft_prompt.reading_as_configured(encoder, config, self.task)
        self.encoder = encoder if config.instance_dependent else None
        if self.encoder is not None:
            self.encoder.set_trainable(bool(getattr(config, "train_encoder", False)))
        emb = base.get_input_embeddings()
        ctx = InitContext(emb.weight, tokenizer, encoder.dim if self.encoder is not None else None,
                          embedding_scale=prefix.embedding_scale(emb))
        self.generator = build_generator(config, ctx)

    def train(self, mode: bool = True) -> "SoftPromptModel":
        super().train(mode)
        self.base.eval()  # dropout in the frozen model would make its output depend on training mode
        if self.encoder is not None:
            self.encoder.eval()
        return self

    def soft_prompts(self, texts: Sequence[str]) -> torch.Tensor:
        """Z for each text: B × n × d (n = the generator's number of output tokens), in float32
        (see :func:`lopa.soft_prompt.compute`)."""
        return soft_prompt.compute(self.generator, self.encoder, texts)

    # -- what the trainer needs ------------------------------------------------------------------
    @property
    def _trained_encoder(self) -> Encoder | None:
        return self.encoder if self.encoder is not None and self.encoder.trainable else None

    def trainable_param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups, each with an ``lr_scale`` (the generator decides; one group by default),
        plus the encoder's own group when it trains."""
        groups = self.generator.param_groups()
        if self._trained_encoder is not None:
            groups.append({"params": [p for p in self.encoder.parameters() if p.requires_grad],
                           "lr_scale": self.config.encoder_lr_scale})  # type: ignore[attr-defined]
        return groups

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        state = dict(self.generator.state_dict())
        if self._trained_encoder is not None:
            state.update({f"{ENCODER_PREFIX}{k}": v for k, v in self.encoder.state_dict().items()})
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        enc = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
        self.generator.load_state_dict({k: v for k, v in state.items() if not k.startswith(ENCODER_PREFIX)})
        if self._trained_encoder is not None:
            self.encoder.load_state_dict(enc)
            self.encoder.clear_cache()

    # -- bookkeeping -----------------------------------------------------------------------------
    def num_trainable_parameters(self) -> int:
        """The generator's parameters, and the encoder's when it trains (``--train-encoder``)."""
        n = sum(p.numel() for p in self.generator.parameters() if p.requires_grad)
        if self._trained_encoder is not None:
            n += sum(p.numel() for p in self.encoder.parameters())
        return n

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``soft_prompt_config.json`` and ``soft_prompt.safetensors`` (see :mod:`lopa.artifact`)."""
        from .artifact import save_artifact
        path = save_artifact(directory, self.generator, base_name=self.base_name, hidden_size=self.hidden_size,
                             encoder_dim=self.encoder.dim if self.encoder is not None else None, task=self.task)
        if self._trained_encoder is not None:
            save_encoder_weights(self.encoder, path)
        return path

    @classmethod
    def from_pretrained(cls, directory: str | Path, base: nn.Module, tokenizer: Any,
                        encoder: Encoder | None = None) -> "SoftPromptModel":
        """Load an artifact onto ``base``; errors name a width mismatch, a corrupt or foreign file."""
        from .artifact import load_artifact
        art = load_artifact(directory, expected_hidden_size=base.get_input_embeddings().weight.shape[1])
        model = cls(base, tokenizer, art.config, encoder=encoder, task=art.task)
        if model.encoder is not None and model.encoder.dim != art.encoder_dim:
            raise ValueError(f"artifact {directory} was trained with encoder features of width {art.encoder_dim}, "
                             f"but encoder {art.config.encoder!r} gives {model.encoder.dim}")
        model.generator.load_state_dict(art.generator.state_dict())
        if model._trained_encoder is not None:
            load_encoder_weights(model.encoder, directory)
        return model


def build_model(base: nn.Module, tokenizer: Any, config: MethodConfig, task: dict[str, Any] | None = None) -> nn.Module:
    """The wrapper a method's config asks for: :class:`SoftPromptModel` for a soft-prompt method, the
    baselines' wrapper for a method that changes the base model's weights (``server_weights``).

    >>> import lopa
    >>> base, tok = lopa.load_base("tiny-random-llama")
    >>> type(build_model(base, tok, lopa.make_config("lora", r=2))).__name__
    'BaselineModel'
    """
    if config.server_weights:
        from .baselines import BaselineModel
        return BaselineModel(base, tokenizer, config, task=task)
    return SoftPromptModel(base, tokenizer, config, task=task)
