"""The ``lossless2`` codec: bit-exact for every dtype and bit pattern, the same bytes for any
thread count, old ``lossless`` files still decoding, and damaged payloads refused in one line.

Equality is checked on bit patterns (tests/bitexact.py), never with ``==``.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from bit_patterns import (ALL_DTYPES, FLOAT_DTYPES, INT_DTYPES, SPECIALS, from_bits, integer_extremes,
                          random_tensor)
from bitexact import assert_bit_exact, assert_same_tensors

from mlcompress import codecs
from mlcompress.assembly import lossless_codec, smallest_lossless
from mlcompress.checkpoint import load_checkpoint
from mlcompress.cli import main
from mlcompress.codecs.lossless2 import CHUNK, MAX_CHUNK, PLANES
from mlcompress.container import TensorRecord, open_mrc, write_mrc
from mlcompress.errors import CodecError, MrcFormatError, UsageError
from mlcompress.format.dtypes import dtype_name
from mlcompress.lossless import encode_lossless

CODEC = codecs.get("lossless2")
#: Options that make lossless2 use several chunks on small test tensors; the old codec takes none.
SMALL_CHUNKS = {"lossless": {}, "lossless2": {"chunk": 1000}}


def record(t: torch.Tensor, params: dict, length: int) -> TensorRecord:
    return TensorRecord("w", tuple(t.shape), dtype_name(t.dtype), "lossless2", params, 0, length, 0)


def roundtrip(t: torch.Tensor, threads: int = 1, **options) -> torch.Tensor:
    """Encode and decode through the codec alone, validating the record as a reader would."""
    payload, params = CODEC.encode(t, {"threads": threads, **options})
    rec = record(t, params, len(payload))
    CODEC.check(rec)
    return CODEC.decode(bytes(payload), rec, threads=threads)


# -- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [CHUNK, 1000, 1], ids=["default-chunk", "chunk-1000", "chunk-1"])
def test_random_values_roundtrip_bit_exact(dtype, chunk):
    t = random_tensor(dtype, (37, 29) if chunk > 1 else (5, 7))
    assert_bit_exact(roundtrip(t, chunk=chunk), t)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_special_values_roundtrip_bit_exact(dtype):
    special = from_bits(SPECIALS[dtype], dtype)
    # Mixed into ordinary weights so the exponent plane goes through zstd, split over chunks.
    t = torch.cat([random_tensor(dtype, (3000,)), special.repeat(50), random_tensor(dtype, (3000,), seed=1)])
    payload, params = CODEC.encode(t, {"chunk": 2048})
    lengths = np.frombuffer(bytes(payload), "<u4", count=4 * len(PLANES[dtype_name(dtype)]))
    assert (lengths < 2048 * np.array([w for _, w in PLANES[dtype_name(dtype)]] * 4)).any()  # some zstd planes
    out = roundtrip(t, chunk=2048)
    assert_bit_exact(out, t)
    nan_bits = {out[3000 + i:3001 + i].view(torch.uint8).numpy().tobytes() for i in range(len(SPECIALS[dtype]))
                if torch.isnan(out[3000 + i].float())}
    assert len(nan_bits) == 5


def roundtrip_with(name: str, t: torch.Tensor) -> torch.Tensor:
    """Round trip through the codec ``name`` alone (either lossless codec)."""
    codec = codecs.get(name)
    payload, params = codec.encode(t.contiguous(), SMALL_CHUNKS[name])
    rec = TensorRecord("t", tuple(t.shape), dtype_name(t.dtype), name, params, 0, len(payload), 0)
    codec.check(rec)
    return codec.decode(bytes(payload), rec)


@pytest.mark.parametrize("name", ["lossless", "lossless2"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_special_values_alone_roundtrip(name, dtype):
    t = from_bits(SPECIALS[dtype], dtype)
    assert_bit_exact(roundtrip_with(name, t), t)


@pytest.mark.parametrize("name", ["lossless", "lossless2"])
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_integer_extremes_roundtrip(name, dtype):
    t = integer_extremes(dtype, 400)
    assert_bit_exact(roundtrip_with(name, t), t)


@pytest.mark.parametrize("name", ["lossless", "lossless2"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0,), (3, 0), ()], ids=["empty", "3x0", "scalar"])
def test_empty_and_scalar_roundtrip(name, dtype, shape):
    t = random_tensor(dtype, shape, seed=3)
    out = roundtrip_with(name, t)
    assert_bit_exact(out, t)
    assert out.dim() == len(shape)


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from([d for d in ALL_DTYPES if d != torch.bool]), chunk=st.integers(1, 40),
       data=st.data())
def test_any_bit_pattern_roundtrips(dtype, chunk, data):
    """Every bit pattern of every dtype (NaN payloads, subnormals, -0.0 included) survives."""
    bits = 8 * torch.empty(0, dtype=dtype).element_size()
    words = data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=0, max_size=120))
    t = from_bits(words, dtype)
    assert_bit_exact(roundtrip(t, chunk=chunk), t)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_non_contiguous_input_through_a_file(dtype, tmp_path):
    base = random_tensor(dtype, (24, 40), seed=5)
    views = {"transposed": base.t(), "strided": base[::3, 1::2], "expanded": base[:1].expand(5, 40)}
    write_mrc(tmp_path / "nc.mrc", views, lambda name, t: ("lossless2", {"chunk": 64}), {})
    assert_same_tensors(open_mrc(tmp_path / "nc.mrc").tensors(), views)


# -- threads ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_same_bytes_for_any_thread_count(dtype):
    t = random_tensor(dtype, (5003,), seed=11)
    payloads = [bytes(CODEC.encode(t, {"threads": n, "chunk": 512})[0]) for n in (1, 2, 4)]
    assert payloads[0] == payloads[1] == payloads[2]
    rec = record(t, {"chunk": 512}, len(payloads[0]))
    for n in (1, 2, 4):
        assert_bit_exact(CODEC.decode(payloads[0], rec, threads=n), t)


def test_same_file_for_any_thread_count_through_the_api(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"big": (torch.randn(3 * CHUNK + 17, generator=g) * 0.02).bfloat16(),
               "w": torch.randn(700, 300, generator=g) * 0.1, "b": torch.zeros(300), "n": torch.tensor(7)}
    files = []
    for n in (1, 2, 4):
        path = tmp_path / f"t{n}.mrc"
        encode_lossless("model.pt", path, tensors=tensors, threads=n)
        files.append(path.read_bytes())
        for threads in (1, 2):
            assert_same_tensors(open_mrc(path).tensors(threads=threads), tensors)
    assert files[0] == files[1] == files[2]
    # lossless3 is the default for float tensors when its C extension is built (tests/test_lossless3.py)
    assert {r.name: r.codec for r in open_mrc(tmp_path / "t1.mrc").records}["big"] == lossless_codec(tensors["big"])


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_bad_thread_counts_are_usage_errors(threads):
    t = random_tensor(torch.float32, (100,))
    with pytest.raises(UsageError, match="threads must be a positive integer"):
        CODEC.encode(t, {"threads": threads})


def test_unknown_options_and_bad_chunks_are_codec_errors():
    t = random_tensor(torch.float32, (100,))
    with pytest.raises(CodecError, match="threads and chunk"):
        CODEC.encode(t, {"level": 3})
    for chunk in (0, MAX_CHUNK + 1, 2.0, True):
        with pytest.raises(CodecError, match="chunk must be an integer"):
            CODEC.encode(t, {"chunk": chunk})


# -- what gets stored -------------------------------------------------------------------------

def test_compresses_trained_like_weights():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300_000, generator=g) * 0.05
    for dtype, least in ((torch.float32, 1.18), (torch.bfloat16, 1.45)):
        t = w.to(dtype)
        payload, _ = CODEC.encode(t, {})
        assert t.numel() * t.element_size() / len(payload) > least
        assert_bit_exact(roundtrip(t), t)


def test_constant_and_upcast_tensors_are_tiny():
    assert len(CODEC.encode(torch.full((100_000,), 0.125), {})[0]) < 200
    # bfloat16 values stored as float32: the two low bytes are all zero and cost nothing
    g = torch.Generator().manual_seed(1)
    upcast = (torch.randn(100_000, generator=g) * 0.05).bfloat16().float()
    assert len(CODEC.encode(upcast, {})[0]) < 0.4 * upcast.numel() * 4


def test_incompressible_planes_are_stored_raw():
    t = torch.randint(0, 256, (50_000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    payload, params = CODEC.encode(t, {})
    assert params == {"chunk": CHUNK}
    assert bytes(payload) == np.array([50_000], "<u4").tobytes() + t.numpy().tobytes()


def test_smallest_lossless_picks_lossless2_or_raw():
    g = torch.Generator().manual_seed(2)
    # float32, bfloat16, float16 get lossless3 when its C extension is built (tests/test_lossless3.py)
    assert smallest_lossless("w", torch.randn(10_000, generator=g).double() * 0.05).codec == "lossless2"
    assert smallest_lossless("i", torch.randint(-50, 50, (10_000,), generator=g)).codec == "lossless2"
    w = torch.randn(10_000, generator=g) * 0.05
    assert smallest_lossless("w", w).codec == lossless_codec(w)
    assert smallest_lossless("b", torch.randn(3, generator=g)).codec == "raw"


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_planes_are_disjoint_byte_ranges_covering_each_element(dtype):
    name = dtype_name(dtype)
    size = torch.empty(0, dtype=dtype).element_size()
    covered = sorted(b for first, width in PLANES[name] for b in range(first, first + width))
    assert covered == list(range(size))
    assert [first for first, _ in PLANES[name]] == sorted((first for first, _ in PLANES[name]), reverse=True)


# -- old files --------------------------------------------------------------------------------

def test_old_lossless_tensors_still_decode_beside_new_ones(tmp_path):
    g = torch.Generator().manual_seed(3)
    tensors = {"old": torch.randn(40, 50, generator=g) * 0.05, "new": torch.randn(40, 50, generator=g) * 0.05}
    plan = {"old": ("lossless", {}), "new": ("lossless2", {})}
    write_mrc(tmp_path / "mixed.mrc", tensors, plan, {})
    mrc = open_mrc(tmp_path / "mixed.mrc")
    assert {r.name: r.codec for r in mrc.records} == {"old": "lossless", "new": "lossless2"}
    assert_same_tensors(mrc.tensors(threads=2), tensors)


# -- damage -----------------------------------------------------------------------------------

def _encoded(dtype=torch.float32, n=6000, chunk=1024):
    t = random_tensor(dtype, (n,), seed=4)
    payload, params = CODEC.encode(t, {"chunk": chunk})
    return t, bytearray(payload), params


@pytest.mark.parametrize(
    "params",
    [{}, {"chunk": 1024, "extra": 1}, {"chunk": 0}, {"chunk": -3}, {"chunk": True}, {"chunk": 1.5},
     {"chunk": MAX_CHUNK + 1}, {"chunk": "1024"}, {"planes": []}],
    ids=["missing", "extra-key", "zero", "negative", "bool", "float", "too-big", "string", "old-params"])
def test_check_rejects_malformed_params(params):
    t = random_tensor(torch.float32, (10,))
    with pytest.raises(MrcFormatError, match="lossless2 tensor 'w'"):
        CODEC.check(record(t, params, 52))


def test_check_rejects_impossible_lengths():
    t, payload, params = _encoded()
    table = 4 * 6 * 3
    for length in (table - 1, table + 6000 * 4 + 1):
        with pytest.raises(MrcFormatError, match="cannot hold"):
            CODEC.check(record(t, params, length))
    with pytest.raises(MrcFormatError, match="cannot hold"):
        CODEC.check(record(torch.zeros(0), params, 8))


def _decode_error(t, params, payload, match):
    rec = record(t, params, len(payload))
    CODEC.check(rec)
    with pytest.raises(MrcFormatError, match=match) as info:
        CODEC.decode(bytes(payload), rec, threads=2)
    assert "\n" not in info.value.one_line()


def test_decode_rejects_a_plane_longer_than_its_raw_bytes():
    t, payload, params = _encoded()
    lengths = np.frombuffer(payload, "<u4", count=18).copy()
    moved = 1025 - int(lengths[0])  # the exponent plane of chunk 0 made longer than its 1024 raw bytes,
    lengths[0], lengths[1] = 1025, lengths[1] - moved  # the next one shorter: the total still adds up
    payload[:72] = lengths.tobytes()
    _decode_error(t, params, payload, "longer than its raw bytes")


def test_decode_rejects_lengths_not_adding_up():
    t, payload, params = _encoded()
    _decode_error(t, params, payload + b"\0" * 8, "do not add up")
    _decode_error(t, params, payload[:-3], "do not add up|damaged zstd plane")


def test_decode_rejects_a_damaged_zstd_frame():
    t, payload, params = _encoded()
    assert np.frombuffer(payload, "<u4", count=1)[0] < 1024  # the first plane is a zstd frame
    broken = bytearray(payload)
    broken[72 + 4] ^= 0xFF  # its frame header descriptor
    _decode_error(t, params, broken, "zstd plane")
    broken = bytearray(payload)
    broken[72 + 20] ^= 0x5A  # inside its compressed block
    _decode_error(t, params, broken, "zstd plane")


def test_decode_rejects_a_frame_of_the_wrong_size_and_trailing_data():
    t = random_tensor(torch.bfloat16, (2000,), seed=5)
    rec_params = {"chunk": 2000}
    exponent = bytes((t.view(torch.int16).numpy().view(np.uint16) >> 7).astype(np.uint8))
    raw_low = bytes(2000)
    for frame, match in ((zstandard.ZstdCompressor().compress(exponent[:1999]), "declares 1999 bytes"),
                         (zstandard.ZstdCompressor(write_content_size=False).compress(exponent), "declares -1 bytes"),
                         (zstandard.ZstdCompressor().compress(exponent) + b"\0\0", "zstd plane")):
        if len(frame) >= 2000:
            continue
        payload = np.array([len(frame), 2000], "<u4").tobytes() + frame + raw_low
        _decode_error(t, rec_params, payload, match)


def test_decode_rejects_bool_bytes_other_than_0_and_1():
    t = torch.zeros(300, dtype=torch.bool)
    values = np.zeros(300, dtype=np.uint8)
    values[7] = 2
    for blob in (values.tobytes(), zstandard.ZstdCompressor().compress(values.tobytes())):
        _decode_error(t, {"chunk": 300}, np.array([len(blob)], "<u4").tobytes() + blob, "bool bytes must be 0 or 1")


@pytest.mark.parametrize("threads", [1, 2])
def test_a_changed_byte_in_a_file_is_a_checksum_error(tmp_path, threads):
    g = torch.Generator().manual_seed(6)
    tensors = {"w": torch.randn(2 * CHUNK, generator=g) * 0.05}  # large: CRC checked beside decoding
    path = tmp_path / "m.mrc"
    encode_lossless("m.pt", path, tensors=tensors)
    rec = open_mrc(path).record("w")
    assert rec.length > 1 << 20
    data = bytearray(path.read_bytes())
    data[rec.offset + 7] ^= 0x10  # inside the length table: decoding itself fails too
    path.write_bytes(bytes(data))
    with pytest.raises(MrcFormatError, match="checksum mismatch in payload of 'w'"):
        open_mrc(path).tensors(threads=threads)
    data[rec.offset + 7] ^= 0x10
    data[rec.offset + rec.length - 1] ^= 0x01  # in a raw plane: decodes to wrong bits without the CRC
    path.write_bytes(bytes(data))
    with pytest.raises(MrcFormatError, match="checksum mismatch in payload of 'w'"):
        open_mrc(bytes(data)).tensors(threads=threads)
    assert zlib.crc32(bytes(data[rec.offset:rec.offset + rec.length])) != rec.crc32


# -- command line -----------------------------------------------------------------------------

def test_cli_threads_give_the_same_file_and_bad_counts_are_usage_errors(tmp_path, capsys):
    g = torch.Generator().manual_seed(8)
    tensors = {"w": torch.randn(2 * CHUNK + 5, generator=g) * 0.05, "b": torch.randn(10, generator=g)}
    torch.save(tensors, tmp_path / "m.pt")
    for threads in ("1", "2"):
        assert main(["encode", str(tmp_path / "m.pt"), "--lossless", "--threads", threads, "-o",
                     str(tmp_path / f"m{threads}.mrc"), "--quiet"]) == 0
    assert (tmp_path / "m1.mrc").read_bytes() == (tmp_path / "m2.mrc").read_bytes()
    assert main(["decode", str(tmp_path / "m1.mrc"), "--threads", "2", "-o", str(tmp_path / "d.safetensors"),
                 "--quiet"]) == 0
    assert_same_tensors(load_checkpoint(tmp_path / "d.safetensors"), tensors)
    capsys.readouterr()
    for command in (["encode", str(tmp_path / "m.pt"), "--lossless", "-o", str(tmp_path / "bad.mrc")],
                    ["decode", str(tmp_path / "m1.mrc"), "-o", str(tmp_path / "bad.safetensors")]):
        assert main([*command, "--threads", "0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: threads must be a positive integer")
    assert not (tmp_path / "bad.mrc").exists() and not (tmp_path / "bad.safetensors").exists()
