"""The quant codec's blockwise passes change no bit: payloads and decodes equal a whole-tensor pass.

Block and slice sizes are set tiny here (``uniform.BLOCK_ELEMENTS``, ``entropy.CHUNK``) so that
rows, groups and level streams are cut in many places, none of them on a round boundary; the
references are the straightforward whole-tensor computations (one ``groups()``/``expand()`` of
the whole matrix, one ``np.unique``, one coder call).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlcompress import codecs
from mlcompress.codecs import entropy
from mlcompress.codecs.quant import decode_levels, encode_levels, l2, level_slices, pack_bits, uniform
from mlcompress.codecs.quant import step as step_grid
from mlcompress.codecs.quant.rdo import HIGH_RATE_LAMBDA, rdo_round
from mlcompress.container import TensorRecord
from mlcompress.errors import InputError, MrcFormatError
from mlcompress.lazy import constriction


@pytest.fixture
def tiny_blocks(monkeypatch):
    monkeypatch.setattr(uniform, "BLOCK_ELEMENTS", 37)
    monkeypatch.setattr(entropy, "CHUNK", 53)


def _weights(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 0.05
    x[x.abs() < 0.01] = 0.0
    x.view(-1)[:3] = -0.0
    return x.to(dtype)


# --- references: one pass over the whole tensor --------------------------------------------------

def _reference_uniform(x, bits, symmetric, per_channel, group_size):
    layout = uniform.GroupLayout.for_shape(tuple(x.shape), per_channel=per_channel, group_size=group_size)
    lo, hi = uniform.level_range(bits, symmetric)
    g = layout.groups(x)
    gmin, gmax = torch.clamp(g.amin(dim=2), max=0.0), torch.clamp(g.amax(dim=2), min=0.0)
    scale, zero = uniform._minmax_params(gmin, gmax, bits, symmetric)
    half = False
    if layout.n_groups > 1:
        half = uniform.half_scales_fit(scale.to(torch.float16).to(torch.float32))
        if half:
            scale = scale.to(torch.float16).to(torch.float32)
            if not symmetric:
                zero = torch.clamp(lo - torch.round(gmin.reshape(-1) / scale.to(torch.float64)), lo, hi).to(torch.int64)
        valid = torch.ones_like(g, dtype=torch.bool)
        if layout.pad:
            valid[:, -1, layout.group - layout.pad:] = False
        scale, zero = uniform._refine_groups(g.reshape(-1, layout.group), valid.reshape(-1, layout.group), scale, zero,
                                             lo, hi, symmetric, half)
    m = x.reshape(layout.rows, layout.cols)
    levels = uniform.quantize(m, layout.expand(scale.to(torch.float64)), layout.expand(zero), lo, hi)
    return levels.reshape(x.shape), scale, zero, layout


def _reference_step(x, step, per_channel, group_size, lam):
    layout = uniform.GroupLayout.for_shape(tuple(x.shape), per_channel=per_channel, group_size=group_size)
    m = x.to(torch.float64).reshape(layout.rows, layout.cols).numpy()
    if layout.n_groups <= 1:
        codes = step_grid.code_for(np.array([step]))[: layout.n_groups]
    else:
        sums = (layout.groups(torch.from_numpy(m)) ** 2).sum(dim=2).reshape(-1).numpy()
        sizes = np.full(layout.groups_per_row, layout.group, dtype=np.float64)
        sizes[-1] -= layout.pad
        rms = np.sqrt(sums / np.tile(sizes, layout.rows))
        whole = float(np.sqrt(np.mean(m * m)))
        codes = step_grid.code_for(step * (np.where(rms > 0, rms / whole, 1.0) if whole > 0 else np.ones_like(rms)))
    t = m / layout.expand(torch.from_numpy(step_grid.steps_of(codes))).numpy()
    return rdo_round(t, lam), codes, layout


def _reference_stream(values: np.ndarray) -> bytes:
    """The entropy stream of docs/format.md from np.unique and a single coder call."""
    symbols, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    words = np.zeros(0, dtype=np.uint32)
    if symbols.size > 1:
        coder = constriction.stream.stack.AnsCoder()
        model = constriction.stream.model.Categorical(counts / float(counts.sum()), perfect=False)
        coder.encode_reverse(inverse.reshape(-1).astype(np.int32), model)
        words = coder.get_compressed()
    head = np.array([symbols.size], "<u4").tobytes() + symbols.astype("<i4").tobytes() + counts.astype("<u8").tobytes()
    return head + np.array([values.size], "<u8").tobytes() + np.array([words.size], "<u4").tobytes() + words.astype("<u4").tobytes()


def _reference_packed(values: np.ndarray, lo: int, width: int) -> bytes:
    u = (values.astype(np.int64) - lo).astype(np.uint32)
    return np.packbits(((u[:, None] >> np.arange(width, dtype=np.uint32)) & 1).astype(np.uint8).reshape(-1),
                       bitorder="little").tobytes()


# --- blocks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows,cols,group", [(5, 10, 3), (3, 100, 100), (1, 100, 100), (3, 100, 7), (4, 9, 9),
                                             (7, 1, 1), (2, 64, 16), (1, 5, 5)])
@pytest.mark.parametrize("limit", [1, 5, 30, 1000])
def test_blocks_cover_in_order_with_whole_groups_where_asked(rows, cols, group, limit):
    layout = uniform.GroupLayout(rows, cols, group)
    for whole in (False, True):
        blocks = layout.blocks(limit, whole_groups=whole)
        assert blocks[0].start == 0 and blocks[-1].stop == rows * cols
        assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))
        for b in blocks:
            assert b.stop - b.start == b.shape[0] * b.shape[1] > 0
            assert b.row1 - b.row0 == 1 or (b.col0, b.col1) == (0, cols)  # whole rows, or part of one
            first, last = layout.group_span(b)
            if whole:
                assert b.col0 % group == 0 and (b.col1 % group == 0 or b.col1 == cols)
                assert last - first >= min(2, layout.n_groups)
            else:
                assert b.stop - b.start <= max(limit, cols if b.col1 - b.col0 == cols and group <= limit else limit)
                assert last - first == 1 or b.col0 % group == 0  # a piece of a group never straddles two


# --- the quantizers against one whole-tensor pass ----------------------------------------------

UNIFORM = [(bits, sym, pc, gs) for bits in (1, 2, 4, 8, 16) for sym in (False, True) if not (sym and bits == 1)
           for pc, gs in ((False, None), (True, None), (False, 7), (False, 16), (False, 1))]


@pytest.mark.parametrize("bits,symmetric,per_channel,group_size", UNIFORM)
@pytest.mark.parametrize("shape", [(13, 29), (6, 3, 5, 5)])
def test_uniform_blocks_equal_one_pass(tiny_blocks, bits, symmetric, per_channel, group_size, shape):
    x = _weights(shape, seed=bits)
    q = uniform.quantize_tensor(x, bits, symmetric=symmetric, per_channel=per_channel, group_size=group_size)
    levels, scale, zero, layout = _reference_uniform(x, bits, symmetric, per_channel, group_size)
    assert torch.equal(q.levels.to(torch.int64), levels) and torch.equal(q.scale, scale) and torch.equal(q.zero_point, zero)
    want = uniform.dequantize(levels.reshape(layout.rows, layout.cols), layout.expand(scale.to(torch.float64)),
                              layout.expand(zero), x.dtype).reshape(x.shape)
    assert torch.equal(q.dequantize(), want)


@pytest.mark.parametrize("lam", [0.0, HIGH_RATE_LAMBDA, 0.7])
@pytest.mark.parametrize("per_channel,group_size", [(False, None), (True, None), (False, 7), (False, 16)])
@pytest.mark.parametrize("step", [0.002, 0.03])
def test_step_blocks_equal_one_pass(tiny_blocks, lam, per_channel, group_size, step):
    x = _weights((13, 29), seed=3)
    q = step_grid.step_quantize(x, step, per_channel=per_channel, group_size=group_size, lam=lam)
    levels, codes, layout = _reference_step(x, step, per_channel, group_size, lam)
    assert np.array_equal(q.levels, levels) and np.array_equal(q.codes, codes)
    steps = layout.expand(torch.from_numpy(step_grid.steps_of(codes)))
    want = (steps * torch.from_numpy(levels).to(torch.float64).reshape(layout.rows, layout.cols)).to(x.dtype)
    assert torch.equal(q.dequantize(), want.reshape(x.shape))


def test_step_too_small_is_refused_in_any_block(tiny_blocks):
    x = torch.zeros(20, 20)
    x[19, 19] = 1.0  # only the last block holds the weight that overflows
    with pytest.raises(InputError, match="too small"):
        step_grid.step_quantize(x, 1e-9)


def test_l2_blocks_equal_one_pass(tiny_blocks):
    x = _weights((13, 29), seed=4)
    e, s = 0.01, 0.004
    e64, s64 = torch.tensor(e, dtype=torch.float32).double(), torch.tensor(s, dtype=torch.float32).double()
    want = torch.round(l2.transform(x.double(), e64, s64)).to(torch.int64)
    assert torch.equal(l2.levels(x, e, s), want)
    assert torch.equal(l2.levels(x, e, s, dtype=torch.int32), want.to(torch.int32))
    n64 = want.double()
    rec = torch.sign(n64) * (float(e64) + (n64.abs() - 0.5) * float(s64))
    assert torch.equal(l2.dequantize_levels(want, e, s), torch.where(n64 == 0, 0.0, rec).float())


# --- streams -----------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [
    np.random.default_rng(0).integers(-8, 8, 1001).astype(np.int8),
    np.random.default_rng(1).integers(-128, 128, 999).astype(np.int8),  # max - min = 255 in int8
    np.random.default_rng(2).geometric(0.2, 777).astype(np.int32) - 3,
    np.array([-(2**30), 2**30, 0, 5, 2**30, -7] * 40, dtype=np.int64),  # the sorting path
    np.full(300, 9, dtype=np.int16),
], ids=["int8", "int8-full-range", "int32", "wide", "constant"])
def test_streams_equal_one_pass(tiny_blocks, values):
    stream = entropy.encode_symbols(values)
    assert stream == _reference_stream(values)
    assert entropy.encode_if_smaller(values, len(stream) + 1) == stream
    sizes = _cuts(values.size, [1, 52, 0, 107, 53])
    parts = list(entropy.decode_slices(stream, sizes, expected_count=values.size))
    assert [p.size for p in parts] == sizes and np.array_equal(np.concatenate(parts), values)
    symbols, counts = entropy.symbol_counts(values)
    ref_symbols, ref_counts = np.unique(values, return_counts=True)
    assert np.array_equal(symbols, ref_symbols) and np.array_equal(counts, ref_counts)


def _cuts(n: int, pattern: list[int]) -> list[int]:
    """Slice sizes repeating ``pattern`` (zeros included), the last one cut to add up to ``n``."""
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(min(pattern[len(sizes) % len(pattern)], n - sum(sizes)))
    return sizes


def test_damage_is_found_after_the_last_slice(tiny_blocks):
    values = np.random.default_rng(5).integers(0, 5, 500)
    stream = bytearray(entropy.encode_symbols(values))
    stream[-8] ^= 0x10  # a flipped bit in a word: wrong values, caught by the end state or histogram
    with pytest.raises(MrcFormatError):
        list(entropy.decode_slices(bytes(stream), [100] * 5, expected_count=500))


@pytest.mark.parametrize("width_values", [
    np.random.default_rng(0).integers(-3, 4, 203),  # 3 bits: slices start inside bytes
    np.random.default_rng(1).integers(0, 2**13, 77),
    np.random.default_rng(2).integers(-(2**20), 2**20, 61),
])
def test_packed_levels_equal_one_pass(tiny_blocks, width_values):
    values = width_values
    lo, width = int(values.min()), int(values.max() - values.min()).bit_length()
    assert pack_bits(values, lo, width) == _reference_packed(values, lo, width)
    section = b"\x01" + np.array([lo], "<i4").tobytes() + bytes([width]) + _reference_packed(values, lo, width)
    assert np.array_equal(decode_levels(memoryview(section), values.size), values)
    parts = list(level_slices(memoryview(section), values.size, _cuts(values.size, [5, 1, 0, 11, 13])))
    assert np.array_equal(np.concatenate(parts), values)


# --- the codec end to end ----------------------------------------------------------------------

CODEC_OPTIONS = [
    {"bits": 4, "group_size": 7}, {"bits": 3, "per_channel": True}, {"bits": 8}, {"bits": 2, "symmetric": True, "group_size": 16},
    {"bits": 16, "per_channel": True}, {"scheme": "step", "step": 0.004, "lam": HIGH_RATE_LAMBDA, "group_size": 7},
    {"scheme": "step", "step": 0.01}, {"scheme": "l2", "edge": 0.01, "step": 0.005},
]


@pytest.mark.parametrize("options", CODEC_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("shape,dtype", [((13, 29), torch.float32), ((6, 3, 5, 5), torch.bfloat16), ((3, 1), torch.float16)])
def test_codec_payload_and_decode_independent_of_blocks(monkeypatch, options, shape, dtype):
    x = _weights(shape, dtype, seed=7)
    codec = codecs.get("quant")
    whole_payload, whole_params = codec.encode(x, options)
    record = TensorRecord("w", shape, str(dtype).removeprefix("torch."), "quant", whole_params, 0, len(whole_payload), 0)
    whole = codec.decode(whole_payload, record)
    monkeypatch.setattr(uniform, "BLOCK_ELEMENTS", 5)
    monkeypatch.setattr(entropy, "CHUNK", 3)
    payload, params = codec.encode(x, options)
    assert payload == whole_payload and params == whole_params
    assert torch.equal(codec.decode(payload, record), whole)


def test_level_section_of_narrow_levels_equals_int64(tiny_blocks):
    values = np.random.default_rng(9).integers(-8, 8, 4000)
    assert encode_levels(values.astype(np.int8)) == encode_levels(values)
    small = np.array([-8, 7, 0], dtype=np.int8)  # packed wins on a tiny tensor
    assert encode_levels(small)[0] == 1 and encode_levels(small) == encode_levels(small.astype(np.int64))
