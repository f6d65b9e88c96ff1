"""The ``lossless3`` codec (docs/format.md §4.7): bit-exact round trips of float32, bfloat16 and
float16 whatever the bit patterns, the same bytes for any thread count, the C decoder equal to
the numpy reference reader and to a reader written from the spec alone, the doc's test vectors,
damaged payloads refused in one line, and the fallback without the C extension.

``spec_lossless3`` below reads payloads one bit at a time from the words of docs/format.md
§4.7 and shares no code with mlcompress; the C and numpy decoders must agree with it.
Equality is checked on bit patterns (tests/bitexact.py), never with ``==``.
"""

from __future__ import annotations

import math
import os
import struct
import time
import zlib

import numpy as np
import pytest
import torch

from bit_patterns import SPECIALS, from_bits, random_tensor
from bitexact import assert_bit_exact, assert_same_tensors
from test_lossless2_spec import spec_read_file

from mlcompress import codecs
from mlcompress.assembly import lossless_codec, smallest_lossless
from mlcompress.checkpoint import load_checkpoint
from mlcompress.codecs import lossless3
from mlcompress.codecs.lossless3 import CHUNK, CODEC, balanced_chunk, decode_chunk_reference
from mlcompress.container import TensorRecord, open_mrc, write_mrc
from mlcompress.errors import CodecError, MrcFormatError
from mlcompress.format.dtypes import dtype_name
from mlcompress.lossless import encode_lossless

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
native = pytest.mark.skipif(not lossless3.NATIVE, reason="the C extension mlcompress.codecs._lossless3 is not built")


class SpecError(ValueError):
    """The independent reader rejects a payload."""


# -- a reader written from docs/format.md §4.7 alone ------------------------------------------

def spec_lossless3(payload: bytes, n: int, dtype: str, params: dict) -> np.ndarray:
    """§4.7: the tensor's elements as an (n, itemsize) array of little-endian bytes."""
    size = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    if set(params) != {"chunk", "symbol_bits"} or any(type(v) is not int for v in params.values()):
        raise SpecError("bad params")
    C, S = params["chunk"], params["symbol_bits"]
    if not 1 <= C <= 2**28 or not 8 <= S <= 12:
        raise SpecError("params out of range")
    B = 8 * size
    W = B - S
    K = math.ceil(n / C)
    if len(payload) < 4 * K:
        raise SpecError("short length table")
    L = struct.unpack_from(f"<{K}I", payload)
    if 4 * K + sum(L) != len(payload):
        raise SpecError("lengths do not add up")
    words, pos = [], 4 * K
    for k in range(K):
        m = min(C, n - k * C)
        chunk = payload[pos:pos + L[k]]
        pos += L[k]
        if not 1 <= len(chunk) <= 1 + m * size:
            raise SpecError("chunk length")
        words += _spec_chunk(chunk, m, size, S, W)
    out = np.array(words, dtype=np.uint64).astype(f"<u{size}")
    return out.view(np.uint8).reshape(n, size)


