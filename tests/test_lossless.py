"""The ``lossless`` codec: bit-exact for every supported dtype, and it actually compresses.

(Special values alone, integer extremes, empty tensors and scalars are checked for every
lossless codec at once in tests/test_lossless_v2.py.)

Equality is checked on bit patterns, never with ``==`` (NaN != NaN, -0.0 == 0.0), so a codec that
canonicalised NaNs or lost the sign of zero would fail here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bit_patterns import ALL_DTYPES, FLOAT_DTYPES, SPECIALS, from_bits, random_tensor
from bitexact import assert_bit_exact, bit_pattern

from mlcompress import codecs
from mlcompress.codecs.lossless import FIELDS
from mlcompress.container import TensorRecord, open_mrc, write_mrc
from mlcompress.format.dtypes import dtype_name
from mlcompress.errors import MrcFormatError

CODEC = codecs.get("lossless")


def roundtrip(t: torch.Tensor) -> torch.Tensor:
    """Encode and decode through the codec alone, validating the record as a reader would."""
    payload, params = CODEC.encode(t.contiguous(), {})
    rec = TensorRecord("t", tuple(t.shape), dtype_name(t.dtype), "lossless", params, 0, len(payload), 0)
    CODEC.check(rec)
    return CODEC.decode(bytes(payload), rec)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_random_values_roundtrip_bit_exact(dtype):
    t = random_tensor(dtype, (37, 29))
    assert_bit_exact(roundtrip(t), t)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_special_values_roundtrip_bit_exact(dtype):
    special = from_bits(SPECIALS[dtype], dtype)
    # Mixed into ordinary weights so the planes go through ANS (a stream of specials alone is
    # small enough to be stored raw), and repeated so every special value is frequent.
    t = torch.cat([random_tensor(dtype, (500,)), special.repeat(20), random_tensor(dtype, (500,), seed=1)])
    payload, params = CODEC.encode(t, {})
    assert any(p["mode"] == "ans" for p in params["planes"])
    out = roundtrip(t)
    assert_bit_exact(out, t)
    # The distinct NaN payloads really are distinct and really survive.
    nan_bits = {bytes(bit_pattern(x)) for x in out[500:500 + len(SPECIALS[dtype])] if torch.isnan(x.float())}
    assert len(nan_bits) == 5


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_non_contiguous_input(dtype, tmp_path):
    base = random_tensor(dtype, (24, 40), seed=5)
    views = {"transposed": base.t(), "strided": base[::3, 1::2], "expanded": base[:1].expand(5, 40)}
    for v in views.values():
        assert not v.is_contiguous()
    # Through the container, which is what users call; the tensors are neither copied nor shared.
    write_mrc(tmp_path / "nc.mrc", views, lambda name, t: ("lossless", {}), {})
    back = open_mrc(tmp_path / "nc.mrc").tensors()
    for name, v in views.items():
        assert_bit_exact(back[name], v)


def test_constant_tensor_is_tiny():
    t = torch.full((10_000,), 0.125, dtype=torch.float32)
    payload, params = CODEC.encode(t, {})
    assert len(payload) < 200
    assert_bit_exact(roundtrip(t), t)


def _ratio(t: torch.Tensor) -> float:
    payload, _ = CODEC.encode(t, {})
    return t.numel() * t.element_size() / len(payload)


def test_compresses_trained_like_fp32_weights():
    w = torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 0.05
    assert _ratio(w) > 1.1
    assert_bit_exact(roundtrip(w), w)


def test_compresses_trained_like_bf16_weights():
    w = (torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 0.05).bfloat16()
    assert _ratio(w) > 1.35
    assert_bit_exact(roundtrip(w), w)


def test_uniform_random_bytes_cost_almost_nothing_extra():
    # Incompressible planes are stored raw, so the payload is at most a few bytes larger.
    t = torch.randint(0, 256, (50_000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    payload, params = CODEC.encode(t, {})
    assert params["planes"] == [{"mode": "raw", "length": 50_000}]
    assert len(payload) == 50_000


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_fields_cover_every_bit_exactly_once(dtype):
    # The plane split must be a bijection on bit patterns: each bit in exactly one field.
    name = dtype_name(dtype)
    bits = 8 * torch.empty(0, dtype=dtype).element_size()
    covered = [0] * bits
    for field in FIELDS[name]:
        for shift, width in field:
            for b in range(shift, shift + width):
                covered[b] += 1
    assert covered == [1] * bits


def _record(t: torch.Tensor, params: dict, length: int) -> TensorRecord:
    return TensorRecord("w", tuple(t.shape), dtype_name(t.dtype), "lossless", params, 0, length, 0)


def test_check_rejects_wrong_plane_count():
    t = random_tensor(torch.float32, (100,))
    payload, params = CODEC.encode(t, {})
    bad = {"planes": params["planes"][:-1]}
    with pytest.raises(MrcFormatError, match="planes, dtype float32 has 4"):
        CODEC.check(_record(t, bad, len(payload)))


def test_check_rejects_raw_plane_of_wrong_size():
    t = random_tensor(torch.float32, (100,))
    payload, params = CODEC.encode(t, {})
    planes = [dict(p) for p in params["planes"]]
    raw = next(p for p in planes if p["mode"] == "raw")
    raw["length"] += 1
    with pytest.raises(MrcFormatError, match="raw plane size does not match its shape"):
        CODEC.check(_record(t, {"planes": planes}, len(payload) + 1))


def test_check_rejects_plane_lengths_not_adding_up():
    t = random_tensor(torch.float32, (100,))
    payload, params = CODEC.encode(t, {})
    with pytest.raises(MrcFormatError, match="plane lengths do not add up"):
        CODEC.check(_record(t, params, len(payload) + 64))


@pytest.mark.parametrize(
    "params",
    [{}, {"planes": 3}, {"planes": [], "extra": 1},
     {"planes": [{"mode": "zip", "length": 1}] * 4},
     {"planes": [{"mode": "ans", "length": -1}] * 4},
     {"planes": [{"mode": "ans", "length": True}] * 4}],
    ids=["missing", "not-list", "extra-key", "bad-mode", "negative", "bool-length"],
)
def test_check_rejects_malformed_params(params):
    t = random_tensor(torch.float32, (10,))
    with pytest.raises(MrcFormatError, match="lossless tensor 'w'"):
        CODEC.check(_record(t, params, 40))


def test_decode_rejects_plane_value_outside_its_field():
    # An ANS plane whose symbols exceed the field width (a crafted stream with a valid CRC) must
    # not silently set bits of a neighbouring field.
    from mlcompress.codecs import entropy

    t = torch.zeros(8, dtype=torch.float16)
    exp_plane = entropy.encode_symbols(np.array([0, 40, 0, 0, 0, 0, 0, 0]))  # 40 > 5-bit field
    planes = [{"mode": "ans", "length": len(exp_plane)}, {"mode": "raw", "length": 8}, {"mode": "raw", "length": 8}]
    payload = exp_plane + bytes(16)
    rec = _record(t, {"planes": planes}, len(payload))
    CODEC.check(rec)
    with pytest.raises(MrcFormatError, match="outside its bit field"):
        CODEC.decode(payload, rec)


def test_decode_rejects_raw_plane_value_outside_its_field():
    t = torch.zeros(8, dtype=torch.float16)
    planes = [{"mode": "raw", "length": 8}] * 3
    payload = bytearray(24)
    payload[3] = 40  # the exponent field of float16 has 5 bits
    rec = _record(t, {"planes": planes}, len(payload))
    CODEC.check(rec)
    with pytest.raises(MrcFormatError, match="outside its bit field"):
        CODEC.decode(bytes(payload), rec)


@pytest.mark.parametrize("mode", ["raw", "ans"])
def test_decode_rejects_bool_bytes_other_than_0_and_1(mode):
    from mlcompress.codecs import entropy

    t = torch.zeros(300, dtype=torch.bool)
    values = np.zeros(300, dtype=np.uint8)
    values[7] = 2
    blob = values.tobytes() if mode == "raw" else entropy.encode_symbols(values)
    rec = _record(t, {"planes": [{"mode": mode, "length": len(blob)}]}, len(blob))
    CODEC.check(rec)
    with pytest.raises(MrcFormatError, match="outside its bit field"):
        CODEC.decode(blob, rec)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_plane_mode_combination_decodes(dtype):
    # Each plane may independently be raw or ANS; decode must handle both for every field kind
    # (whole bytes, fields straddling bytes, multi-range fields).
    t = random_tensor(dtype, (2000,), seed=7)
    payload, params = CODEC.encode(t, {})
    from mlcompress.codecs import entropy
    from mlcompress.codecs.lossless import _bits, _extract, _raw_dtype

    u = _bits(t, dtype_name(dtype))
    fields = FIELDS[dtype_name(dtype)]
    for flip in range(len(fields)):
        blobs, planes = [], []
        for i, field in enumerate(fields):
            values = _extract(u, field)
            ans = (i == flip) != (params["planes"][i]["mode"] == "ans")
            blob = entropy.encode_symbols(values.astype(np.int32)) if ans else values.astype(_raw_dtype(field)).tobytes()
            blobs.append(blob)
            planes.append({"mode": "ans" if ans else "raw", "length": len(blob)})
        data = b"".join(blobs)
        rec = _record(t, {"planes": planes}, len(data))
        CODEC.check(rec)
        assert_bit_exact(CODEC.decode(data, rec), t)
