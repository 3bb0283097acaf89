"""The auto precision: bf16 only where the CPU runs it natively and faster than fp32."""

import pytest
import torch

from lopa import hardware


@pytest.fixture(autouse=True)
def fresh_cache():
    hardware.cpu_bf16_is_faster.cache_clear()
    yield
    hardware.cpu_bf16_is_faster.cache_clear()


def fake_cpu(monkeypatch, flags, capability="AVX512", speedup=None):
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: set(flags))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    if speedup is not None:
        monkeypatch.setattr(hardware, "bf16_matmul_speedup", lambda *a, **k: speedup)
    else:
        monkeypatch.setattr(hardware, "bf16_matmul_speedup",
                            lambda *a, **k: pytest.fail("no timing expected on this CPU"))


def test_no_native_bf16_means_fp32(monkeypatch):
    fake_cpu(monkeypatch, {"avx2", "fma"}, capability="AVX2")
    assert not hardware.cpu_supports_bf16()
    assert not hardware.cpu_bf16_is_faster()


def test_avx512_bf16_flag_without_avx512_dispatch_is_not_native(monkeypatch):
    fake_cpu(monkeypatch, {"avx512_bf16"}, capability="AVX2")
    assert not hardware.cpu_supports_bf16()


def test_amx_means_bf16_without_timing(monkeypatch):
    fake_cpu(monkeypatch, {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    assert hardware.cpu_bf16_is_faster()


@pytest.mark.parametrize("speedup,expected", [(0.67, False), (1.05, False), (1.6, True)])
def test_avx512_bf16_alone_follows_the_timed_matmul(monkeypatch, speedup, expected):
    fake_cpu(monkeypatch, {"avx512f", "avx512_bf16"}, speedup=speedup)
    assert hardware.cpu_supports_bf16()
    assert hardware.cpu_bf16_is_faster() is expected


def test_the_timing_is_cached_per_process(monkeypatch):
    calls = []
    fake_cpu(monkeypatch, {"avx512f", "avx512_bf16"})
    monkeypatch.setattr(hardware, "bf16_matmul_speedup", lambda *a, **k: calls.append(1) or 2.0)
    assert hardware.cpu_bf16_is_faster() and hardware.cpu_bf16_is_faster()
    assert len(calls) == 1


def test_real_speedup_is_a_positive_ratio():
    s = hardware.bf16_matmul_speedup(m=32, k=64, n=64, repeats=2)
    assert s > 0 and s == s  # finite, not NaN


def test_serving_backend_auto_dtype_follows_it(monkeypatch):
    from lopa.serve.backends import resolve_dtype
    fake_cpu(monkeypatch, {"avx512f", "avx512_bf16"}, speedup=0.6)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    hardware.cpu_bf16_is_faster.cache_clear()
    fake_cpu(monkeypatch, {"avx512f", "avx512_bf16", "amx_bf16"})
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32


def test_one_precision_vocabulary_for_train_eval_and_serve(monkeypatch):
    """Training's --precision, evaluation's --precision and the server's --dtype take the same names,
    and 'auto' is decided in one place."""
    from lopa.evaluate import EvalArgs
    from lopa.serve.backends import DTYPE_CHOICES, resolve_dtype
    from lopa.serve.protocol import BackendError
    from lopa.train import TrainArgs
    assert set(hardware.PRECISION_CHOICES) <= set(DTYPE_CHOICES)
    for short, long in hardware.SHORT.items():
        assert hardware.resolve_precision(short) == hardware.resolve_precision(long) == getattr(torch, long)
        assert resolve_dtype(short, torch.device("cpu")) == getattr(torch, long)
    assert TrainArgs(precision="bfloat16").precision == TrainArgs(precision="bf16").precision == "bf16"
    assert TrainArgs(precision="float32").precision == "fp32"
    with pytest.raises(ValueError, match="loss scaling"):
        TrainArgs(precision="fp16")
    eval_choices = {f.name: f.metadata.get("choices") for f in __import__("dataclasses").fields(EvalArgs)}
    assert set(eval_choices["precision"]) == set(hardware.PRECISION_CHOICES)
    with pytest.raises(BackendError, match="precision must be one of"):
        resolve_dtype("half", torch.device("cpu"))

    # auto: the same decision whoever asks
    fake_cpu(monkeypatch, {"avx512f", "avx512_bf16", "amx_bf16"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.resolve_precision("auto") == resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert TrainArgs(precision="auto").precision == "bf16"


def test_autocast_is_off_for_float32_and_on_for_bfloat16():
    with hardware.autocast("fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with hardware.autocast("bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
