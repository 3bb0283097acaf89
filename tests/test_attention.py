"""lopa_sdpa: transformers' SDPA, with one-query bf16 CPU steps computed in float32."""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import lopa
from lopa import attention, prefix


class _Module(torch.nn.Module):  # what sdpa_attention_forward reads from the attention layer
    is_causal = True
    num_key_value_groups = 3


def _qkv(q_len: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(4, 6, q_len, 16, generator=g).to(dtype)
    k = torch.randn(4, 2, 9, 16, generator=g).to(dtype)
    v = torch.randn(4, 2, 9, 16, generator=g).to(dtype)
    mask = torch.ones(4, 1, q_len, 9, dtype=torch.bool)
    mask[0, ..., :3] = False  # a left-padded row
    return q, k, v, mask


def test_one_query_bf16_runs_in_float32_and_the_rest_is_sdpa():
    m = _Module()
    q, k, v, mask = _qkv(1, torch.bfloat16)
    out, _ = attention.lopa_sdpa(m, q, k, v, mask, scaling=0.25)
    want, _ = sdpa_attention_forward(m, q.float(), k.float(), v.float(), mask, scaling=0.25)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want.to(torch.bfloat16))
    for q_len, dtype in ((5, torch.bfloat16), (1, torch.float32)):  # untouched: prefill, and float32 models
        q, k, v, mask = _qkv(q_len, dtype)
        m5 = torch.ones(4, 1, q_len, 9, dtype=torch.bool)
        out, _ = attention.lopa_sdpa(m, q, k, v, m5, scaling=0.25)
        want, _ = sdpa_attention_forward(m, q, k, v, m5, scaling=0.25)
        assert out.dtype == dtype and torch.equal(out, want)


def test_load_base_installs_it_and_generation_matches_plain_sdpa_in_float32():
    base, tok = lopa.load_base("tiny-random-llama")
    assert base.config._attn_implementation == "lopa_sdpa"
    assert attention.install(base) is False  # already installed: nothing to do
    batch = prefix.assemble(base, [torch.randn(3, 64) * 0.5, torch.randn(1, 64)], [[5, 6, 7], [9]])
    ours = prefix.generate_ids(base, tok, batch, max_new_tokens=6)
    base.set_attn_implementation("sdpa")
    assert prefix.generate_ids(base, tok, batch, max_new_tokens=6) == ours
