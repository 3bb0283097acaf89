"""Generated tokens' log-probabilities in OpenAI's two shapes.

A backend reports every generated token as a :class:`~lopa.prefix.TokenLogprob` (its id, its
log-probability under the model's raw distribution and the step's ``k`` most likely tokens). This
module turns them into what the answer carries:

* ``/v1/completions`` (``logprobs: k``), OpenAI's legacy format: ``{"tokens", "token_logprobs",
  "top_logprobs", "text_offset"}``, one entry per token; ``top_logprobs[j]`` maps the step's ``k``
  most likely token strings to their log-probabilities, plus the chosen token (so up to ``k + 1``
  entries, as OpenAI and vLLM answer); ``text_offset[j]`` is where token j's text begins in the
  choice's text.
* ``/v1/chat/completions`` (``logprobs: true, top_logprobs: k``): ``{"content": [{"token",
  "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...k]}]}``.

A token's string is its UTF-8 text; a token that holds only part of a character (byte-level
vocabularies split them) is written ``bytes:\\xe6\\x97`` as OpenAI writes it, and ``bytes`` always
holds its exact bytes. Only the tokens whose text the answer holds are listed: when a stop string
cuts the text, the tokens from the stop string on are left out (they still count in ``usage``).

Example::

    >>> from lopa.models import load_tokenizer
    >>> strings = TokenStrings(load_tokenizer("tiny-random-llama"))
    >>> ids = [88, 17097, 241, 115]  # "h", then " 日" in three byte-level tokens: " \\xe6", "\\x97", "\\xa5"
    >>> [strings.token(i) for i in ids]
    [('h', [104]), ('bytes:\\\\x20\\\\xe6', [32, 230]), ('bytes:\\\\x97', [151]), ('bytes:\\\\xa5', [165])]
    >>> strings.offsets(ids)
    [0, 1, 2, 2]
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Sequence

from ..prefix import TokenLogprob

_HEX_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
FLOOR = -9999.0
"""what a log-probability of minus infinity (a token the model rules out) or NaN is written as: JSON has neither"""


def finite(x: float) -> float:
    """``x``, or :data:`FLOOR` where JSON could not carry it.

    >>> finite(-1.5), finite(float("-inf")), finite(float("nan"))
    (-1.5, -9999.0, -9999.0)
    """
    return x if math.isfinite(x) else FLOOR


def _byte_level_table() -> dict[str, int]:
    """The character a byte-level BPE vocabulary spells each byte with -> that byte.

    Bytes that are printable Latin-1 characters stand for themselves; the other 68 take the
    characters from U+0100 on, in byte order (GPT-2's scheme, which SmolLM, Llama 3, Qwen and
    most byte-level vocabularies share).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class TokenStrings:
    """Token ids -> their strings and bytes, and text offsets, for one tokenizer (cached per id)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = _byte_level_table() if "ByteLevel" in repr(decoder) else None
        self.metaspace = "Metaspace" in repr(decoder) or "\u2581" in repr(decoder)
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self.added = {int(i): str(getattr(t, "content", t)) for i, t in added.items()}
        self._cache: dict[int, tuple[str, bytes]] = {}  # at most one entry per vocabulary id

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self.added:
            return self.added[token_id].encode("utf-8")
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if self.byte_level is not None and all(c in self.byte_level for c in piece):
                return bytes(self.byte_level[c] for c in piece)
            m = _HEX_BYTE.fullmatch(piece)
            if m:  # sentencepiece byte fallback
                return bytes([int(m.group(1), 16)])
            if self.metaspace:
                return piece.replace("\u2581", " ").encode("utf-8")
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def token(self, token_id: int) -> tuple[str, list[int]]:
        """``(string, bytes)`` of one token: its text, or ``bytes:\\xNN...`` when its bytes are not
        whole UTF-8 characters."""
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._bytes(token_id)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            hit = self._cache[token_id] = (text, raw)
        return hit[0], list(hit[1])

    def offsets(self, ids: Sequence[int]) -> list[int]:
        """Where each token's text begins in ``decode(ids)`` (special tokens skipped, as the answer's
        text is): the length of the text of the tokens before it, less a trailing incomplete
        character (U+FFFD), never less than the token before's."""
        out: list[int] = []
        for k in range(len(ids)):
            out.append(next_offset(out, self.tokenizer.decode(list(ids[:k]), skip_special_tokens=True)))
        return out


@functools.lru_cache(maxsize=4)
def token_strings(tokenizer: Any) -> TokenStrings:
    """The server's one :class:`TokenStrings` of ``tokenizer``, so its cache lasts across requests."""
    return TokenStrings(tokenizer)


def next_offset(offsets: list[int], text_before: str) -> int:
    """The offset of the next token, given the decoded text of the tokens before it (the one rule
    :meth:`TokenStrings.offsets` and a stream, which has that text at hand, both follow)."""
    return max(len(text_before.rstrip("\ufffd")), offsets[-1] if offsets else 0)


def kept(steps: Sequence[TokenLogprob], offsets: Sequence[int], text: str, cut: bool) -> int:
    """How many of ``steps`` the answer lists: all, unless a stop string ``cut`` the text; then
    those whose text begins before the cut."""
    if not cut:
        return len(steps)
    return sum(1 for off in offsets if off < len(text))


def completion_logprobs(strings: TokenStrings, steps: Sequence[TokenLogprob], offsets: Sequence[int]) -> dict[str, Any]:
    """OpenAI's legacy ``choices[i].logprobs`` of ``steps`` (their text offsets given)."""
    tokens, values, tops = [], [], []
    for s in steps:
        name = strings.token(s.token)[0]
        tokens.append(name)
        values.append(finite(s.logprob))
        top = {strings.token(t)[0]: finite(lp) for t, lp in s.top}
        top.setdefault(name, finite(s.logprob))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": list(offsets)}


def _entry(strings: TokenStrings, token_id: int, logprob: float) -> dict[str, Any]:
    name, raw = strings.token(token_id)
    return {"token": name, "logprob": finite(logprob), "bytes": raw}


def chat_logprobs(strings: TokenStrings, steps: Sequence[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's chat ``choices[i].logprobs`` of ``steps``."""
    return {"content": [{**_entry(strings, s.token, s.logprob),
                         "top_logprobs": [_entry(strings, t, lp) for t, lp in s.top]} for s in steps]}


__all__ = ["FLOOR", "TokenStrings", "chat_logprobs", "completion_logprobs", "finite", "kept", "next_offset",
           "token_strings"]