class Bits:
    """A bit string over bytes, bit j = bit (j mod 8) of byte j // 8."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def bit(self) -> int:
        if self.pos >= 8 * len(self.data):
            raise SpecError("read past the end")
        b = (self.data[self.pos // 8] >> (self.pos % 8)) & 1
        self.pos += 1
        return b

    def number(self, w: int) -> int:  # least significant bit first
        return sum(self.bit() << i for i in range(w))

    def padding_is_zero(self) -> bool:
        return all(self.bit() == 0 for _ in range(8 * len(self.data) - self.pos))


def _spec_chunk(chunk: bytes, m: int, size: int, S: int, W: int) -> list[int]:
    B = 8 * size
    mode = chunk[0]
    if mode == 0:
        if len(chunk) != 1 + m * size:
            raise SpecError("stored chunk length")
        return [int.from_bytes(chunk[1 + i * size:1 + (i + 1) * size], "little") for i in range(m)]
    head = 3 + math.ceil(W / 8)
    if mode not in (1, 2) or len(chunk) < head:
        raise SpecError("mode or header")
    z, w, c = chunk[1], chunk[2], int.from_bytes(chunk[3:head], "little")
    if z + w > W or c >= 2**W or c & ((2**w - 1) << z):
        raise SpecError("z, w, c")
    tail_len = math.ceil(m * w / 8)
    tail = Bits(chunk[head:head + tail_len])
    if len(tail.data) != tail_len:
        raise SpecError("short tail")
    fields = [tail.number(w) for _ in range(m)]
    if not tail.padding_is_zero():
        raise SpecError("tail padding")
    pos = head + tail_len
    if mode == 2:
        if len(chunk) != pos + 2:
            raise SpecError("mode 2 length")
        s = int.from_bytes(chunk[pos:pos + 2], "little")
        if s >= 2**S:
            raise SpecError("symbol")
        symbols = [s] * m
    else:
        symbols = _spec_huffman(chunk, pos, m, S)
    out = []
    for s, f in zip(symbols, fields):
        u1 = (s << W) | (f << z) | c
        h1 = u1 >> (B - 16)
        h = (h1 >> 1) | ((h1 & 1) << 15)
        out.append((h << (B - 16)) | (u1 & ((1 << (B - 16)) - 1)))
    return out


def _spec_huffman(chunk: bytes, pos: int, m: int, S: int) -> list[int]:
    def u16(at: int) -> int:
        if at + 2 > len(chunk):
            raise SpecError("short table")
        return int.from_bytes(chunk[at:at + 2], "little")

    lengths = {}
    R, pos, end = u16(pos), pos + 2, 0
    if R < 1:
        raise SpecError("no runs")
    for _ in range(R):
        first, count = u16(pos), u16(pos + 2)
        pos += 4
        if count < 1 or first < end or first + count > 2**S or pos + (count + 1) // 2 > len(chunk):
            raise SpecError("run")
        for i in range(count):
            length = (chunk[pos + i // 2] >> (4 * (i % 2))) & 15
            if length > 12:
                raise SpecError("length > 12")
            if length:
                lengths[first + i] = length
        if count % 2 and chunk[pos + count // 2] >> 4:
            raise SpecError("padding nibble")
        pos += (count + 1) // 2
        end = first + count
    if len(lengths) < 2 or sum(2 ** (12 - length) for length in lengths.values()) != 2**12:
        raise SpecError("not a complete code")
    codes, code, previous = {}, 0, None
    for s, length in sorted(lengths.items(), key=lambda item: (item[1], item[0])):
        if previous is not None:
            code = (code + 1) << (length - previous)
        codes[(length, code)] = s
        previous = length
    if pos + 32 > len(chunk):
        raise SpecError("short stream lengths")
    N = struct.unpack_from("<8I", chunk, pos)
    pos += 32
    if pos + sum(N) != len(chunk):
        raise SpecError("stream lengths")
    symbols = [0] * m
    for j in range(8):
        stream = Bits(chunk[pos:pos + N[j]])
        pos += N[j]
        for i in range(j, m, 8):
            code, length = 0, 0
            while (length, code) not in codes:
                code, length = code << 1 | stream.bit(), length + 1  # most significant bit first
            symbols[i] = codes[(length, code)]
        if math.ceil(stream.pos / 8) != N[j] or not stream.padding_is_zero():
            raise SpecError("stream end")
    return symbols


# -- helpers ----------------------------------------------------------------------------------

def record(t: torch.Tensor, params: dict, length: int, name: str = "w") -> TensorRecord:
    return TensorRecord(name, tuple(t.shape), dtype_name(t.dtype), "lossless3", params, 0, length, 0)


def decode(payload: bytes, rec: TensorRecord, threads: int = 1, reference: bool = False) -> torch.Tensor:
    """Decode with the C kernels (AVX2 where the CPU has it, and then scalar too, which must give
    the same), or with the numpy reference reader when ``reference``."""
    saved = lossless3._native
    if reference:
        lossless3._native = None
    try:
        CODEC.check(rec)
        out = CODEC.decode(payload, rec, threads=threads)
        if not reference and saved.simd(False):
            try:
                assert_bit_exact(CODEC.decode(payload, rec, threads=threads), out)
            finally:
                saved.simd(True)
        return out
    finally:
        lossless3._native = saved


def spec_words(payload: bytes, t: torch.Tensor, params: dict) -> bytes:
    return spec_lossless3(payload, t.numel(), dtype_name(t.dtype), params).tobytes()


def check_all_decoders(t: torch.Tensor, spec: bool = True, **options) -> bytes:
    """Encode; C decoder, reference reader and (small tensors) the spec reader give ``t`` back."""
    payload, params = CODEC.encode(t, {"threads": 1, **options})
    payload = bytes(payload)
    rec = record(t, params, len(payload))
    assert_bit_exact(decode(payload, rec), t)
    assert_bit_exact(decode(payload, rec, reference=True), t)
    if spec:
        assert spec_words(payload, t, params) == t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return payload


def weights(dtype: torch.dtype, n: int, seed: int = 0) -> torch.Tensor:
    return random_tensor(dtype, (n,), seed)


# -- round trips ------------------------------------------------------------------------------

@native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 63, 100, 1001])
def test_small_tensors_every_decoder(dtype, n):
    check_all_decoders(weights(dtype, n), chunk=max(1, n // 3 + 1))
    check_all_decoders(weights(dtype, n, seed=1))


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values_every_decoder(dtype):
    special = from_bits(SPECIALS[dtype], dtype)  # NaN payloads, +-Inf, +-0, subnormals, max, 1.0
    t = torch.cat([weights(dtype, 300), special.repeat(20), weights(dtype, 300, seed=1)])
    payload = check_all_decoders(t, chunk=500)
    assert payload[4 + 0] != 0  # the first chunk is coded, not stored
    alone = special.repeat(40)
    check_all_decoders(alone)
    out = decode(bytes(CODEC.encode(alone, {})[0]), record(alone, CODEC.encode(alone, {})[1], len(CODEC.encode(alone, {})[0])))
    nans = {bytes(out[i:i + 1].view(torch.uint8).numpy()) for i in range(14) if torch.isnan(out[i].float())}
    assert len(nans) == 5  # five distinct NaN payloads survive


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [8, 9, 10, 11, 12])
def test_every_symbol_width(dtype, bits):
    t = torch.cat([weights(dtype, 2000), from_bits(SPECIALS[dtype], dtype)])
    check_all_decoders(t, spec=bits in (8, 12), symbol_bits=bits, chunk=900)


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_constant_tensors_are_a_few_bytes(dtype):
    for value in (0.0, 1.0, -0.0, float("nan"), float("-inf")):
        t = torch.full((10_000,), value, dtype=dtype)
        payload = check_all_decoders(t)
        assert len(payload) <= 4 + 5 + 3, value  # one mode-2 chunk


@native
def test_upcast_tensors_drop_their_zero_bits():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(50_000, generator=g) * 0.05
    for narrow, dropped in ((torch.bfloat16, 16), (torch.float16, 13)):
        upcast = w.to(narrow).float()
        payload, params = CODEC.encode(upcast, {})
        assert bytes(payload)[5:7] == bytes([dropped, 22 - dropped])  # z and w of the only chunk
        assert_bit_exact(decode(bytes(payload), record(upcast, params, len(payload))), upcast)
        assert len(payload) < 50_000 * (4 - dropped / 8)


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_and_scalar_tensors(dtype):
    for t in (torch.empty(0, dtype=dtype), torch.zeros(0, 4, dtype=dtype), torch.tensor(1.5, dtype=dtype),
              torch.tensor(float("nan"), dtype=dtype)):
        payload, params = CODEC.encode(t, {})
        rec = record(t, params, len(payload))
        CODEC.check(rec)
        assert_bit_exact(decode(bytes(payload), rec), t)
        assert_bit_exact(decode(bytes(payload), rec, reference=True), t)
    assert bytes(CODEC.encode(torch.empty(0, dtype=dtype), {})[0]) == b""


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sizes_that_are_not_a_multiple_of_the_chunk(dtype):
    t = weights(dtype, 3 * 4096 + 17).reshape(-1, 1)
    for chunk in (4096, 4095, 1000, 13):
        payload, params = CODEC.encode(t, {"chunk": chunk})
        rec = record(t, params, len(payload))
        for threads in (1, 3):
            assert_bit_exact(decode(bytes(payload), rec, threads=threads), t)
    assert_bit_exact(decode(bytes(payload), rec, reference=True), t)


@native
def test_noncontiguous_and_multidimensional_input():
    t = weights(torch.float32, 6000).reshape(60, 100).t()
    payload, params = CODEC.encode(t, {})
    assert_bit_exact(decode(bytes(payload), record(t, params, len(payload))), t.contiguous())


def test_balanced_chunks():
    assert balanced_chunk(0) == 1 and balanced_chunk(5) == 5 and balanced_chunk(CHUNK) == CHUNK
    assert balanced_chunk(400_000) == 200_000  # two equal halves, not 262,144 + 137,856
    assert balanced_chunk(3 * CHUNK + 1) == 196_609  # four chunks of (nearly) a quarter each
    for n in (CHUNK + 1, 10**6, 7 * CHUNK - 3):
        c = balanced_chunk(n)
        assert c <= CHUNK and math.ceil(n / c) == math.ceil(n / CHUNK)


# -- threads ----------------------------------------------------------------------------------

@native
def test_same_bytes_for_any_thread_count():
    t = weights(torch.bfloat16, 5 * 3000 + 11)
    payloads = [bytes(CODEC.encode(t, {"threads": n, "chunk": 3000})[0]) for n in (1, 2, 3)]
    assert payloads[0] == payloads[1] == payloads[2]
    rec = record(t, {"chunk": 3000, "symbol_bits": 10}, len(payloads[0]))
    for n in (1, 2, 3):
        assert_bit_exact(decode(payloads[0], rec, threads=n), t)


@native
def test_batches_of_many_tensors_on_any_thread_count():
    """``decode_many`` (one native batch for all the chunks of all the tensors, largest first)
    gives every tensor bit-exactly and the payloads' CRCs, whatever the thread count."""
    tensors = [weights(dtype, n, seed) for seed, (dtype, n) in
               enumerate([(torch.float32, 7000), (torch.bfloat16, 1), (torch.float16, 12_345), (torch.bfloat16, 0),
                          (torch.float32, 3 * 2000 + 5)])]
    items = []
    for t in tensors:
        payload, params = CODEC.encode(t, {"chunk": 2000})
        items.append((bytes(payload), record(t, params, len(payload))))
    for threads in (1, 2, 3, 8):
        decoded, crcs = CODEC.decode_many(items, threads, crc=True)
        for out, t in zip(decoded, tensors):
            assert_bit_exact(out, t)
        assert crcs == [zlib.crc32(p) for p, _ in items]
    assert CODEC.decode_many(items, 2)[1] is None


