"""SoftPromptModel and the prefix core: save/load round trips, mixed-task batches, the LM head at the
answer position only, and the encoder's feature cache."""

from __future__ import annotations

import json

import pytest
import torch

import lopa
from lopa import prefix
from lopa.artifact import CONFIG_NAME, WEIGHTS_NAME

from conftest import LABEL_WORDS, TEXTS, VARIANT_IDS, VARIANTS, build_model, perturb_

D = 64


@pytest.mark.parametrize("vid,method,settings", VARIANTS, ids=VARIANT_IDS)
def test_save_and_load_give_identical_outputs(tiny_base, tiny_encoder, tmp_path, vid, method, settings):
    base, tok = tiny_base
    model = build_model(base, tok, tiny_encoder, method, **settings)
    perturb_(model.generator)
    model.eval()
    scores = model.classify(TEXTS, LABEL_WORDS)
    texts = model.generate(TEXTS[:2], max_new_tokens=6)
    assert scores.shape == (len(TEXTS), 2) and torch.isfinite(scores).all()

    model.save_pretrained(tmp_path / "art")
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    meta = json.loads((tmp_path / "art" / CONFIG_NAME).read_text())
    assert meta["method"] == method and meta["base_model"] == "tiny-random-llama" and meta["hidden_size"] == D
    assert meta["num_output_tokens"] == model.generator.num_output_tokens
    assert meta["lopa_version"] == lopa.__version__

    encoder = tiny_encoder if model.encoder is not None and settings.get("encoder") != "self" else None
    loaded = lopa.SoftPromptModel.from_pretrained(tmp_path / "art", base, tok, encoder=encoder).eval()
    assert loaded.config == model.config
    for k, v in model.generator.state_dict().items():
        assert torch.equal(loaded.generator.state_dict()[k], v), k
    assert torch.equal(loaded.classify(TEXTS, LABEL_WORDS), scores)
    assert loaded.generate(TEXTS[:2], max_new_tokens=6) == texts


def test_loading_with_an_encoder_of_another_width_fails(tiny_base, tiny_encoder, tmp_path):
    base, tok = tiny_base
    model = build_model(base, tok, tiny_encoder, "lopa", num_virtual_tokens=2, rank=2, hidden_size=8,
                        encoder="tiny-random-bert")
    model.save_pretrained(tmp_path)
    self_encoder = lopa.load_encoder("self", base=base, tokenizer=tok)  # width 64, not 32
    with pytest.raises(Exception, match="width"):
        lopa.SoftPromptModel.from_pretrained(tmp_path, base, tok, encoder=self_encoder)


# -- mixed batches ------------------------------------------------------------------------------------
MIXED = [  # four tasks, four methods, four prompt lengths, four input lengths
    ("prompt-tuning", dict(num_virtual_tokens=3), "Review: fine. It was"),
    ("lopt-1", dict(num_virtual_tokens=5, rank=2), "def add(a, b):"),
    ("idpg", dict(num_virtual_tokens=2, hidden_size=8, encoder="tiny-random-bert"),
     "Question: is the sky blue on a clear day in summer? Answer:"),
    ("lopa", dict(num_virtual_tokens=3, rank=2, hidden_size=8, encoder="tiny-random-bert", combine="concat"), "x"),
    ("lopt-2", dict(num_virtual_tokens=7, rank=3), "The quick brown fox"),
]


@pytest.fixture
def mixed_rows(tiny_base, tiny_encoder):
    base, tok = tiny_base
    prompts, ids = [], []
    for i, (method, settings, text) in enumerate(MIXED):
        model = build_model(base, tok, tiny_encoder, method, **settings)
        perturb_(model.generator, seed=i, scale=0.3)
        with torch.no_grad():
            prompts.append(model.eval().soft_prompts([text])[0])
        ids.append(tok(text, add_special_tokens=False)["input_ids"])
    assert len({p.shape[0] for p in prompts}) == len(MIXED)
    return prompts, ids


def test_mixed_batch_logits_match_rows_alone(tiny_base, mixed_rows):
    base, _ = tiny_base
    prompts, ids = mixed_rows
    batch = prefix.assemble(base, prompts, ids)
    lens = [p.shape[0] + len(t) for p, t in zip(prompts, ids)]
    assert batch.inputs_embeds.shape == (len(ids), max(lens), D)
    assert batch.attention_mask.sum(1).tolist() == lens
    with torch.no_grad():
        together = prefix.last_logits(base, batch)
        for i in range(len(ids)):
            alone = prefix.last_logits(base, prefix.assemble(base, [prompts[i]], [ids[i]]))[0]
            assert torch.allclose(together[i], alone, atol=1e-5, rtol=0), (i, (together[i] - alone).abs().max())


