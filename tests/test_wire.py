"""The soft-prompt wire format: exact round trips, and every refusal with a clear message."""

from __future__ import annotations

import base64

import pytest
import torch

from lopa.serve.wire import DTYPES, WireError, decode_soft_prompt, encode_soft_prompt, encoded_length

D = 8


def decode(obj, **kw):
    kw = {"hidden_size": D, "max_soft_tokens": 16, **kw}
    return decode_soft_prompt(obj, **kw)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("m", [1, 3, 16])
def test_round_trip_is_exact_in_the_wire_dtype(dtype, m):
    z = torch.randn(m, D, generator=torch.Generator().manual_seed(m)) * 3
    obj = encode_soft_prompt(z, dtype)
    assert obj["dtype"] == dtype and obj["shape"] == [m, D]
    assert len(obj["data"]) == encoded_length(m * D * DTYPES[dtype][2])
    out = decode(obj)
    assert out.dtype == getattr(torch, dtype) and out.shape == (m, D)
    assert torch.equal(out, z.to(getattr(torch, dtype)))


def test_float32_bytes_are_little_endian():
    obj = encode_soft_prompt(torch.tensor([[1.0, -2.0]]))
    assert base64.b64decode(obj["data"]) == b"\x00\x00\x80\x3f\x00\x00\x00\xc0"


def test_bfloat16_bits_are_the_top_half_of_float32():
    obj = encode_soft_prompt(torch.tensor([[1.0, -2.0]]), "bfloat16")
    assert base64.b64decode(obj["data"]) == b"\x80\x3f\x00\xc0"


def test_out_dtype_casts_and_refuses_overflow():
    z = torch.full((2, D), 1e30)
    assert decode(encode_soft_prompt(z), out_dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(WireError, match="too large for the model's dtype float16"):
        decode(encode_soft_prompt(z), out_dtype=torch.float16)


def test_encode_refuses_bad_input():
    with pytest.raises(ValueError, match="dtype must be one of"):
        encode_soft_prompt(torch.zeros(2, D), "float64")
    with pytest.raises(ValueError, match="2 dimensions"):
        encode_soft_prompt(torch.zeros(1, 2, D))


def good(m=2, dtype="float32"):
    return encode_soft_prompt(torch.ones(m, D), dtype)


@pytest.mark.parametrize("obj, match", [
    ([1, 2], "must be an object"),
    ({**good(), "extra": 1}, "unknown field"),
    ({**good(), "dtype": "float64"}, "dtype must be one of"),
    ({k: v for k, v in good().items() if k != "dtype"}, "dtype must be one of"),
    ({**good(), "shape": [2]}, "shape must be two integers"),
    ({**good(), "shape": [2, 8.0]}, "shape must be two integers"),
    ({**good(), "shape": [True, 8]}, "shape must be two integers"),
    ({**good(), "shape": "2x8"}, "shape must be two integers"),
    ({**good(), "shape": [2, 9]}, "shape\\[1\\] is 9, but this model's hidden size is 8"),
    ({**good(), "shape": [0, 8]}, "m, the number of virtual tokens\\) is 0; this server accepts 1 to 16"),
    ({**good(), "shape": [-1, 8]}, "is -1"),
    ({**good(), "shape": [17, 8]}, "is 17; this server accepts 1 to 16"),
    ({**good(), "data": 5}, "data must be a base64 string"),
    ({**good(), "data": good()["data"][:-4]}, "needs 64 bytes = 88 characters"),
    ({**good(), "data": "!" * 88}, "not valid standard base64"),
    ({**good(), "data": base64.b64encode(bytes(63)).decode() + "===="}, "decodes to 63 bytes"),
    ({**good(), "data": good()["data"].replace("A", "-", 1)}, "not valid standard base64"),
    ({**good(), "data": " " + good()["data"][1:]}, "not valid standard base64"),
])
def test_rejections(obj, match):
    with pytest.raises(WireError, match=match) as info:
        decode(obj)
    assert info.value.status == 400


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(dtype, bad):
    z = torch.ones(3, D)
    z[1, 2] = bad
    with pytest.raises(WireError, match="1 NaN or infinite"):
        decode(encode_soft_prompt(z, dtype))


def test_huge_data_is_refused_by_its_length_without_decoding(monkeypatch):
    import lopa.serve.wire as wire

    def boom(*a, **k):
        raise AssertionError("decoded a string whose length was already wrong")

    monkeypatch.setattr(wire.base64, "b64decode", boom)
    with pytest.raises(WireError, match="base64 characters"):
        decode({**good(), "data": "A" * 50_000_000})


def test_max_bytes():
    with pytest.raises(WireError, match="is 64 bytes; the limit is 63"):
        decode(good(), max_bytes=63)
    assert decode(good(), max_bytes=64).shape == (2, D)


# -- property-based: no input makes the decoder fail any other way ---------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# whatever JSON can hold, lone surrogates included (JSON's "\ud800" escape decodes to one)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(alphabet=st.characters(codec=None)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def _decodes_or_refuses(obj) -> torch.Tensor | None:
    try:
        out = decode(obj, out_dtype=torch.float16)
    except WireError as e:
        assert e.status == 400 and e.message and len(e.message) < 400, e.message
        e.message.encode("utf-8")  # the server puts it in a JSON answer
        return None
    assert out.dtype == torch.float16 and out.dim() == 2 and out.shape[1] == D and 1 <= out.shape[0] <= 16
    assert bool(torch.isfinite(out).all())
    return out


@FUZZ
@given(obj=json_values)
def test_any_json_value_decodes_or_is_a_wire_error(obj):
    _decodes_or_refuses(obj)


@FUZZ
@given(dtype=st.sampled_from(sorted(DTYPES)) | json_values,
       shape=st.lists(st.integers(-2, 20), min_size=0, max_size=3) | json_values,
       raw=st.binary(max_size=200), pad=st.sampled_from(["", "=", "==", "A", " ", "\ud800"]),
       extra=st.dictionaries(st.sampled_from(["x", "scale", "dtype"]), json_values, max_size=1))
def test_near_miss_objects_decode_or_are_wire_errors(dtype, shape, raw, pad, extra):
    """Objects close to valid ones, where the decoder's checks sit: each field right or wrong on its own."""
    _decodes_or_refuses({"dtype": dtype, "shape": shape, "data": base64.b64encode(raw).decode() + pad, **extra})


@FUZZ
@given(m=st.integers(1, 16), dtype=st.sampled_from(sorted(DTYPES)),
       values=st.lists(st.floats(-6e4, 6e4, allow_nan=False, width=32), min_size=1, max_size=16 * D))
def test_round_trip_of_any_finite_array(m, dtype, values):
    z = torch.tensor((values * (m * D // len(values) + 1))[:m * D], dtype=torch.float32).reshape(m, D)
    want = z.to(getattr(torch, dtype))
    assert torch.equal(decode(encode_soft_prompt(z, dtype)), want)
