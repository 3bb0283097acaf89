"""`lopa bench serving --quick`: the real entry point (a real `lopa serve` subprocess on loopback, PEFT LoRA
and prompt tuning in process, a `lopa gateway` in front of the server) on the tiny model; the JSON's
structure and the report's files only. Speed is never asserted: the machine is shared and timings are
noise here."""

from __future__ import annotations

import json

import pytest

from lopa.cli import main


def test_quick_writes_json_plot_and_doc_section(tmp_path, capsys):
    out, doc = tmp_path / "results", tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text("# Results\n\nkept above\n\n<!-- serving:start -->\nSTALE-SECTION\n<!-- serving:end -->\n\nkept below\n")
    # --gen-threads unlike --threads: the generation workload gets a server of its own
    assert main(["bench", "serving", "--quick", "--out", str(out), "--doc", str(doc), "--gen-threads", "2"]) == 0
    result = json.loads((out / "serving.json").read_text())

    assert result["benchmark"] == "serving" and result["settings"]["model"] == "tiny-random-llama"
    assert result["settings"]["tasks"] == [1, 4, 64] and result["command"].startswith("lopa bench serving --quick")
    assert result["server"]["health"]["status"] == "ok" and result["server"]["command"].startswith("lopa serve")
    n = result["settings"]["requests"]
    assert set(result["classification"]) == {"1", "4", "64"}
    for k, row in result["classification"].items():
        assert row["requests"] == n and row["distinct_tasks_in_stream"] == min(int(k), n)
        assert set(row["contenders"]) == {"lopa", "lora", "peft-pt", "bare"}
        ran = {c: x for c, x in row["contenders"].items() if x.get("fits") is not False}
        assert set(ran) == ({"lopa", "peft-pt", "bare"} if k == "64" else {"lopa", "lora", "peft-pt", "bare"})
        for c, x in ran.items():
            assert x["requests_per_s"] > 0 and x["tokens_per_s"] > 0, (k, c)
            assert len(x["seconds"]) == result["settings"]["repeats"], (k, c)
        lora_ratio = {"lopa_over_lora"} if k != "64" else set()
        assert set(row["ratios"]) == {"lopa_over_bare", "lopa_over_peft_pt"} | lora_ratio
        assert all(v > 0 for v in row["ratios"].values())
        server = row["contenders"]["lopa"]
        assert 1 <= server["mean_batch_size"] <= result["settings"]["batch_size"]
        assert server["cold_requests_per_s"] > 0 and len(server["passes"]) == result["settings"]["repeats"]
        assert all(p["lead_in_requests"] == result["settings"]["batch_size"] for p in server["passes"])
        # pages touched afresh per request, the server's (from /proc) and this process's for those run here
        assert server["minor_faults_per_request"] >= 0
        assert all(p["server_minor_faults_per_request"] >= 0 for p in server["passes"])
        assert all(x["minor_faults_per_request"] >= 0 for x in ran.values())
        # PEFT prompt tuning holds the server's soft prompts: the same numbers (fp32 tiny model here)
        assert row["max_abs_logprob_diff_lopa_vs_peft_pt"] < 1e-5
        assert 0 <= row["rounding_floor"] < 1e-5  # the bare model's own batch-shape rounding, measured
    assert result["classification"]["4"]["contenders"]["peft-pt"]["batches_per_pass"] == 4  # one per adapter
    # operators per batch: lopa's and the bare model's do not depend on K; LoRA's mixed batch loops over its adapters
    ops = {k: {c: x["operators_per_batch"] for c, x in row["contenders"].items() if "operators_per_batch" in x}
           for k, row in result["classification"].items()}
    assert all(0 < o["non_view"] < o["all"] for by_c in ops.values() for o in by_c.values())
    assert ops["1"]["lopa"] == ops["4"]["lopa"] == ops["64"]["lopa"] and ops["1"]["bare"] == ops["64"]["bare"]
    assert ops["4"]["lora"]["non_view"] > ops["1"]["lora"]["non_view"] > ops["1"]["bare"]["non_view"]

    mem = result["memory"]
    assert set(mem["server_rss_by_k"]) == {"1", "4", "64"}
    assert all(v["rss_mib"] > 0 for v in mem["server_rss_by_k"].values())
    # the server has seen every one of the K tasks before K is timed: its RSS before and after, at every K
    seen = mem["server_seen_by_k"]
    assert [seen[k]["tasks_seen"] for k in ("1", "4", "64")] == [1, 4, 64]
    assert [seen[k]["sent_now"] for k in ("1", "4", "64")] == [1, 3, 60]
    assert all(v["rss_before_mib"] > 0 and v["rss_after_mib"] > 0 for v in seen.values())
    lora = mem["lora_by_k"]
    assert lora["1"]["adapters"] == 1 and lora["4"]["adapters"] == 4 and lora["1"]["fits"] and lora["4"]["fits"]
    assert lora["4"]["adapter_mib"] == pytest.approx(4 * lora["1"]["adapter_mib"])
    # 64 adapters exceed --quick's budget: not grown; the row says so, with the measured figures and their extrapolation
    unfit = result["classification"]["64"]["contenders"]["lora"]
    assert unfit == lora["64"] and unfit["fits"] is False and unfit["adapters"] == 64
    assert unfit["measured_on_adapters"] == 4 and "requests_per_s" not in unfit
    assert unfit["per_adapter_mib"] == pytest.approx(lora["4"]["adapter_mib"] / 4)
    assert unfit["extrapolated_mib"] == pytest.approx(64 * unfit["per_adapter_mib"])
    assert unfit["extrapolated_mib"] > unfit["budget_mib"]
    assert unfit["budget_mib"] == result["settings"]["lora_budget_mib"] >= lora["4"]["adapter_mib"]
    assert unfit["per_adapter_load_s"] > 0 and unfit["per_adapter_fast_build_s"] > 0
    assert unfit["extrapolated_load_s"] == pytest.approx(64 * unfit["per_adapter_load_s"])
    assert unfit["extrapolated_fast_build_s"] == pytest.approx(64 * unfit["per_adapter_fast_build_s"])
    # prompt tuning's adapters are small: all 64 fit and ran
    assert result["classification"]["64"]["contenders"]["peft-pt"]["batches_per_pass"] == n

    gen = result["generation"]
    assert set(gen["contenders"]) == {"lopa", "hf-fp32", "hf-bf16", "vllm"}
    assert "skipped" in gen["contenders"]["vllm"]  # --quick never starts vLLM
    for c in ("lopa", "hf-fp32", "hf-bf16"):
        assert gen["contenders"][c]["requests_per_s"] > 0 and gen["contenders"][c]["generated_tokens"] >= 0
    assert set(gen["ratios"]) == {"lopa_over_hf_fp32", "lopa_over_hf_bf16"}
    assert gen["threads"] == 2 and "--threads 2" in result["generation_server"]["command"]
    assert "--threads 1" in result["server"]["command"] and "--device cpu" in result["server"]["command"]

    pc = result["prefix_cache"]  # a repeated-task stream against a server with the cache and one without
    assert set(pc["contenders"]) == {"cached", "plain"} and pc["requests"] == n
    assert all(x["requests_per_s"] > 0 for x in pc["contenders"].values()) and pc["ratio_cached_over_plain"] > 0
    assert "--prefix-cache-mib 64" in pc["commands"]["cached"] and "--prefix-cache-mib" not in pc["commands"]["plain"]
    assert pc["cache"]["misses_total"] == 1 and pc["cache"]["hits_total"] > n  # one task's soft prompt, computed once
    assert pc["max_logprob_difference"] < 1e-4  # fp32 tiny model: rounding only
    # on the sweep's threads (the generation server here has 2), so that it compares with LoRA's rows
    assert pc["threads"] == 1 and all("--threads 1" in c for c in pc["commands"].values())
    assert pc["cached_over_lora"] == {}  # LoRA ran at K = 1 and 4 only, and the target is from K = 8 on

    gw = result["gateway"]
    assert gw["command"].startswith("lopa gateway --task task0=")
    assert gw["upstream"] == result["generation_server"]["command"]  # the server running when the section starts
    assert gw["requests"] == result["settings"]["gateway_requests"]
    assert len(gw["tasks"]) == result["settings"]["gateway_tasks"]
    assert all(gw["contenders"][p]["requests_per_s"] > 0 for p in ("gateway", "direct"))
    assert gw["ratio_gateway_over_direct"] > 0 and gw["target"] == 0.9 and 0 <= gw["same_reply_fraction"] <= 1
    st = gw["streaming"]
    assert len(st["stream_total_s"]) == len(st["whole_response_s"]) == result["settings"]["stream_requests"]
    assert st["without_text"] < st["requests"] and 0 < st["ttft_s_median"] <= st["stream_total_s_median"]

    text = doc.read_text()
    assert text.startswith("# Results\n\nkept above") and text.rstrip().endswith("kept below")
    assert text.count("<!-- serving:start -->") == 1 and "STALE-SECTION" not in text and "## Serving throughput" in text
    assert (doc.parent / "serving_throughput.png").stat().st_size > 1000
    assert "Operators dispatched per batch" in text
    assert "does not fit" in text and "Gateway:" in text and "first streamed token" in text
    assert "Prefix cache: a repeated-task stream" in text and "Minor page faults per request" in text
    assert "wrote" in capsys.readouterr().out


