"""The default backend: a Hugging Face causal LM run in this process through :mod:`lopa.prefix`
(the same code as training and the in-process client), so all three give the same numbers.

Example::

    >>> import torch
    >>> backend = TransformersBackend("tiny-random-llama", dtype="float32")
    >>> ids = backend.label_token_ids([" no", " yes"])
    >>> rows = [ClassifyRow([1, 2, 3], torch.zeros(4, 64), ids), ClassifyRow([7], torch.ones(2, 64), ids)]
    >>> [len(lp) for lp in backend.classify(rows)]
    [2, 2]
    >>> backend.generate([GenerateRow([1, 2], torch.zeros(4, 64), max_new_tokens=3)])[0].finish_reason
    'length'
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ... import prefix
from ...models import load_base
from ..batcher import Batcher, torch_threads_init
from ..protocol import ClassifyRow, Completion, GenerateRow, max_token_chars
from .precision import resolve_device, resolve_dtype

BATCH_INVARIANT_CHOICES = ("auto", "on", "off")


class TransformersBackend:
    """A Hugging Face causal LM run through :mod:`lopa.prefix` on one device.

    Args:
        model_name: a short name (``smollm2-135m``), hub id or local path (see :func:`lopa.models.load_base`).
        dtype: ``auto`` (see :func:`~lopa.serve.backends.precision.resolve_dtype`), ``float32``,
            ``bfloat16`` or ``float16``.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``, ...
        batch_invariant: ``on``: rows share a forward pass only with rows of the same length, so no
            row is padded and a row's answer does not depend on its neighbours; ``off``: rows of any
            length share one padded pass (fewer, fuller passes); ``auto``: on in bfloat16 and
            float16, off in float32. Why: the padded pass takes another attention path (with a
            mask) than a row alone, and in bf16 that moves log-probabilities by up to ~4e-3; in
            float32 by under 1e-5, about what the batch size alone moves them (README, "Serving").

    Not thread-safe: call it from one thread at a time (the batcher owns one worker thread).
    """

    def __init__(self, model_name: str, dtype: str = "auto", device: str = "auto", batch_invariant: str = "auto"):
        if batch_invariant not in BATCH_INVARIANT_CHOICES:
            raise ValueError(f"batch_invariant must be one of {BATCH_INVARIANT_CHOICES}, got {batch_invariant!r}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_invariant = batch_invariant == "on" or (batch_invariant == "auto" and self.dtype != torch.float32)
        self.model_name = model_name
        self.base, self.tokenizer = load_base(model_name, self.dtype)
        self.max_token_chars = max_token_chars(self.tokenizer)
        self.base.to(self.device)
        emb = self.base.get_input_embeddings().weight
        self.hidden_size = int(emb.shape[1])
        self.vocab_size = int(emb.shape[0])

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a prompt, without special tokens (as :class:`lopa.SoftPromptModel` does)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def label_token_ids(self, label_words: Sequence[str]) -> list[int]:
        """First token of each label word; ValueError when two share one (see :func:`lopa.prefix.label_token_ids`)."""
        return prefix.label_token_ids(self.tokenizer, label_words)

    def _length(self, token_ids: Sequence[int], soft_prompt: torch.Tensor) -> int | None:
        """The part of a row's grouping key that keeps padding out of its pass (None: padding allowed)."""
        return len(token_ids) + int(soft_prompt.shape[0]) if self.batch_invariant else None

    @torch.inference_mode()
    def classify(self, rows: Sequence[ClassifyRow]) -> list[list[float]]:
        """Label log-probabilities for every row: one forward pass per distinct number of classes
        (and, batch-invariant, per distinct length)."""
        out: list[list[float] | None] = [None] * len(rows)
        groups: dict[tuple[int, int | None], list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault((len(r.label_ids), self._length(r.token_ids, r.soft_prompt)), []).append(i)
        for idx in groups.values():
            batch = prefix.assemble(self.base, [rows[i].soft_prompt for i in idx], [rows[i].token_ids for i in idx])
            label_ids = torch.tensor([rows[i].label_ids for i in idx], dtype=torch.long)
            logp = prefix.classify(self.base, batch, label_ids).cpu().tolist()
            for i, lp in zip(idx, logp):
                out[i] = lp
        return out  # type: ignore[return-value]

    def generate(self, rows: Sequence[GenerateRow]) -> list[Completion]:
        """Completions for every row: one KV-cached decoding loop (:func:`lopa.prefix.generate_ids`) per
        group of equal settings (and, batch-invariant, equal length); ``completion_tokens`` counts the
        tokens generated."""
        out: list[Completion | None] = [None] * len(rows)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault((*r.group_key(), self._length(r.token_ids, r.soft_prompt)), []).append(i)
        for idx in groups.values():
            first = rows[idx[0]]
            batch = prefix.assemble(self.base, [rows[i].soft_prompt for i in idx], [rows[i].token_ids for i in idx])
            sample = first.temperature > 0
            stop = list(first.stop) or None
            ids = prefix.generate_ids(self.base, self.tokenizer, batch, max_new_tokens=first.max_new_tokens,
                                      do_sample=sample, temperature=first.temperature if sample else 1.0,
                                      top_p=first.top_p if sample else 1.0, stop=stop,
                                      seed=first.seed if sample else None)
            for i, toks in zip(idx, ids):
                decoded = self.tokenizer.decode(toks, skip_special_tokens=True)
                text = prefix.cut_at_stop(decoded, stop)
                # the whole budget spent and no stop string in it: cut by length; else EOS or a stop string
                reason = "length" if len(toks) >= first.max_new_tokens and text == decoded else "stop"
                out[i] = Completion(text, reason, len(toks))
        return out  # type: ignore[return-value]

    def make_batcher(self, *, max_batch_size: int, max_wait_ms: float,
                     on_batch: Callable[[str, int], None] | None = None) -> Batcher:
        """A :class:`~lopa.serve.batcher.Batcher` whose worker thread computes on this thread's torch threads."""
        return Batcher(self, max_batch_size, max_wait_ms, on_batch=on_batch, worker_init=torch_threads_init())

    def close(self) -> None:
        """Nothing to stop: the model lives in this process and goes with it."""
