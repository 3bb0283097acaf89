"""Running a frozen causal LM on ``[soft prompt ; tokens]``: the one piece the client-side wrapper
(:mod:`lopa.model`) and the server (:mod:`lopa.serve`) share. It knows nothing of methods: a soft
prompt here is just an ``n × d`` tensor, and every row of a batch may carry its own, of its own length.

Layout of a batch (DESIGN.md, "Placement"): each row is ``[padding][soft prompt][tokens]``, padded
on the left, so every row ends at the last position. The attention mask is 0 on padding, and position
ids count from 0 at the first real position, so a row gives the same result alone or in any batch.

Example::

    >>> import torch, lopa
    >>> from lopa import prefix
    >>> base, tok = lopa.load_base("tiny-random-llama")
    >>> batch = prefix.assemble(base, [torch.zeros(3, 64), torch.zeros(5, 64)], [[1, 2], [7]])
    >>> batch.inputs_embeds.shape, batch.attention_mask.tolist()[0]
    (torch.Size([2, 6, 64]), [0, 1, 1, 1, 1, 1])
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PrefixBatch:
    inputs_embeds: torch.Tensor   # B × L × d
    attention_mask: torch.Tensor  # B × L (long)
    position_ids: torch.Tensor    # B × L
    past: Any = None
    """a KV cache already holding the first positions (the soft prompts, :mod:`lopa.serve.backends.softkv`):
    the inputs above then cover only the positions after it, and ``attention_mask`` covers both"""

    def __repr__(self) -> str:  # keeps doctest output short
        return f"PrefixBatch{tuple(self.inputs_embeds.shape)}"

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"inputs_embeds": self.inputs_embeds, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids}


def assemble(base: Any, soft_prompts: torch.Tensor | Sequence[torch.Tensor], token_ids: Sequence[Sequence[int]],
             pad_to_multiple: int | None = None) -> PrefixBatch:
    """Build the left-padded ``[pad][soft][tokens]`` inputs for a batch.

    ``soft_prompts`` is a B × n × d tensor or a list of ``n_i × d`` tensors (rows may differ in n).
    Gradients flow into the soft prompts; the token embeddings come from the frozen table.
    ``pad_to_multiple`` rounds the batch length up to a multiple of it (more left padding, same
    result), which bounds the number of distinct shapes the kernels see.

    The layout is worked out in Python and applied by one gather over ``[0 ; soft prompts ; token
    embeddings]``, so a batch costs the same few tensor operations at any B: on a GPU each operation is
    a kernel launch (and each host tensor moved, a copy), where a loop over rows paid several per row.
    """
    emb_layer = base.get_input_embeddings()
    dtype, device = emb_layer.weight.dtype, emb_layer.weight.device
    d = int(emb_layer.weight.shape[1])
    bsz = len(token_ids)
    if bsz == 0:
        raise ValueError("a batch needs at least one row")
    if len(soft_prompts) != bsz:
        raise ValueError(f"{len(soft_prompts)} soft prompts for {bsz} rows")
    if isinstance(soft_prompts, torch.Tensor):
        if soft_prompts.dim() != 3 or soft_prompts.shape[2] != d:
            raise ValueError(f"soft prompts have shape {tuple(soft_prompts.shape)}, expected (B, n, {d})")
        lens_s = [int(soft_prompts.shape[1])] * bsz
        softs = soft_prompts.reshape(-1, d).to(device=device, dtype=dtype)
    else:
        for i, z in enumerate(soft_prompts):
            if z.dim() != 2 or z.shape[1] != d:
                raise ValueError(f"soft prompt {i} has shape {tuple(z.shape)}, expected (n, {d})")
        lens_s = [int(z.shape[0]) for z in soft_prompts]
        parts = list(soft_prompts)
        if len({z.device for z in parts}) > 1:  # one copy to the device for the batch, unless they are spread
            parts = [z.to(device) for z in parts]
        softs = torch.cat(parts, 0).to(device=device, dtype=dtype)
    lens_t = [len(t) for t in token_ids]
    total = max(a + b for a, b in zip(lens_s, lens_t))
    if pad_to_multiple is not None:
        if pad_to_multiple < 1:
            raise ValueError(f"pad_to_multiple must be at least 1, got {pad_to_multiple}")
        total = -(-total // pad_to_multiple) * pad_to_multiple
    width = max(*lens_t, 1)
    ids = torch.tensor([list(t) + [0] * (width - len(t)) for t in token_ids], dtype=torch.long, device=device)
    tok_emb = emb_layer(ids)  # B × width × d
    # rows of the gathered table: 0 is zeros (padding), then every soft prompt's rows, then every token row
    first_token = 1 + sum(lens_s)
    index: list[int] = []
    mask: list[int] = []
    soft_at = 1
    for i, (ls, lt) in enumerate(zip(lens_s, lens_t)):
        pad = total - ls - lt
        tok_at = first_token + i * width
        index += [0] * pad + list(range(soft_at, soft_at + ls)) + list(range(tok_at, tok_at + lt))
        mask += [0] * pad + [1] * (ls + lt)
        soft_at += ls
    table = torch.cat([tok_emb.new_zeros(1, d), softs, tok_emb.reshape(-1, d)], 0)
    embeds = table.index_select(0, torch.tensor(index, dtype=torch.long, device=device)).view(bsz, total, d)
    masks = torch.tensor(mask, dtype=torch.long, device=device).view(bsz, total)
    positions = (masks.cumsum(-1) - 1).clamp_min(0)
    return PrefixBatch(embeds, masks, positions)


def embedding_scale(emb_layer: nn.Module) -> float:
    """The factor by which ``emb_layer`` multiplies its table's rows (Gemma's scaled embeddings: √d).

    Measured on a few rows spread over the vocabulary rather than read from a model-specific attribute;
    1.0 when the module's output is not a plain multiple of its rows. The tolerance admits a bf16 table's
    rounding (about 0.4%), far below what any other change to the rows would show.

    >>> emb = nn.Embedding(10, 4)
    >>> embedding_scale(emb)
    1.0
    """
    weight = emb_layer.weight
    ids = torch.arange(0, weight.shape[0], max(1, weight.shape[0] // 8), device=weight.device)[:8]
    with torch.no_grad():
        out, rows = emb_layer(ids).float(), weight[ids].float()
    denom = rows.pow(2).sum()
    if denom == 0:
        return 1.0
    scale = float((out * rows).sum() / denom)
    return scale if torch.allclose(out, rows * scale, rtol=1e-2, atol=1e-6) else 1.0


def _last_positions(batch: PrefixBatch, k: int) -> torch.Tensor:
    """``logits_to_keep`` for the last ``k`` positions, as indices rather than the int ``k``.

    With an int, Hugging Face models slice ``hidden[:, -k:]``: a strided view that ``F.linear`` cannot
    fold into one matrix product, so the LM head runs as a batched product against the vocabulary
    matrix broadcast over the batch (4x slower on CPU, in the forward and the backward). Indexing
    with a tensor gives a contiguous copy that folds into one ``mm``.
    """
    length = batch.inputs_embeds.shape[1]
    return torch.arange(max(length - k, 0), length, device=batch.inputs_embeds.device)


def last_logits(base: Any, batch: PrefixBatch) -> torch.Tensor:
    """Logits at the last position only (B × V): the LM head is never applied anywhere else."""
    if batch.past is not None:  # the soft prompts' keys and values come from the cache
        out = base(**batch.model_inputs(), **{cache_kwarg(base): batch.past}, use_cache=True,
                   logits_to_keep=_last_positions(batch, 1))
    else:
        out = base(**batch.model_inputs(), logits_to_keep=_last_positions(batch, 1), use_cache=False)
    return out.logits[:, -1]


def label_token_ids(tokenizer: Any, label_words: Sequence[str]) -> list[int]:
    """The first token of each label word (leading space kept); errors if two classes share it."""
    if len(label_words) < 2:
        raise ValueError(f"need at least two label words, got {list(label_words)}")
    ids = []
    for w in label_words:
        toks = tokenizer(w, add_special_tokens=False)["input_ids"]
        if not toks:
            raise ValueError(f"label word {w!r} tokenizes to nothing")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        clash = [w for w, i in zip(label_words, ids) if ids.count(i) > 1]
        raise ValueError(f"label words {clash} start with the same token; choose words whose first tokens differ")
    return ids


def classify(base: Any, batch: PrefixBatch, label_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Log-probabilities (over the whole vocabulary) of each label word's first token: B × C."""
    logp = torch.log_softmax(last_logits(base, batch).float(), dim=-1)
    if isinstance(label_ids, torch.Tensor) and label_ids.dim() == 2:  # per-row label sets
        return logp.gather(1, label_ids.to(logp.device))
    return logp[:, torch.as_tensor(list(label_ids), device=logp.device)]


