"""How :class:`lopa.Client` reaches a model: over HTTP to a ``lopa serve``, or in this process.

Both transports take the same thing, texts with their soft prompts, and give the same answers, so the
client computes Z once and never asks which one it holds. :class:`InProcess` runs the server's own
backend code (:mod:`lopa.serve.backends`), so the numbers match a server's.

Example (in-process, on the tiny test model)::

    >>> import torch
    >>> t = InProcess("tiny-random-llama")
    >>> t.hidden_size
    64
    >>> out = t.classify(["a fine film"], torch.zeros(1, 2, 64), [" bad", " good"])
    >>> sorted(out[0])
    ['label', 'label_word', 'logprobs']
    >>> t.close()
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch

from .serve.backends import ClassifyRow, GenerateRow, classification_result
from .serve.wire import encode_soft_prompt


class ClientError(RuntimeError):
    """The client cannot do what was asked (width mismatch, missing encoder, unreachable server, ...)."""


class ServerError(ClientError):
    """The server answered with an error; ``status`` and the server's message are kept."""

    def __init__(self, status: int, message: str, type: str | None = None):
        super().__init__(f"server answered {status}: {message}")
        self.status, self.message, self.type = status, message, type


@dataclass(frozen=True)
class Sampling:
    """What a generation asks for, the same for every text of a call."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


class Transport(Protocol):
    """What the client needs from a model: its description, and rows of (text, Z) answered."""

    hidden_size: int
    model: str
    max_soft_tokens: int | None
    base: Any  # the base model and tokenizer where they live in this process (for the 'self' encoder)
    tokenizer: Any

    def classify(self, texts: Sequence[str], z: torch.Tensor, words: Sequence[str]) -> list[dict[str, Any]]: ...

    def generate(self, texts: Sequence[str], z: torch.Tensor, sampling: Sampling) -> list[str]: ...

    def close(self) -> None: ...


class InProcess:
    """The base model in this process, run by the server's transformers backend."""

    max_soft_tokens = None

    def __init__(self, model: str, dtype: str = "float32"):
        from .serve.backends import TransformersBackend
        self._backend = TransformersBackend(model, dtype=dtype)
        self.model, self.hidden_size = model, self._backend.hidden_size
        self.base, self.tokenizer = self._backend.base, self._backend.tokenizer

    def tokenize(self, text: str) -> list[int]:
        """The token ids the model reads for ``text`` (after the soft prompt)."""
        return self._backend.tokenize(text)

    def classify(self, texts: Sequence[str], z: torch.Tensor, words: Sequence[str]) -> list[dict[str, Any]]:
        ids = self._backend.label_token_ids(list(words))
        rows = [ClassifyRow(self._backend.tokenize(t), zi, ids) for t, zi in zip(texts, z)]
        return [classification_result(lp, list(words)) for lp in self._backend.classify(rows)]

    def generate(self, texts: Sequence[str], z: torch.Tensor, sampling: Sampling) -> list[str]:
        s = sampling
        rows = [GenerateRow(self._backend.tokenize(t), zi, s.max_new_tokens, s.temperature, s.top_p, s.stop, s.seed)
                for t, zi in zip(texts, z)]
        return [c.text for c in self._backend.generate(rows)]

    def close(self) -> None:
        pass


class HTTP:
    """A ``lopa serve`` at ``url``; soft prompts travel in the wire format, ``concurrency`` requests at
    once so that the server batches them together."""

    base = tokenizer = None  # the weights stay on the server

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 120.0, concurrency: int = 16,
                 wire_dtype: str = "float32"):
        import httpx
        self.url, self.wire_dtype, self.concurrency = url.rstrip("/"), wire_dtype, max(1, concurrency)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, limits=limits)
        self.health = self._request("GET", "/health")
        self.model = str(self.health.get("model", ""))
        self.hidden_size = self.health.get("hidden_size")
        cap = self.health.get("max_soft_tokens")
        self.max_soft_tokens = int(cap) if cap is not None else None

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        import httpx
        try:
            r = self._http.request(method, path, json=body)
        except httpx.HTTPError as e:
            raise ClientError(f"cannot reach the server at {self.url}: {e}") from None
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.status_code >= 400:
            err = data.get("error", {}) if isinstance(data, dict) else {}
            raise ServerError(r.status_code, err.get("message") or r.text[:500], err.get("type"))
        if not isinstance(data, dict):
            raise ClientError(f"the server at {self.url} answered {path} with something other than a JSON object")
        return data

    def _post_all(self, path: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if len(bodies) == 1:
            return [self._request("POST", path, bodies[0])]
        with ThreadPoolExecutor(self.concurrency) as pool:  # the server batches what arrives together
            return list(pool.map(lambda b: self._request("POST", path, b), bodies))

    def classify(self, texts: Sequence[str], z: torch.Tensor, words: Sequence[str]) -> list[dict[str, Any]]:
        return self._post_all("/v1/classify", [
            {"text": t, "soft_prompt": encode_soft_prompt(zi, self.wire_dtype), "label_words": list(words)}
            for t, zi in zip(texts, z)])

    def generate(self, texts: Sequence[str], z: torch.Tensor, sampling: Sampling) -> list[str]:
        s = sampling
        bodies = [{"text": t, "soft_prompt": encode_soft_prompt(zi, self.wire_dtype), "max_new_tokens": s.max_new_tokens,
                   "temperature": s.temperature, "top_p": s.top_p, "stop": list(s.stop), "seed": s.seed}
                  for t, zi in zip(texts, z)]
        return [r["text"] for r in self._post_all("/v1/generate", bodies)]

    def close(self) -> None:
        self._http.close()
