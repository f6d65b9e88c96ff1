"""The ``.mrc`` container, version 1: one file holding every tensor of a model, each by one codec.

The byte layout is specified in docs/format.md; this module is its reference implementation.
Design choices, and why:

* A fixed 24-byte preamble (magic, version, header CRC32, header length) and a JSON header of
  bounded size, like safetensors, so a reader learns everything about the file from one small
  read and can validate it completely before it allocates or decodes anything. The JSON is
  zlib-compressed: REC files store a few bits per block, and a plain-text header with its
  repeated keys would otherwise be most of a small model's file.
* Every payload has its own CRC32 and a 64-byte aligned offset; padding must be zero and the
  header records the total file size, so truncation and every single-byte change are detected.
* Writes go through :func:`mlcompress.atomic.atomic_output` (temporary file, then rename), so an
  interrupted encode never leaves a partial ``.mrc`` behind.
* Tensors that share storage (tied embeddings) are stored once; the others record ``alias_of``.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from mlcompress import codecs
from mlcompress.atomic import atomic_output, check_destination
from mlcompress.errors import InputError, MrcFormatError

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

_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The container's name for a torch dtype; a dtype it cannot store is an :class:`InputError`."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise InputError(
            f"tensors of dtype {dtype} cannot be stored", hint=f"supported: {', '.join(_DTYPES)}"
        ) from None


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise MrcFormatError(f"unknown dtype {name!r} in header") from None


def itemsize(name: str) -> int:
    return torch.empty(0, dtype=torch_dtype(name)).element_size()


@dataclass
class TensorRecord:
    """One tensor's entry in the header. ``offset`` is absolute from the start of the file."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    codec: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    offset: int = 0
    length: int = 0
    crc32: int = 0
    alias_of: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the decoded tensor in bytes."""
        return self.numel * itemsize(self.dtype)

    def to_json(self) -> dict[str, Any]:
        if self.alias_of is not None:
            return {"name": self.name, "alias_of": self.alias_of}
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "codec": self.codec,
            "params": self.params,
            "offset": self.offset,
            "length": self.length,
            "crc32": self.crc32,
        }


@dataclass
class EncodedTensor:
    """A tensor already encoded by a codec, ready to be placed in a container."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    codec: str
    params: dict[str, Any]
    payload: bytes


@dataclass
class Alias:
    """A tensor that shares storage with ``target`` and is stored only once."""

    name: str
    target: str


# --------------------------------------------------------------------------------------------
# Writing


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def write_encoded(
    path: str | os.PathLike,
    entries: Iterable[EncodedTensor | Alias],
    metadata: Mapping[str, Any],
    *,
    force: bool = False,
) -> Path:
    """Write pre-encoded tensors as a ``.mrc`` file, atomically. Returns the destination path."""
    path = Path(path)
    entries = list(entries)
    seen: set[str] = set()
    for entry in entries:
        if entry.name in seen:
            raise InputError(f"tensor name {entry.name!r} appears twice")
        seen.add(entry.name)
    stored = {e.name for e in entries if isinstance(e, EncodedTensor)}
    for entry in entries:
        if isinstance(entry, Alias) and entry.target not in stored:
            raise InputError(f"alias {entry.name!r} points at {entry.target!r}, which is not stored")

    records: list[TensorRecord] = []
    for entry in entries:
        if isinstance(entry, Alias):
            records.append(TensorRecord(entry.name, (), "", alias_of=entry.target))
        else:
            records.append(
                TensorRecord(
                    entry.name,
                    tuple(int(s) for s in entry.shape),
                    entry.dtype,
                    entry.codec,
                    dict(entry.params),
                    length=len(entry.payload),
                    crc32=zlib.crc32(entry.payload),
                )
            )
    payloads = [e.payload for e in entries if isinstance(e, EncodedTensor)]

    # The header holds the payload offsets, which depend on the header's own length: iterate
    # until the length is stable (it can only grow by a few digits, so this ends in 2-3 rounds).
    header_len = 0
    while True:
        header_end = PREAMBLE.size + header_len
        offset = _align(header_end)
        file_size = header_end
        for rec in records:
            if rec.alias_of is None:
                rec.offset = offset
                file_size = offset + rec.length
                offset = _align(file_size)
        header = encode_header(_header_doc(records, metadata, file_size=file_size))
        if len(header) <= header_len:
            # Offsets were laid out for header_len bytes: pad with zero bytes to match. The
            # guess only grows, so this loop ends.
            header += b"\0" * (header_len - len(header))
            break
        header_len = len(header)

    with atomic_output(path, force=force) as tmp, open(tmp, "wb") as f:
        f.write(PREAMBLE.pack(MAGIC, VERSION, zlib.crc32(header), len(header)))
        f.write(header)
        pos = PREAMBLE.size + len(header)
        for rec, payload in zip((r for r in records if r.alias_of is None), payloads):
            f.write(b"\0" * (rec.offset - pos))
            f.write(payload)
            pos = rec.offset + len(payload)
    return path


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