def classification_loss(base: Any, batch: PrefixBatch, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the vocabulary at the answer position; ``targets`` are token ids (B)."""
    return F.cross_entropy(last_logits(base, batch).float(), targets.to(batch.inputs_embeds.device))


def generation_loss(base: Any, batch: PrefixBatch, token_ids: Sequence[Sequence[int]],
                    target_lens: Sequence[int], loss_masks: Sequence[Sequence[bool]] | None = None) -> torch.Tensor:
    """Mean cross-entropy over the target tokens only: row i's last ``target_lens[i]`` tokens, plus
    the tokens that ``loss_masks[i]`` (one flag per token of ``token_ids[i]``) marks, e.g. the earlier
    assistant turns of a conversation.

    Rows end at the last position (left padding), so the targets all sit at the end and the LM head
    is computed only from the first trained token of any row onwards.
    """
    rows = []
    for i, (ids, t) in enumerate(zip(token_ids, target_lens)):
        flags = [False] * len(ids)
        if loss_masks is not None and loss_masks[i]:
            flags[:len(loss_masks[i])] = list(loss_masks[i])[:len(ids)]
        for j in range(len(ids) - t, len(ids)):
            flags[j] = True
        rows.append(flags)
    k = max((len(f) - f.index(True) for f in rows if True in f), default=0) + 1
    out = base(**batch.model_inputs(), logits_to_keep=_last_positions(batch, k), use_cache=False)
    logits = out.logits[:, -k:-1].float()  # position p predicts token p+1
    labels = torch.full(logits.shape[:2], -100, dtype=torch.long, device=logits.device)
    for i, (ids, flags) in enumerate(zip(token_ids, rows)):
        n = min(len(ids), k - 1)
        tail_ids, tail_flags = list(ids[len(ids) - n:]), flags[len(ids) - n:]
        labels[i, k - 1 - n:] = torch.as_tensor([t if f else -100 for t, f in zip(tail_ids, tail_flags)],
                                                device=logits.device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def _eos_ids(base: Any, tokenizer: Any) -> set[int]:
    """Every id that ends a row: the tokenizer's EOS and the model's generation config's (int or list)."""
    ids: set[int] = set()
    for e in (tokenizer.eos_token_id, getattr(getattr(base, "generation_config", None), "eos_token_id", None)):
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    return ids


def new_cache(base: Any) -> Any:
    """An empty KV cache for ``base``."""
    from transformers import DynamicCache
    try:  # with the config, models with sliding-window layers get the right cache per layer
        return DynamicCache(config=base.config)
    except TypeError:  # older transformers
        return DynamicCache()


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(base: Any) -> str:
    """The name under which ``base.forward`` takes its KV cache: ``cache`` (transformers >= 5.24, which
    deprecates ``past_key_values`` and drops it in 5.40) or ``past_key_values`` (earlier releases and
    models whose forward is their own). Passed under a dropped name, the cache would be silently
    ignored and every decode step would see only its own token.

    >>> class Older:
    ...     def forward(self, input_ids=None, past_key_values=None, use_cache=None): ...
    >>> class Newer:
    ...     def forward(self, input_ids=None, cache=None, use_cache=None): ...
    >>> cache_kwarg(Older()), cache_kwarg(Newer())
    ('past_key_values', 'cache')
    """
    return _cache_kwarg_of(type(base))


def _next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """Greedy argmax, or a sample from the temperature-scaled distribution cut to its top-p nucleus."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class TokenLogprob(NamedTuple):
    """One generated token with its log-probability and the step's most likely tokens.

    The log-probabilities are of the model's own next-token distribution (``log_softmax`` of the raw
    logits, in float32), before temperature and top-p reshape it for sampling: the quantity vLLM
    reports by default (``logprobs_mode="raw_logprobs"``) and the one :func:`classify` scores.
    """

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """the step's ``k`` most likely ``(token id, logprob)``, most likely first"""

    def keep_top(self, k: int) -> "TokenLogprob":
        """The same token with only its ``k`` most likely alternatives."""
        return self if len(self.top) <= k else self._replace(top=self.top[:k])


