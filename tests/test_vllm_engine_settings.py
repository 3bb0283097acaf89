"""``lopa serve --backend vllm``'s engine settings: validation in :class:`ServeConfig`, the command
line, and their mapping onto vLLM's engine arguments (:func:`engine_kwargs`, no vLLM needed)."""

from __future__ import annotations

import importlib.util
import pytest

from lopa.cli import build_parser
from lopa.serve.backends import BackendError, make_backend
from lopa.serve.backends.vllm import GiB, engine_kwargs
from lopa.serve.config import VLLM_ENGINE_SETTINGS, ServeConfig

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.parametrize("name,value", [("tensor_parallel_size", 2), ("gpu_memory_utilization", 0.5),
                                        ("max_model_len", 4096), ("quantization", "awq"),
                                        ("enable_prefix_caching", True), ("enable_prefix_caching", False),
                                        ("kv_cache_memory", 4.0)])
def test_refused_with_the_transformers_backend(name, value):
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ValueError, match=f"{flag} is a setting of vLLM's engine; add --backend vllm"):
        ServeConfig(**{name: value})


def test_several_settings_named_together():
    with pytest.raises(ValueError, match="--tensor-parallel-size, --quantization are settings of vLLM's engine"):
        ServeConfig(tensor_parallel_size=2, quantization="fp8")


@pytest.mark.parametrize("name,value,message", [
    ("tensor_parallel_size", 0, r"tensor_parallel_size must be an integer in \[1, 1024\], got 0"),
    ("tensor_parallel_size", 1.5, "tensor_parallel_size must be an integer"),
    ("tensor_parallel_size", True, "tensor_parallel_size must be an integer"),
    ("gpu_memory_utilization", 0.0, r"gpu_memory_utilization must be a fraction in \(0, 1\], got 0.0"),
    ("gpu_memory_utilization", 1.2, "gpu_memory_utilization must be a fraction"),
    ("gpu_memory_utilization", float("nan"), "gpu_memory_utilization must be a fraction"),
    ("max_model_len", 0, "max_model_len must be an integer"),
    ("max_model_len", 100, "max_model_len 100 is below max_soft_tokens \\+ max_prompt_tokens \\+ max_new_tokens = 2368"),
    ("quantization", "", "quantization must name a vLLM quantisation method"),
    ("quantization", "awq; rm", "quantization must name a vLLM quantisation method"),
    ("enable_prefix_caching", "yes", "enable_prefix_caching must be true or false"),
    ("kv_cache_memory", 0, "kv_cache_memory must be a positive number of GiB"),
    ("kv_cache_memory", -1.0, "kv_cache_memory must be a positive number of GiB"),
    ("kv_cache_memory", float("inf"), "kv_cache_memory must be a positive number of GiB"),
])
def test_ranges_checked_with_the_vllm_backend(name, value, message):
    # range errors come before the check that vLLM is installed, so they show on any machine
    with pytest.raises(ValueError, match=message):
        ServeConfig(backend="vllm", **{name: value})


@pytest.mark.skipif(HAS_VLLM, reason="checks the message where vLLM is missing")
def test_valid_settings_then_need_vllm():
    with pytest.raises(ValueError, match=r"needs vllm: pip install 'lopa\[vllm\]'"):
        ServeConfig(backend="vllm", tensor_parallel_size=2, gpu_memory_utilization=0.8, max_model_len=4096,
                    quantization="fp8", enable_prefix_caching=True, kv_cache_memory=2)


def test_max_model_len_defaults_to_the_request_limits():
    cfg = ServeConfig(max_soft_tokens=16, max_prompt_tokens=64, max_new_tokens=32)
    assert cfg.engine_max_model_len == 112
    assert cfg.vllm_settings() == {}


def test_command_line_options_and_help():
    parser = build_parser()
    help_text = parser._subparsers._group_actions[0].choices["serve"].format_help()  # what serve --help prints
    for name in VLLM_ENGINE_SETTINGS:
        assert "--" + name.replace("_", "-") in help_text
    assert "--no-enable-prefix-caching" in help_text  # tri-state: on, off, or vLLM's default
    assert "kv_cache_memory_bytes" in help_text  # the docstrings are the help
    ns = parser.parse_args(["serve", "--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.85",
                            "--max-model-len", "8192", "--quantization", "fp8", "--no-enable-prefix-caching",
                            "--kv-cache-memory", "1.5"])
    assert (ns.tensor_parallel_size, ns.gpu_memory_utilization, ns.max_model_len, ns.quantization,
            ns.enable_prefix_caching, ns.kv_cache_memory) == (2, 0.85, 8192, "fp8", False, 1.5)
    assert parser.parse_args(["serve"]).enable_prefix_caching is None


