"""The preamble and the header document of a ``.mrc`` file (version 1), and where payloads go.

Design choices, and why (the byte layout is docs/format.md; this module is its reference):

* A fixed 24-byte preamble (magic, version, header CRC32, header length) and a JSON header of
  bounded size, like safetensors, so a reader learns everything about the file from one small
  read and can validate it completely before it allocates or decodes anything. The JSON is
  zlib-compressed: REC files store a few bits per block, and a plain-text header with its
  repeated keys would otherwise be most of a small model's file.
* Every payload has its own CRC32 and an 8-byte aligned offset; padding must be zero and the
  header records the total file size, so truncation and every single-byte change are detected.
* :func:`lay_out` is the one place that assigns offsets, so a writer and a size estimate (for
  ``--target-size``) agree on the header's exact length without writing a file.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

from mlcompress.errors import InputError, MrcFormatError
from mlcompress.format.dtypes import ITEMSIZE
from mlcompress.format.records import TensorRecord

MAGIC = b"\x89MRC\r\n\x1a\n"
VERSION = 1
ALIGN = 8
PREAMBLE = struct.Struct("<8sIIQ")  # magic, version, header crc32, header length
#: Upper bound on the stored header and on its decompressed JSON: bounds the only allocations made
#: before validation.
MAX_HEADER_BYTES = 64 << 20
MAX_DIMS = 32
#: Largest decoded tensor a reader accepts, unless MLCOMPRESS_MAX_TENSOR_BYTES raises it.
DEFAULT_MAX_TENSOR_BYTES = 1 << 37


def align(n: int) -> int:
    """``n`` rounded up to the payload alignment."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


def max_tensor_bytes() -> int:
    value = os.environ.get("MLCOMPRESS_MAX_TENSOR_BYTES")
    return int(value) if value else DEFAULT_MAX_TENSOR_BYTES