@native
def test_a_damaged_chunk_in_a_batch_names_its_tensor_and_chunk():
    good = [(weights(torch.bfloat16, 5000, seed), f"t{seed}") for seed in range(3)]
    items = []
    for t, name in good:
        payload, params = CODEC.encode(t, {"chunk": 2000})
        items.append((bytearray(payload), record(t, params, len(payload), name)))
    damaged = items[1][0]
    damaged[4 * 3 + struct.unpack_from("<I", damaged)[0]] = 7  # chunk 1 of t1: an unknown mode
    for threads in (1, 3):
        with pytest.raises(MrcFormatError, match=r"lossless3 tensor 't1': chunk 1: unknown chunk mode"):
            CODEC.decode_many([(bytes(p), r) for p, r in items], threads)


@native
def test_native_batches_equal_the_one_chunk_kernels():
    native_module = lossless3._native
    rng = np.random.default_rng(3)
    chunks = [weights(torch.bfloat16, int(m), seed).view(torch.int16).numpy().view(np.uint8)
              for seed, m in enumerate(rng.integers(1, 5000, 9))]
    jobs, single = [], []
    for c in chunks:
        jobs.append((c, 2, 10, np.empty(c.size + 1, dtype=np.uint8)))
        out = np.empty(c.size + 1, dtype=np.uint8)
        single.append(bytes(out[:native_module.encode_chunk(c, 2, 10, out)]))
    for threads in (1, 4):
        lengths = native_module.encode_chunks(jobs, threads)
        assert [bytes(dst[:n]) for (_, _, _, dst), n in zip(jobs, lengths)] == single
    targets = [np.empty(c.size, dtype=np.uint8) for c in chunks]
    crcs, error = native_module.decode_chunks([(p, 2, 10, t) for p, t in zip(single, targets)], single, 2)
    assert error is None and crcs == [zlib.crc32(p) for p in single]
    assert all(np.array_equal(t, c) for t, c in zip(targets, chunks))
    with pytest.raises(ValueError, match="threads must be at least 1"):
        native_module.decode_chunks([], [], 0)
    with pytest.raises(TypeError):
        native_module.encode_chunks([[chunks[0], 2, 10, targets[0]]], 1)



