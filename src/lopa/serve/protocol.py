"""What the server and a backend say to each other: rows in, results out.

A backend takes already-checked rows (token ids, an ``m × d`` soft prompt, and the row's label ids or
decoding settings) and returns one result per row. Rows may belong to any number of tasks; the
backend knows no task and holds no per-task state. Everything here is plain data and protocols, so
every other room of :mod:`lopa.serve` can import it without importing each other.

Example::

    >>> import torch
    >>> row = GenerateRow([1, 2], torch.zeros(4, 8), max_new_tokens=3, temperature=1e-40)
    >>> row.temperature  # too small to sample with: greedy
    0.0
    >>> classification_result([-2.0, -0.5], [" bad", " good"])
    {'logprobs': [-2.0, -0.5], 'label': 1, 'label_word': ' good'}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch

from ..prefix import TokenLogprob

KINDS = ("classify", "generate")
SCHEDULING_CHOICES = ("continuous", "static")
"""how a backend's batcher schedules generation rows: ``continuous``, rows join and leave between
decode steps; ``static``, a batch runs to its longest row before the next one starts"""

# Below this, sampling divides logits by so little that they overflow to infinity (1e-40 does), and
# the distribution is a point mass anyway: such a temperature means greedy. vLLM uses the same cut.
MIN_SAMPLING_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20
"""the most alternatives a request may ask for per generated token (OpenAI's chat limit; vLLM's
``max_logprobs``, which the vLLM backend sets to it)"""


class BackendError(RuntimeError):
    """A backend that cannot be built here (not installed, not implemented, bad setting)."""


@dataclass
class ClassifyRow:
    """One classification request: score each label's first token after ``[soft ; tokens]``."""

    token_ids: list[int]
    soft_prompt: torch.Tensor  # m × d
    label_ids: list[int]       # one token id per class


@dataclass
class GenerateRow:
    """One generation request; ``temperature == 0`` is greedy (``top_p`` and ``seed`` are then unused).

    A temperature below :data:`MIN_SAMPLING_TEMPERATURE` is stored as 0 (greedy).
    """

    token_ids: list[int]
    soft_prompt: torch.Tensor
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    on_token: Callable[..., bool | None] | None = field(default=None, repr=False, compare=False)
    """called from the backend's thread with each new token id, where the backend can (streaming),
    and with its :class:`TokenLogprob` as a second argument when ``logprobs`` is set; False stops
    the row there (its client went away)"""
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: each generated token's log-probability and its step's k
    most likely tokens (:class:`TokenLogprob`, the model's raw distribution) in ``Completion.logprobs``.
    Rows asking for different k decode together (it is no part of :meth:`group_key`)."""

    def __post_init__(self) -> None:
        if self.temperature < MIN_SAMPLING_TEMPERATURE:
            self.temperature = 0.0

    def group_key(self) -> tuple[Any, ...]:
        """Rows with equal keys decode together in one ``generate`` call.

        Greedy rows need only the same length budget and stop strings. Sampled rows also need the
        same temperature and top_p; a seeded row runs alone, because the seed sets one RNG for the
        whole batch and the same request must give the same text whatever else is in the batch.
        """
        if self.temperature == 0:
            return ("greedy", self.max_new_tokens, tuple(self.stop))
        uid = id(self) if self.seed is not None else None
        return ("sample", self.max_new_tokens, tuple(self.stop), float(self.temperature), float(self.top_p),
                self.seed, uid)


@dataclass
class Completion:
    """A generated text; ``finish_reason`` is ``"length"`` when the budget ran out, else ``"stop"``."""

    text: str
    finish_reason: str
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    """every generated token (``completion_tokens`` of them, the one that completed a stop string
    included) when the row asked for ``logprobs``, else None"""


class Submitter(Protocol):
    """Where the server hands rows: the :class:`~lopa.serve.batcher.Batcher`, or a backend's own
    continuous batching (vLLM). ``submit`` raises ``BatcherClosed`` / ``BatcherFull`` to refuse."""

    stats: dict[str, int]

    @property
    def queue_depth(self) -> int: ...

    async def start(self) -> None: ...

    async def submit(self, kind: str, row: Any) -> Any: ...

    async def close(self) -> None: ...


class Backend(Protocol):
    """What the server needs from a backend."""

    model_name: str
    hidden_size: int
    vocab_size: int
    dtype: torch.dtype
    batch_invariant: bool
    """whether a row's answer is the same whatever rows share its batch (bit for bit on one machine)"""
    max_token_chars: int
    """no token of the tokenizer covers more characters of text (see :func:`max_token_chars`)"""

    def tokenize(self, text: str) -> list[int]: ...

    def label_token_ids(self, label_words: Sequence[str]) -> list[int]: ...

    def classify(self, rows: Sequence[ClassifyRow]) -> list[list[float]]: ...

    def generate(self, rows: Sequence[GenerateRow]) -> list[Completion]: ...

    def make_batcher(self, *, max_batch_size: int, max_wait_ms: float,
                     on_batch: Callable[[str, int], None] | None = None,
                     scheduling: str = "continuous") -> Submitter:
        """What collects the server's rows for this backend; ``scheduling`` is one of
        :data:`SCHEDULING_CHOICES` (a backend whose engine schedules itself may ignore it)."""
        ...

    def close(self) -> None:
        """Free what the backend holds outside Python's memory (engine processes)."""
        ...


def max_token_chars(tokenizer: Any) -> int:
    """The most characters of text one token can stand for: its longest vocabulary entry (byte-level
    and sentencepiece vocabularies spell a token with at least one character per character of text).

    A text longer than this times the prompt limit cannot fit, so it is refused before tokenising,
    which would cost seconds per megabyte.

    >>> class Tok:
    ...     def get_vocab(self): return {"a": 0, "Ġthe": 1, "<|endoftext|>": 2}
    >>> max_token_chars(Tok())
    13
    """
    return max((len(t) for t in tokenizer.get_vocab()), default=1)


def classification_result(logprobs: Sequence[float], label_words: Sequence[str]) -> dict[str, Any]:
    """The JSON answer for one classified row; the server and the in-process client both use it.

    >>> classification_result([-2.0, -0.5], [" bad", " good"])
    {'logprobs': [-2.0, -0.5], 'label': 1, 'label_word': ' good'}
    """
    k = max(range(len(logprobs)), key=lambda i: logprobs[i])
    return {"logprobs": list(logprobs), "label": k, "label_word": label_words[k]}
