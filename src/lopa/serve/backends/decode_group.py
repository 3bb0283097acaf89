"""A decode group: rows of equal decoding settings that share every forward pass, advanced one token
at a time (:class:`lopa.prefix.Decoder`), each row handed back as a :class:`Completion` the step it ends.

The transformers backend opens them (:meth:`TransformersBackend.open_groups`); its ``generate`` steps
each group to the end, and the continuous scheduler (:mod:`lopa.serve.scheduler`) steps all open
groups a token per round, so rows join and leave between steps. Both compute the same numbers, since
a group's passes do not depend on when it is stepped.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ... import prefix
from ..protocol import Completion, GenerateRow


class DecodeGroup:
    """Rows ``members`` (positions in the caller's list) of one decoding pass, whose prefill is ``batch``
    (built by the backend: the joint ``[Z ; tokens]`` pass, or the tokens on cached soft prompts).

    :meth:`step` makes one token for each row still decoding and returns ``(position, Completion)`` for
    every row that ended there; :meth:`drop` stops a row whose caller went away. ``finished`` is true
    once no row is left; ``started`` once the prefill has run (nothing was streamed before it).
    """

    def __init__(self, base: Any, tokenizer: Any, rows: Sequence[GenerateRow], members: list[int],
                 batch: prefix.PrefixBatch):
        self.tokenizer, self.members = tokenizer, members
        self.rows = [rows[i] for i in members]
        first = self.rows[0]
        sample = first.temperature > 0
        self.stop = list(first.stop) or None
        # log-probabilities cost a log_softmax per step: only for groups where a row asks for them,
        # at the largest k asked, each row then keeping its own k
        ks = [r.logprobs for r in self.rows if r.logprobs is not None]
        self.decoder = prefix.Decoder(
            base, tokenizer, batch, first.max_new_tokens, do_sample=sample,
            temperature=first.temperature if sample else 1.0, top_p=first.top_p if sample else 1.0,
            stop=self.stop, seed=first.seed if sample else None, on_token=_stream_to(self.rows),
            top_logprobs=max(ks) if ks else None)

    @property
    def finished(self) -> bool:
        return self.decoder.finished

    @property
    def started(self) -> bool:
        return self.decoder.steps > 0

    @property
    def live(self) -> int:
        """Rows still decoding."""
        return 0 if self.decoder.finished else self.decoder.done.count(False)

    def drop(self, position: int) -> None:
        """Stop decoding the row at ``position`` (in the caller's list); it gets no Completion."""
        self.decoder.drop(self.members.index(position))

    def step(self) -> list[tuple[int, Completion]]:
        return [(self.members[j], self._completion(j)) for j in self.decoder.step()]

    def _completion(self, j: int) -> Completion:
        toks = self.decoder.rows[j]
        decoded = self.tokenizer.decode(toks, skip_special_tokens=True)
        text = prefix.cut_at_stop(decoded, self.stop)
        # the whole budget spent and no stop string in it: cut by length; else EOS or a stop string
        reason = "length" if len(toks) >= self.rows[j].max_new_tokens and text == decoded else "stop"
        k = self.rows[j].logprobs
        return Completion(text, reason, len(toks), None if k is None else [s.keep_top(k) for s in self.decoder.logprobs[j]])


def _stream_to(rows: Sequence[GenerateRow]) -> Callable[..., bool | None] | None:
    """The per-token callback of one decoding group: row j of the group reports to its row's ``on_token``
    (with the token's log-probability, trimmed to the row's k, when the row asked for them)."""
    callbacks = [r.on_token for r in rows]
    ks = [r.logprobs for r in rows]
    if not any(callbacks):
        return None

    def call(j: int, token: int, logprob: prefix.TokenLogprob | None = None) -> bool | None:
        if callbacks[j] is None:
            return None
        k = ks[j]
        return callbacks[j](token) if k is None or logprob is None else callbacks[j](token, logprob.keep_top(k))

    return call