@native
def test_woken_workers_change_nothing_and_survive_fork():
    """``prepare`` (``wake``) only gets the pool's workers spinning ahead of a batch: batches
    after it, with spinning or parked workers, in this process and in a forked child (which
    starts with no workers), decode bit-exactly; a thread count of 1 or less wakes nothing."""
    t = weights(torch.float32, 4 * 2000 + 3)
    payload, params = CODEC.encode(t, {"chunk": 2000})
    item = (bytes(payload), record(t, params, len(payload)))
    for threads in (0, 1, 2, 5):
        lossless3._native.wake(threads)
        CODEC.prepare(max(threads, 1))
        assert_bit_exact(CODEC.decode_many([item], max(threads, 1))[0][0], t)
    time.sleep(0.005)  # past the spin: parked workers take the next batch
    assert_bit_exact(CODEC.decode_many([item], 3)[0][0], t)
    with pytest.raises(TypeError):
        lossless3._native.wake("2")
    if not hasattr(os, "fork"):
        return
    pid = os.fork()
    if pid == 0:  # the child: a fresh pool; exit status 0 only if the batch decodes exactly
        ok = False
        try:
            CODEC.prepare(3)
            ok = torch.equal(CODEC.decode_many([item], 3)[0][0].view(torch.int32), t.view(torch.int32))
        finally:
            os._exit(0 if ok else 1)
    assert os.waitpid(pid, 0)[1] == 0