@torch.inference_mode()
def generate_ids(base: Any, tokenizer: Any, batch: PrefixBatch, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, stop: Sequence[str] | None = None,
                 seed: int | None = None, on_token: Callable[..., bool | None] | None = None) -> list[list[int]]:
    """The new token ids of every row, each cut before its EOS and after the token that completed a
    stop string: greedy or sampled decoding with the KV cache. ``on_token(row, token_id)`` is called
    for each token as it is kept (a server streams with it); when it returns False that row stops
    there (its client went away), and the loop ends once no row is left.
    :func:`generate_logprobs` is the same loop that also reports each token's log-probability, and
    :class:`Decoder` the same loop a step at a time (the server interleaves groups with it).

    One prefill over ``[pad][soft][tokens]`` (the LM head at the last position only), then one token
    per row and step; a finished row is fed EOS until every row is done. This loop is all the
    decoding the library needs, without ``generate``'s per-step machinery (about half the time of
    ``model.generate`` for a batch of 32 short rows on a CPU). ``seed`` seeds a private generator,
    so sampling is repeatable and leaves torch's global RNG alone.
    """
    return _decode(base, tokenizer, batch, max_new_tokens, do_sample, temperature, top_p, stop, seed, on_token,
                   None)[0]


@torch.inference_mode()
def generate_logprobs(base: Any, tokenizer: Any, batch: PrefixBatch, top_logprobs: int = 0,
                      max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                      top_p: float = 1.0, stop: Sequence[str] | None = None, seed: int | None = None,
                      on_token: Callable[..., bool | None] | None = None) -> list[list[TokenLogprob]]:
    """:func:`generate_ids` (same tokens, same arguments) with every kept token's
    :class:`TokenLogprob` and the ``top_logprobs`` most likely tokens of its step;
    ``on_token(row, token_id, token_logprob)`` is called as each is kept.

    The log-probabilities are the model's raw distribution (see :class:`TokenLogprob`): a greedy
    token's is the largest of its step.
    """
    if top_logprobs < 0:
        raise ValueError(f"top_logprobs must be >= 0, got {top_logprobs}")
    return _decode(base, tokenizer, batch, max_new_tokens, do_sample, temperature, top_p, stop, seed, on_token,
                   top_logprobs)[1]


