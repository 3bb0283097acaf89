"""A soft prompt's keys and values computed on their own, and batches whose passes start from them.

A row is ``[soft prompt Z ; tokens]`` with Z at positions 0..m-1. Attention is causal and position ids
count from Z's first row, so Z's keys and values in every layer depend on Z alone: they can be computed
once (:func:`soft_prompt_kv`) and reused by every request that carries the same Z
(:mod:`~lopa.serve.backends.prefixcache`). A batch then runs only its tokens (:func:`assemble_after`), on a KV
cache laid out ``[padding][Z's keys and values]`` per row, the tokens ``[padding][tokens]`` after it.

Exactness: Z's pass is always its own forward (one Z, no padding), whether or not its keys and values
were cached, so a cache hit gives the same bits as a miss. It is not the joint ``[Z ; tokens]`` pass of
:func:`lopa.prefix.assemble`: the two round differently (measured in the README's "Serving").

Models with sliding-window layers are refused (:func:`unsupported`): their cache drops old positions,
and the padding in front of Z would count towards the window.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ... import prefix

# per layer: (keys, values), each heads × m × head_dim
KV = tuple[tuple[torch.Tensor, torch.Tensor], ...]


def unsupported(base: Any) -> str | None:
    """Why a soft prompt's keys and values cannot be reused on ``base`` (None: they can). The per-layer
    ``layer_types`` decide where the config has them; else a ``sliding_window`` that is in use
    (Qwen2 names one but turns it off with ``use_sliding_window=False``)."""
    cfg = base.config
    kinds = getattr(cfg, "layer_types", None)
    if kinds is not None:
        sliding = bool(set(kinds) - {"full_attention"})
    else:
        sliding = bool(getattr(cfg, "sliding_window", None)) and getattr(cfg, "use_sliding_window", True) is not False
    if sliding:
        return (f"{type(base).__name__} has sliding-window (or other non-full) attention layers, whose cache "
                "drops positions; the prefix cache needs full attention in every layer")
    return None


def kv_bytes(kv: KV) -> int:
    return sum(k.nbytes + v.nbytes for k, v in kv)


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values) of a filled cache: ``layers`` in transformers 5, the lists before."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


@torch.inference_mode()
def soft_prompt_kv(base: Any, soft: torch.Tensor) -> KV:
    """Every layer's keys and values at Z's positions, from a forward over Z alone (positions 0..m-1,
    no padding): the same pass for every request, so the result depends on Z's bits alone."""
    emb = base.get_input_embeddings().weight
    z = soft.to(device=emb.device, dtype=emb.dtype)[None]
    cache = prefix.new_cache(base)
    positions = torch.arange(z.shape[1], device=emb.device)[None]
    base(inputs_embeds=z, position_ids=positions, **{prefix.cache_kwarg(base): cache}, use_cache=True,
         logits_to_keep=1)  # the LM head at one position: only the cache is wanted
    return tuple((k[0].clone(), v[0].clone()) for k, v in _layers(cache))


def _past(base: Any, kvs: Sequence[KV], past_len: int) -> Any:
    """A KV cache of ``past_len`` positions per row: zeros, then row i's Z at the end (left padding).
    Each distinct soft prompt is padded once per layer and rows repeating it share that copy (one stack
    per layer, not a copy per row: a repeated-task batch holds one soft prompt many times)."""
    cache = prefix.new_cache(base)
    for layer in range(len(kvs[0])):
        padded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for kv in kvs:
            if id(kv) not in padded:
                k, v = kv[layer]
                pk = k.new_zeros(k.shape[0], past_len, k.shape[2])
                pv = v.new_zeros(v.shape[0], past_len, v.shape[2])
                pk[:, past_len - k.shape[1]:], pv[:, past_len - v.shape[1]:] = k, v
                padded[id(kv)] = (pk, pv)
        rows = [padded[id(kv)] for kv in kvs]
        cache.update(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), layer)
    return cache


def assemble_after(base: Any, kvs: Sequence[KV], token_ids: Sequence[Sequence[int]],
                   past_len: int | None = None, tok_len: int | None = None) -> prefix.PrefixBatch:
    """The batch of rows ``[padding][Z_i][padding][tokens_i]`` whose Z part is already computed (``kvs[i]``):
    its inputs are the tokens part only, its ``past`` the Z part. ``past_len`` / ``tok_len`` are the
    padded lengths of the two parts (None: the batch's longest), so that a caller can make a row's
    layout depend on its own lengths alone (batch invariance). Every row needs at least one token."""
    soft_lens = [int(kv[0][0].shape[1]) for kv in kvs]
    tok_lens = [len(t) for t in token_ids]
    if min(tok_lens, default=1) < 1:
        raise ValueError("every row needs at least one token after its soft prompt")
    p = past_len if past_len is not None else max(soft_lens)
    t = tok_len if tok_len is not None else max(tok_lens)
    if p < max(soft_lens) or t < max(tok_lens):
        raise ValueError(f"padded lengths ({p}, {t}) below the longest row ({max(soft_lens)}, {max(tok_lens)})")
    emb_layer = base.get_input_embeddings()
    device = emb_layer.weight.device
    ids = torch.zeros(len(kvs), t, dtype=torch.long, device=device)
    mask = torch.zeros(len(kvs), p + t, dtype=torch.long, device=device)
    for i, (toks, m) in enumerate(zip(token_ids, soft_lens)):
        ids[i, t - len(toks):] = torch.as_tensor(list(toks), dtype=torch.long)
        mask[i, p - m:p] = 1
        mask[i, p + t - len(toks):] = 1
    tok_mask = mask[:, p:]
    embeds = emb_layer(ids) * tok_mask[..., None].to(emb_layer.weight.dtype)  # padding as zeros, as assemble
    positions = torch.as_tensor(soft_lens, device=device)[:, None] + (tok_mask.cumsum(-1) - 1).clamp_min(0)
    return prefix.PrefixBatch(embeds, mask, positions, past=_past(base, kvs, p))