def test_gateway_is_optional_and_budget_checked(tmp_path, capsys):
    from lopa.benchmarks.serving import parse_args
    assert parse_args(["--quick", "--no-gateway", "--out", str(tmp_path)]).gateway is False
    assert parse_args(["--out", str(tmp_path)]).tasks == [1, 8, 64, 512, 10000]
    with pytest.raises(SystemExit) as e:
        parse_args(["--quick", "--lora-budget-mib", "0", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--lora-budget-mib must be > 0" in capsys.readouterr().err


def test_prefix_cache_row_is_optional_and_checked(tmp_path, capsys):
    from lopa.benchmarks.serving import parse_args
    assert parse_args(["--quick", "--out", str(tmp_path)]).prefix_cache_mib == 64
    assert parse_args(["--quick", "--prefix-cache-mib", "0", "--out", str(tmp_path)]).prefix_cache_mib == 0  # skipped
    with pytest.raises(SystemExit) as e:
        parse_args(["--quick", "--prefix-cache-mib", "-1", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--prefix-cache-mib must be >= 0" in capsys.readouterr().err.replace("\n", " ")


def test_bad_option_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["bench", "serving", "--quick", "--tasks", "0,4", "--out", str(tmp_path)])
    assert e.value.code == 2


@pytest.mark.parametrize("device,message", [("tpu", "--device must be cpu, cuda or cuda:N"),
                                            ("nonsense", "--device must be cpu, cuda or cuda:N")])
def test_bad_device_is_a_usage_error(tmp_path, capsys, device, message):
    with pytest.raises(SystemExit) as e:
        main(["bench", "serving", "--quick", "--device", device, "--out", str(tmp_path)])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is here")
def test_cuda_without_a_gpu_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "serving", "--quick", "--device", "cuda", "--out", str(tmp_path)])
    assert e.value.code == 2 and "sees no CUDA GPU" in capsys.readouterr().err


@pytest.mark.gpu
def test_quick_on_cuda(tmp_path):
    assert main(["bench", "serving", "--quick", "--device", "cuda", "--out", str(tmp_path),
                 "--doc", str(tmp_path / "results.md")]) == 0
    result = json.loads((tmp_path / "serving.json").read_text())
    assert result["settings"]["device"] == "cuda" and result["dtype"] == "bfloat16"


def test_the_peft_check_measures_rounding_against_the_models_own_batch_shape_floor():
    """In bf16 a model's label log-probs move with the batch's shape (kernels block by shape); the check
    that PEFT prompt tuning computes what the server does must allow what the bare model itself shows,
    and no more than twice it."""
    from lopa.benchmarks.serving import notes_checks

    def result(diff, floor):
        row = {"max_abs_logprob_diff_lopa_vs_peft_pt": diff, "rounding_floor": floor, "contenders": {}}
        return {"settings": {"batch_size": 32, "requests": 64}, "dtype": "bfloat16",
                "classification": {"1": {**row, "max_abs_logprob_diff_lopa_vs_peft_pt": 0.0}, "512": row}}

    same = notes_checks(result(0.47, 0.33))[0]
    assert "compute the same thing" in same and "NOT" not in same and "differed by up to 0.33" in same
    assert "NOT compute" in notes_checks(result(0.47, 0.01))[0]
    assert "NOT compute" in notes_checks(result(0.47, None))[0]  # no floor measured: the dtype's usual 0.05


def test_the_prefix_cache_is_set_against_loras_rows_from_k_8():
    from lopa.benchmarks.serving import cached_over_lora
    from lopa.benchmarks.serving_prefix import render_prefix_cache
    result = {"classification": {k: {"contenders": {"lora": lora}} for k, lora in
                                 (("1", {"requests_per_s": 100.0}), ("8", {"requests_per_s": 50.0}),
                                  ("64", {"requests_per_s": 80.0}), ("512", {"fits": False}))},
              "prefix_cache": {"requests": 8, "m": 4, "text_tokens": 8, "mib": 64, "threads": 1,
                               "max_logprob_difference": 0.0, "ratio_cached_over_plain": 1.1, "cache": {},
                               "contenders": {"cached": {"requests_per_s": 60.0}, "plain": {"requests_per_s": 55.0}}}}
    result["prefix_cache"]["cached_over_lora"] = ratios = cached_over_lora(result)
    assert ratios == {"8": 1.2, "64": 0.75}
    text = "\n".join(render_prefix_cache(result, 1.0))
    assert "K = 8: 1.20 ✓, K = 64: 0.75 ✗" in text and "on 1 torch thread(s)" in text


@pytest.mark.parametrize("contenders", [["lopa", "lora", "peft-pt", "bare"], ["bare", "lopa"],
                                        ["lora", "bare", "lopa-inproc", "lopa", "peft-pt"], ["lopa", "lora"]])
def test_every_pass_runs_lopa_next_to_the_bare_model(contenders):
    from lopa.benchmarks.serving import pass_order
    orders = [pass_order(contenders, r) for r in range(2 * len(contenders))]
    assert all(sorted(o) == sorted(contenders) for o in orders)
    assert len({o[0] for o in orders}) > 1  # the passes still rotate
    if "bare" in contenders:
        assert all(abs(o.index("lopa") - o.index("bare")) == 1 for o in orders), orders
        assert {o.index("lopa") < o.index("bare") for o in orders} == {True, False}  # each goes first in turn
