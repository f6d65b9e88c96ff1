"""The preamble and the header document of a ``.mrc`` file (versions 1 and 2), and where payloads go.

Design choices, and why (the byte layout is docs/format.md; this module is its reference):

* A fixed 24-byte preamble (magic, version, header CRC32, header length) and a JSON header of
  bounded size, like safetensors, so a reader learns everything about the file from one small
  read and can validate it completely before it allocates or decodes anything. The JSON is
  zlib-compressed: REC files store a few bits per block, and a plain-text header with its
  repeated keys would otherwise be most of a small model's file.
* Every payload has its own CRC32 and an 8-byte aligned offset; padding must be zero and the
  header records the total file size, so truncation and every single-byte change are detected.
* Version 2 (what mlcompress writes) keeps version 1's structure and makes small files small:
  the JSON is raw DEFLATE with a preset dictionary fixed in the spec (:data:`PRESET_DICTIONARY`,
  the keys and values every header repeats), records leave out ``dtype`` float32 and empty
  ``params``, and a :class:`~mlcompress.format.records.GroupRecord` stores many tensors of one
  codec (a REC file's) under one offset, length and CRC. A LeNet-5 REC header is then ~160
  bytes instead of ~580.
* :func:`lay_out` is the one place that assigns offsets, so a writer and a size estimate (for
  ``--target-size``) agree on the header's exact length without writing a file.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from mlcompress.errors import InputError, MrcFormatError
from mlcompress.format.dtypes import ITEMSIZE
from mlcompress.format.records import GroupRecord, TensorRecord

Unit = TensorRecord | GroupRecord

MAGIC = b"\x89MRC\r\n\x1a\n"
VERSION = 2  # what the writer writes
READABLE_VERSIONS = (1, 2)
#: Version 2's DEFLATE preset dictionary (RFC 1951 raw deflate, window 2^15; docs/format.md):
#: text the header is likely to repeat, so even its first occurrence costs a back-reference.
PRESET_DICTIONARY = (
    b'"alias_of":"","dtype":"bfloat16","dtype":"float16","dtype":"int64",'
    b'"codec":"lossless","params":{"planes":[{"mode":"ans","length":},{"mode":"raw","length":}]},'
    b'"codec":"quant","codec":"raw","params":{"bits":16,"seed":0,"layout_seed":0},'
    b'"group":[["conv1.weight",[".bias",[],{"free":"layers.0.fc1.weight",'
    b'"offset":,"length":,"crc32":}]}'
    b'{"format":"mlcompress.mrc","version":2,"file_size":,"metadata":{"producer":"mlcompress 0.2.0",'
    b'"options":{"method":"rec"}},"tensors":[{"name":"'
)
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


def encode_header(doc: Mapping[str, Any], version: int = VERSION) -> bytes:
    """The stored form of a header document: compact UTF-8 JSON, compressed at level 9 -- a zlib
    stream (version 1) or raw DEFLATE with :data:`PRESET_DICTIONARY` (version 2)."""
    text = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(text) > MAX_HEADER_BYTES:
        raise InputError(f"header of {len(text)} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    if version == 1:
        return zlib.compress(text, 9)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, PRESET_DICTIONARY)
    return deflater.compress(text) + deflater.flush()


def decode_header(stored: bytes, path: str | os.PathLike = "<header>", version: int = VERSION) -> Any:
    """Inverse of :func:`encode_header` for a header region (the stream + zero padding)."""
    inflater = zlib.decompressobj() if version == 1 else zlib.decompressobj(-15, PRESET_DICTIONARY)
    try:
        text = inflater.decompress(stored, MAX_HEADER_BYTES + 1)
    except zlib.error:
        raise MrcFormatError(f"{path}: header is not a valid {'zlib' if version == 1 else 'DEFLATE'} stream") from None
    if len(text) > MAX_HEADER_BYTES:
        raise MrcFormatError(f"{path}: header expands beyond the {MAX_HEADER_BYTES}-byte limit")
    if not inflater.eof or inflater.unconsumed_tail:
        raise MrcFormatError(f"{path}: header is not a complete {'zlib' if version == 1 else 'DEFLATE'} stream")
    if inflater.unused_data.strip(b"\0"):
        raise MrcFormatError(f"{path}: header is followed by non-zero padding")
    try:
        return json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise MrcFormatError(f"{path}: header is not valid JSON") from None


def header_doc(units: Sequence[Unit], metadata: Mapping[str, Any], file_size: int,
               version: int = VERSION) -> dict[str, Any]:
    return {
        "format": "mlcompress.mrc",
        "version": version,
        "file_size": file_size,
        "metadata": dict(metadata),
        "tensors": [u.to_json(version) for u in units],
    }


def has_payload(unit: Unit) -> bool:
    """Whether a unit occupies bytes after the header (an alias does not)."""
    return isinstance(unit, GroupRecord) or unit.alias_of is None


def lay_out(units: Sequence[Unit], metadata: Mapping[str, Any], version: int = VERSION) -> tuple[bytes, int]:
    """Assign every stored unit its aligned offset; returns ``(stored header, file size)``.

    ``length`` and ``crc32`` of each unit must be set; a group's members get offsets back to
    back from the group's (their lengths add up to the group's). The header holds the payload offsets,
    which depend on the header's own length: iterate until the length is stable (it only grows
    by a few digits, so this ends in 2-3 rounds), then pad the header with zero bytes to the
    length the offsets were laid out for.
    """
    doc = header_doc(units, metadata, file_size=0, version=version)
    # Only the offsets and the file size change from round to round: the objects are built once
    # and those fields set in place.
    placed = [(unit, obj) for unit, obj in zip(units, doc["tensors"]) if has_payload(unit)]
    header_len = 0
    while True:
        header_end = PREAMBLE.size + header_len
        offset = align(header_end)
        file_size = header_end
        for unit, obj in placed:
            unit.offset = obj["offset"] = offset
            file_size = offset + unit.length
            offset = align(file_size)
        doc["file_size"] = file_size
        header = encode_header(doc, version)
        if len(header) <= header_len:
            for unit in units:
                if isinstance(unit, GroupRecord):
                    place_members(unit)
            return header + b"\0" * (header_len - len(header)), file_size
        header_len = len(header)


def place_members(group: GroupRecord) -> None:
    """Offsets of a group's members: back to back from the group's offset."""
    pos = group.offset
    for member in group.members:
        member.offset = pos
        pos += member.length


def read_preamble(path: Path, pre: bytes, size: int) -> tuple[int, int, int]:
    """``(version, header crc32, header length)`` of a file of ``size`` bytes, validated."""
    if len(pre) < len(MAGIC) or pre[: len(MAGIC)] != MAGIC:
        raise MrcFormatError(f"{path} is not an .mrc file (bad magic bytes)")
    if len(pre) < PREAMBLE.size:
        raise MrcFormatError(f"{path}: truncated inside the preamble")
    _, version, header_crc, header_len = PREAMBLE.unpack(pre)
    if version not in READABLE_VERSIONS:
        raise MrcFormatError(f"{path}: unsupported .mrc version {version}",
                             hint=f"this mlcompress reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    if header_len > MAX_HEADER_BYTES:
        raise MrcFormatError(f"{path}: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if PREAMBLE.size + header_len > size:
        raise MrcFormatError(f"{path}: truncated inside the header")
    return version, header_crc, header_len


def _need(cond: bool, path: Path, what: str, *args: Any) -> None:
    """Raise ``MrcFormatError`` unless ``cond``. The message is ``what.format(*args)``, built only
    on failure: a header has checks per tensor, and formatting every message of a well-formed
    file cost most of the time to open a small model's file."""
    if not cond:
        raise MrcFormatError(f"{path}: {what.format(*args) if args else what}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_header(path: Path, doc: Any, version: int = VERSION,
                 expand: Callable[[GroupRecord], list[TensorRecord]] | None = None,
                 ) -> tuple[list[TensorRecord], list[Unit], int, dict]:
    """Records (group members in place of their group), stored units, file size and metadata of a
    header document, structurally validated.

    ``expand`` turns a version-2 group into its member records (a codec's knowledge: the
    container passes it); it raises :class:`MrcFormatError` on a malformed entry. Codec
    parameters are not checked here: that is each codec's ``check`` (the container does it).
    """
    _need(isinstance(doc, dict), path, "header is not a JSON object")
    _need(doc.get("format") == "mlcompress.mrc", path, "header does not name the mlcompress.mrc format")
    _need(doc.get("version") == version, path, "header version disagrees with the preamble")
    file_size = doc.get("file_size")
    _need(_is_int(file_size) and file_size >= 0, path, "header lacks a valid file_size")
    metadata = doc.get("metadata", {})
    _need(isinstance(metadata, dict), path, "header metadata is not an object")
    items = doc.get("tensors")
    _need(isinstance(items, list), path, "header lacks a tensor list")
    records: list[TensorRecord] = []
    units: list[Unit] = []
    for item in items:
        if version >= 2 and isinstance(item, dict) and "group" in item:
            group = _parse_group(path, item)
            _need(expand is not None, path, "header has a group record but no codec to read it")
            group.members = expand(group)
            _need(sum(m.length for m in group.members) == group.length, path,
                  f"{group.name}: member payloads do not add up to the group's length")
            for member in group.members:
                member.group = len(units)
            place_members(group)
            units.append(group)
            records.extend(group.members)
            continue
        rec = _parse_record(path, item, version)
        records.append(rec)
        if rec.alias_of is None:
            units.append(rec)
    names: set[str] = set()
    limit = max_tensor_bytes()
    for rec in records:
        _need(rec.name not in names, path, "tensor {!r} appears twice", rec.name)
        names.add(rec.name)
        if rec.alias_of is None:
            _need(rec.nbytes <= limit, path, "tensor {!r} would decode to {} bytes, above the limit of {} "
                  "(set MLCOMPRESS_MAX_TENSOR_BYTES to allow it)", rec.name, rec.nbytes, limit)
    by_name = {r.name: r for r in records}
    for rec in records:
        if rec.alias_of is not None:
            target = by_name.get(rec.alias_of)
            _need(target is not None and target.alias_of is None, path,
                  f"alias {rec.name!r} points at {rec.alias_of!r}, which is not a stored tensor")
    return records, units, file_size, metadata


