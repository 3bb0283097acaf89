"""The methods: Z's shape, where gradients go, that only the generator trains, config validation and
the exact trainable-parameter counts of DESIGN.md."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

import lopa
from lopa.methods import (METHODS, ConfigError, InitContext, SoftPromptConfig, build_generator, make_config,
                          soft_prompt_methods)
from lopa.methods.base import initial_prompt

from conftest import TEXTS, VARIANT_IDS, VARIANTS, perturb_

D = 64  # tiny-random-llama's width
E = 32  # tiny-random-bert's width


def test_registry_has_every_method():
    assert sorted(METHODS) == ["full", "idpg", "lopa", "lopt-1", "lopt-2", "lora", "prompt-tuning"]
    assert soft_prompt_methods() == ["idpg", "lopa", "lopt-1", "lopt-2", "prompt-tuning"]
    assert all(METHODS[m][0].server_weights for m in ("lora", "full"))


# -- Z --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vid,method,settings", VARIANTS, ids=VARIANT_IDS)
def test_z_shape(make_model, vid, method, settings):
    model = make_model(method, **settings).eval()
    # at initialisation LoPA's instance part can be below float32's resolution around sigmoid(0):
    # move the heads off their start so instance dependence is visible
    perturb_(model.generator, scale=0.5)
    m = settings["num_virtual_tokens"]
    n = 2 * m if settings.get("combine") == "concat" else m
    assert model.generator.num_output_tokens == n
    with torch.no_grad():
        z = model.soft_prompts(TEXTS)
    assert z.shape == (len(TEXTS), n, D)
    assert torch.isfinite(z).all()
    assert torch.equal(z[0], z[2])  # same text, same prompt (eval mode: no dropout)
    if model.generator.needs_features:
        assert not torch.equal(z[0], z[1]), "an instance-dependent method ignored its input"
    else:
        assert torch.equal(z[0], z[1]), "a task-wide prompt differed between instances"


def test_concat_is_shared_then_instance_part(make_model):
    model = make_model("lopa", num_virtual_tokens=3, rank=2, hidden_size=8, encoder="tiny-random-bert",
                       combine="concat").eval()
    with torch.no_grad():
        z = model.soft_prompts(TEXTS[:2])
    assert z.shape == (2, 6, D)
    assert torch.equal(z[0, :3], model.generator.shared) and torch.equal(z[1, :3], model.generator.shared)


@pytest.mark.parametrize("vid,method,settings", VARIANTS, ids=VARIANT_IDS)
def test_gradients_reach_only_the_generator(make_model, label_ids, vid, method, settings):
    model = make_model(method, **settings).train()
    loss = model(TEXTS, label_ids=label_ids[[0, 1, 1]])
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    gen_params = dict(model.generator.named_parameters())
    assert gen_params
    for name, p in gen_params.items():
        assert p.grad is not None, f"no gradient on generator parameter {name}"
        assert torch.isfinite(p.grad).all()
    assert any(p.grad.abs().sum() > 0 for p in gen_params.values())
    for name, p in model.base.named_parameters():
        assert p.grad is None, f"gradient on base parameter {name}"
        assert not p.requires_grad
    if model.encoder is not None:
        for name, p in model.encoder.named_parameters():
            assert p.grad is None, f"gradient on encoder parameter {name}"


@pytest.mark.parametrize("method,settings", [
    ("prompt-tuning", dict(num_virtual_tokens=3)),
    ("lopa", dict(num_virtual_tokens=3, rank=2, hidden_size=8, encoder="tiny-random-bert")),
], ids=["prompt-tuning", "lopa"])
def test_generation_loss_gradients(make_model, method, settings):
    model = make_model(method, **settings).train()
    loss = model(TEXTS[:2], targets=[" def f(): return 1", " yes"])
    loss.backward()
    assert all(p.grad is not None for p in model.generator.parameters())
    assert all(p.grad is None for p in model.base.parameters())


@pytest.mark.parametrize("vid,method,settings", VARIANTS, ids=VARIANT_IDS)
def test_adamw_steps_change_only_the_generator(make_model, label_ids, vid, method, settings):
    model = make_model(method, **settings).train()
    # collect what a trainer would: every parameter that asks for a gradient
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in model.generator.parameters()}
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    enc_before = {k: v.clone() for k, v in model.encoder.state_dict().items()} if model.encoder is not None else {}
    gen_before = {k: v.clone() for k, v in model.generator.named_parameters()}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(TEXTS, label_ids=label_ids[[0, 1, 1]]).backward()
        opt.step()
    for k, v in model.base.state_dict().items():
        assert torch.equal(v, base_before[k]), f"base weight {k} changed"
    if model.encoder is not None:
        for k, v in model.encoder.state_dict().items():
            assert torch.equal(v, enc_before[k]), f"encoder weight {k} changed"
    for k, p in model.generator.named_parameters():
        assert not torch.equal(p, gen_before[k]), f"generator parameter {k} did not train"


def test_param_groups_cover_the_generator():
    cfg = make_config("lopa", num_virtual_tokens=3, rank=2, hidden_size=8, shared_lr_scale=0.5)
    gen = build_generator(cfg, InitContext(torch.randn(50, 16), encoder_dim=12))
    groups = gen.param_groups()
    assert [g["lr_scale"] for g in groups] == [0.5, 1.0]
    assert groups[0]["params"] == [gen.shared]
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in gen.parameters())


# -- initialisation --------------------------------------------------------------------------------
def test_same_config_same_generator():
    ctx = InitContext(torch.randn(100, 16), encoder_dim=12)
    for name, settings in [("prompt-tuning", {}), ("lopt-1", {}), ("lopt-2", {}), ("idpg", dict(hidden_size=8)),
                           ("lopa", dict(hidden_size=8))]:
        a = build_generator(make_config(name, num_virtual_tokens=3, **settings), ctx).state_dict()
        b = build_generator(make_config(name, num_virtual_tokens=3, **settings), ctx).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_prompt_tuning_inits(tiny_base):
    base, tok = tiny_base
    emb = base.get_input_embeddings().weight
    ctx = InitContext(emb, tok)
    vocab = initial_prompt(make_config("prompt-tuning", num_virtual_tokens=6), ctx)
    assert all((emb[:5000] == row).all(-1).any() for row in vocab), "vocab init is not rows of the table"
    text = initial_prompt(make_config("prompt-tuning", num_virtual_tokens=5, init="text", init_text="It was"), ctx)
    ids = tok("It was", add_special_tokens=False)["input_ids"]
    want = emb[torch.tensor((ids * 5)[:5])]
    assert torch.equal(text, want)
    rnd = initial_prompt(make_config("prompt-tuning", num_virtual_tokens=200, init="random"), ctx)
    assert abs(rnd.std().item() - 0.02) < 0.002


def test_lopt_starts_near_the_prompt_tuning_init():
    ctx = InitContext(torch.randn(100, 16))
    p = initial_prompt(make_config("prompt-tuning", num_virtual_tokens=4), ctx)
    # rank r >= m: LoPT-1 reproduces the prompt exactly; LoPT-2 up to tanh's curvature
    z1 = build_generator(make_config("lopt-1", num_virtual_tokens=4, rank=4), ctx)(None, 1)[0]
    assert torch.allclose(z1, p, atol=1e-5)
    z2 = build_generator(make_config("lopt-2", num_virtual_tokens=4, rank=4), ctx)(None, 1)[0]
    assert (z2 - p).norm() / p.norm() < 0.2
    # lower rank: the best rank-r approximation (Eckart-Young)
    u, s, vh = torch.linalg.svd(p, full_matrices=False)
    best = (u[:, :2] * s[:2]) @ vh[:2]
    z1r = build_generator(make_config("lopt-1", num_virtual_tokens=4, rank=2), ctx)(None, 1)[0]
    assert torch.allclose(z1r, best, atol=1e-5)


def test_lopt2_x0_is_a_fixed_buffer():
    gen = build_generator(make_config("lopt-2", num_virtual_tokens=4, rank=2), InitContext(torch.randn(100, 8)))
    assert "x0" in dict(gen.named_buffers()) and "x0" not in dict(gen.named_parameters())
    assert "x0" in gen.state_dict()


def test_instance_method_needs_encoder_width():
    with pytest.raises(ConfigError, match="encoder_dim"):
        build_generator(make_config("lopa", num_virtual_tokens=2), InitContext(torch.randn(10, 8)))


# -- config validation -----------------------------------------------------------------------------
@pytest.mark.parametrize("method,settings,named", [
    ("lopa", dict(rank=0), "rank"),
    ("lopt-1", dict(rank=0), "rank"),
    ("lopt-2", dict(rank=0), "rank"),
    ("prompt-tuning", dict(num_virtual_tokens=0), "num_virtual_tokens"),
    ("lopa", dict(num_virtual_tokens=0), "num_virtual_tokens"),
    ("prompt-tuning", dict(num_virtual_tokens=2.5), "num_virtual_tokens"),
    ("prompt-tuning", dict(num_virtual_tokens=True), "num_virtual_tokens"),
    ("prompt-tuning", dict(num_virtual_tokens=5000), "num_virtual_tokens"),
    ("lopa", dict(combine="multiply"), "combine"),
    ("prompt-tuning", dict(init="text"), "init_text"),
    ("prompt-tuning", dict(init="text", init_text=""), "init_text"),
    ("prompt-tuning", dict(init="zeros"), "init"),
    ("lopa", dict(hidden_size=0), "hidden_size"),
    ("idpg", dict(dropout=1.5), "dropout"),
    ("idpg", dict(pooling="max"), "pooling"),
    ("lopa", dict(encoder=""), "encoder"),
    ("lopa", dict(gate_scale=0.0), "gate_scale"),
    ("lopa", dict(shared_lr_scale=-1.0), "shared_lr_scale"),
    ("lopt-2", dict(activation="gelu"), "activation"),
    ("lopa", dict(rank="4"), "rank"),
    ("prompt-tuning", dict(rank=4), "rank"),           # a setting of another method
    ("lopa", dict(bogus=1), "bogus"),                  # an unknown key
], ids=lambda v: v if isinstance(v, str) else None)
def test_config_errors_name_the_setting(method, settings, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        make_config(method, **settings)


def test_unknown_method_is_named():
    with pytest.raises(ConfigError, match="p-tuning") as e:
        make_config("p-tuning", num_virtual_tokens=4)
    assert "lopa" in str(e.value)  # and the known ones are listed
    assert issubclass(ConfigError, ValueError)


def test_config_round_trips_through_dict():
    cfg = make_config("lopa", num_virtual_tokens=5, rank=3, combine="max", encoder="self")
    d = cfg.to_dict()
    assert d["method"] == "lopa"
    assert SoftPromptConfig.from_dict(d) == cfg
    with pytest.raises(ConfigError, match="typo"):
        SoftPromptConfig.from_dict({**d, "typo": 1})
    with pytest.raises(ConfigError, match="nope"):
        SoftPromptConfig.from_dict({**d, "method": "nope"})


@pytest.mark.parametrize("method", ["idpg", "lopa"])
def test_feature_norm_makes_the_heads_blind_to_the_features_scale(method):
    # mean pooling shrinks features as texts grow; a normalised head gives one prompt at any scale
    x = torch.randn(3, 12)
    for norm, invariant in (("none", False), ("l2", True), ("rms", True)):
        gen = build_generator(make_config(method, num_virtual_tokens=3, hidden_size=16, feature_norm=norm),
                              InitContext(torch.randn(50, 8), encoder_dim=12)).eval()
        with torch.no_grad():
            same = torch.allclose(gen(x, 3), gen(0.4 * x, 3), atol=1e-6)
        assert same == invariant, norm
    with pytest.raises(ConfigError, match="feature_norm"):
        make_config(method, feature_norm="layer")


def test_a_stored_config_without_feature_norm_keeps_the_unnormalised_heads():
    # an artifact written before the setting existed computed with raw features, whatever today's default
    d = make_config("lopa", num_virtual_tokens=3, feature_norm="rms").to_dict()
    del d["feature_norm"]
    assert SoftPromptConfig.from_dict(d).feature_norm == "none"


def test_drop_instances_puts_the_batch_mean_in_place_of_a_share_of_the_rows():
    from lopa.methods.base import drop_instances
    torch.manual_seed(0)
    x = torch.randn(4000, 6)
    out = drop_instances(x, 0.3)
    dropped = (out == x.mean(0)).all(1)
    kept = (out == x).all(1)
    assert (dropped | kept).all()  # a row is either its own features or the mean, never a mix
    assert 0.26 < dropped.float().mean().item() < 0.34
    x.requires_grad_(True)
    drop_instances(x, 1.0).sum().backward()  # the mean is detached: no gradient runs to the features
    assert x.grad is None or not x.grad.any()


@pytest.mark.parametrize("method", ["idpg", "lopa"])
def test_instance_dropout_gives_dropped_examples_the_average_prompt_while_training_only(make_model, method):
    model = make_model(method, num_virtual_tokens=3, hidden_size=16, instance_dropout=1.0, dropout=0.0)
    perturb_(model.generator, scale=0.5)  # so that different features give visibly different prompts
    texts = ["Review: dull. It was", "Review: a gripping, funny film that I loved. It was"]
    with torch.no_grad():
        z = model.train().soft_prompts(texts)
        assert torch.allclose(z[0], z[1])  # every example had the batch's mean features
        z = model.eval().soft_prompts(texts)
        assert not torch.allclose(z[0], z[1])  # scoring and serving always read each text's own features
    with pytest.raises(ConfigError, match="instance_dropout"):
        make_config(method, instance_dropout=1.5)


def test_a_stored_config_without_instance_dropout_trained_without_it():
    d = make_config("lopa", num_virtual_tokens=3, instance_dropout=0.5).to_dict()
    del d["instance_dropout"]
    assert SoftPromptConfig.from_dict(d).instance_dropout == 0.0


# -- trainable counts -----------------------------------------------------------------------------
def lopa_count(e, d, h, m, r):
    """DESIGN.md: (e·h + h) + (h·m·r + m·r) + (e·h + h) + (h·d·r + d·r) + m·d."""
    return (e * h + h) + (h * m * r + m * r) + (e * h + h) + (h * d * r + d * r) + m * d


def n_params(gen):
    return sum(p.numel() for p in gen.parameters() if p.requires_grad)


@pytest.mark.parametrize("e,d,h,m,r", [(1024, 1024, 256, 10, 4), (384, 576, 256, 10, 4), (32, 64, 16, 4, 2),
                                       (48, 40, 8, 3, 5)])
def test_lopa_count_matches_formula(e, d, h, m, r):
    ctx = InitContext(torch.randn(100, d), encoder_dim=e)
    for combine in ("gate", "add", "max", "concat"):
        gen = build_generator(make_config("lopa", num_virtual_tokens=m, rank=r, hidden_size=h, combine=combine), ctx)
        assert n_params(gen) == lopa_count(e, d, h, m, r)
    if (e, d, h, m, r) == (1024, 1024, 256, 10, 4):
        assert lopa_count(e, d, h, m, r) == 1_597_992  # the reference code's "1.60M"


def test_lopa_count_on_a_model(make_model):
    model = make_model("lopa", num_virtual_tokens=4, rank=2, hidden_size=16, encoder="tiny-random-bert")
    assert model.num_trainable_parameters() == lopa_count(E, D, 16, 4, 2)
    model = make_model("lopa", num_virtual_tokens=4, rank=2, hidden_size=16, encoder="self")
    assert model.num_trainable_parameters() == lopa_count(D, D, 16, 4, 2)


@pytest.mark.parametrize("m,r,d", [(10, 4, 576), (4, 2, 64), (7, 3, 20)])
def test_low_rank_and_prompt_tuning_counts(m, r, d):
    ctx = InitContext(torch.randn(100, d), encoder_dim=12)
    assert n_params(build_generator(make_config("lopt-1", num_virtual_tokens=m, rank=r), ctx)) == r * (m + d)
    assert n_params(build_generator(make_config("lopt-2", num_virtual_tokens=m, rank=r), ctx)) == 2 * r * d
    assert n_params(build_generator(make_config("prompt-tuning", num_virtual_tokens=m), ctx)) == m * d
    h, e = 8, 12
    assert n_params(build_generator(make_config("idpg", num_virtual_tokens=m, hidden_size=h), ctx)) == \
        e * h + h + h * m * d + m * d


PEFT_LINE = re.compile(r"^trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: (\d+\.\d{4})$")


@pytest.mark.parametrize("vid,method,settings", VARIANTS, ids=VARIANT_IDS)
def test_print_trainable_parameters(make_model, capsys, vid, method, settings):
    model = make_model(method, **settings)
    model.print_trainable_parameters()
    out = capsys.readouterr().out.strip()
    match = PEFT_LINE.match(out)
    assert match, out
    trainable, total = int(match[1].replace(",", "")), int(match[2].replace(",", ""))
    assert trainable == model.num_trainable_parameters() == n_params(model.generator)
    base_n = sum(p.numel() for p in model.base.parameters())
    enc_n = sum(p.numel() for p in model.encoder.parameters()) if settings.get("encoder") not in (None, "self") else 0
    assert total == base_n + enc_n + trainable  # the self encoder's table is the base's: counted once
    assert match[3] == f"{100 * trainable / total:.4f}"


# -- the wall: a method is a module that maps features to Z, nothing more ---------------------------
def test_methods_import_no_wrapper_trainer_or_server():
    forbidden = {"model", "train", "serve", "client", "cli", "artifact", "prefix"}
    for path in Path(lopa.methods.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                parts = (node.module or "").split(".")
                if node.level >= 2:  # from .. import x / from ..x import y
                    names = parts if node.module else [a.name for a in node.names]
                    assert not forbidden & set(names[:1]), f"{path.name} imports {names}"
                if parts[:1] == ["lopa"]:
                    assert not forbidden & set(parts[1:2]), f"{path.name} imports {node.module}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    assert not (a.name.startswith("lopa.") and forbidden & {a.name.split(".")[1]}), path.name
