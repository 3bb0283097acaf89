"""`lopa bench train-speed --quick`: the real entry point on the tiny models; the JSON's structure only
(speed is never asserted in tests: the machine is shared and timings are noise here)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from lopa.cli import main

KEYS = ("method", "precision", "trainable_params", "median_s", "q1_s", "q3_s", "min_s", "max_s", "n", "times_s",
        "cpu_median_s", "cpu_times_s", "batch_median_s", "warmup_s", "first_loss")


def _run(tmp_path, capsys, *extra: str) -> tuple[dict, str]:
    # one thread: on a shared 2-core machine, two threads per process spin at barriers and crawl
    rc = main(["bench", "train-speed", "--quick", "--threads", "1", "--out", str(tmp_path), *extra])
    assert rc == 0
    return json.loads((tmp_path / "train_speed.json").read_text()), capsys.readouterr().out


def test_quick_both_precisions_writes_every_column_and_ratio(tmp_path, capsys):
    threads = torch.get_num_threads()
    result, printed = _run(tmp_path, capsys, "--precision", "both", "--probe-shapes", "1", "--pad-to-multiple", "8")
    assert result["benchmark"] == "train_speed"
    assert result["settings"]["model"] == "tiny-random-llama" and result["settings"]["batch_size"] == 4
    assert len(result["batches"]) == 2 and all(b["batch_size"] == 4 for b in result["batches"])
    assert all(b["lopa_len"] % 8 == 0 and b["lopa_len"] >= b["prompt_len"] + 10 for b in result["batches"])

    expected = {f"{m}/{p}" for m in ("lopa-pt", "peft-pt", "lopa", "lopa-reencode") for p in ("fp32", "bf16")}
    assert set(result["contenders"]) == expected
    for key, c in result["contenders"].items():  # --quick: 1 warm-up pass, then 2 timed, over 2 batches
        assert set(KEYS) <= set(c), key
        assert c["n"] == len(c["times_s"]) == len(c["cpu_times_s"]) == 4 and len(c["warmup_s"]) == 2, key
        assert len(c["batch_median_s"]) == 2, key
        assert c["q1_s"] <= c["median_s"] <= c["q3_s"], key
    assert result["contenders"]["lopa-pt/fp32"]["trainable_params"] == result["contenders"]["peft-pt/fp32"]["trainable_params"]
    assert result["contenders"]["lopa/fp32"]["trainable_params"] > result["contenders"]["lopa-pt/fp32"]["trainable_params"]

    ratios = result["ratios"]
    assert set(ratios) == {"peft_over_lopa_pt/fp32", "peft_over_lopa_pt/bf16", "peft_fp32_over_lopa_pt_bf16",
                           "lopa_over_lopa_pt/fp32", "lopa_over_lopa_pt/bf16", "reencode_over_cached/fp32",
                           "reencode_over_cached/bf16"}
    mixed = ratios["peft_fp32_over_lopa_pt_bf16"]
    assert (mixed["numerator"], mixed["denominator"]) == ("peft-pt/fp32", "lopa-pt/bf16")
    for name, r in ratios.items():
        assert min(r["value"], r["per_batch"], r["ratio_of_medians"], r["cpu_value"]) > 0 and r["what"], name
        assert r["value"] == r["paired_median"], name
        assert ("target" in r) == ("meets_target" in r)
    assert ratios["peft_over_lopa_pt/fp32"]["target"] == ">= 1.3"
    assert ratios["peft_fp32_over_lopa_pt_bf16"]["target"] == ">= 1.8"

    enc = result["encoder"]
    assert enc["cached_run"]["encoded"] == 0  # cached LoPA never ran the encoder while being timed
    assert enc["cached_run"]["hits"] == enc["cached_run"]["steps"] * 4
    assert enc["encode_batch_median_s/fp32"] > 0 and enc["encode_batch_median_s/bf16"] > 0
    assert {"reencode_extra_s/fp32", "reencode_extra_s/bf16"} <= set(enc)
    assert set(result["shape_probe"]) == {"fp32", "bf16"} and len(result["shape_probe"]["bf16"]["steps"]) == 1
    assert "peft_over_lopa_pt/fp32" in printed and "wrote" in printed
    assert result["settings"]["threads_used"] == 1 and torch.get_num_threads() == threads  # restored afterwards


def test_quick_bf16_times_peft_fp32_baseline_too(tmp_path, capsys):
    result, _ = _run(tmp_path, capsys, "--precision", "bf16", "--no-reencode")
    assert set(result["contenders"]) == {"lopa-pt/bf16", "peft-pt/bf16", "lopa/bf16", "peft-pt/fp32"}
    assert set(result["ratios"]) == {"peft_over_lopa_pt/bf16", "lopa_over_lopa_pt/bf16", "peft_fp32_over_lopa_pt_bf16"}
    assert not any(k.startswith(("encode_batch", "reencode")) for k in result["encoder"])
    for b in result["batches"]:  # PEFT's input is the prompt plus the answer token; both carry 10 virtual tokens
        assert (b["lopa_len"], b["peft_len"]) == (b["prompt_len"] + 10, b["prompt_len"] + 11)


def test_bad_option_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["bench", "train-speed", "--quick", "--batch-size", "0", "--out", str(tmp_path)])
    assert e.value.code == 2


@pytest.mark.parametrize("out", ["a-file", "train_speed.json", "a-file/below"])
def test_out_that_is_not_a_folder_fails_before_any_work(tmp_path, capsys, out):
    """--out is a folder, as for every benchmark; a file (or a file name, the old convention) is refused
    while the options are parsed, not after minutes of timing."""
    (tmp_path / "a-file").write_text("not a folder")
    started = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        main(["bench", "train-speed", "--out", str(tmp_path / out)])
    assert e.value.code == 2 and time.perf_counter() - started < 5
    assert "--out" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing written
