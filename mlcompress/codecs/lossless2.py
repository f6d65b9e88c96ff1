"""``lossless2`` codec: bit-exact tensors as zstd-coded byte planes, in fixed-size chunks.

Why this design (figures in docs/lossless.md): the ``lossless`` codec's split of each value into
an exponent plane and near-uniform mantissa planes captures almost all of a float tensor's
redundancy, but its entropy stage (constriction's categorical ANS, ~31 ns a symbol to decode)
made it 10-25x slower than the byte-grouping tools people compare it with. Here the same idea
is laid out for speed:

* the top 16 bits of each float are rotated left by one bit, which puts the exponent (float32,
  bfloat16; float16's with its top three mantissa bits) alone in one byte and the sign at the
  bottom of the next; everything is then cut along byte boundaries into planes, so splitting
  and reassembling are a handful of whole-array numpy operations;
* each plane is one zstd frame (RFC 8878), whose Huffman literal stage decodes at GB/s; the
  encoder's match finder is set so it finds almost no matches, because on exponent bytes LZ
  matches cost more than the literals they replace; a plane zstd cannot shrink is stored raw
  and decodes as a view of the payload;
* the tensor is cut into chunks of ``params["chunk"]`` elements, coded independently, so any
  number of threads decodes or encodes them in parallel and the bytes written never depend on
  how many threads there were.

The rotation is a bijection on bit patterns, so NaN payloads, +-Inf, -0.0 and subnormals
survive. The byte layout is docs/format.md, "lossless2".
"""

from __future__ import annotations

import itertools
import struct
import sys
import threading
from typing import Any, Mapping

from mlcompress.codecs.raw import tensor_from_le_bytes, tensor_to_le_bytes
from mlcompress.errors import CodecError, MrcFormatError
from mlcompress.format.dtypes import FLOAT_DTYPES, dtype_name, itemsize, torch_dtype
from mlcompress.format.records import TensorRecord
from mlcompress.lazy import numpy as np
from mlcompress.lazy import torch
from mlcompress.lazy import zstandard
from mlcompress.workers import map_ordered, resolve_threads

#: Elements per chunk the encoder writes (a reader takes ``params["chunk"]``, anything in
#: 1..MAX_CHUNK). Measured in docs/lossless.md: below 2^18 the per-chunk Python work starts to
#: show in decode speed, above it a LeNet-5's largest tensor (400,000 weights) would no longer
#: split between two threads.
CHUNK = 1 << 18
#: Largest chunk a reader accepts: keeps every plane's stored length below 2^32.
MAX_CHUNK = 1 << 28


def _byte_planes(nbytes: int) -> tuple[tuple[int, int], ...]:
    return tuple((k, 1) for k in reversed(range(nbytes)))


#: The planes of each dtype, in payload order: ``(first byte, bytes)`` of the element's
#: little-endian bit pattern after the float rotation (integers are not transformed).
PLANES: dict[str, tuple[tuple[int, int], ...]] = {
    "float64": ((7, 1), (6, 1), (0, 6)),
    "float32": ((3, 1), (2, 1), (0, 2)),
    "float16": ((1, 1), (0, 1)),
    "bfloat16": ((1, 1), (0, 1)),
    "int64": _byte_planes(8),
    "int32": _byte_planes(4),
    "int16": _byte_planes(2),
    "int8": _byte_planes(1),
    "uint8": _byte_planes(1),
    "bool": _byte_planes(1),
}
_WIDTH_DTYPE = {1: "u1", 2: "<u2"}  # planes of other widths are handled as (m, width) bytes
_LOCAL = threading.local()  # one zstd context pair per thread: contexts are not thread-safe


def _zstd_compressor() -> Any:
    compressor = getattr(_LOCAL, "compressor", None)
    if compressor is None:
        # Fast strategy, smallest hash table, 7-byte minimum match: on exponent bytes zstd then
        # finds almost no matches and codes the plane with its Huffman literal stage, which
        # is both smaller and 3-4x faster to encode and decode than level 1-3 (measured in
        # docs/lossless.md). Single-threaded: parallelism is ours, over chunks.
        params = zstandard.ZstdCompressionParameters(
            window_log=17, chain_log=6, hash_log=6, search_log=1, min_match=7, target_length=0,
            strategy=zstandard.STRATEGY_FAST, write_content_size=True, write_checksum=False,
            write_dict_id=False, threads=0)
        compressor = _LOCAL.compressor = zstandard.ZstdCompressor(compression_params=params)
    return compressor


def _zstd_decompressor() -> Any:
    decompressor = getattr(_LOCAL, "decompressor", None)
    if decompressor is None:
        decompressor = _LOCAL.decompressor = zstandard.ZstdDecompressor()
    return decompressor