def _step_logprobs(logits: torch.Tensor, nxt: torch.Tensor, k: int) -> list[tuple[float, tuple[tuple[int, float], ...]]]:
    """Each row's chosen-token log-probability and its ``k`` most likely tokens, from one step's logits."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, nxt[:, None]).squeeze(-1).tolist()
    if k == 0:
        return [(c, ()) for c in chosen]
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return [(c, tuple(zip(i, v))) for c, i, v in zip(chosen, ids.tolist(), values.tolist())]


def _decode(base: Any, tokenizer: Any, batch: PrefixBatch, max_new_tokens: int, do_sample: bool, temperature: float,
            top_p: float, stop: Sequence[str] | None, seed: int | None, on_token: Callable[..., bool | None] | None,
            top_logprobs: int | None) -> tuple[list[list[int]], list[list[TokenLogprob]]]:
    """The decoding loop of :func:`generate_ids` and :func:`generate_logprobs`: the kept ids of every
    row and, when ``top_logprobs`` is not None, their log-probabilities (else empty lists)."""
    dec = Decoder(base, tokenizer, batch, max_new_tokens, do_sample, temperature, top_p, stop, seed, on_token,
                  top_logprobs)
    while not dec.finished:
        dec.step()
    return dec.rows, dec.logprobs


class Decoder:
    """One decoding group advanced one token per :meth:`step`: the loop of :func:`generate_ids`, cut
    into steps so that a server can interleave groups (continuous batching) and hand back each row as
    soon as it ends. Stepping a decoder to the end computes exactly what :func:`generate_ids` does
    (it is that function's loop): the first step is the prefill, and a row that has ended stays in
    the batch, fed EOS, so its neighbours' passes keep their shape and their numbers.

    ``rows[i]`` / ``logprobs[i]`` hold row ``i``'s kept tokens so far; ``finished`` is true once no
    row is left to decode (each ended, or the budget is spent), after which :meth:`step` does nothing.
    """

    def __init__(self, base: Any, tokenizer: Any, batch: PrefixBatch, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, stop: Sequence[str] | None = None,
                 seed: int | None = None, on_token: Callable[..., bool | None] | None = None,
                 top_logprobs: int | None = None):
        if do_sample and temperature <= 0:
            raise ValueError(f"sampling needs temperature > 0, got {temperature}")
        self.base, self.tokenizer, self.max_new_tokens = base, tokenizer, max_new_tokens
        self.do_sample, self.temperature, self.top_p, self.stop = do_sample, temperature, top_p, stop
        self.on_token, self.top_logprobs = on_token, top_logprobs
        device = batch.inputs_embeds.device
        self.generator = torch.Generator(device=device).manual_seed(seed) if do_sample and seed is not None else None
        eos = _eos_ids(base, tokenizer)
        self.eos_t = torch.tensor(sorted(eos) or [-1], device=device)
        self.fill = min(eos) if eos else 0
        bsz = batch.inputs_embeds.shape[0]
        self.rows: list[list[int]] = [[] for _ in range(bsz)]
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(bsz)]
        self.done = [False] * bsz
        self.steps = 0
        self.finished = False
        self._reported = [False] * bsz
        self._batch: PrefixBatch | None = batch  # until the prefill has read it
        # the KV cache, under the name this model takes; it starts from the batch's own when it has one
        self._cache = {cache_kwarg(base): batch.past if batch.past is not None else new_cache(base)}
        self._mask, self._pos = batch.attention_mask, batch.position_ids

    def drop(self, i: int) -> None:
        """Stop decoding row ``i`` (its caller went away); from the next step it is fed EOS."""
        self.done[i] = self._reported[i] = True
        if all(self.done):
            self._finish()

    @torch.inference_mode()
    def step(self) -> list[int]:
        """Make one token for every row still decoding; the rows that ended at this step (by EOS, a stop
        string, their ``on_token`` returning False, or, at the last step, the budget), each reported once."""
        if self.finished:
            return []
        if self.max_new_tokens >= 1:
            logits = self._forward()
            self._keep(logits)
            self.steps += 1
        if all(self.done) or self.steps >= self.max_new_tokens:
            self._finish()
        ended = [i for i, (d, r) in enumerate(zip(self.done, self._reported)) if not r and (d or self.finished)]
        for i in ended:
            self._reported[i] = True
        return ended

    def _finish(self) -> None:
        self.finished = True
        self._batch, self._cache = None, {}  # the KV cache is a group's largest holding: free it now

    def _forward(self) -> torch.Tensor:
        """The next-token logits of every row (B × V): the prefill at the first step, then one token per row."""
        if self._batch is not None:
            batch, self._batch = self._batch, None
            out = self.base(**batch.model_inputs(), **self._cache, use_cache=True,
                            logits_to_keep=_last_positions(batch, 1))
            return out.logits[:, -1]
        bsz = len(self.rows)
        feed = torch.tensor([self.fill if d else r[-1] for d, r in zip(self.done, self.rows)],
                            device=self._mask.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(bsz, 1)], 1)
        self._pos = self._pos[:, -1:] + 1
        out = self.base(input_ids=feed[:, None], attention_mask=self._mask, position_ids=self._pos, **self._cache,
                        use_cache=True)
        return out.logits[:, -1]

    def _keep(self, logits: torch.Tensor) -> None:
        """Choose each row's next token and keep it, unless the row has ended (EOS, stop string, caller gone)."""
        nxt = _next_tokens(logits, self.do_sample, self.temperature, self.top_p, self.generator)
        is_eos = torch.isin(nxt, self.eos_t).tolist()
        steps = _step_logprobs(logits, nxt, self.top_logprobs) if self.top_logprobs is not None else None
        for i, (t, e) in enumerate(zip(nxt.tolist(), is_eos)):
            if self.done[i]:
                continue
            if e:
                self.done[i] = True
                continue
            self.rows[i].append(t)
            if steps is not None:
                self.logprobs[i].append(TokenLogprob(t, *steps[i]))
                stay = self.on_token is None or self.on_token(i, t, self.logprobs[i][-1]) is not False
            else:
                stay = self.on_token is None or self.on_token(i, t) is not False
            if not stay:  # the caller wants no more of this row
                self.done[i] = True
            elif self.stop:
                text = self.tokenizer.decode(self.rows[i], skip_special_tokens=True)
                self.done[i] = any(s in text for s in self.stop)


def generate(base: Any, tokenizer: Any, batch: PrefixBatch, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, stop: Sequence[str] | None = None,
             seed: int | None = None) -> list[str]:
    """Greedy or sampled decoding with the KV cache (:func:`generate_ids`); each row's text, cut at
    EOS and before the first stop string."""
    ids = generate_ids(base, tokenizer, batch, max_new_tokens=max_new_tokens, do_sample=do_sample,
                       temperature=temperature, top_p=top_p, stop=stop, seed=seed)
    return [cut_at_stop(tokenizer.decode(r, skip_special_tokens=True), stop) for r in ids]


def cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = min((j for j in (text.find(s) for s in stop or ()) if j != -1), default=len(text))
    return text[:cut]