def encode_header(doc: Mapping[str, Any]) -> bytes:
    """The stored form of a header document: compact UTF-8 JSON, zlib-compressed (level 9)."""
    text = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(text) > MAX_HEADER_BYTES:
        raise InputError(f"header of {len(text)} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    return zlib.compress(text, 9)


def decode_header(stored: bytes, path: str | os.PathLike = "<header>") -> Any:
    """Inverse of :func:`encode_header` for a header region (zlib stream + zero padding)."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(stored, MAX_HEADER_BYTES + 1)
    except zlib.error:
        raise MrcFormatError(f"{path}: header is not a valid zlib stream") from None
    if len(text) > MAX_HEADER_BYTES:
        raise MrcFormatError(f"{path}: header expands beyond the {MAX_HEADER_BYTES}-byte limit")
    if not inflater.eof or inflater.unconsumed_tail:
        raise MrcFormatError(f"{path}: header is not a complete zlib stream")
    if inflater.unused_data.strip(b"\0"):
        raise MrcFormatError(f"{path}: header is followed by non-zero padding")
    try:
        return json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise MrcFormatError(f"{path}: header is not valid JSON") from None


def header_doc(records: Sequence[TensorRecord], metadata: Mapping[str, Any], file_size: int) -> dict[str, Any]:
    return {
        "format": "mlcompress.mrc",
        "version": VERSION,
        "file_size": file_size,
        "metadata": dict(metadata),
        "tensors": [r.to_json() for r in records],
    }


def lay_out(records: Sequence[TensorRecord], metadata: Mapping[str, Any]) -> tuple[bytes, int]:
    """Assign every stored record its aligned offset; returns ``(stored header, file size)``.

    ``length`` and ``crc32`` of each record must be set. The header holds the payload offsets,
    which depend on the header's own length: iterate until the length is stable (it only grows
    by a few digits, so this ends in 2-3 rounds), then pad the header with zero bytes to the
    length the offsets were laid out for.
    """
    header_len = 0
    while True:
        header_end = PREAMBLE.size + header_len
        offset = align(header_end)
        file_size = header_end
        for rec in records:
            if rec.alias_of is None:
                rec.offset = offset
                file_size = offset + rec.length
                offset = align(file_size)
        header = encode_header(header_doc(records, metadata, file_size=file_size))
        if len(header) <= header_len:
            return header + b"\0" * (header_len - len(header)), file_size
        header_len = len(header)


def read_preamble(path: Path, pre: bytes, size: int) -> tuple[int, int, int]:
    """``(version, header crc32, header length)`` of a file of ``size`` bytes, validated."""
    if len(pre) < len(MAGIC) or pre[: len(MAGIC)] != MAGIC:
        raise MrcFormatError(f"{path} is not an .mrc file (bad magic bytes)")
    if len(pre) < PREAMBLE.size:
        raise MrcFormatError(f"{path}: truncated inside the preamble")
    _, version, header_crc, header_len = PREAMBLE.unpack(pre)
    if version != VERSION:
        raise MrcFormatError(f"{path}: unsupported .mrc version {version}", hint=f"this mlcompress reads version {VERSION}")
    if header_len > MAX_HEADER_BYTES:
        raise MrcFormatError(f"{path}: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if PREAMBLE.size + header_len > size:
        raise MrcFormatError(f"{path}: truncated inside the header")
    return version, header_crc, header_len


def _need(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise MrcFormatError(f"{path}: {what}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_header(path: Path, doc: Any) -> tuple[list[TensorRecord], int, dict]:
    """Records, file size and metadata of a header document, structurally validated.

    Codec parameters are not checked here: that is each codec's ``check`` (the container does it).
    """
    _need(isinstance(doc, dict), path, "header is not a JSON object")
    _need(doc.get("format") == "mlcompress.mrc", path, "header does not name the mlcompress.mrc format")
    _need(doc.get("version") == VERSION, path, "header version disagrees with the preamble")
    file_size = doc.get("file_size")
    _need(_is_int(file_size) and file_size >= 0, path, "header lacks a valid file_size")
    metadata = doc.get("metadata", {})
    _need(isinstance(metadata, dict), path, "header metadata is not an object")
    items = doc.get("tensors")
    _need(isinstance(items, list), path, "header lacks a tensor list")
    records: list[TensorRecord] = []
    names: set[str] = set()
    limit = max_tensor_bytes()
    for item in items:
        _need(isinstance(item, dict) and isinstance(item.get("name"), str), path, "tensor record without a name")
        name = item["name"]
        _need(name not in names, path, f"tensor {name!r} appears twice")
        names.add(name)
        if "alias_of" in item:
            _need(set(item) == {"name", "alias_of"} and isinstance(item["alias_of"], str), path,
                  f"alias record {name!r} is malformed")
            records.append(TensorRecord(name, (), "", alias_of=item["alias_of"]))
            continue
        shape = item.get("shape")
        _need(isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_int(s) and s >= 0 for s in shape),
              path, f"tensor {name!r} has an invalid shape")
        _need(isinstance(item.get("dtype"), str) and item["dtype"] in ITEMSIZE, path,
              f"tensor {name!r} has unknown dtype {item.get('dtype')!r}")
        _need(isinstance(item.get("codec"), str), path, f"tensor {name!r} names no codec")
        _need(isinstance(item.get("params"), dict), path, f"tensor {name!r} has no codec params object")
        for key in ("offset", "length", "crc32"):
            _need(_is_int(item.get(key)) and item[key] >= 0, path, f"tensor {name!r} has an invalid {key}")
        rec = TensorRecord(name, tuple(shape), item["dtype"], item["codec"], item["params"],
                           item["offset"], item["length"], item["crc32"])
        _need(rec.nbytes <= limit, path,
              f"tensor {name!r} would decode to {rec.nbytes} bytes, above the limit of {limit} "
              "(set MLCOMPRESS_MAX_TENSOR_BYTES to allow it)")
        records.append(rec)
    by_name = {r.name: r for r in records}
    for rec in records:
        if rec.alias_of is not None:
            target = by_name.get(rec.alias_of)
            _need(target is not None and target.alias_of is None, path,
                  f"alias {rec.name!r} points at {rec.alias_of!r}, which is not a stored tensor")
    return records, file_size, metadata


def check_layout(path: Path, f, records: Sequence[TensorRecord], header_end: int, file_size: int) -> None:
    """Payloads aligned, in order, non-overlapping, zero-padded, and ending exactly at the end."""
    stored = sorted((r for r in records if r.alias_of is None), key=lambda r: r.offset)
    pos = header_end
    for rec in stored:
        _need(rec.offset % ALIGN == 0, path, f"payload of {rec.name!r} is not {ALIGN}-byte aligned")
        _need(rec.offset >= pos, path, f"payload of {rec.name!r} overlaps the header or another payload")
        _need(rec.offset + rec.length <= file_size, path, f"payload of {rec.name!r} runs past the end of the file")
        if rec.offset > pos:
            _need(rec.offset - pos < ALIGN, path, "gap between payloads is larger than the alignment")
            f.seek(pos)
            _need(f.read(rec.offset - pos) == b"\0" * (rec.offset - pos), path,
                  "padding bytes are not zero (the file is damaged)")
        pos = rec.offset + rec.length
    _need(pos == file_size, path, "file has trailing bytes after the last payload")