def _parse_position(path: Path, item: dict, what: str, *args: Any) -> tuple[int, int, int]:
    """``offset``, ``length`` and ``crc32`` of a record; ``what.format(*args)`` names it in errors."""
    for key in ("offset", "length", "crc32"):
        value = item.get(key)
        if not (_is_int(value) and value >= 0):
            raise MrcFormatError(f"{path}: {what.format(*args)} has an invalid {key}")
    return item["offset"], item["length"], item["crc32"]


def _parse_group(path: Path, item: dict) -> GroupRecord:
    _need(set(item) == {"codec", "params", "group", "offset", "length", "crc32"}, path,
          "group record must have exactly codec, params, group, offset, length, crc32")
    _need(isinstance(item["codec"], str), path, "group record names no codec")
    _need(isinstance(item["params"], dict), path, "group record has no params object")
    _need(isinstance(item["group"], list) and item["group"], path, "group record has no member list")
    offset, length, crc = _parse_position(path, item, "group record")
    return GroupRecord(item["codec"], item["params"], item["group"], offset=offset, length=length, crc32=crc)


def _parse_record(path: Path, item: Any, version: int) -> TensorRecord:
    _need(isinstance(item, dict) and isinstance(item.get("name"), str), path, "tensor record without a name")
    name = item["name"]
    if "alias_of" in item:
        _need(set(item) == {"name", "alias_of"} and isinstance(item["alias_of"], str), path,
              "alias record {!r} is malformed", name)
        return TensorRecord(name, (), "", alias_of=item["alias_of"])
    if version >= 2:  # defaults left out by the writer
        item = {"dtype": "float32", "params": {}, **item}
    shape = item.get("shape")
    _need(isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_int(s) and s >= 0 for s in shape),
          path, "tensor {!r} has an invalid shape", name)
    _need(isinstance(item.get("dtype"), str) and item["dtype"] in ITEMSIZE, path,
          "tensor {!r} has unknown dtype {!r}", name, item.get("dtype"))
    _need(isinstance(item.get("codec"), str), path, "tensor {!r} names no codec", name)
    _need(isinstance(item.get("params"), dict), path, "tensor {!r} has no codec params object", name)
    offset, length, crc = _parse_position(path, item, "tensor {!r}", name)
    return TensorRecord(name, tuple(shape), item["dtype"], item["codec"], item["params"], offset, length, crc)