# -- the spec's test vectors and whole files ---------------------------------------------------

DOC_TENSOR = [0x3F80, 0x4000, 0x3F88, 0x3F80, 0x3F00, 0x3F80, 0x3F80, 0x3F80, 0x4000, 0x4000, 0x3F80, 0x3F80, 0x4000,
              0x3F88, 0x3F00, 0x3F80, 0x3F80, 0x3FC0, 0x3F80, 0x4000, 0x3F80, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x3FC0,
              0x3F88, 0x3F80, 0x3F80, 0x3F88, 0x3F88, 0x3F88]
DOC_PAYLOAD = (
    "3c000000 01040100 042000e4 0100f8010900 0300010302"
    "01000000 02000000 01000000 01000000 01000000 01000000 01000000 01000000"
    "12 f503 00 04 0b 0c 06 1c")


def test_the_doc_vectors():
    """docs/format.md §4.7, "Test vectors", by the spec reader, mlcompress's decoders and encoder."""
    payload = bytes.fromhex(DOC_PAYLOAD.replace(" ", ""))
    assert len(payload) == 64
    t = from_bits(DOC_TENSOR, torch.bfloat16)
    params = {"chunk": 32, "symbol_bits": 10}
    assert spec_lossless3(payload, 32, "bfloat16", params).view("<u2").reshape(-1).tolist() == DOC_TENSOR
    rec = record(t, params, len(payload))
    assert_bit_exact(decode(payload, rec, reference=True), t)
    ones = torch.ones(5, dtype=torch.bfloat16)
    one = torch.ones(1, dtype=torch.bfloat16)
    small = {"06000000 02 00 00 00 fc01": (ones, {"chunk": 5, "symbol_bits": 10}),
             "06000000 02 00 00 01 0000": (-0.0 * ones, {"chunk": 5, "symbol_bits": 10}),
             "03000000 00 803f": (one, {"chunk": 1, "symbol_bits": 10})}
    for text, (tensor, p) in small.items():
        data = bytes.fromhex(text.replace(" ", ""))
        assert spec_words(data, tensor, p) == tensor.view(torch.uint8).numpy().tobytes()
        assert_bit_exact(decode(data, record(tensor, p, len(data)), reference=True), tensor)
    if lossless3.NATIVE:
        assert_bit_exact(decode(payload, rec), t)
        assert bytes(CODEC.encode(t, {})[0]) == payload and CODEC.encode(t, {})[1] == params
        for text, (tensor, p) in small.items():
            assert bytes(CODEC.encode(tensor, {})[0]).hex() == text.replace(" ", "")


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    w = torch.randn(300, 700, generator=g) * 0.05
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, 3.4e38] * 100)
    return {"fp32": w, "bf16": w.bfloat16(), "fp16": w.half(), "upcast": w[:20].bfloat16().float(),
            "specials": specials, "specials_bf16": specials.bfloat16(), "zeros": torch.zeros(64, 3),
            "fp64": w[:10].double(), "int64": torch.arange(3000) - 1500, "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 4), "tied": w}


@native
def test_lossless_files_decode_from_the_spec(tmp_path):
    tensors = _tensors()
    path = tmp_path / "m.mrc"
    encode_lossless("m.pt", path, tensors=tensors)
    used = {r.name: r.codec for r in open_mrc(path).records}
    assert {used[k] for k in ("fp32", "bf16", "fp16", "upcast", "specials", "specials_bf16", "zeros")} == {"lossless3"}
    assert used["int64"] == used["fp64"] == "lossless2"
    # Big tensors through the spec reader would take minutes one bit at a time: a file of their
    # first 3000 elements goes through it, the whole file through mlcompress's two decoders.
    small = {k: (v.reshape(-1)[:3000].clone() if v.numel() > 3000 else v) for k, v in tensors.items() if k != "tied"}
    encode_lossless("s.pt", tmp_path / "s.mrc", tensors=small)
    mine = spec_read_file(tmp_path / "s.mrc", {"lossless3": spec_lossless3})
    for name, t in small.items():
        assert mine[name][2] == (t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""), name
    assert_same_tensors(open_mrc(path).tensors(), tensors)
    saved = lossless3._native
    lossless3._native = None
    try:
        assert_same_tensors(open_mrc(path).tensors(threads=2), tensors)
    finally:
        lossless3._native = saved


@native
def test_old_lossless2_tensors_beside_lossless3_ones(tmp_path):
    t = weights(torch.float32, 5000)
    path = tmp_path / "mixed.mrc"
    write_mrc(path, {"old": t, "new": t.clone()}, {"old": ("lossless2", {}), "new": ("lossless3", {})}, {})
    mrc = open_mrc(path)
    assert {r.name: r.codec for r in mrc.records} == {"old": "lossless2", "new": "lossless3"}
    assert_same_tensors(mrc.tensors(), {"old": t, "new": t})


# -- what gets written ------------------------------------------------------------------------

@native
def test_smaller_than_lossless2_on_trained_weights():
    """The two LeNet-5 checkpoints of the benchmark when present, else normal weights."""
    path = os.path.join(os.path.dirname(__file__), "..", "runs", "bench-models", "lenet5-seed0.pt")
    w = load_checkpoint(path)["fc1.weight"] if os.path.exists(path) else torch.randn(400, 500) * 0.05
    for dtype in (torch.float32, torch.bfloat16):
        t = w.to(dtype)
        ours = len(CODEC.encode(t, {})[0])
        theirs = len(codecs.get("lossless2").encode(t, {})[0])
        assert ours < 0.998 * theirs, dtype


@native
def test_smallest_lossless_and_the_float_codec_pick_lossless3():
    g = torch.Generator().manual_seed(2)
    for dtype in DTYPES:
        assert smallest_lossless("w", (torch.randn(10_000, generator=g) * 0.05).to(dtype)).codec == "lossless3"
    assert smallest_lossless("b", torch.randn(3, generator=g)).codec == "raw"
    assert smallest_lossless("d", torch.randn(1000, generator=g).double()).codec == "lossless2"
    assert smallest_lossless("i", torch.arange(1000)).codec == "lossless2"
    low = codecs.get("float")
    for fmt, inner in (("bf16", "lossless3"), ("fp16", "lossless3"), ("fp8-e4m3", "lossless2")):
        payload, params = low.encode(torch.randn(300, 300, generator=g) * 0.03, {"format": fmt})
        assert params["codec"] == inner, fmt


def test_without_the_extension_lossless2_is_written_and_lossless3_still_decodes(monkeypatch, tmp_path):
    t = weights(torch.bfloat16, 3000)
    if lossless3.NATIVE:
        payload, params = CODEC.encode(t, {})
    else:
        payload, params = bytes.fromhex(DOC_PAYLOAD.replace(" ", "")), {"chunk": 32, "symbol_bits": 10}
        t = from_bits(DOC_TENSOR, torch.bfloat16)
    monkeypatch.setattr(lossless3, "_native", None)
    monkeypatch.setattr(lossless3, "NATIVE", False)
    assert lossless_codec(t) == "lossless2"
    assert smallest_lossless("w", weights(torch.float32, 1000)).codec == "lossless2"
    with pytest.raises(CodecError, match="needs the C extension"):
        CODEC.encode(t, {})
    assert_bit_exact(CODEC.decode(bytes(payload), record(t, params, len(payload))), t)
    encode_lossless("m.pt", tmp_path / "m.mrc", tensors={"w": t})
    assert [r.codec for r in open_mrc(tmp_path / "m.mrc").records] == ["lossless2"]


def test_crc32_is_zlibs():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 70_000, dtype=np.uint8).tobytes()
    for n in list(range(0, 200)) + [255, 256, 4095, 65536, 70_000]:
        for start in (0, 1, 7):
            piece = memoryview(data)[start:start + n]
            assert lossless3.crc32(piece) == zlib.crc32(piece), (n, start)
            assert lossless3.crc32(piece, 0xDEADBEEF) == zlib.crc32(piece, 0xDEADBEEF), (n, start)