def test_mixed_batch_greedy_matches_rows_alone(tiny_base, mixed_rows):
    base, tok = tiny_base
    prompts, ids = mixed_rows
    batch = prefix.assemble(base, prompts, ids)
    together = prefix.generate(base, tok, batch, max_new_tokens=8)
    kw = dict(max_new_tokens=8, do_sample=False, temperature=None, top_p=None, top_k=None,
              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, return_dict_in_generate=True,
              output_scores=True)
    with torch.no_grad():
        out = base.generate(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, **kw)
    for i in range(len(ids)):
        single = prefix.assemble(base, [prompts[i]], [ids[i]])
        assert prefix.generate(base, tok, single, max_new_tokens=8) == [together[i]], i
        with torch.no_grad():
            one = base.generate(inputs_embeds=single.inputs_embeds, attention_mask=single.attention_mask, **kw)
        n = one.sequences.shape[1]
        assert out.sequences[i, :n].tolist() == one.sequences[0].tolist(), i
        # the decoding steps (KV cache, positions under left padding) agree, not just the argmax
        for step in range(n):
            assert torch.allclose(out.scores[step][i], one.scores[step][0], atol=1e-4, rtol=0), (i, step)


def test_padding_goes_before_the_soft_prompt(tiny_base):
    base, _ = tiny_base
    soft = [torch.ones(2, D), torch.full((4, D), 2.0)]
    batch = prefix.assemble(base, soft, [[5, 6, 7], [8]])
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    batch = prefix.assemble(base, soft, [[5, 6, 7, 9], [8]])
    assert batch.attention_mask.tolist() == [[1] * 6, [0, 1, 1, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 3, 4]]
    assert torch.equal(batch.inputs_embeds[1, 1:5], soft[1]) and torch.equal(batch.inputs_embeds[0, :2], soft[0])
    emb = base.get_input_embeddings().weight
    assert torch.equal(batch.inputs_embeds[1, 5], emb[8])
    with pytest.raises(ValueError, match="expected"):
        prefix.assemble(base, [torch.zeros(2, D + 1)], [[1]])
    with pytest.raises(ValueError, match="soft prompts"):
        prefix.assemble(base, [torch.zeros(2, D)], [[1], [2]])


# -- the LM head at the answer position only -------------------------------------------------------
@pytest.fixture
def lm_head_inputs(tiny_base):
    base, _ = tiny_base
    shapes = []
    handle = base.get_output_embeddings().register_forward_hook(lambda mod, args, out: shapes.append(args[0].shape))
    yield shapes
    handle.remove()


def test_classify_applies_lm_head_at_one_position(make_model, lm_head_inputs, label_ids):
    model = make_model("lopa", num_virtual_tokens=3, rank=2, hidden_size=8, encoder="tiny-random-bert").eval()
    scores = model.classify(TEXTS, LABEL_WORDS)
    assert scores.shape == (len(TEXTS), 2)
    assert lm_head_inputs and all(s[1] == 1 for s in lm_head_inputs), lm_head_inputs
    lm_head_inputs.clear()
    model.train()(TEXTS, label_ids=label_ids[[0, 1, 0]]).backward()
    assert lm_head_inputs and all(s[1] == 1 for s in lm_head_inputs), lm_head_inputs


def test_classify_scores_are_the_full_forward_at_the_last_position(make_model):
    model = make_model("prompt-tuning", num_virtual_tokens=3).eval()
    perturb_(model.generator)
    batch = model._batch(TEXTS[:2])
    with torch.no_grad():
        full = torch.log_softmax(model.base(**batch.model_inputs()).logits[:, -1].float(), -1)
    ids = prefix.label_token_ids(model.tokenizer, LABEL_WORDS)
    assert torch.allclose(model.classify(TEXTS[:2], LABEL_WORDS), full[:, ids], atol=1e-5)


def test_generation_loss_applies_lm_head_to_the_targets_only(make_model, lm_head_inputs):
    model = make_model("prompt-tuning", num_virtual_tokens=3).train()
    targets = [" yes", " return a + b"]
    model(TEXTS[:2], targets=targets)
    longest = max(len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in targets) + 1  # + EOS
    assert [s[1] for s in lm_head_inputs] == [longest + 1]