def _read_at(f, pos: int, n: int) -> bytes:
    """``n`` bytes of ``f`` at ``pos``: one ``pread`` for a real file (a seek and a read cost
    two system calls per payload of a small model's file), else seek and read."""
    try:
        return os.pread(f.fileno(), n, pos)
    except (AttributeError, OSError, io.UnsupportedOperation):
        f.seek(pos)
        return f.read(n)


def check_layout(path: Path, f, units: Sequence[Unit], header_end: int, file_size: int) -> None:
    """Payloads aligned, in order, non-overlapping, zero-padded, and ending exactly at the end."""
    stored = sorted((u for u in units if has_payload(u)), key=lambda r: r.offset)
    pos = header_end
    for rec in stored:
        _need(rec.offset % ALIGN == 0, path, "payload of {!r} is not {}-byte aligned", rec.name, ALIGN)
        _need(rec.offset >= pos, path, "payload of {!r} overlaps the header or another payload", rec.name)
        _need(rec.offset + rec.length <= file_size, path, "payload of {!r} runs past the end of the file", rec.name)
        if rec.offset > pos:
            _need(rec.offset - pos < ALIGN, path, "gap between payloads is larger than the alignment")
            _need(_read_at(f, pos, rec.offset - pos) == b"\0" * (rec.offset - pos), path,
                  "padding bytes are not zero (the file is damaged)")
        pos = rec.offset + rec.length
    _need(pos == file_size, path, "file has trailing bytes after the last payload")