# -- options and damaged payloads -------------------------------------------------------------

@native
def test_bad_options_are_codec_errors():
    t = weights(torch.float32, 100)
    with pytest.raises(CodecError, match="threads, chunk and symbol_bits"):
        CODEC.encode(t, {"level": 3})
    for bad in ({"chunk": 0}, {"chunk": 2**28 + 1}, {"chunk": True}, {"symbol_bits": 7}, {"symbol_bits": 13},
                {"symbol_bits": 10.0}):
        with pytest.raises(CodecError, match="must be an integer"):
            CODEC.encode(t, bad)
    with pytest.raises(CodecError, match="not float64"):
        CODEC.encode(t.double(), {})


def test_check_refuses_bad_records():
    t = torch.zeros(100)
    good = {"chunk": 100, "symbol_bits": 10}
    CODEC.check(record(t, good, 5))
    bad = [({"chunk": 100}, 5), ({**good, "extra": 1}, 5), ({"chunk": 0, "symbol_bits": 10}, 5),
           ({"chunk": 100, "symbol_bits": 13}, 5), ({"chunk": True, "symbol_bits": 10}, 5), (good, 4), (good, 406)]
    for params, length in bad:
        with pytest.raises(MrcFormatError, match="lossless3 tensor 'w'"):
            CODEC.check(record(t, params, length))
    with pytest.raises(MrcFormatError, match="dtype float64"):
        CODEC.check(record(t.double(), good, 5))


