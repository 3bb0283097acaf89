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
from ..protocol import SCHEDULING_CHOICES, BackendError, ClassifyRow, Completion, GenerateRow, max_token_chars
from ..scheduler import ContinuousBatcher
from . import softkv
from .decode_group import DecodeGroup
from .invariance import matmuls_batch_invariant
from .precision import resolve_device, resolve_dtype
from .prefixcache import PrefixCache

BATCH_INVARIANT_CHOICES = ("auto", "on", "off")
PAD_MULTIPLE = 16  # batch-invariant rows pad to a multiple of this: fewer distinct lengths, so fuller passes


class TransformersBackend:
    """A Hugging Face causal LM run through :mod:`lopa.prefix` on one device.

    Args:
        model_name: a short name (``smollm2-135m``), hub id or local path (see :func:`lopa.models.load_base`).
        dtype: ``auto`` (see :func:`~lopa.serve.backends.precision.resolve_dtype`), ``float32``,
            ``bfloat16`` or ``float16``.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``, ...
        batch_invariant: ``on``: each row is padded by an amount set by its own length alone (see
            :meth:`_length`) and shares a pass only with rows padded to the same length, so its answer
            does not depend on its neighbours, bit for bit where the machine's matrix products are
            themselves invariant to the number of rows; ``off``: rows of any length share one pass,
            each padded to the longest (fewer passes; how much padding depends on the batch), as PEFT
            and ``generate`` batch; ``auto``: ``on`` where the model's own matrix products are invariant
            on this device and dtype (:func:`~lopa.serve.backends.invariance.matmuls_batch_invariant`),
            else ``off``, since padding by length then buys nothing exact. Measured in the README's
            "Serving".
        prefix_cache_bytes: when above 0, keep each distinct soft prompt's keys and values, up to this
            many bytes (:mod:`~lopa.serve.backends.prefixcache`): every row's soft prompt then runs as
            its own pass (:mod:`~lopa.serve.backends.softkv`), skipped when cached, so an answer is the
            same bits whether its soft prompt was cached or not (but not those of the joint pass used
            with the cache off). Rows without tokens take the joint pass either way.

    Not thread-safe: call it from one thread at a time (the batcher owns one worker thread).
    """

    def __init__(self, model_name: str, dtype: str = "auto", device: str = "auto", batch_invariant: str = "auto",
                 prefix_cache_bytes: int = 0):
        if batch_invariant not in BATCH_INVARIANT_CHOICES:
            raise ValueError(f"batch_invariant must be one of {BATCH_INVARIANT_CHOICES}, got {batch_invariant!r}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model_name = model_name
        self.base, self.tokenizer = load_base(model_name, self.dtype)
        self.max_token_chars = max_token_chars(self.tokenizer)
        self.base.to(self.device)
        self.batch_invariant = batch_invariant == "on" or (batch_invariant == "auto"
                                                           and matmuls_batch_invariant(self.base))
        emb = self.base.get_input_embeddings().weight
        self.hidden_size = int(emb.shape[1])
        self.vocab_size = int(emb.shape[0])
        self.prefix_cache = self._make_prefix_cache(prefix_cache_bytes)

    def _make_prefix_cache(self, max_bytes: int) -> PrefixCache | None:
        if max_bytes <= 0:
            return None
        why = softkv.unsupported(self.base)
        if why is not None:
            raise BackendError(f"--prefix-cache-mib: {why}")
        return PrefixCache(max_bytes, self.model_name)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a prompt, without special tokens (as :class:`lopa.SoftPromptModel` does)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def label_token_ids(self, label_words: Sequence[str]) -> list[int]:
        """First token of each label word; ValueError when two share one (see :func:`lopa.prefix.label_token_ids`)."""
        return prefix.label_token_ids(self.tokenizer, label_words)

    def _length(self, token_ids: Sequence[int], soft_prompt: torch.Tensor) -> int | None:
        """The padded length of a row's pass when batch-invariant (None: whatever its batch needs).

        Batch-invariant, a row's padding depends on its own length alone: rounded up to the next
        multiple of :data:`PAD_MULTIPLE`, and always at least one pad, so that every pass takes the
        masked attention path (a row with no padding would take the unmasked one alone and the masked
        one beside a shorter row). Rows with equal padded lengths share a pass; their answers are as
        if each ran alone, since no reduction mixes rows.
        """
        if not self.batch_invariant:
            return None
        n = len(token_ids) + int(soft_prompt.shape[0])
        return (n // PAD_MULTIPLE + 1) * PAD_MULTIPLE

    def _layout(self, token_ids: Sequence[int], soft_prompt: torch.Tensor) -> tuple[Any, ...]:
        """What rows sharing a pass must have in common: the padded length (:meth:`_length`), or, with the
        prefix cache, whether the row uses it and the padded lengths of its soft-prompt and token parts
        (each its own length's next multiple of :data:`PAD_MULTIPLE`, at least one pad before Z: the
        masked attention path always, as :meth:`_length`)."""
        if self.prefix_cache is None or not token_ids:
            return (False, self._length(token_ids, soft_prompt))
        if not self.batch_invariant:
            return (True, None, None)
        m, t = int(soft_prompt.shape[0]), len(token_ids)
        return (True, (m // PAD_MULTIPLE + 1) * PAD_MULTIPLE, -(-t // PAD_MULTIPLE) * PAD_MULTIPLE)

    def _batch(self, softs: Sequence[torch.Tensor], token_ids: Sequence[Sequence[int]],
               layout: tuple[Any, ...]) -> prefix.PrefixBatch:
        """The pass of rows sharing ``layout``: the joint ``[Z ; tokens]`` pass, or the tokens on the
        soft prompts' cached (or freshly computed) keys and values."""
        if not layout[0]:
            return prefix.assemble(self.base, softs, token_ids, pad_to_multiple=layout[1])
        cache, dtype = self.prefix_cache, self.base.get_input_embeddings().weight.dtype
        assert cache is not None
        kvs = [cache.get(s.to(dtype), lambda z: softkv.soft_prompt_kv(self.base, z)) for s in softs]
        return softkv.assemble_after(self.base, kvs, token_ids, past_len=layout[1], tok_len=layout[2])

    @property
    def prefix_caching(self) -> bool:
        """Whether repeated soft prompts' keys and values are reused (``/health`` says it)."""
        return self.prefix_cache is not None

    def prefix_cache_stats(self) -> dict[str, int] | None:
        """The prefix cache's counters (None when it is off): for the server's metrics."""
        return None if self.prefix_cache is None else self.prefix_cache.stats()

    @torch.inference_mode()
    def classify(self, rows: Sequence[ClassifyRow]) -> list[list[float]]:
        """Label log-probabilities for every row: one forward pass per distinct number of classes
        (and, batch-invariant, per distinct length)."""
        out: list[list[float] | None] = [None] * len(rows)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault((len(r.label_ids), *self._layout(r.token_ids, r.soft_prompt)), []).append(i)
        for key, idx in groups.items():
            batch = self._batch([rows[i].soft_prompt for i in idx], [rows[i].token_ids for i in idx], key[1:])
            label_ids = torch.tensor([rows[i].label_ids for i in idx], dtype=torch.long)
            logp = prefix.classify(self.base, batch, label_ids).cpu().tolist()
            for i, lp in zip(idx, logp):
                out[i] = lp
        return out  # type: ignore[return-value]

    def open_groups(self, rows: Sequence[GenerateRow]) -> list[DecodeGroup]:
        """The decode groups of ``rows``: one per group of equal settings (:meth:`GenerateRow.group_key`)
        and, batch-invariant, equal padded length; each knows its rows by their positions in ``rows``."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault((self._layout(r.token_ids, r.soft_prompt), *r.group_key()), []).append(i)
        return [DecodeGroup(self.base, self.tokenizer, rows, idx,
                            self._batch([rows[i].soft_prompt for i in idx], [rows[i].token_ids for i in idx], key[0]))
                for key, idx in groups.items()]

    def generate(self, rows: Sequence[GenerateRow]) -> list[Completion]:
        """Completions for every row: each decode group (:meth:`open_groups`) is a KV-cached decoding
        loop (:class:`lopa.prefix.Decoder`) run to its end; ``completion_tokens`` counts the tokens generated."""
        out: list[Completion | None] = [None] * len(rows)
        for group in self.open_groups(rows):
            while not group.finished:
                for i, completion in group.step():
                    out[i] = completion
        return out  # type: ignore[return-value]

    def make_batcher(self, *, max_batch_size: int, max_wait_ms: float,
                     on_batch: Callable[[str, int], None] | None = None,
                     scheduling: str = "continuous") -> Batcher:
        """``continuous``: a :class:`~lopa.serve.scheduler.ContinuousBatcher` (rows join and leave between
        decode steps); ``static``: a :class:`~lopa.serve.batcher.Batcher` (each batch runs to its longest
        row). Either's worker thread computes on this thread's torch threads."""
        if scheduling not in SCHEDULING_CHOICES:
            raise ValueError(f"scheduling must be one of {list(SCHEDULING_CHOICES)}, got {scheduling!r}")
        cls = ContinuousBatcher if scheduling == "continuous" else Batcher
        return cls(self, max_batch_size, max_wait_ms, on_batch=on_batch, worker_init=torch_threads_init())

    def close(self) -> None:
        """Nothing to stop: the model lives in this process and goes with it."""