def _header_doc(records: list[TensorRecord], metadata: Mapping[str, Any], file_size: int) -> dict[str, Any]:
    return {
        "format": "mlcompress.mrc",
        "version": VERSION,
        "file_size": file_size,
        "metadata": dict(metadata),
        "tensors": [r.to_json() for r in records],
    }


def shared_storage_aliases(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Map each tensor that is a view of the same memory as an earlier one to that earlier name.

    Only exact ties count (same storage, offset, shape, stride and dtype), as in tied embeddings;
    partial overlaps are stored separately.
    """
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, t in tensors.items():
        if t.numel() == 0:
            continue
        key = (
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
            t.device,
        )
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def write_mrc(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    plan: Mapping[str, tuple[str, Mapping[str, Any]]] | Callable[[str, torch.Tensor], tuple[str, Mapping[str, Any]]],
    metadata: Mapping[str, Any],
    *,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Encode ``tensors`` with the codec chosen per tensor by ``plan`` and write a ``.mrc`` file.

    ``plan`` maps a name to ``(codec_name, options)``, or is a function of (name, tensor) giving
    the same. Tied tensors are encoded once. ``progress`` is called with each tensor's name
    after it is encoded.
    """
    path = check_destination(path, force=force)

    def encode_one(name: str, tensor: torch.Tensor) -> EncodedTensor:
        codec_name, options = plan(name, tensor) if callable(plan) else plan[name]
        encoded = encode_tensor(name, tensor, codec_name, options)
        if progress is not None:
            progress(name)
        return encoded

    return write_encoded(path, encode_entries(tensors, encode_one), metadata, force=force)


def encode_entries(
    tensors: Mapping[str, torch.Tensor],
    encode_one: Callable[[str, torch.Tensor], EncodedTensor],
    progress: Callable[[int], None] | None = None,
) -> list[EncodedTensor | Alias]:
    """Encode every tensor once (tied tensors become aliases), in the checkpoint's order."""
    aliases = shared_storage_aliases(tensors)
    entries: list[EncodedTensor | Alias] = []
    for name, tensor in tensors.items():
        if name in aliases:
            entries.append(Alias(name, aliases[name]))
        else:
            entries.append(encode_one(name, tensor))
        if progress is not None:
            progress(1)
    return entries


def encode_tensor(name: str, tensor: torch.Tensor, codec_name: str, options: Mapping[str, Any]) -> EncodedTensor:
    """Encode one tensor with one codec (on CPU, contiguous) into an :class:`EncodedTensor`."""
    tensor = tensor.detach().to("cpu").contiguous()
    dtype = dtype_name(tensor.dtype)
    payload, params = codecs.get(codec_name).encode(tensor, options)
    return EncodedTensor(name, tuple(tensor.shape), dtype, codec_name, params, bytes(payload))


# --------------------------------------------------------------------------------------------
# Reading


def max_tensor_bytes() -> int:
    value = os.environ.get("MLCOMPRESS_MAX_TENSOR_BYTES")
    return int(value) if value else DEFAULT_MAX_TENSOR_BYTES


class MrcFile:
    """A validated ``.mrc`` file. Construct with :func:`open_mrc`; tensors are decoded lazily."""

    def __init__(self, path: Path, version: int, metadata: dict, records: list[TensorRecord],
                 header_length: int, file_size: int) -> None:
        self.path = path
        self.version = version
        self.metadata = metadata
        self.records = records
        self.header_length = header_length
        self.file_size = file_size
        self._by_name = {r.name: r for r in records}

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.records]

    def record(self, name: str) -> TensorRecord:
        """The record of ``name``, following an alias to the stored tensor."""
        try:
            rec = self._by_name[name]
        except KeyError:
            raise InputError(f"no tensor named {name!r} in {self.path}") from None
        return self._by_name[rec.alias_of] if rec.alias_of is not None else rec

    def payload(self, name: str) -> bytes:
        """The payload bytes of ``name``, checked against their CRC32."""
        rec = self.record(name)
        with open(self.path, "rb") as f:
            f.seek(rec.offset)
            data = f.read(rec.length)
        if len(data) != rec.length:
            raise MrcFormatError(f"{self.path}: payload of {rec.name!r} is truncated")
        if zlib.crc32(data) != rec.crc32:
            raise MrcFormatError(f"{self.path}: checksum mismatch in payload of {rec.name!r}")
        return data

    def tensor(self, name: str) -> torch.Tensor:
        """Decode one tensor (on CPU)."""
        rec = self.record(name)
        out = codecs.get(rec.codec).decode(self.payload(rec.name), rec)
        if tuple(out.shape) != rec.shape or out.dtype != torch_dtype(rec.dtype):
            raise MrcFormatError(
                f"{self.path}: {rec.name!r} decoded to {tuple(out.shape)} {out.dtype}, "
                f"header says {rec.shape} {rec.dtype}"
            )
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """Decode every tensor; aliases are restored as the very same tensor object."""
        out: dict[str, torch.Tensor] = {}
        for rec in self.records:
            if rec.alias_of is None:
                out[rec.name] = self.tensor(rec.name)
        return {r.name: out[r.alias_of or r.name] for r in self.records}

    def __iter__(self) -> Iterator[TensorRecord]:
        return iter(self.records)