def _coded(t: torch.Tensor) -> tuple[bytearray, dict]:
    payload, params = CODEC.encode(t, {})
    return bytearray(payload), params


def _both_refuse(payload: bytes, t: torch.Tensor, params: dict, match: str = "lossless3 tensor 'w'") -> None:
    rec = record(t, params, len(payload))
    for reference in (False, True):
        with pytest.raises(MrcFormatError, match=match):
            decode(bytes(payload), rec, reference=reference)
    with pytest.raises(SpecError):
        spec_lossless3(bytes(payload), t.numel(), dtype_name(t.dtype), params)


@native
def test_damaged_payloads_are_format_errors():
    t = weights(torch.bfloat16, 600)
    good, params = _coded(t)
    assert good[4:8] == b"\x01\x00\x06\x00"  # a coded chunk with z 0, w 6, c 0: the tail, 450 bytes, then the table
    table = 4 + 4 + 450
    runs = struct.unpack_from("<H", good, table)[0]
    cases = {
        "truncated": good[:-1],
        "longer": good + b"\0",
        "length table": struct.pack("<I", len(good) - 3) + good[4:],
        "mode": good[:4] + b"\x07" + good[5:],
        "field past the tail": good[:5] + b"\x01" + good[6:],
        "constant bits in the field": good[:7] + b"\x01" + good[8:],
        "no runs": good[:table] + b"\0\0" + good[table + 2:],
        "length above 12": good[:table + 6] + b"\xff" + good[table + 7:],
    }
    # A code length changed by one: the code is no longer complete.
    nibble = table + 2 + 4
    first_len = good[nibble] & 15
    cases["incomplete code"] = good[:nibble] + bytes([(good[nibble] & 0xF0) | (first_len + 1)]) + good[nibble + 1:]
    # Stream lengths: move one byte from stream 0 to stream 1 (the sum still adds up).
    pos = table + 2
    for _ in range(runs):
        count = struct.unpack_from("<H", good, pos + 2)[0]
        pos += 4 + (count + 1) // 2
    n0, n1 = struct.unpack_from("<2I", good, pos)
    cases["stream lengths"] = good[:pos] + struct.pack("<2I", n0 - 1, n1 + 1) + good[pos + 8:]
    cases["stream overrun"] = good[:pos] + struct.pack("<2I", n0 + 1, n1 - 1) + good[pos + 8:]
    for name, payload in cases.items():
        _both_refuse(payload, t, params)


