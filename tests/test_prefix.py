"""The shared [pad][soft][tokens] core: its own decoding loop against transformers' ``generate``."""

from __future__ import annotations

import pytest
import torch

from lopa import prefix


def _batch(base, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d = base.get_input_embeddings().weight.shape[1]
    soft = [torch.randn(n, d, generator=g) * 0.5 for n in (3, 0, 5, 1)]  # rows of different lengths
    ids = [[5, 17, 99], [1, 2, 3, 4, 5, 6, 7], [42], [300, 301]]
    return prefix.assemble(base, soft, ids)


def _hf_greedy(base, tok, batch, n: int) -> list[list[int]]:
    out = base.generate(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, max_new_tokens=n,
                        do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id,
                        eos_token_id=tok.eos_token_id)
    rows = []
    for r in out.tolist():
        rows.append(r[:r.index(tok.eos_token_id)] if tok.eos_token_id in r else r)
    return rows


def test_greedy_equals_transformers_generate(tiny_base):
    base, tok = tiny_base
    batch = _batch(base)
    with torch.no_grad():
        want = _hf_greedy(base, tok, batch, 12)
    got = prefix.generate_ids(base, tok, batch, max_new_tokens=12)
    assert got == want and all(len(r) == 12 for r in got)
    # each row alone gives its own result (left padding and positions make rows independent)
    for i in range(4):
        one = prefix.PrefixBatch(*(t[i:i + 1] for t in (batch.inputs_embeds, batch.attention_mask,
                                                      batch.position_ids)))
        assert prefix.generate_ids(base, tok, one, max_new_tokens=12) == [got[i]]


def test_eos_ends_a_row_and_the_others_go_on(tiny_base):
    base, tok = tiny_base
    batch = _batch(base)
    free = prefix.generate_ids(base, tok, batch, max_new_tokens=8)
    # make a token that first appears mid-row the end of sequence: a model whose generation config says so
    row, k = next((i, k) for i, r in enumerate(free) for k in range(1, len(r)) if r[k] not in r[:k])
    eos = free[row][k]
    saved = base.generation_config.eos_token_id
    base.generation_config.eos_token_id = [tok.eos_token_id, eos]
    try:
        got = prefix.generate_ids(base, tok, batch, max_new_tokens=8)
    finally:
        base.generation_config.eos_token_id = saved
    assert got[row] == free[row][:k]
    for g, f in zip(got, free):  # every row ends at its own first EOS, or runs the whole budget
        assert g == (f[:f.index(eos)] if eos in f else f)


def test_stop_strings_cut_the_text_and_stop_the_row(tiny_base):
    base, tok = tiny_base
    batch = _batch(base)
    free = prefix.generate_ids(base, tok, batch, max_new_tokens=10)
    text = tok.decode(free[1], skip_special_tokens=True)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop and stop in text
    ids = prefix.generate_ids(base, tok, batch, max_new_tokens=10, stop=[stop])
    assert len(ids[1]) < 10 and stop in tok.decode(ids[1], skip_special_tokens=True)
    texts = prefix.generate(base, tok, batch, max_new_tokens=10, stop=[stop])
    assert texts[1] == text[:text.find(stop)]
    assert prefix.cut_at_stop("a;b.c", [".", ";"]) == "a" and prefix.cut_at_stop("abc", None) == "abc"


def test_the_decoder_reports_each_row_the_step_it_ends(tiny_base):
    """``Decoder`` is the loop a step at a time: each row reported once, the step it ends (a stop
    string here, a dropped row at once and never again, the rest at the budget), with
    ``generate_ids``'s tokens."""
    base, tok = tiny_base
    batch = _batch(base)
    free = prefix.generate_ids(base, tok, batch, max_new_tokens=10)
    text = tok.decode(free[1], skip_special_tokens=True)
    stop = [text[len(text) // 2:len(text) // 2 + 2]]
    want = prefix.generate_ids(base, tok, batch, max_new_tokens=10, stop=stop)
    dec = prefix.Decoder(base, tok, batch, 10, stop=stop)
    ended: dict[int, int] = {}
    while not dec.finished:
        for i in dec.step():
            assert i not in ended
            ended[i] = dec.steps
        if dec.steps == 2:
            dec.drop(3)
    assert dec.rows[:3] == want[:3] and dec.rows[3] == want[3][:2]
    assert [ended[i] for i in range(3)] == [len(w) for w in want[:3]] and ended[1] < 10 and 3 not in ended
    assert dec.step() == []


def test_sampling_is_repeatable_and_a_tiny_nucleus_is_greedy(tiny_base):
    base, tok = tiny_base
    batch = _batch(base)
    rng = torch.get_rng_state()
    a = prefix.generate_ids(base, tok, batch, max_new_tokens=8, do_sample=True, temperature=1.5, seed=7)
    b = prefix.generate_ids(base, tok, batch, max_new_tokens=8, do_sample=True, temperature=1.5, seed=7)
    c = prefix.generate_ids(base, tok, batch, max_new_tokens=8, do_sample=True, temperature=1.5, seed=8)
    assert a == b and a != c
    assert torch.equal(rng, torch.get_rng_state())  # a seeded sample leaves the global RNG alone
    greedy = prefix.generate_ids(base, tok, batch, max_new_tokens=8)
    assert prefix.generate_ids(base, tok, batch, max_new_tokens=8, do_sample=True, top_p=1e-9, seed=1) == greedy
    with pytest.raises(ValueError, match="temperature > 0"):
        prefix.generate_ids(base, tok, batch, max_new_tokens=2, do_sample=True, temperature=0.0)
    assert prefix.generate_ids(base, tok, batch, max_new_tokens=0) == [[], [], [], []]


def test_decoding_passes_the_cache_under_the_name_the_model_takes(tiny_base):
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name goes in 5.40): the loop
    must use whichever the installed model's forward takes, with no deprecation path in between."""
    import inspect
    import warnings
    base, tok = tiny_base
    params = inspect.signature(type(base).forward).parameters
    assert prefix.cache_kwarg(base) in params
    batch = _batch(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        got = prefix.generate_ids(base, tok, batch, max_new_tokens=6)
    # with the cache really used, decoding equals recomputing the whole row at every step
    for i, row in enumerate(got):
        emb = batch.inputs_embeds[i:i + 1]
        mask = batch.attention_mask[i:i + 1]
        want = []
        with torch.no_grad():
            for _ in range(len(row)):
                logits = base(inputs_embeds=emb, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                              use_cache=False).logits[0, -1]
                t = int(logits.argmax())
                want.append(t)
                emb = torch.cat([emb, base.get_input_embeddings()(torch.tensor([[t]]))], 1)
                mask = torch.cat([mask, mask.new_ones(1, 1)], 1)
        assert row == want


def test_generate_logprobs_reports_the_same_tokens_with_the_models_numbers(tiny_base):
    """Same tokens as generate_ids (greedy and seeded sampling); a greedy token leads its top list,
    and every number is one plain forward pass's log_softmax at that position."""
    base, tok = tiny_base
    batch = _batch(base)
    greedy = prefix.generate_logprobs(base, tok, batch, top_logprobs=3, max_new_tokens=5)
    assert [[s.token for s in r] for r in greedy] == prefix.generate_ids(base, tok, batch, max_new_tokens=5)
    for r in greedy:
        for s in r:
            assert len(s.top) == 3 and s.top[0] == (s.token, s.logprob) and s.top[0][1] >= s.top[1][1] >= s.top[2][1]
    # row 0 again, without a cache: [soft ; prompt ; the first 4 generated tokens]
    g = torch.Generator().manual_seed(0)
    soft = torch.randn(3, base.get_input_embeddings().weight.shape[1], generator=g) * 0.5
    new = [s.token for s in greedy[0]]
    full = prefix.assemble(base, [soft], [[5, 17, 99] + new[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(base(**full.model_inputs(), use_cache=False).logits[0, -5:].float(), -1)
    assert torch.allclose(torch.tensor([s.logprob for s in greedy[0]]), logp[torch.arange(5), torch.tensor(new)],
                          atol=1e-4)
    kw = dict(max_new_tokens=6, do_sample=True, temperature=1.5, seed=7)
    sampled = prefix.generate_logprobs(base, tok, batch, top_logprobs=0, **kw)
    assert [[s.token for s in r] for r in sampled] == prefix.generate_ids(base, tok, batch, **kw)
    assert all(s.top == () and s.logprob <= 0 for r in sampled for s in r)
    seen = []
    prefix.generate_logprobs(base, tok, batch, top_logprobs=1, max_new_tokens=2,
                             on_token=lambda i, t, lp: seen.append((i, t, lp.token)))
    assert len(seen) == 8 and all(t == tt for _, t, tt in seen)


def _layout_by_hand(base, softs, ids, total):
    """The batch laid out row by row, as the definition says: [zeros][soft][token embeddings]."""
    emb = base.get_input_embeddings()
    rows, masks = [], []
    for z, t in zip(softs, ids):
        pad = total - len(z) - len(t)
        tok = emb(torch.tensor(t, dtype=torch.long)) if t else z.new_zeros(0, z.shape[1])
        rows.append(torch.cat([z.new_zeros(pad, z.shape[1]), z, tok]))
        masks.append([0] * pad + [1] * (len(z) + len(t)))
    return torch.stack(rows), torch.tensor(masks)


def test_assemble_lays_out_rows_exactly_and_passes_gradients(tiny_base):
    base, _ = tiny_base
    d = base.get_input_embeddings().weight.shape[1]
    g = torch.Generator().manual_seed(3)
    softs = [torch.randn(n, d, generator=g).requires_grad_() for n in (3, 0, 5, 1)]
    ids = [[5, 17, 99], [1, 2, 3, 4, 5, 6, 7], [], [300, 301]]
    batch = prefix.assemble(base, softs, ids, pad_to_multiple=4)
    want, mask = _layout_by_hand(base, softs, ids, total=8)
    assert torch.equal(batch.inputs_embeds, want) and torch.equal(batch.attention_mask, mask)
    assert batch.position_ids[0].tolist() == [0, 0, 0, 1, 2, 3, 4, 5]
    grads = torch.autograd.grad((batch.inputs_embeds * 2).sum(), [softs[0], softs[2]])
    assert all(torch.equal(gr, torch.full_like(gr, 2.0)) for gr in grads)
    # a B x n x d tensor gives the same batch as its rows in a list
    z = torch.randn(4, 2, d, generator=g)
    a, b = prefix.assemble(base, z, ids), prefix.assemble(base, list(z), ids)
    assert torch.equal(a.inputs_embeds, b.inputs_embeds) and torch.equal(a.attention_mask, b.attention_mask)
    with pytest.raises(ValueError, match=r"soft prompt 1 has shape \(2, 3\)"):
        prefix.assemble(base, [softs[0], torch.zeros(2, 3)], ids[:2])
    with pytest.raises(ValueError, match="at least one row"):
        prefix.assemble(base, [], [])


def test_assemble_costs_the_same_operators_at_any_batch_size(tiny_base):
    # on a GPU every operator is a kernel launch: a per-row loop would cost launches per request
    from lopa.benchmarks.serving import count_operators
    base, _ = tiny_base
    d = base.get_input_embeddings().weight.shape[1]

    def ops(b: int) -> int:
        softs = [torch.randn(10, d) for _ in range(b)]
        ids = [list(range(5, 5 + 3 + i % 7)) for i in range(b)]
        return count_operators(lambda: prefix.assemble(base, softs, ids))["non_view"]
    assert ops(2) == ops(32) == ops(64)