def open_mrc(path: str | os.PathLike) -> MrcFile:
    """Open and fully validate a ``.mrc`` file's structure; payload CRCs are checked on read.

    Every inconsistency raises :class:`MrcFormatError` with a one-line message before anything
    proportional to the declared sizes is allocated.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if not path.is_file():
        raise InputError(f"{path} is not a file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        pre = f.read(PREAMBLE.size)
        if len(pre) < len(MAGIC) or pre[: len(MAGIC)] != MAGIC:
            raise MrcFormatError(f"{path} is not an .mrc file (bad magic bytes)")
        if len(pre) < PREAMBLE.size:
            raise MrcFormatError(f"{path}: truncated inside the preamble")
        _, version, header_crc, header_len = PREAMBLE.unpack(pre)
        if version != VERSION:
            raise MrcFormatError(
                f"{path}: unsupported .mrc version {version}", hint=f"this mlcompress reads version {VERSION}"
            )
        if header_len > MAX_HEADER_BYTES:
            raise MrcFormatError(f"{path}: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if PREAMBLE.size + header_len > size:
            raise MrcFormatError(f"{path}: truncated inside the header")
        header = f.read(header_len)
        if zlib.crc32(header) != header_crc:
            raise MrcFormatError(f"{path}: header checksum mismatch (the file is damaged)")
        doc = decode_header(header, path)
        records, file_size, metadata = _parse_header(path, doc)
        if size != file_size:
            kind = "truncated" if size < file_size else "longer than its header says"
            raise MrcFormatError(f"{path}: file is {kind} ({size} bytes, header says {file_size})")
        _check_layout(path, f, records, PREAMBLE.size + header_len, file_size)
    return MrcFile(path, version, metadata, records, header_len, file_size)


def _need(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise MrcFormatError(f"{path}: {what}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_header(path: Path, doc: Any) -> tuple[list[TensorRecord], int, dict]:
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
        _need(isinstance(item.get("dtype"), str) and item["dtype"] in _DTYPES, path, f"tensor {name!r} has unknown dtype {item.get('dtype')!r}")
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
    for rec in records:
        if rec.alias_of is None:
            codec = codecs.get(rec.codec)
            try:
                codec.check(rec)
            except MrcFormatError as exc:
                raise MrcFormatError(f"{path}: {exc}") from None
            except (KeyError, TypeError, ValueError, OverflowError) as exc:
                raise MrcFormatError(f"{path}: tensor {rec.name!r} has malformed {rec.codec} params ({exc})") from None
    return records, file_size, metadata


def _check_layout(path: Path, f, records: list[TensorRecord], header_end: int, file_size: int) -> None:
    stored = sorted((r for r in records if r.alias_of is None), key=lambda r: r.offset)
    pos = header_end
    for rec in stored:
        _need(rec.offset % ALIGN == 0, path, f"payload of {rec.name!r} is not {ALIGN}-byte aligned")
        _need(rec.offset >= pos, path, f"payload of {rec.name!r} overlaps the header or another payload")
        _need(rec.offset + rec.length <= file_size, path, f"payload of {rec.name!r} runs past the end of the file")
        _check_zero_padding(path, f, pos, rec.offset)
        pos = rec.offset + rec.length
    _need(pos == file_size, path, "file has trailing bytes after the last payload")


def _check_zero_padding(path: Path, f, start: int, end: int) -> None:
    if end > start:
        _need(end - start < ALIGN, path, "gap between payloads is larger than the alignment")
        f.seek(start)
        _need(f.read(end - start) == b"\0" * (end - start), path, "padding bytes are not zero (the file is damaged)")