@native
def test_random_damage_never_crashes():
    """Flipped bytes and truncations anywhere: a format error or a tensor of the right shape."""
    rng = np.random.default_rng(5)
    for dtype in DTYPES:
        t = torch.cat([weights(dtype, 3000), from_bits(SPECIALS[dtype], dtype)])
        good, params = _coded(t)
        rec = record(t, params, len(good))
        for trial in range(300):
            bad = bytearray(good)
            for _ in range(int(rng.integers(1, 4))):
                bad[int(rng.integers(0, len(bad)))] ^= int(rng.integers(1, 256))
            if trial % 5 == 0:
                bad = bad[:int(rng.integers(0, len(bad)))]
            rec = record(t, params, len(bad))
            try:
                CODEC.check(rec)
                out = CODEC.decode(bytes(bad), rec, threads=1)
            except MrcFormatError as exc:
                assert "\n" not in str(exc)
                continue
            assert out.shape == t.shape and out.dtype == t.dtype


@native
def test_a_chunk_longer_than_stored_is_refused():
    t = torch.ones(6, dtype=torch.bfloat16)
    long = b"\x02\x00\x00\x00\xfc\x01" + b"\0" * 2  # 8 bytes > 1 + 3 * 2, though it parses
    payload = struct.pack("<2I", len(long), 1) + long + b"\0"
    with pytest.raises(MrcFormatError, match="chunk 0 is 8 bytes, longer than stored"):
        decode(payload, record(t, {"chunk": 3, "symbol_bits": 10}, len(payload)))


def test_damage_in_files_is_reported_as_damage(tmp_path):
    t = weights(torch.float32, 20_000)
    path = tmp_path / "m.mrc"
    write_mrc(path, {"w": t}, {"w": ("lossless3" if lossless3.NATIVE else "raw", {})}, {})
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(MrcFormatError, match="checksum mismatch"):
        open_mrc(path).tensors()