def test_generation_loss_is_the_target_tokens_cross_entropy(make_model):
    model = make_model("prompt-tuning", num_virtual_tokens=3).eval()
    tok = model.tokenizer
    text, target = TEXTS[1], " yes indeed"
    loss = model([text], targets=[target])
    tgt = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = tok(text, add_special_tokens=False)["input_ids"] + tgt
    batch = prefix.assemble(model.base, model.soft_prompts([text]), [ids])
    with torch.no_grad():
        logits = model.base(**batch.model_inputs()).logits[0].float()
    want = torch.nn.functional.cross_entropy(logits[-len(tgt) - 1:-1], torch.tensor(tgt))
    assert torch.allclose(loss, want, atol=1e-5)


def test_forward_needs_exactly_one_target_kind(make_model, label_ids):
    model = make_model("prompt-tuning", num_virtual_tokens=2)
    with pytest.raises(ValueError, match="exactly one"):
        model(TEXTS)
    with pytest.raises(ValueError, match="exactly one"):
        model(TEXTS[:1], label_ids=label_ids[:1], targets=["x"])


def test_train_mode_keeps_base_and_encoder_in_eval(make_model):
    model = make_model("idpg", num_virtual_tokens=2, hidden_size=8, encoder="tiny-random-bert").train()
    assert model.generator.training
    assert not model.base.training and not model.encoder.training
    assert not any(m.training for m in model.base.modules())


# -- the feature cache ------------------------------------------------------------------------------
def test_encoder_sees_each_text_once(tiny_base, label_ids):
    base, tok = tiny_base
    encoder = lopa.load_encoder("tiny-random-bert")  # its own cache and counters
    model = build_model(base, tok, encoder, "lopa", num_virtual_tokens=2, rank=2, hidden_size=8,
                        encoder="tiny-random-bert")
    model.soft_prompts(["a", "b", "a"])
    assert encoder.stats == {"encoded": 2, "hits": 1}
    model.soft_prompts(["b", "c"])
    assert encoder.stats == {"encoded": 3, "hits": 2}
    for _ in range(3):  # three "epochs" of training
        model.train()(TEXTS, label_ids=label_ids[[0, 1, 0]]).backward()
    model.eval().classify(TEXTS, LABEL_WORDS)
    assert encoder.stats["encoded"] == 3 + len(set(TEXTS))
    # cached features are the encoder's own output
    fresh = encoder._encode_batch(["b"])[0]
    assert torch.allclose(encoder.encode(["b"])[0], fresh, atol=1e-6)


def test_self_encoder_caches_too(tiny_base):
    base, tok = tiny_base
    model = build_model(base, tok, None, "lopa", num_virtual_tokens=2, rank=2, hidden_size=8, encoder="self")
    for _ in range(3):
        model.soft_prompts(TEXTS)
    assert model.encoder.stats["encoded"] == len(set(TEXTS))
    want = base.get_input_embeddings().weight[tok(TEXTS[1], add_special_tokens=False)["input_ids"]].mean(0)
    assert torch.allclose(model.encoder.encode([TEXTS[1]])[0], want, atol=1e-6)


def test_cache_is_bounded():
    encoder = lopa.load_encoder("tiny-random-bert")
    encoder.max_cache = 2
    feats = encoder.encode(["a", "b", "c"])  # a batch larger than the cache still gets all its rows
    assert feats.shape == (3, encoder.dim)
    assert len(encoder._cache) == 2 and "a" not in encoder._cache
    assert torch.allclose(encoder.encode(["a"])[0], feats[0], atol=1e-6)


