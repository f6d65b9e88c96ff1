"""docs/format.md is enough to decode: an independent decoder written from §4.2 and §4.4 alone.

Everything above the tests (the ``spec_*`` functions) is a decoder -- and, for §4.2, an encoder --
written from the text of docs/format.md only, on plain Python integers, IEEE float64 and numpy:
it uses neither constriction nor any of mlcompress's code. The tests feed it streams and payloads
written by mlcompress's real encoders and require the same symbols, the same words and
bit-identical tensors as mlcompress's own decoder. If the spec and the code drift apart, they fail.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch

# --------------------------------------------------------------------------------------------
# §4.2 Entropy stream, from the spec
# --------------------------------------------------------------------------------------------

PRECISION = 24  # probability precision (bits)
WORD_BITS = 32  # ANS word size (bits)
STATE_BITS = 64  # ANS state size (bits)
ONE = 1 << PRECISION  # total of the quantised frequencies
LOW = 1 << (STATE_BITS - WORD_BITS)  # the state is kept at or above this while words remain
WORD_MASK = (1 << WORD_BITS) - 1


class SpecError(ValueError):
    """The independent decoder rejects a stream or payload."""


def spec_cdf(counts: list[int]) -> list[int]:
    """The quantised cumulative table cdf[0..N] (cdf[0] = 0, cdf[N] = 2^24) of §4.2."""
    n_table = len(counts)
    if not 2 <= n_table < ONE - 1:
        raise SpecError("an ANS model needs 2 <= n_table < 2^24 - 1")
    total = float(sum(counts))
    probs = [float(c) / total for c in counts]  # IEEE float64 division, correctly rounded
    norm = 0.0
    for p in probs:  # left to right, one rounding per addition
        norm += p
    scale = float(ONE - n_table) / norm
    cdf = []
    running = 0.0
    for i, p in enumerate(probs):
        cdf.append(int(running * scale) + i)  # int() truncates toward zero
        running += p
    cdf.append(ONE)
    return cdf


def _find_symbol(cdf: list[int], quantile: int) -> int:
    lo, hi = 0, len(cdf) - 1  # invariant: cdf[lo] <= quantile < cdf[hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cdf[mid] <= quantile:
            lo = mid
        else:
            hi = mid
    return lo


def spec_rans_decode(words: list[int], cdf: list[int], count: int) -> list[int]:
    """Decode ``count`` table indices from the words (in stored order), checking the end state."""
    pos = len(words)
    state = 0
    if pos:
        pos -= 1
        state = words[pos]
        if state == 0:
            raise SpecError("the last word of a stream is never zero")
        if pos:
            pos -= 1
            state = (state << WORD_BITS) | words[pos]
    out = []
    mask = ONE - 1
    for _ in range(count):
        quantile = state & mask
        s = _find_symbol(cdf, quantile)
        state = (state >> PRECISION) * (cdf[s + 1] - cdf[s]) + (quantile - cdf[s])
        if state < LOW and pos:
            pos -= 1
            state = (state << WORD_BITS) | words[pos]
        out.append(s)
    if state != 0 or pos != 0:
        raise SpecError("the coder is not empty after the declared number of values")
    return out


def spec_rans_encode(indices: list[int], cdf: list[int]) -> list[int]:
    """The informative encoder of §4.2 (values in reverse order, then the final state)."""
    words: list[int] = []
    state = 0
    for s in reversed(indices):
        freq = cdf[s + 1] - cdf[s]
        if (state >> (STATE_BITS - PRECISION)) >= freq:
            words.append(state & WORD_MASK)
            state >>= WORD_BITS
        state = ((state // freq) << PRECISION) | (cdf[s] + state % freq)
    while state:
        words.append(state & WORD_MASK)
        state >>= WORD_BITS
    return words


def spec_decode_stream(data: bytes, expected: int | None = None) -> list[int]:
    """A whole §4.2 stream -> the list of symbol values."""
    if len(data) < 4:
        raise SpecError("truncated")
    (n_table,) = struct.unpack_from("<I", data, 0)
    pos = 4
    if len(data) < pos + 12 * n_table + 12:
        raise SpecError("truncated table")
    symbols = list(struct.unpack_from(f"<{n_table}i", data, pos))
    pos += 4 * n_table
    counts = list(struct.unpack_from(f"<{n_table}Q", data, pos))
    pos += 8 * n_table
    n_values, n_words = struct.unpack_from("<QI", data, pos)
    pos += 12
    if len(data) != pos + 4 * n_words:
        raise SpecError("length does not match n_words")
    if expected is not None and n_values != expected:
        raise SpecError("unexpected value count")
    if any(b <= a for a, b in zip(symbols, symbols[1:])) or any(c == 0 for c in counts):
        raise SpecError("table not strictly increasing / zero count")
    if sum(counts) != n_values or (n_values > 0) != (n_table > 0):
        raise SpecError("counts do not add up")
    if n_table <= 1:
        if n_words:
            raise SpecError("a one-symbol stream carries no words")
        return [symbols[0]] * n_values if n_table else []
    words = list(struct.unpack_from(f"<{n_words}I", data, pos))
    index = spec_rans_decode(words, spec_cdf(counts), n_values)
    hist = [0] * n_table
    for i in index:
        hist[i] += 1
    if hist != counts:
        raise SpecError("decoded histogram differs from the table")
    return [symbols[i] for i in index]


# --------------------------------------------------------------------------------------------
# §4.4 `quant`, from the spec
# --------------------------------------------------------------------------------------------


def spec_decode_levels(section: bytes, count: int) -> np.ndarray:
    if not section:
        raise SpecError("no level section")
    mode = section[0]
    if mode == 0:
        return np.array(spec_decode_stream(section[1:], count), dtype=np.int64)
    if mode == 1:
        if len(section) < 6:
            raise SpecError("packed header truncated")
        lo, width = struct.unpack_from("<iB", section, 1)
        if width > 32 or len(section) != 6 + (count * width + 7) // 8:
            raise SpecError("packed section has the wrong length")
        packed = section[6:]
        mask = (1 << width) - 1
        out = []
        for i in range(count):  # bit n of the stream is bit n % 8 of byte n // 8
            first = i * width
            chunk = int.from_bytes(packed[first // 8 : (first + width + 7) // 8 + 1], "little")
            out.append(lo + ((chunk >> (first % 8)) & mask))
        return np.array(out, dtype=np.int64)
    raise SpecError("unknown level mode")


def _round_f64(x64: np.ndarray, dtype: str) -> np.ndarray:
    """float64 -> the stored dtype's bit patterns, by the spec's rounding rule."""
    if dtype == "float64":
        return x64.view(np.uint64)
    x32 = x64.astype(np.float32)  # round to nearest, ties to even
    if dtype == "float32":
        return x32.view(np.uint32)
    if dtype == "float16":
        return x32.astype(np.float16).view(np.uint16)  # second rounding, from float32
    if dtype == "bfloat16":
        u = x32.view(np.uint32).astype(np.uint64)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # nearest-even on the upper 16 bits (no NaN here)
        return r.astype(np.uint16)
    raise SpecError(f"not a float dtype: {dtype}")


def spec_decode_quant(payload: bytes, shape: tuple[int, ...], dtype: str, params: dict) -> np.ndarray:
    """A §4.4 payload -> the tensor's bit patterns (unsigned ints of the dtype's width), C order."""
    numel = math.prod(shape)
    if params["scheme"] == "l2":
        n = spec_decode_levels(payload, numel).astype(np.float64)
        e = float(np.float32(params["edge"]))
        s = float(np.float32(params["step"]))
        a = np.abs(n)
        out = np.sign(n) * (e + (a - 0.5) * s)
        out = np.where(a == 0, 0.0, out)
        return _round_f64(out, dtype).reshape(shape)
    if params["scheme"] == "step":
        rows, cols, group = params["rows"], params["cols"], params["group"]
        per_row = -(-cols // group) if cols else 0
        if rows * cols != numel:
            raise SpecError("layout does not match")
        cb = params["codes_bytes"]
        q = np.array(spec_decode_stream(payload[:cb], rows * per_row), dtype=np.int64)
        if q.size and (q.min() < -8192 or q.max() > 4095):
            raise SpecError("step code out of range")
        step = (64 + np.mod(q, 64)).astype(np.float64) * np.exp2(np.floor_divide(q, 64) - 6)
        n = spec_decode_levels(payload[cb:], numel)
        if n.size and np.abs(n).max() > 2**24 - 1:
            raise SpecError("level out of range")
        k = np.arange(numel)
        g = (k // cols) * per_row + (k % cols) // group if cols else np.zeros(0, np.int64)
        return _round_f64(step[g] * n.astype(np.float64), dtype).reshape(shape)
    assert params["scheme"] == "uniform"
    rows, cols, group = params["rows"], params["cols"], params["group"]
    per_row = -(-cols // group) if cols else 0
    n_groups = rows * per_row
    sb, zb = params["scale_bytes"], params["zp_bytes"]
    half = params.get("scale_dtype", "float32") == "float16"
    if sb != (2 if half else 4) * n_groups or rows * cols != numel:
        raise SpecError("layout does not match")
    scale = np.frombuffer(payload[:sb], dtype="<f2" if half else "<f4").astype(np.float32)
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        raise SpecError("bad scale")
    zero = np.array(spec_decode_stream(payload[sb : sb + zb], n_groups), dtype=np.int64)
    n = spec_decode_levels(payload[sb + zb :], numel)
    half = 1 << (params["bits"] - 1)
    lo, hi = (-(half - 1), half - 1) if params["symmetric"] else (-half, half - 1)
    if n.size and (n.min() < lo or n.max() > hi):
        raise SpecError("level out of range")
    r = np.arange(numel) // cols if cols else np.zeros(0, np.int64)
    c = np.arange(numel) % cols if cols else np.zeros(0, np.int64)
    g = r * per_row + c // group
    s64 = scale[g].astype(np.float64)
    out = s64 * (n.astype(np.float64) - zero[g].astype(np.float64))
    return _round_f64(out, dtype).reshape(shape)


# --------------------------------------------------------------------------------------------
# Tests against mlcompress's encoders (and its decoder as the reference)
# --------------------------------------------------------------------------------------------

from mlcompress import codecs  # noqa: E402
from mlcompress.codecs import entropy  # noqa: E402
from mlcompress.format.records import TensorRecord  # noqa: E402


# The §4.2 test vector (docs/format.md).
VECTOR_VALUES = [5, -2, 5, 5, 0, 5, -2, 5, 9, 5, 0, 5, 5, -2, 0, 5, 9, 5, 5, -2, 5, 0, 5, 5, 5, -2, 9, 5, 5, 0, 5, 5,
                 -2, 5, 5, 0, 5, 9, 5, -2]
VECTOR_WORDS = [0x2B48F2BD, 0x7E56C18B, 0x002001C0]


def _histogram_streams():
    rng = np.random.default_rng(20240611)
    cases = {
        "two-symbols": np.array([0, 1, 1, 0, 1, 1, 1], dtype=np.int64),
        "two-very-skewed": np.array([3] * 5000 + [-7], dtype=np.int64)[rng.permutation(5001)],
        "single-symbol": np.full(300, -4, dtype=np.int64),
        "single-value": np.array([12345], dtype=np.int64),
        "empty": np.zeros(0, dtype=np.int64),
        "uniform-16": rng.integers(0, 16, 3000),
        "geometric": rng.geometric(0.05, 4000) - 30,
        "zipf-wide": np.minimum(rng.zipf(1.3, 3000), 10**6) * rng.choice([-1, 1], 3000),
        "one-dominant-of-many": np.where(rng.random(4000) < 0.995, 0, rng.integers(-1000, 1000, 4000)),
        "int32-extremes": np.array([-(2**31), 2**31 - 1, 0, -1] * 25, dtype=np.int64),
        "trailing-index-0": np.array([1, 1, 2, 0, 0, 0, 0, 0], dtype=np.int64),
        "vector": np.array(VECTOR_VALUES, dtype=np.int64),
    }
    for k in range(6):  # random histograms with random alphabet sizes and Dirichlet weights
        size = int(rng.integers(2, 300))
        p = rng.dirichlet(np.full(size, 0.3))
        cases[f"dirichlet-{k}"] = rng.choice(np.arange(size) - size // 2, size=2500, p=p)
    return cases


_STREAMS = _histogram_streams()


@pytest.mark.parametrize("name", list(_STREAMS))
def test_entropy_stream_decodes_from_the_spec(name):
    values = _STREAMS[name]
    stream = entropy.encode_symbols(values)
    assert spec_decode_stream(stream, values.size) == values.tolist()
    # The informative encoder of the spec writes the very same words.
    (n_table,) = struct.unpack_from("<I", stream, 0)
    if n_table >= 2:
        counts = list(struct.unpack_from(f"<{n_table}Q", stream, 4 + 4 * n_table))
        symbols = list(struct.unpack_from(f"<{n_table}i", stream, 4))
        n_words = struct.unpack_from("<I", stream, 4 + 12 * n_table + 8)[0]
        words = list(struct.unpack_from(f"<{n_words}I", stream, 4 + 12 * n_table + 12))
        where = {v: i for i, v in enumerate(symbols)}
        assert spec_rans_encode([where[v] for v in values.tolist()], spec_cdf(counts)) == words


def test_entropy_stream_vector_from_the_doc():
    """The numbers printed in docs/format.md §4.2."""
    stream = entropy.encode_symbols(np.array(VECTOR_VALUES))
    assert spec_cdf([7, 6, 23, 4]) == [0, 2936013, 5452595, 15099493, 16777216]
    assert stream.hex() == (
        "04000000" "feffffff" "00000000" "05000000" "09000000"
        "0700000000000000" "0600000000000000" "1700000000000000" "0400000000000000"
        "2800000000000000" "03000000" "bdf2482b" "8bc1567e" "c0012000"
    )
    assert spec_rans_encode([{-2: 0, 0: 1, 5: 2, 9: 3}[v] for v in VECTOR_VALUES], spec_cdf([7, 6, 23, 4])) == VECTOR_WORDS
    assert spec_decode_stream(stream) == VECTOR_VALUES


def test_entropy_decoder_rejects_damage():
    values = _STREAMS["geometric"]
    stream = bytearray(entropy.encode_symbols(values))
    with pytest.raises(SpecError):
        spec_decode_stream(bytes(stream[:-4]))
    stream[-8] ^= 0x10  # a flipped bit in a word: wrong histogram or non-empty end state
    with pytest.raises(SpecError):
        spec_decode_stream(bytes(stream))


def test_two_symbol_table_extremes():
    """The smallest quantised frequency is 1 even for a probability far below 2^-24."""
    assert spec_cdf([1, 10**12]) == [0, 1, ONE]
    # The truncated boundary falls just short of 2^24 - 2, so the last symbol gets 2 slots.
    assert spec_cdf([10**12, 1]) == [0, ONE - 2, ONE]
    assert spec_cdf([1, 1]) == [0, ONE // 2, ONE]
    # Mirrors the mlcompress encoder on a 2-symbol table with a rare symbol at either end.
    for values in ([0] * 999 + [1], [1] + [0] * 999, [5] + [-5] * 998 + [5]):
        stream = entropy.encode_symbols(np.array(values))
        assert spec_decode_stream(stream) == values


# -- quant -----------------------------------------------------------------------------------

_QUANT_OPTIONS = [
    {"bits": 8},
    {"bits": 8, "symmetric": True},
    {"bits": 4, "per_channel": True},
    {"bits": 4, "per_channel": True, "symmetric": True},
    {"bits": 3, "group_size": 16, "symmetric": True},
    {"bits": 2, "group_size": 7},
    {"bits": 1},
    {"bits": 16, "per_channel": True},
    {"bits": 5, "group_size": 1000},
    {"scheme": "l2", "edge": 0.05, "step": 0.03},
    {"scheme": "l2", "edge": 0.3, "step": 0.001},
    {"scheme": "l2", "edge": 1e-4, "step": 0.2},
    {"scheme": "step", "step": 0.05},
    {"scheme": "step", "step": 0.003, "lam": 0.0},
    {"scheme": "step", "step": 0.02, "per_channel": True},
    {"scheme": "step", "step": 0.5, "group_size": 7},
]


def _tensors():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(12, 3, 5, 5, generator=g) * 0.1
    w[0, 0] = 0.0
    return {
        "conv": w,
        "fc16": (torch.randn(10, 33, generator=g) * 2).to(torch.float16),
        "bf16": (torch.randn(6, 40, generator=g)).to(torch.bfloat16),
        "f64": torch.randn(7, 9, generator=g, dtype=torch.float64) * 3,
        "heavy": torch.randn(64, 128, generator=g) ** 3,  # peaked levels: the ANS level mode, wide tables
        "vec": torch.randn(50, generator=g) + 0.5,
        "tiny": torch.tensor([[0.25, -1.0], [3.0, 0.0]]),
        "zeros": torch.zeros(4, 5),
        "scalar": torch.tensor(-0.7),
        "empty": torch.zeros(0, 3),
    }


_TENSORS = _tensors()


def _record(name, x, params, payload):
    dtype = str(x.dtype).removeprefix("torch.")
    return TensorRecord(name, tuple(x.shape), dtype, "quant", params, 0, len(payload), 0)


def _check_bit_identical(name, x, options):
    codec = codecs.encoder("quant")
    payload, params = codec.encode(x, options)
    params = json.loads(json.dumps(params))  # what a reader gets from the header
    rec = _record(name, x, params, payload)
    theirs = codec.decode(payload, rec)
    mine = spec_decode_quant(payload, rec.shape, rec.dtype, params)
    assert theirs.dtype == x.dtype and tuple(theirs.shape) == tuple(x.shape)
    assert _same_bits(mine, theirs)
    return payload, params


def _same_bits(mine: np.ndarray, theirs: torch.Tensor) -> bool:
    """``torch.equal`` on the bit patterns (so -0.0 vs 0.0 and NaN payloads count)."""
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[theirs.element_size()]
    return torch.equal(torch.from_numpy(mine.copy(order="C")).view(view), theirs.contiguous().view(view))


@pytest.mark.parametrize("options", _QUANT_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_quant_payload_decodes_bit_identically(options):
    for name, x in _TENSORS.items():
        _check_bit_identical(name, x, options)


def test_both_level_modes_are_exercised():
    seen = set()
    for name, x in _TENSORS.items():
        for options in _QUANT_OPTIONS:
            payload, params = codecs.encoder("quant").encode(x, options)
            start = {"l2": 0, "step": params.get("codes_bytes")}.get(params["scheme"],
                                                                       params.get("scale_bytes", 0) + params.get("zp_bytes", 0))
            seen.add((params["scheme"], payload[start], x.numel() > 0))
    assert seen >= {("uniform", 0, True), ("uniform", 1, True), ("l2", 0, True), ("l2", 1, True), ("step", 0, True),
                    ("step", 1, True)}


_DOC_X = torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.0, -0.75]])
_DOC_QUANT_VECTORS = [  # docs/format.md §4.4 "Test vectors": tensor, options, params, payload, float32 bits
    (_DOC_X, {"bits": 4, "per_channel": True},
     {"scheme": "uniform", "bits": 4, "symmetric": False, "rows": 2, "cols": 3, "group": 3, "scale_bytes": 4,
      "zp_bytes": 44, "scale_dtype": "float16"},
     "542e d731 02000000 fcffffff 02000000 0100000000000000 0100000000000000 0200000000000000 01000000"
     " 00008000 01 f8ffffff 04 0ffd04",
     [0x3EFD2000, 0xBF7D2000, 0x3E97E000, 0x40007A00, 0x00000000, 0xBF3AE000]),
    (_DOC_X, {"bits": 3, "symmetric": True, "group_size": 2},
     {"scheme": "uniform", "bits": 3, "symmetric": True, "rows": 2, "cols": 3, "group": 2, "scale_bytes": 8,
      "zp_bytes": 28, "scale_dtype": "float16"},
     "ec34 552d 5539 0034 01000000 00000000 0400000000000000 0400000000000000 00000000"
     " 01 fdffffff 03 853d00",
     [0x3F1D8000, 0xBF6C4000, 0x3E7FF000, 0x3FFFF000, 0x00000000, 0xBF400000]),
    (torch.tensor([0.0, 0.04, -0.2, 0.11, -0.03]), {"scheme": "l2", "edge": 0.05, "step": 0.03},
     {"scheme": "l2", "edge": 0.05000000074505806, "step": 0.029999999329447746},
     "01 faffffff 04 668006",
     [0x00000000, 0x00000000, 0xBE5C28F6, 0x3DC28F5C, 0x00000000]),
    (_DOC_X, {"scheme": "step", "step": 0.25},
     {"scheme": "step", "rows": 1, "cols": 6, "group": 6, "codes_bytes": 28},
     "01000000 80ffffff 0100000000000000 0100000000000000 00000000 01 fcffffff 04 06c514",
     [0x3F000000, 0xBF800000, 0x3E800000, 0x40000000, 0x00000000, 0xBF400000]),
]


@pytest.mark.parametrize("vector", range(len(_DOC_QUANT_VECTORS)))
def test_quant_vectors_from_the_doc(vector):
    x, options, params, payload_hex, bits = _DOC_QUANT_VECTORS[vector]
    payload, got_params = codecs.encoder("quant").encode(x, options)
    assert json.loads(json.dumps(got_params)) == params
    assert payload.hex() == payload_hex.replace(" ", "")
    assert spec_decode_quant(payload, tuple(x.shape), "float32", params).reshape(-1).tolist() == bits
    _check_bit_identical("doc", x, options)


def test_l2_params_are_taken_at_float32():
    """A header number that is not a float32 value (any writer may store 0.1) is rounded first."""
    codec = codecs.get("quant")
    x = _TENSORS["conv"]
    payload, _ = codec.encode(x, {"scheme": "l2", "edge": 0.1, "step": 0.03})
    cases = [({"scheme": "l2", "edge": 0.1, "step": 0.03}, payload, x)]
    # edge 1 + 0.499 ulp is float32 1.0: n = 1 gives 1.0 + tiny, but 1 + 1 ulp from the unrounded edge
    from mlcompress.codecs.quant import encode_levels

    crafted = encode_levels(np.array([0, 1, -1, 2, 3]))
    cases.append(({"scheme": "l2", "edge": 1 + 0.499 * 2**-23, "step": 0.01 * 2**-23}, crafted, torch.zeros(5)))
    for params, data, like in cases:
        rec = _record("w", like, params, data)
        mine = spec_decode_quant(data, rec.shape, rec.dtype, params)
        assert _same_bits(mine, codec.decode(data, rec))
    assert mine[1] == 0x3F800000  # 1.0f


def test_l2_operation_order_float64():
    """float64 output keeps every rounding of ``e + ((|n| - 0.5) * s)``; other orders differ.

    With ``e`` and ``s`` many binades apart the float64 steps are not exact, and e.g.
    ``(e - 0.5 s) + |n| s`` gives other bits (checked below for these parameters)."""
    from mlcompress.codecs.quant import encode_levels

    e = float(np.array([0x3F821D94], dtype=np.uint32).view(np.float32)[0])  # 1.0165276...
    st = float(np.array([0x30E8193D], dtype=np.uint32).view(np.float32)[0])  # 1.6887...e-09
    levels = np.arange(-300, 301)
    payload = encode_levels(levels)
    params = {"scheme": "l2", "edge": e, "step": st}
    rec = TensorRecord("w", (levels.size,), "float64", "quant", params, 0, len(payload), 0)
    mine = spec_decode_quant(payload, rec.shape, rec.dtype, params)
    assert _same_bits(mine, codecs.get("quant").decode(payload, rec))
    a = np.abs(levels).astype(np.float64)
    other = np.where(a == 0, 0.0, np.sign(levels) * ((e - 0.5 * st) + a * st))
    assert not np.array_equal(other.view(np.uint64), mine)


def test_quant_through_a_file(tmp_path):
    from mlcompress.container import encode_tensor, open_mrc, write_encoded

    t = {"a": _TENSORS["conv"], "b": _TENSORS["fc16"]}
    path = write_encoded(tmp_path / "q.mrc", [encode_tensor(n, x, "quant", {"bits": 4, "per_channel": True})
                                              for n, x in t.items()], {})
    f = open_mrc(path)
    for name, x in t.items():
        rec = f.record(name)
        payload = bytes(f.payload(name))
        mine = spec_decode_quant(payload, tuple(rec.shape), rec.dtype, rec.params)
        assert _same_bits(mine, f.tensor(name))


def _direct_bits(x64: float, dtype: str) -> int:
    """One rounding, float64 -> half precision, nearest-even (NOT the spec's rule)."""
    if dtype == "float16":
        return int(np.array([x64]).astype(np.float16).view(np.uint16)[0])  # numpy rounds once
    u = int(np.array([x64]).view(np.uint64)[0])
    r = (u + (1 << 44) - 1 + ((u >> 45) & 1)) >> 45 << 45  # nearest-even to 7 mantissa bits
    return int(np.array([r], dtype=np.uint64).view(np.float64).astype(np.float32).view(np.uint32)[0] >> 16)


# float32 scale bits and a level whose exact product lies just off a half-precision tie (found by
# a search): float32 rounding moves it onto the tie, which then rounds to even -- up in the first
# case of each dtype, down in the second.
_HALF_CASES = [
    ("float16", 0x3B5D93AC, 28089),  # 94.96874924... -> fp16 95.0 (one rounding: 94.9375)
    ("float16", 0x3ACCBDB2, 24297),  # 37.95312508... -> fp16 37.9375 (one rounding: 37.96875)
    ("bfloat16", 0x3BEB7CB7, 2496),  # 17.93749907... -> bf16 18.0 (one rounding: 17.875)
    ("bfloat16", 0x3C0BCF17, 9170),  # 78.25000139... -> bf16 78.0 (one rounding: 78.5)
]


@pytest.mark.parametrize("dtype,scale_bits,level", _HALF_CASES)
def test_half_precision_rounds_through_float32(dtype, scale_bits, level):
    """fp16/bf16: float64 -> float32 -> dtype, two roundings (the spec's rule), not one."""
    from mlcompress.codecs.quant import encode_levels

    scale = np.array([scale_bits], dtype="<u4").view("<f4")
    zps = entropy.encode_symbols(np.zeros(1, dtype=np.int64))
    payload = scale.tobytes() + zps + encode_levels(np.array([level]))
    params = {"scheme": "uniform", "bits": 16, "symmetric": False, "rows": 1, "cols": 1, "group": 1,
              "scale_bytes": 4, "zp_bytes": len(zps)}
    rec = TensorRecord("t", (1,), dtype, "quant", params, 0, len(payload), 0)
    theirs = int(codecs.get("quant").decode(payload, rec).view(torch.int16).numpy().view(np.uint16)[0])
    mine = int(spec_decode_quant(payload, (1,), dtype, params)[0])
    assert mine == theirs
    assert _direct_bits(float(scale[0]) * level, dtype) != mine  # the case tells the two rules apart