def test_engine_kwargs_maps_every_setting():
    settings = {"tensor_parallel_size": 4, "gpu_memory_utilization": 0.8, "max_model_len": 4096,
                "quantization": "awq", "enable_prefix_caching": False, "kv_cache_memory": 2}
    kw = engine_kwargs("/models/m", "bfloat16", enforce_eager=False, max_model_len=2048, max_num_seqs=64,
                       settings=settings)
    assert kw == {"model": "/models/m", "enable_prompt_embeds": True, "dtype": "bfloat16", "enforce_eager": False,
                  "generation_config": "vllm", "disable_log_stats": True, "seed": 0, "max_logprobs": 20,
                  "max_num_seqs": 64,
                  "tensor_parallel_size": 4, "gpu_memory_utilization": 0.8, "max_model_len": 4096,
                  "quantization": "awq", "enable_prefix_caching": False, "kv_cache_memory_bytes": 2 * GiB}
    assert isinstance(kw["kv_cache_memory_bytes"], int)


def test_engine_kwargs_leaves_unset_to_vllm():
    kw = engine_kwargs("/m", "float32", enforce_eager=True, settings={n: None for n in VLLM_ENGINE_SETTINGS})
    assert not {"tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "quantization",
                "enable_prefix_caching", "kv_cache_memory_bytes"} & set(kw)


def test_engine_kwargs_from_a_config_round_trip():
    # what lopa serve hands over: ServeConfig names in, vLLM names out (built without the vllm check)
    cfg = ServeConfig.__new__(ServeConfig)
    for f, v in {"tensor_parallel_size": 2, "gpu_memory_utilization": None, "max_model_len": None,
                 "quantization": "fp8", "enable_prefix_caching": True, "kv_cache_memory": 0.25}.items():
        setattr(cfg, f, v)
    kw = engine_kwargs("/m", "bfloat16", enforce_eager=False, settings=ServeConfig.vllm_settings(cfg))
    assert (kw["tensor_parallel_size"], kw["quantization"], kw["enable_prefix_caching"],
            kw["kv_cache_memory_bytes"]) == (2, "fp8", True, GiB // 4)


def test_extra_engine_args_cannot_turn_off_prompt_embeds():
    with pytest.raises(ValueError, match="'enable_prompt_embeds' is set by the backend"):
        engine_kwargs("/m", "bfloat16", enforce_eager=False, extra={"enable_prompt_embeds": False})
    assert engine_kwargs("/m", "bfloat16", enforce_eager=False, extra={"swap_space": 0})["swap_space"] == 0


def test_transformers_backend_refuses_engine_settings():
    with pytest.raises(BackendError, match="settings of vLLM's engine; use --backend vllm"):
        make_backend("transformers", "tiny-random-llama", engine_settings={"tensor_parallel_size": 2})


def test_prefix_caching_is_on_where_vllm_hashes_prompt_embeddings():
    from lopa.serve.backends.vllm import prefix_caching_setting
    assert prefix_caching_setting({}, sound=True) == {"enable_prefix_caching": True}
    assert prefix_caching_setting({"enable_prefix_caching": None}, sound=False) == {"enable_prefix_caching": False}
    assert prefix_caching_setting({"enable_prefix_caching": False}, sound=True) == {"enable_prefix_caching": False}
    with pytest.raises(BackendError, match="does not hash prompt embeddings"):
        prefix_caching_setting({"enable_prefix_caching": True}, sound=False)


def test_the_transformers_prefix_cache_is_refused_with_vllm():
    with pytest.raises(ValueError, match="vLLM caches prefixes in its own KV cache"):
        ServeConfig(backend="vllm", prefix_cache_mib=16)
    with pytest.raises(BackendError):  # before vLLM starts (where vLLM is missing, for that)
        make_backend("vllm", "smollm2-135m", prefix_cache_bytes=1 << 20)