def test_generator_computes_in_float32_under_bf16_autocast(tiny_base):
    """At initialisation LoPA's gate is within a few thousandths of 0.5; in bf16 it would round to
    exactly 0.5 almost everywhere, erasing the instance part. The generator must stay in float32."""
    base, tok = tiny_base
    config = lopa.make_config("lopa", num_virtual_tokens=4, rank=2, hidden_size=16, encoder="self")
    model = lopa.SoftPromptModel(base, tok, config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # heads scaled so the gate sits about 0.002 from 0.5, as at the real model's start
        for head in (model.generator.u_head, model.generator.v_head):
            for lin in (head.fc1, head.fc2):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model.soft_prompts(TEXTS)
    assert z.dtype == torch.float32
    gate = z / model.generator.shared.detach()
    assert (gate - 0.5).abs().max() < 0.05  # still near its starting point ...
    assert (gate != 0.5).float().mean() > 0.9  # ... but not rounded onto it
    assert (gate[0] - gate[1]).abs().max() > 0  # and it differs between instances
    with torch.no_grad():
        fp32 = model.soft_prompts(TEXTS)
    assert torch.allclose(z, fp32, atol=1e-6)


def test_a_trained_encoder_trains_counts_and_travels_with_the_artifact(tiny_base, tmp_path):
    base, tok = tiny_base
    frozen = lopa.SoftPromptModel(base, tok, lopa.make_config("lopa", num_virtual_tokens=4, rank=2, hidden_size=16,
                                                              encoder="tiny-random-bert"))
    config = lopa.make_config("lopa", num_virtual_tokens=4, rank=2, hidden_size=16, encoder="tiny-random-bert",
                              train_encoder=True, encoder_lr_scale=0.1)
    model = lopa.SoftPromptModel(base, tok, config)
    n_encoder = sum(p.numel() for p in model.encoder.parameters())
    assert model.num_trainable_parameters() == frozen.num_trainable_parameters() + n_encoder
    groups = model.trainable_param_groups()
    assert groups[-1]["lr_scale"] == 0.1 and sum(p.numel() for p in groups[-1]["params"]) == n_encoder

    model.train()
    loss = model(TEXTS, label_ids=torch.tensor([5] * len(TEXTS)))
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    assert all(p.grad is None for p in model.base.parameters())
    with torch.no_grad():  # a changed encoder changes the features: nothing may come from a cache
        before = model.encoder.encode(TEXTS[:1]).clone()
        for p in model.encoder.parameters():
            p.add_(0.05)
        assert not torch.allclose(model.encoder.encode(TEXTS[:1]), before)
    assert set(model.trainable_state_dict()) >= {"shared", "encoder.model.embeddings.word_embeddings.weight"}

    model.eval()
    with torch.no_grad():
        z = model.soft_prompts(TEXTS)
    model.save_pretrained(tmp_path / "art")
    assert (tmp_path / "art" / "encoder.safetensors").is_file()
    loaded = lopa.SoftPromptModel.from_pretrained(tmp_path / "art", base, tok).eval()
    with torch.no_grad():
        assert torch.equal(loaded.soft_prompts(TEXTS), z)
    from lopa.client import Client
    with Client(tmp_path / "art") as client:  # the client computes the same prompts from the same files
        assert torch.equal(client.soft_prompt(TEXTS), z)
    (tmp_path / "art" / "encoder.safetensors").unlink()
    with pytest.raises(ValueError, match="encoder.safetensors"):
        lopa.SoftPromptModel.from_pretrained(tmp_path / "art", base, tok)


def test_train_encoder_needs_an_encoder_of_its_own():
    with pytest.raises(lopa.methods.ConfigError, match="self"):
        lopa.make_config("lopa", encoder="self", train_encoder=True)


def test_a_scaled_embedding_starts_the_prompt_at_the_size_of_the_tokens_around_it(fresh_base):
    """Gemma's embedding module multiplies its rows by √d: a prompt taken from the raw table would start
    √d times smaller than the token embeddings next to it (PEFT takes the module's output too)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    base, tok = fresh_base
    plain = base.get_input_embeddings()
    scaled = Gemma3TextScaledWordEmbedding(plain.num_embeddings, plain.embedding_dim, padding_idx=None,
                                           embed_scale=8.0)
    scaled.weight.data.copy_(plain.weight.data)
    base.set_input_embeddings(scaled)
    assert prefix.embedding_scale(scaled) == pytest.approx(8.0)
    assert prefix.embedding_scale(plain) == 1.0
    half = Gemma3TextScaledWordEmbedding(plain.num_embeddings, plain.embedding_dim, padding_idx=None,
                                         embed_scale=640 ** 0.5).to(torch.bfloat16)  # Gemma's √d, loaded in bf16
    assert prefix.embedding_scale(half) == pytest.approx(640 ** 0.5, rel=1e-2)
    model = lopa.SoftPromptModel(base, tok, lopa.make_config("prompt-tuning", num_virtual_tokens=3, init="text",
                                                             init_text="great movie"))
    ids = tok("great movie", add_special_tokens=False)["input_ids"]
    want = scaled(torch.tensor((ids * 3)[:3]))
    assert torch.allclose(model.soft_prompts(["x"])[0], want, atol=1e-5)
    vocab = lopa.SoftPromptModel(base, tok, lopa.make_config("lopa", num_virtual_tokens=4, rank=2, hidden_size=8,
                                                             encoder="self"))
    rows = vocab.generator.shared.detach() / 8.0  # each row of Z_S is a table row times the scale
    assert all(torch.isclose(plain.weight, r, atol=1e-6).all(1).any() for r in rows)
