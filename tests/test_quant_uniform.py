"""Data-free integer quantization (seed 001 §3) and the ``quant`` codec's exact round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlcompress import codecs
from mlcompress.codecs.quant import decode_levels, encode_levels
from mlcompress.container import EncodedTensor, TensorRecord, encode_tensor, open_mrc, write_encoded
from mlcompress.errors import MrcFormatError, UsageError
from mlcompress.codecs.quant import uniform
from mlcompress.quant.counter import hard_entropy_bits


def _partitioned(theta, partitions, M, s, b):
    """Expand per-partition (M, s, b) to per-element arrays (partitions are 1-based as in the seed)."""
    n = len(theta)
    Me, se, be = [0] * n, [0.0] * n, [0] * n
    for part, m, sj, bj in zip(partitions, M, s, b):
        for i in part:
            Me[i - 1], se[i - 1], be[i - 1] = m, sj, bj
    Me, se, be = torch.tensor(Me), torch.tensor(se, dtype=torch.float64), torch.tensor(be)
    q = uniform.quantize(torch.tensor(theta, dtype=torch.float64), se, be, -Me, Me)
    return q, uniform.dequantize(q, se, be, torch.float64)


def test_seed_worked_example():
    q, deq = _partitioned([1.20, -0.55, 0.07, 2.31], [{1, 2}, {3, 4}], [127, 7], [0.01, 0.1], [0, 1])
    assert q.tolist() == [120, -55, 2, 7]
    assert [round(v, 12) for v in deq.tolist()] == [1.20, -0.55, 0.1, 0.6]


def test_seed_exercise():
    q, deq = _partitioned([0.34, -1.26, 0.51], [{1, 3}, {2}], [15, 127], [0.02, 0.01], [2, 0])
    assert q.tolist() == [15, -126, 15]
    assert [round(v, 12) for v in deq.tolist()] == [0.26, -1.26, 0.26]


@pytest.mark.parametrize("bits", [0, 17, -3])
def test_bits_out_of_range(bits):
    with pytest.raises(UsageError, match="--bits"):
        uniform.quantize_tensor(torch.randn(8, 8), bits)


def test_symmetric_one_bit_refused():
    with pytest.raises(UsageError, match="symmetric"):
        uniform.level_range(1, True)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_levels_in_range_and_error_bounded(bits, symmetric):
    if symmetric and bits == 1:
        return
    torch.manual_seed(bits)
    x = torch.randn(16, 40)
    q = uniform.quantize_tensor(x, bits, symmetric=symmetric, per_channel=True, refine=False)
    lo, hi = uniform.level_range(bits, symmetric)
    assert q.levels.min() >= lo and q.levels.max() <= hi
    err = (q.dequantize() - x).abs()
    # Min/max: inside the fitted range the error is at most half a step (plus scale rounding).
    step = q.layout.expand(q.scale.double()).reshape(x.shape)
    assert bool((err <= step / 2 * (1 + 2**-10) + 1e-6).all())
    # The least-squares refinement (the default with groups) never has a larger error in any group.
    r = uniform.quantize_tensor(x, bits, symmetric=symmetric, per_channel=True)
    assert r.levels.min() >= lo and r.levels.max() <= hi
    sse_minmax = ((q.dequantize() - x) ** 2).sum(dim=1)
    sse_refined = ((r.dequantize() - x) ** 2).sum(dim=1)
    assert bool((sse_refined <= sse_minmax * (1 + 1e-5) + 1e-6).all())  # + float32 rounding of the result
    if bits <= 4:
        assert float(sse_refined.sum()) < 0.97 * float(sse_minmax.sum())


def test_zero_is_exact():
    x = torch.randn(8, 32)
    x[x.abs() < 0.5] = 0.0
    for symmetric in (False, True):
        deq = uniform.quantize_tensor(x, 3, symmetric=symmetric, group_size=8).dequantize()
        assert bool((deq[x == 0] == 0).all())


def test_group_layout():
    layout = uniform.GroupLayout.for_shape((6, 3, 5, 5), group_size=32)
    assert (layout.rows, layout.cols, layout.group, layout.groups_per_row) == (6, 75, 32, 3)
    assert uniform.GroupLayout.for_shape((6, 10), per_channel=True).n_groups == 6
    assert uniform.GroupLayout.for_shape((6, 10)).n_groups == 1
    with pytest.raises(UsageError):
        uniform.GroupLayout.for_shape((6, 10), group_size=0)


@pytest.mark.parametrize(
    "options",
    [
        {"bits": 8},
        {"bits": 4, "per_channel": True},
        {"bits": 3, "group_size": 16, "symmetric": True},
        {"bits": 2, "group_size": 7},
        {"bits": 1},
        {"bits": 16, "per_channel": True},
        {"scheme": "l2", "edge": 0.05, "step": 0.03},
    ],
)
def test_quant_codec_round_trip_exact(tmp_path, options):
    torch.manual_seed(0)
    t = {"w": torch.randn(24, 3, 5, 5) * 0.1, "v": torch.randn(10, 33).to(torch.float16)}
    entries = [encode_tensor(n, x, "quant", options) for n, x in t.items()]
    path = write_encoded(tmp_path / "q.mrc", entries, {})
    f = open_mrc(path)
    for name, x in t.items():
        got = f.tensor(name)
        if options.get("scheme") == "l2":
            from mlcompress.codecs.quant import l2

            want = l2.dequantize_levels(l2.levels(x, options["edge"], options["step"]), options["edge"], options["step"], x.dtype)
        else:
            q = uniform.quantize_tensor(x, options["bits"], symmetric=options.get("symmetric", False),
                                        per_channel=options.get("per_channel", False), group_size=options.get("group_size"))
            want = q.dequantize()
            rec = f.record(name)
            # per-channel / per-group parameters restored: the layout in the header is the quantizer's
            assert (rec.params["rows"], rec.params["cols"], rec.params["group"]) == (q.layout.rows, q.layout.cols, q.layout.group)
        assert got.dtype == x.dtype and got.shape == x.shape
        assert torch.equal(got, want.reshape(x.shape))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_entropy_coded_size_at_most_nominal(bits):
    torch.manual_seed(1)
    for x in (torch.randn(200, 300) * 0.05, torch.randn(4, 4), torch.rand(50, 50)):
        payload, params = codecs.get("quant").encode(x, {"bits": bits})
        level_bytes = len(payload) - params["scale_bytes"] - params["zp_bytes"]
        # level section: mode byte (+ 5-byte packed header) then at most bits x count
        assert (level_bytes - 6) * 8 <= bits * x.numel() + 8
    # Gaussian weights at 8 bits: the levels' entropy is ~7.3 bits, and the coder gets there.
    x = torch.randn(200, 300)
    payload, _ = codecs.get("quant").encode(x, {"bits": 8})
    ideal = hard_entropy_bits(uniform.quantize_tensor(x, 8).levels)
    assert len(payload) * 8 < 0.95 * 8 * x.numel()
    assert len(payload) * 8 < ideal * 1.01 + 8 * 12 * 256


def test_level_section_packed_and_ans_round_trip():
    rng = np.random.default_rng(0)
    for values in (rng.integers(-3, 4, size=17), rng.integers(-100, 100, size=20000), np.zeros(5, dtype=np.int64)):
        section = encode_levels(values)
        assert np.array_equal(decode_levels(memoryview(section), values.size), values)


def _record(payload: bytes, params: dict, shape=(4, 8)) -> TensorRecord:
    return TensorRecord("w", shape, "float32", "quant", params, 0, len(payload), 0)


def test_check_rejects_inconsistent_params():
    codec = codecs.get("quant")
    payload, params = codec.encode(torch.randn(4, 8), {"bits": 4, "per_channel": True})
    codec.check(_record(payload, params))
    bad = [
        {**params, "rows": 3},
        {**params, "scale_bytes": 4},
        {**params, "bits": 0},
        {**params, "bits": 17},
        {**params, "zp_bytes": 10**9},
        {**params, "scheme": "nope"},
        {**params, "symmetric": "no"},
        {"scheme": "l2", "edge": -1.0, "step": 1.0},
        {"scheme": "l2", "edge": 1.0},
    ]
    for p in bad:
        with pytest.raises(MrcFormatError):
            codec.check(_record(payload, p))
    with pytest.raises(MrcFormatError):
        codec.check(TensorRecord("w", (4, 8), "int32", "quant", params, 0, len(payload), 0))


def test_decode_rejects_damaged_payload():
    codec = codecs.get("quant")
    payload, params = codec.encode(torch.randn(4, 8), {"bits": 4})
    with pytest.raises(MrcFormatError):
        codec.decode(payload[:-3], _record(payload[:-3], params))
    l2payload, l2params = codec.encode(torch.randn(4, 8), {"scheme": "l2", "edge": 0.1, "step": 0.1})
    with pytest.raises(MrcFormatError):
        codec.decode(l2payload, _record(l2payload, l2params, shape=(4, 9)))
