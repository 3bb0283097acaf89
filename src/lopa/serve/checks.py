"""What every endpoint checks before a row reaches the batcher: the prompt, the soft prompt, the
label words and the generation limits, each refused with an :class:`~lopa.serve.errors.APIError`
that names the field.

Tokenising runs in one thread of its own, never on the event loop: a long text or a large label set
costs that thread time while the server goes on accepting and answering. Label words' token ids are
cached by the total bytes they hold (:class:`~lopa.serve.labelcache.ByteLRU`), not by count.

Example::

    >>> import asyncio, torch
    >>> from lopa.serve.backends import TransformersBackend
    >>> from lopa.serve.config import ServeConfig
    >>> from lopa.serve.wire import encode_soft_prompt
    >>> checks = Checks(TransformersBackend("tiny-random-llama", dtype="float32"),
    ...                 ServeConfig(model="tiny-random-llama", max_prompt_tokens=4))
    >>> len(asyncio.run(checks.prompt_ids("a fine film", None))) > 0
    True
    >>> asyncio.run(checks.prompt_ids(None, [1, 2, 3, 4, 5]))
    Traceback (most recent call last):
    ...
    lopa.serve.errors.APIError: the prompt is 5 tokens; this server accepts at most 4 (--max-prompt-tokens)
    >>> checks.soft(encode_soft_prompt(torch.zeros(2, 64))).shape
    torch.Size([2, 64])
    >>> checks.close()
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import torch
from pydantic import BaseModel

from .config import MiB, ServeConfig
from .errors import APIError
from .labelcache import ByteLRU
from .protocol import Backend
from .wire import decode_soft_prompt

T = TypeVar("T")
LABEL_CACHE_BYTES = 16 * MiB


def _label_set_bytes(words: tuple[str, ...], ids: tuple[int, ...]) -> int:
    # what the entry holds: the words' text (up to 4 bytes a character in a str) and an int per word
    return sum(49 + 4 * len(w) for w in words) + 36 * len(ids) + 120


class Checks:
    """The request checks of one server: ``backend``'s vocabulary and width, ``cfg``'s limits."""

    def __init__(self, backend: Backend, cfg: ServeConfig, label_cache_bytes: int = LABEL_CACHE_BYTES):
        self.backend, self.cfg = backend, cfg
        self.label_cache: ByteLRU[tuple[str, ...], tuple[int, ...]] = ByteLRU(label_cache_bytes, _label_set_bytes)
        # one thread: tokenisers are not promised to be thread-safe, and one is enough to keep the loop free
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lopa-tokenize")
        # twice the exact bound: a normaliser may merge characters (NFC) before the vocabulary sees them
        self.max_text_chars = 2 * cfg.max_prompt_tokens * backend.max_token_chars

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def label_ids(self, words: list[str]) -> list[int]:
        """The first token of each label word (400 when two words share it)."""
        key = tuple(words)
        ids = self.label_cache.get(key)
        if ids is None:
            try:
                ids = tuple(await self._off_loop(self.backend.label_token_ids, key))
            except ValueError as e:
                raise APIError(400, str(e), param="label_words") from None
            self.label_cache.put(key, ids)
        return list(ids)

    async def prompt_ids(self, text: str | None, token_ids: list[int] | None) -> list[int]:
        """The prompt's token ids from exactly one of ``text`` and ``token_ids``, within the limits."""
        backend, cfg = self.backend, self.cfg
        if (text is None) == (token_ids is None):
            raise APIError(400, "give exactly one of text or token_ids", param="text")
        if token_ids is not None:
            bad = next((t for t in token_ids if not 0 <= t < backend.vocab_size), None)
            if bad is not None:
                raise APIError(400, f"token id {bad} is outside the vocabulary [0, {backend.vocab_size})",
                               param="token_ids")
            ids = list(token_ids)
        elif len(text) > self.max_text_chars:  # cannot fit: refuse without seconds of tokenising
            raise APIError(400, f"the text is {len(text)} characters; no token of this model covers more than "
                                f"{backend.max_token_chars}, so it cannot fit in {cfg.max_prompt_tokens} tokens "
                                f"(--max-prompt-tokens)", param="text")
        else:
            ids = await self._off_loop(backend.tokenize, text)
        if len(ids) > cfg.max_prompt_tokens:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this server accepts at most "
                                f"{cfg.max_prompt_tokens} (--max-prompt-tokens)", param="text" if text else "token_ids")
        return ids

    def soft(self, obj: BaseModel | dict[str, Any] | None) -> torch.Tensor:
        """The decoded ``m × d`` soft prompt in the model's dtype (400 for anything the wire refuses)."""
        if obj is None:
            raise APIError(400, "soft_prompt is required: {\"dtype\": ..., \"shape\": [m, d], \"data\": base64}",
                           param="soft_prompt")
        if isinstance(obj, BaseModel):
            obj = obj.model_dump()
        return decode_soft_prompt(obj, hidden_size=self.backend.hidden_size, max_soft_tokens=self.cfg.max_soft_tokens,
                                  out_dtype=self.backend.dtype)

    def new_tokens(self, n: int, name: str) -> int:
        if not 1 <= n <= self.cfg.max_new_tokens:
            raise APIError(400, f"{name} is {n}; this server allows 1 to {self.cfg.max_new_tokens} (--max-new-tokens)",
                           param=name)
        return n
