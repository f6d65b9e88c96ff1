"""``lossless3`` codec: float tensors bit-exactly, a Huffman-coded symbol and raw bits per element.

Why (figures in docs/lossless.md): ``lossless2`` puts the exponent in a byte of its own and lets
zstd Huffman-code it, which lands at ZipNN's ratio but not above, and its numpy reassembly of
byte planes cannot reach ZipNN's decode speed. The exponent and the top mantissa bits depend on
each other, so coding them as one symbol saves about 0.06 bits per weight, and bit-level work
that numpy does in whole-array passes is a single pass in C. For float32, bfloat16 and float16:

* the top 16 bits of each value are rotated left by one, as in ``lossless2``; the top ``S``
  bits of the result (``params["symbol_bits"]``: 10, the exponent and two mantissa bits, for
  float32 and bfloat16; 8 for float16) are the element's *symbol*, the bits below its *tail*;
* per chunk, the symbols are coded with a canonical Huffman code of at most 12 bits (built for
  that chunk, its code lengths stored in the chunk), split over 8 interleaved bitstreams so a
  decoder follows 8 independent chains of look-ups; of the tails only the bits that differ
  between the chunk's elements are packed, the others stored once (a float32 tensor holding
  bfloat16 values stores 6 bits an element, a constant tensor none);
* a chunk with a single symbol stores no Huffman part at all, and a chunk that would not be
  smaller than its raw bytes is stored raw.

Chunks are coded independently, so threads share them and the bytes never depend on how many
threads there were. The hot loops are the C extension :mod:`mlcompress.codecs._lossless3`
(built by ``pip install``; optional). Without it, ``lossless3`` files still decode with the
numpy reader below (about 10 MB/s, a hundred times slower; it is also the reference the C
decoder is tested against) and :func:`mlcompress.assembly.smallest_lossless` writes
``lossless2`` instead. The byte layout is docs/format.md §4.7.
"""

from __future__ import annotations

import struct
import sys
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from mlcompress.codecs.lossless2 import CHUNK, MAX_CHUNK, _le_bytes
from mlcompress.codecs.raw import tensor_from_le_bytes
from mlcompress.errors import CodecError, MrcFormatError
from mlcompress.format.dtypes import dtype_name, itemsize, torch_dtype
from mlcompress.format.records import TensorRecord
from mlcompress.lazy import numpy as np
from mlcompress.lazy import torch
from mlcompress.workers import resolve_threads

try:  # the optional C extension; a build of other kernels than this file expects is not used
    import mlcompress.codecs._lossless3 as _native

    if getattr(_native, "VERSION", None) != 3:
        _native = None
except ImportError:
    _native = None

#: The C kernels are importable: lossless3 can encode, and decodes at full speed.
NATIVE: bool = _native is not None
#: ``zlib.crc32``'s function, from the C extension when it is built: carry-less multiplication
#: makes it 4-5x faster (docs/lossless.md), and the container checks a CRC over every payload.
crc32: Callable[..., int] = _native.crc32 if _native is not None else zlib.crc32
#: The dtypes lossless3 stores (others use lossless2).
DTYPES = ("float32", "bfloat16", "float16")
#: Symbol bits the encoder uses by dtype (measured in docs/lossless.md); readers take 8..12.
SYMBOL_BITS = {"float32": 10, "bfloat16": 10, "float16": 8}
MIN_SYMBOL_BITS, MAX_SYMBOL_BITS = 8, 12
#: Longest Huffman code, in bits, and the number of interleaved streams per chunk (§4.7).
MAX_CODE_LENGTH = 12
STREAMS = 8