def _le_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's elements as an ``(n, itemsize)`` uint8 array of little-endian bytes
    (a view of the tensor's memory on little-endian hosts)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    size = flat.element_size()
    if flat.numel() == 0:  # torch may give an empty tensor a stride of 0, which cannot be viewed as bytes
        return np.empty((0, size), dtype=np.uint8)
    if sys.byteorder == "little":
        return flat.view(torch.uint8).numpy().reshape(-1, size)
    return np.frombuffer(tensor_to_le_bytes(flat), dtype=np.uint8).reshape(-1, size)


def _column(le: np.ndarray, first: int, width: int) -> np.ndarray:
    """Plane ``(first, width)`` of the ``(m, itemsize)`` byte array ``le``, as a view:
    ``(m,)`` of u1 or little-endian u2, else ``(m, width)`` bytes."""
    dtype = _WIDTH_DTYPE.get(width)
    if dtype is None:
        return le[:, first:first + width]
    return le.view(dtype)[:, first // width] if first % width == 0 else le[:, first:first + width].view(dtype)[:, 0]


class Lossless2Codec:
    name = "lossless2"
    #: Takes ``threads`` (encode option, decode keyword); the output never depends on it.
    parallel = True

    # ---- encoding ---------------------------------------------------------------------------

    def encode(self, tensor: torch.Tensor, options: Mapping[str, Any]) -> tuple[memoryview, dict]:
        unknown = set(options) - {"threads", "chunk"}
        if unknown:
            raise CodecError(f"lossless2 takes the options threads and chunk, not {', '.join(sorted(unknown))}")
        chunk = options.get("chunk", CHUNK)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= MAX_CHUNK:
            raise CodecError(f"lossless2 chunk must be an integer in 1..{MAX_CHUNK}, got {chunk!r}")
        threads = resolve_threads(options.get("threads"))
        dtype = dtype_name(tensor.dtype)
        le = _le_bytes(tensor)
        if le.shape[0] == 0:
            return memoryview(b""), {"chunk": chunk}
        n = le.shape[0]
        planes = PLANES[dtype]
        rotate = dtype in FLOAT_DTYPES

        def encode_chunk(index: int) -> list[Any]:
            return self._encode_chunk(le[index * chunk:(index + 1) * chunk], planes, rotate)

        blobs = [blob for chunk_blobs in map_ordered(encode_chunk, range(-(-n // chunk)), threads) for blob in chunk_blobs]
        lengths = [memoryview(b).nbytes for b in blobs]
        # The payload is built in a numpy buffer, not joined into bytes: numpy backs large
        # buffers with huge pages, and faulting in a large bytes object's 4 KiB pages cost
        # as much as a third of the encode on the machines measured (docs/lossless.md).
        payload = np.empty(4 * len(blobs) + sum(lengths), dtype=np.uint8)
        payload[: 4 * len(blobs)] = np.array(lengths, dtype="<u4").view(np.uint8)
        pos = 4 * len(blobs)
        for blob, length in zip(blobs, lengths):
            payload[pos:pos + length] = np.frombuffer(blob, dtype=np.uint8)
            pos += length
        return memoryview(payload), {"chunk": chunk}

    @staticmethod
    def _encode_chunk(le: np.ndarray, planes: tuple[tuple[int, int], ...], rotate: bool) -> list[Any]:
        """One chunk's stored planes: each a zstd frame, or its raw bytes when that is no larger."""
        m, size = le.shape
        if rotate:  # the top 16 bits rotated left by one: the exponent byte, then mantissa + sign
            # A contiguous copy first: numpy's shifts on a strided column are 3x slower.
            head = np.ascontiguousarray(_column(le, size - 2, 2))
            exponent = np.empty(m, dtype=np.uint8)
            np.right_shift(head, np.uint16(7), out=exponent, casting="unsafe")  # keeps the low 8 bits
            rotated = head << np.uint16(1)
            rotated |= head >> np.uint16(15)
            values = [exponent, rotated.astype(np.uint8)] + [_column(le, first, width) for first, width in planes[2:]]
        else:
            values = [_column(le, first, width) for first, width in planes]
        compressor = _zstd_compressor()
        out = []
        for plane in values:
            raw = np.ascontiguousarray(plane).reshape(-1).view(np.uint8)
            frame = compressor.compress(raw)
            out.append(frame if len(frame) < raw.size else raw)
        return out

    # ---- validation and decoding ---------------------------------------------------------------

    def check(self, record: TensorRecord) -> None:
        params = record.params
        if set(params) != {"chunk"}:
            raise MrcFormatError(f"lossless2 tensor {record.name!r} must have exactly the param 'chunk'")
        chunk = params["chunk"]
        if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= MAX_CHUNK:
            raise MrcFormatError(f"lossless2 tensor {record.name!r}: chunk must be an integer in 1..{MAX_CHUNK}")
        if record.dtype not in PLANES:
            raise MrcFormatError(f"lossless2 tensor {record.name!r}: dtype {record.dtype} cannot be stored")
        n = record.numel
        table = 4 * -(-n // chunk) * len(PLANES[record.dtype])
        if not table <= record.length <= table + record.nbytes:
            raise MrcFormatError(f"lossless2 tensor {record.name!r}: payload of {record.length} bytes cannot hold "
                                 f"{n} elements in chunks of {chunk}")

    def decode(self, payload: bytes, record: TensorRecord, device: Any = "cpu", threads: int | None = None) -> torch.Tensor:
        n, size = record.numel, itemsize(record.dtype)
        if n == 0:
            return torch.empty(record.shape, dtype=torch_dtype(record.dtype))
        chunk = record.params["chunk"]
        planes = PLANES[record.dtype]
        count = -(-n // chunk)
        # The table is handled in plain Python: a model has hundreds of small tensors, and for
        # them numpy's per-call cost would be most of the decode.
        head = 4 * count * len(planes)
        if len(payload) < head:
            raise MrcFormatError(f"lossless2 tensor {record.name!r}: payload shorter than its length table")
        lengths = struct.unpack_from(f"<{count * len(planes)}I", payload)
        if head + sum(lengths) != len(payload):
            raise MrcFormatError(f"lossless2 tensor {record.name!r}: plane lengths do not add up to the payload")
        offsets = list(itertools.accumulate(lengths, initial=head))
        out = np.empty((n, size), dtype=np.uint8)
        view = memoryview(payload)
        rotate = record.dtype in FLOAT_DTYPES
        is_bool = record.dtype == "bool"

        def decode_chunk(index: int) -> None:
            start = index * chunk
            m = min(chunk, n - start)
            stored = []
            for p, (_, width) in enumerate(planes, start=index * len(planes)):
                length, raw = lengths[p], m * width
                if length > raw:
                    raise MrcFormatError(f"lossless2 tensor {record.name!r}: a plane is longer than its raw bytes")
                blob = view[offsets[p]:offsets[p] + length]
                stored.append(blob if length == raw else _decompress(blob, raw, record.name))
            _place(out[start:start + m], stored, planes, rotate)
            if is_bool and int(np.frombuffer(stored[0], dtype=np.uint8).max()) > 1:
                raise MrcFormatError(f"lossless2 tensor {record.name!r}: bool bytes must be 0 or 1")

        map_ordered(decode_chunk, range(count), resolve_threads(threads))
        if sys.byteorder == "little":
            return torch.from_numpy(out.reshape(-1)).view(torch_dtype(record.dtype)).reshape(record.shape)
        return tensor_from_le_bytes(out.reshape(-1).data, record.dtype, record.shape)


def _decompress(blob: memoryview, size: int, name: str) -> bytes:
    """A stored zstd plane: exactly one frame that declares and holds ``size`` bytes. The size
    is checked before decompressing, so a crafted frame cannot make the reader allocate more."""
    try:
        declared = zstandard.frame_content_size(blob)
        if declared != size:
            raise MrcFormatError(f"lossless2 tensor {name!r}: a zstd plane declares {declared} bytes, not {size}")
        data = _zstd_decompressor().decompress(blob, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise MrcFormatError(f"lossless2 tensor {name!r}: damaged zstd plane ({' '.join(str(exc).split())})") from None
    if len(data) != size:
        raise MrcFormatError(f"lossless2 tensor {name!r}: a zstd plane holds {len(data)} bytes, not {size}")
    return data


def _place(le: np.ndarray, stored: list[Any], planes: tuple[tuple[int, int], ...], rotate: bool) -> None:
    """Write one chunk's planes (bytes-like, in payload order) into its ``(m, itemsize)`` bytes."""
    m, size = le.shape
    start = 0
    if rotate:  # undo the rotation of the top 16 bits while joining the first two planes
        joined = np.frombuffer(stored[0], dtype=np.uint8).astype("<u2")
        joined <<= np.uint16(8)
        joined |= np.frombuffer(stored[1], dtype=np.uint8)
        low = joined >> np.uint16(1)
        joined <<= np.uint16(15)
        head = _column(le, size - 2, 2)
        if size == 2:  # the column is the whole chunk: write the result in place
            np.bitwise_or(joined, low, out=head)
        else:  # numpy's ufuncs are slow on strided output; one strided copy is not
            joined |= low
            head[...] = joined
        start = 2
    for data, (first, width) in zip(stored[start:], planes[start:]):
        column = _column(le, first, width)
        dtype = _WIDTH_DTYPE.get(width, "u1")
        column[...] = np.frombuffer(data, dtype=dtype).reshape(column.shape)


CODEC = Lossless2Codec()