def balanced_chunk(n: int) -> int:
    """The chunk size the encoder writes for ``n`` elements: as few chunks as ``CHUNK`` allows,
    all of (nearly) the same size, so two threads split a two-chunk tensor evenly and no chunk
    is a small remainder that pays for a code table of its own."""
    if n <= CHUNK:
        return max(n, 1)
    count = -(-n // CHUNK)
    return -(-n // count)


def _where(record: TensorRecord) -> str:
    return f"lossless3 tensor {record.name!r}"


class Lossless3Codec:
    name = "lossless3"
    #: Takes ``threads`` (encode option, decode keyword); the output never depends on it.
    parallel = True

    # ---- encoding ---------------------------------------------------------------------------

    def encode(self, tensor: Any, options: Mapping[str, Any]) -> tuple[memoryview, dict]:
        """Options: ``threads``, and ``chunk`` / ``symbol_bits`` to override the writer's
        choices (tests use them). Needs the C extension."""
        if _native is None:
            raise CodecError("lossless3 encoding needs the C extension mlcompress.codecs._lossless3",
                             hint="reinstall with a C compiler available (pip install -e .), or use lossless2")
        dtype = dtype_name(tensor.dtype)
        if dtype not in DTYPES:
            raise CodecError(f"lossless3 stores {', '.join(DTYPES)}, not {dtype}", hint="use lossless2")
        n = tensor.numel()
        chunk, bits, threads = _encode_options(options, n, dtype)
        params = {"chunk": chunk, "symbol_bits": bits}
        count = -(-n // chunk)
        if count == 0:
            return memoryview(b""), params
        if count > 1:  # the workers wake while the bytes are laid out
            self.prepare(threads)
        le = _le_bytes(tensor)
        size = le.shape[1]
        flat = le.reshape(-1)
        # Chunk k is coded into its own slot of one buffer, as long as its stored form; the
        # slots are then closed up. One numpy buffer, not bytes objects: numpy backs large
        # buffers with huge pages (docs/lossless.md, "numpy costs").
        head = 4 * count
        out = np.empty(head + count + n * size, dtype=np.uint8)
        if count == 1:  # most tensors: no per-chunk bookkeeping (it showed on small ones)
            length = _native.encode_chunk(flat, size, bits, out[4:])
            struct.pack_into("<I", out, 0, length)
            return memoryview(out[:4 + length]), params

        jobs = []
        for k in range(count):
            start, stop = k * chunk, min(n, (k + 1) * chunk)
            slot = head + k + start * size
            jobs.append((flat[start * size:stop * size], size, bits, out[slot:slot + 1 + (stop - start) * size]))
        lengths = _native.encode_chunks(jobs, resolve_threads(threads))
        pos = head
        for k, length in enumerate(lengths):
            slot = head + k + k * chunk * size
            if slot != pos:
                out[pos:pos + length] = out[slot:slot + length]
            pos += length
        struct.pack_into(f"<{count}I", out, 0, *lengths)
        return memoryview(out[:pos]), params

    # ---- validation and decoding ---------------------------------------------------------------

    def check(self, record: TensorRecord) -> None:
        params = record.params
        if set(params) != {"chunk", "symbol_bits"}:
            raise MrcFormatError(f"{_where(record)} must have exactly the params 'chunk' and 'symbol_bits'")
        chunk, bits = params["chunk"], params["symbol_bits"]
        if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= MAX_CHUNK:
            raise MrcFormatError(f"{_where(record)}: chunk must be an integer in 1..{MAX_CHUNK}")
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_SYMBOL_BITS <= bits <= MAX_SYMBOL_BITS:
            raise MrcFormatError(f"{_where(record)}: symbol_bits must be an integer in {MIN_SYMBOL_BITS}..{MAX_SYMBOL_BITS}")
        if record.dtype not in DTYPES:
            raise MrcFormatError(f"{_where(record)}: dtype {record.dtype} cannot be stored")
        n = record.numel
        count = -(-n // chunk)
        if not 5 * count <= record.length <= 5 * count + n * itemsize(record.dtype):
            raise MrcFormatError(f"{_where(record)}: payload of {record.length} bytes cannot hold "
                                 f"{n} elements in chunks of {chunk}")

    def prepare(self, threads: int | None = None) -> None:
        """Wake the native workers a batch on ``threads`` threads will use, so that they are
        running when it starts: the container calls this before it reads the payloads, and
        :meth:`decode_many` before it plans the chunks (docs/lossless.md, item 7)."""
        threads = resolve_threads(threads)
        if _native is not None and threads > 1:
            _native.wake(threads)

    def decode(self, payload: Any, record: TensorRecord, device: Any = "cpu", threads: int | None = None) -> Any:
        return self.decode_many([(payload, record)], threads)[0][0]

    def decode_many(self, items: Sequence[tuple[Any, TensorRecord]], threads: int | None = None,
                    crc: bool = False) -> tuple[list[Any], list[int] | None]:
        """Decode several tensors' payloads ``(payload, record)`` in one batch of chunks on
        ``threads`` threads (default: all cores), and with ``crc`` the CRC-32 of each payload.

        Why a batch: on a small model, one call (and one thread hand-off) per chunk cost as much
        as decoding it; here all chunks of all the tensors, largest first, share the threads in
        one native call (``_lossless3.decode_chunks``). Returns the tensors and the CRCs (or
        ``None``); a damaged payload raises :class:`MrcFormatError` naming its tensor and chunk.
        """
        threads = resolve_threads(threads)
        self.prepare(threads)
        plans = [_plan(payload, record) for payload, record in items]
        jobs = [job for plan in plans for job in plan.jobs]
        if _native is not None:
            crcs, error = _native.decode_chunks(jobs, [payload for payload, _ in items] if crc else [], threads)
            if error is not None:
                index, reason = error
                for plan in plans:
                    if index < len(plan.jobs):
                        raise MrcFormatError(f"{_where(plan.record)}: chunk {index}: {reason}")
                    index -= len(plan.jobs)
        else:
            for plan in plans:
                for k, (data, size, bits, target) in enumerate(plan.jobs):
                    try:
                        target.view(f"<u{size}")[...] = decode_chunk_reference(data, len(target) // size, size, bits)
                    except ValueError as exc:
                        raise MrcFormatError(f"{_where(plan.record)}: chunk {k}: {exc}") from None
            crcs = [crc32(payload) for payload, _ in items] if crc else []
        return [plan.tensor() for plan in plans], (crcs if crc else None)


@dataclass
class _Plan:
    """One tensor's decode: its output bytes and the chunk jobs ``(src, itemsize, symbol_bits,
    dst)`` that fill them (the C kernel's argument layout)."""

    record: TensorRecord
    out: Any
    jobs: list[tuple[Any, int, int, Any]]

    def tensor(self) -> Any:
        record = self.record
        if record.numel == 0:
            return torch.empty(record.shape, dtype=torch_dtype(record.dtype))
        if sys.byteorder == "little":
            return torch.from_numpy(self.out).view(torch_dtype(record.dtype)).reshape(record.shape)
        return tensor_from_le_bytes(self.out.data, record.dtype, record.shape)


def _plan(payload: Any, record: TensorRecord) -> _Plan:
    """The chunk jobs of one payload, its length table checked (``MrcFormatError`` if wrong)."""
    n, size = record.numel, itemsize(record.dtype)
    out = np.empty(n * size, dtype=np.uint8)
    if n == 0:
        return _Plan(record, out, [])
    chunk, bits = record.params["chunk"], record.params["symbol_bits"]
    count = -(-n // chunk)
    # The table in plain Python: for a model's many small tensors numpy's per-call cost
    # would be most of the decode.
    if len(payload) < 4 * count:
        raise MrcFormatError(f"{_where(record)}: payload shorter than its length table")
    lengths = struct.unpack_from(f"<{count}I", payload)
    if 4 * count + sum(lengths) != len(payload):
        raise MrcFormatError(f"{_where(record)}: chunk lengths do not add up to the payload")
    view = memoryview(payload)
    jobs = []
    pos = 4 * count
    for k, length in enumerate(lengths):
        start, stop = k * chunk, min(n, (k + 1) * chunk)
        if not 1 <= length <= 1 + (stop - start) * size:
            raise MrcFormatError(f"{_where(record)}: chunk {k} is {length} bytes, longer than stored or empty")
        jobs.append((view[pos:pos + length], size, bits, out[start * size:stop * size]))
        pos += length
    return _Plan(record, out, jobs)


def _encode_options(options: Mapping[str, Any], n: int, dtype: str) -> tuple[int, int, Any]:
    """``(chunk, symbol_bits, threads)`` from the encode options, checked; the writer's choices
    where they are not given."""
    unknown = set(options) - {"threads", "chunk", "symbol_bits"}
    if unknown:
        raise CodecError(f"lossless3 takes the options threads, chunk and symbol_bits, not {', '.join(sorted(unknown))}")
    chunk = options.get("chunk", balanced_chunk(n))
    if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= MAX_CHUNK:
        raise CodecError(f"lossless3 chunk must be an integer in 1..{MAX_CHUNK}, got {chunk!r}")
    bits = options.get("symbol_bits", SYMBOL_BITS[dtype])
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_SYMBOL_BITS <= bits <= MAX_SYMBOL_BITS:
        raise CodecError(f"lossless3 symbol_bits must be an integer in {MIN_SYMBOL_BITS}..{MAX_SYMBOL_BITS}, got {bits!r}")
    return chunk, bits, options.get("threads")


# ---- the reference reader (numpy; used without the C extension, and by the tests) ---------------


def decode_chunk_reference(chunk: Any, m: int, size: int, symbol_bits: int) -> Any:
    """One chunk of ``m`` elements (``size`` bytes each) as an array of their unsigned bit
    patterns, following docs/format.md §4.7 step by step; ``ValueError`` names what is wrong.

    Whole-array numpy where the format allows it; the Huffman streams are decoded by pointer
    doubling (the position after each code is known for every bit position at once, and
    composing that map with itself log2(symbols) times gives every symbol's start).
    """
    data = np.frombuffer(chunk, dtype=np.uint8)
    word = np.dtype(f"<u{size}")
    B, S = 8 * size, symbol_bits
    W = B - S
    if data.size < 1:
        raise ValueError("empty chunk")
    mode = int(data[0])
    if mode == 0:
        if data.size != 1 + m * size:
            raise ValueError("stored chunk of the wrong length")
        return data[1:].view(word).copy()
    if mode > 2:
        raise ValueError("unknown chunk mode")
    cbytes = (W + 7) // 8
    if data.size < 3 + cbytes:
        raise ValueError("chunk shorter than its header")
    z, w = int(data[1]), int(data[2])
    if z + w > W:
        raise ValueError("tail field outside the tail")
    c = int.from_bytes(data[3:3 + cbytes].tobytes(), "little")
    if c >> W or c & (((1 << w) - 1) << z):
        raise ValueError("constant tail bits overlap the field or the symbol")
    pos = 3 + cbytes + (m * w + 7) // 8
    if data.size < pos:
        raise ValueError("chunk shorter than its tail")
    tail = _unpack(data[3 + cbytes:pos], m, w) if w else np.zeros(m, dtype=np.uint32)
    if mode == 2:
        if data.size != pos + 2:
            raise ValueError("single-symbol chunk of the wrong length")
        s = int(data[pos]) | int(data[pos + 1]) << 8
        if s >= 1 << S:
            raise ValueError("symbol out of range")
        symbols = np.full(m, s, dtype=np.uint32)
    else:
        lengths, pos = _code_lengths(data, pos, S)
        if data.size < pos + 4 * STREAMS:
            raise ValueError("chunk shorter than its stream lengths")
        sizes = [int(v) for v in data[pos:pos + 4 * STREAMS].view("<u4")]
        pos += 4 * STREAMS
        if pos + sum(sizes) != data.size:
            raise ValueError("stream lengths do not add up to the chunk")
        table = _decode_table(lengths)
        symbols = np.empty(m, dtype=np.uint32)
        for j, nbytes in enumerate(sizes):
            symbols[j::STREAMS] = _huffman_stream(data[pos:pos + nbytes], -(-(m - j) // STREAMS), table)
            pos += nbytes
    x = (symbols << np.uint32(W)) | (tail << np.uint32(z)) | np.uint32(c)
    if size == 4:
        return (((x >> 1) & 0x7FFF0000) | ((x << 15) & 0x80000000) | (x & 0xFFFF)).astype(word)
    return (((x >> 1) | (x << 15)) & 0xFFFF).astype(word)


def _code_lengths(data: Any, pos: int, S: int) -> tuple[list[int], int]:
    """The code-length table at byte ``pos`` of a coded chunk: every symbol's length, and where
    the table ends."""
    lengths = [0] * (1 << S)
    if data.size < pos + 2:
        raise ValueError("chunk shorter than its code-length table")
    runs, pos, end = int(data[pos]) | int(data[pos + 1]) << 8, pos + 2, 0
    if runs == 0:
        raise ValueError("code-length table without runs")
    for _ in range(runs):
        if pos + 4 > data.size:
            raise ValueError("code-length table runs past the chunk")
        first, n = (int(v) for v in data[pos:pos + 4].view("<u2"))
        pos += 4
        if n == 0 or first < end or first + n > 1 << S:
            raise ValueError("code-length runs out of order or out of range")
        packed = data[pos:pos + (n + 1) // 2]
        if packed.size < (n + 1) // 2:
            raise ValueError("code-length table runs past the chunk")
        nibbles = np.stack([packed & 15, packed >> 4], axis=1).reshape(-1)
        if n % 2 and nibbles[-1]:
            raise ValueError("nonzero padding nibble in the code-length table")
        if (nibbles > MAX_CODE_LENGTH).any():
            raise ValueError("code length above 12")
        lengths[first:first + n] = [int(v) for v in nibbles[:n]]
        pos += (n + 1) // 2
        end = first + n
    used = [length for length in lengths if length]
    if len(used) < 2 or sum(1 << (MAX_CODE_LENGTH - length) for length in used) != 1 << MAX_CODE_LENGTH:
        raise ValueError("code lengths do not make a complete prefix code")
    return lengths, pos


def _decode_table(lengths: list[int]) -> Any:
    """A ``2^12`` table indexed by the next 12 stream bits (first bit lowest): symbol | length << 12.
    Canonical codes: by increasing length, then symbol; each the previous plus one, shifted
    left as the length grows; a code is read most significant bit first."""
    table = np.zeros(1 << MAX_CODE_LENGTH, dtype=np.uint32)
    code, previous = 0, 0
    for length, symbol in sorted((length, s) for s, length in enumerate(lengths) if length):
        code <<= length - previous
        previous = length
        reversed_code = int(f"{code:0{length}b}"[::-1], 2)
        table[reversed_code::1 << length] = symbol | length << 12
        code += 1
    return table


def _huffman_stream(stream: Any, count: int, table: Any) -> Any:
    """``count`` symbols from one bitstream, which must end (zero-padded) exactly at its last byte."""
    bits = np.unpackbits(stream, bitorder="little").astype(np.int64)
    P = bits.size
    if count == 0:
        if P:
            raise ValueError("a Huffman stream does not end where its length says")
        return np.empty(0, dtype=np.uint32)
    padded = np.concatenate([bits, np.zeros(MAX_CODE_LENGTH, dtype=np.int64)])
    window = np.zeros(P, dtype=np.int64)
    for k in range(MAX_CODE_LENGTH):
        window |= padded[k:k + P] << k
    entry = table[window] if P else np.zeros(0, dtype=np.uint32)
    after = np.arange(P) + (entry >> 12)
    jump = np.append(np.minimum(after, P), P)  # P: the stream has run out (and stays there)
    starts = np.zeros(count, dtype=np.int64)
    done = 1
    while done < count:
        take = min(done, count - done)
        starts[done:done + take] = jump[starts[:take]]
        done += take
        if done < count:
            jump = jump[jump]
    if P == 0 or int(starts[-1]) >= P:
        raise ValueError("a Huffman stream does not end where its length says")
    end = int(after[starts[-1]])
    if (end + 7) // 8 != stream.size:
        raise ValueError("a Huffman stream does not end where its length says")
    if bits[end:].any():
        raise ValueError("nonzero padding bits after a Huffman stream")
    return (entry[starts] & 0xFFF).astype(np.uint32)


def _unpack(tail: Any, m: int, w: int) -> Any:
    """``m`` fields of ``w`` bits, element 0 first, each least significant bit first."""
    bits = np.unpackbits(tail, bitorder="little")
    if bits[m * w:].any():
        raise ValueError("nonzero padding bits after the tail")
    fields = bits[:m * w].reshape(m, w).astype(np.uint32)
    return fields @ (np.uint32(1) << np.arange(w, dtype=np.uint32))


CODEC = Lossless3Codec()
