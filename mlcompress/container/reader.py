"""Reading a ``.mrc`` file: validate everything from one small read, decode tensors on demand."""

from __future__ import annotations

import io
import os
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from mlcompress import codecs
from mlcompress.codecs.lossless3 import crc32
from mlcompress.errors import InputError, MrcFormatError
from mlcompress.workers import resolve_threads, submit
from mlcompress.format.dtypes import torch_dtype
from mlcompress.format.header import PREAMBLE, Unit, check_layout, decode_header, parse_header, read_preamble
from mlcompress.format.records import GroupRecord, TensorRecord
from mlcompress.lazy import numpy as np
from mlcompress.lazy import torch

#: Payloads at least this large have their CRC computed on a worker thread while a parallel
#: codec decodes them (docs/lossless.md): below it the hand-off costs more than it saves.
CONCURRENT_CRC_BYTES = 1 << 20


class MrcFile:
    """A validated ``.mrc`` file. Construct with :func:`open_mrc`; tensors are decoded lazily."""

    def __init__(self, path: Path, version: int, metadata: dict, records: list[TensorRecord],
                 header_length: int, file_size: int, data: bytes | None = None,
                 units: list[Unit] | None = None) -> None:
        self.path = path
        self._data = data  # the whole file, when it was opened from memory
        self.version = version
        self.metadata = metadata
        self.records = records
        self.units = units if units is not None else [r for r in records if r.alias_of is None]
        self._group_bytes: dict[int, bytes] = {}  # verified payloads of groups already read
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

    def _read_unchecked(self, offset: int, length: int, what: str, view: bool = False,
                        handle: BinaryIO | None = None) -> bytes | memoryview:
        """The payload bytes at ``offset``; from a file opened in memory, a view of them when
        ``view`` (for codecs that take any buffer), else a copy. ``handle``: the file, already
        open (unbuffered), when several payloads are read in a row."""
        if self._data is not None:
            data = memoryview(self._data)[offset : offset + length] if view else self._data[offset : offset + length]
        elif handle is not None:
            data = _read_into_array(handle, offset, length) if view else _read_bytes(handle, offset, length)
        else:
            with open(self.path, "rb", buffering=0) as f:
                data = _read_into_array(f, offset, length) if view else _read_bytes(f, offset, length)
        if len(data) != length:
            raise MrcFormatError(f"{self.path}: payload of {what} is truncated")
        return data

    def _checksum_error(self, what: str) -> MrcFormatError:
        return MrcFormatError(f"{self.path}: checksum mismatch in payload of {what}")

    def _read(self, offset: int, length: int, crc: int, what: str, handle: BinaryIO | None = None) -> bytes:
        data = self._read_unchecked(offset, length, what, handle=handle)
        if crc32(data) != crc:
            raise self._checksum_error(what)
        return data

    def payload(self, name: str, *, handle: BinaryIO | None = None) -> bytes:
        """The payload bytes of ``name``, checked against their CRC32 (a group member's: its
        group's, read and checked once)."""
        rec = self.record(name)
        if rec.group is None:
            return self._read(rec.offset, rec.length, rec.crc32, repr(rec.name), handle)
        group = self.units[rec.group]
        data = self._group_bytes.get(rec.group)
        if data is None:
            data = self._group_bytes[rec.group] = self._read(group.offset, group.length, group.crc32, group.name, handle)
        start = rec.offset - group.offset
        return data[start : start + rec.length]

    def tensor(self, name: str, *, device: Any = "cpu", threads: int | None = None) -> Any:
        """Decode one tensor on ``device`` (a torch device or its name; the bits never depend on it).

        ``threads`` (default: all cores) is how many threads a codec that splits its work
        (``lossless2``, ``lossless3``) may use; the result never depends on it.
        """
        return self._decode(self.record(name), _as_device(device), resolve_threads(threads), None)

    def _decode(self, rec: TensorRecord, device: Any, threads: int, handle: BinaryIO | None) -> Any:
        codec = codecs.get(rec.codec)
        if getattr(codec, "parallel", False):
            out = self._decode_parallel(codec, rec, device, threads, handle)
        else:
            out = codec.decode(self.payload(rec.name, handle=handle), rec, device)
        if tuple(out.shape) != rec.shape or out.dtype != torch_dtype(rec.dtype):
            raise MrcFormatError(
                f"{self.path}: {rec.name!r} decoded to {tuple(out.shape)} {out.dtype}, header says {rec.shape} {rec.dtype}"
            )
        return out if out.device == device else out.to(device)

    def _decode_parallel(self, codec: Any, rec: TensorRecord, device: Any, threads: int,
                         handle: BinaryIO | None) -> Any:
        """Decode with a codec that takes ``threads``; a large payload's CRC is computed on a
        worker meanwhile (the decoded tensor is returned only once the CRC matched)."""
        if rec.group is not None:
            return codec.decode(self.payload(rec.name, handle=handle), rec, device, threads=threads)
        data = self._read_unchecked(rec.offset, rec.length, repr(rec.name), view=True, handle=handle)
        if threads == 1 or rec.length < CONCURRENT_CRC_BYTES:
            if crc32(data) != rec.crc32:
                raise self._checksum_error(repr(rec.name))
            return codec.decode(data, rec, device, threads=threads)
        crc = submit(threads, crc32, data)
        try:
            out = codec.decode(data, rec, device, threads=threads)
        except MrcFormatError:
            if crc.result() != rec.crc32:  # damage is reported as damage, not as what it broke
                raise self._checksum_error(repr(rec.name)) from None
            raise
        if crc.result() != rec.crc32:
            raise self._checksum_error(repr(rec.name))
        return out

    def tensors(self, *, device: Any = "cpu", threads: int | None = None) -> dict[str, Any]:
        """Decode every tensor on ``device``; aliases are restored as the very same tensor object.
        ``threads`` is :meth:`tensor`'s. The file is opened once for all of them (opening it per
        tensor cost more than decoding a small tensor)."""
        out: dict[str, Any] = {}
        threads = resolve_threads(threads)
        device = _as_device(device)
        with self._open() as handle:
            for rec in self.records:
                if rec.alias_of is None:
                    out[rec.name] = self._decode(self._by_name[rec.name], device, threads, handle)
        return {r.name: out[r.alias_of or r.name] for r in self.records}

    @contextmanager
    def _open(self) -> Iterator[BinaryIO | None]:
        """The file, opened unbuffered for a run of reads (nothing when it is held in memory)."""
        if self._data is not None:
            yield None
            return
        with open(self.path, "rb", buffering=0) as f:
            yield f

    def __iter__(self) -> Iterator[TensorRecord]:
        return iter(self.records)


def _read_into_array(f: BinaryIO, offset: int, length: int) -> memoryview:
    """``length`` bytes of the unbuffered file ``f`` from ``offset`` (fewer at the end of the
    file) in a fresh numpy buffer. Why not ``f.read``: numpy backs large buffers with huge pages,
    and on the machines measured (docs/lossless.md) first touching a large ``bytes`` object's
    4 KiB pages cost about as much as decoding it."""
    buffer = memoryview(np.empty(length, dtype=np.uint8))
    got = 0
    f.seek(offset)
    while got < length:
        n = f.readinto(buffer[got:])
        if not n:
            break
        got += n
    return buffer[:got]


def _read_bytes(f: BinaryIO, offset: int, length: int) -> bytes:
    """``length`` bytes of ``f`` from ``offset`` as ``bytes`` (fewer at the end of the file), for
    codecs that want them."""
    f.seek(offset)
    parts = []
    got = 0
    while got < length:
        part = f.read(length - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _as_device(device: Any) -> Any:
    """``device`` as a ``torch.device`` (a name such as ``"cpu"`` never equals one)."""
    return device if isinstance(device, torch.device) else torch.device(device)


def open_mrc(source: str | os.PathLike | bytes) -> MrcFile:
    """Open and fully validate a ``.mrc`` file's structure (a path, or the file's bytes);
    payload CRCs are checked on read.

    Every inconsistency raises :class:`MrcFormatError` with a one-line message before anything
    proportional to the declared sizes is allocated.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return _open(Path("<bytes>"), io.BytesIO(data), len(data), data)
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if not path.is_file():
        raise InputError(f"{path} is not a file")
    with open(path, "rb") as f:
        return _open(path, f, path.stat().st_size, None)


def _open(path: Path, f: BinaryIO, size: int, data: bytes | None) -> MrcFile:
    version, header_crc, header_len = read_preamble(path, f.read(PREAMBLE.size), size)
    header = f.read(header_len)
    if zlib.crc32(header) != header_crc:
        raise MrcFormatError(f"{path}: header checksum mismatch (the file is damaged)")
    records, units, file_size, metadata = parse_header(path, decode_header(header, path, version), version,
                                                       expand=lambda group: _members(path, group))
    for rec in records:
        if rec.alias_of is None:
            _check_codec(path, rec)
    if size != file_size:
        kind = "truncated" if size < file_size else "longer than its header says"
        raise MrcFormatError(f"{path}: file is {kind} ({size} bytes, header says {file_size})")
    check_layout(path, f, units, PREAMBLE.size + header_len, file_size)
    return MrcFile(path, version, metadata, records, header_len, file_size, data, units)


def _members(path: Path, group: GroupRecord) -> list[TensorRecord]:
    """A group's member records, from its codec (which must know how to group)."""
    codec = codecs.get(group.codec)
    if not hasattr(codec, "group_members"):
        raise MrcFormatError(f"{path}: codec {group.codec!r} does not store groups")
    try:
        return codec.group_members(group.params, group.entries)
    except MrcFormatError as exc:
        raise MrcFormatError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise MrcFormatError(f"{path}: malformed {group.name} ({exc})") from None


def _check_codec(path: Path, rec: TensorRecord) -> None:
    codec = codecs.get(rec.codec)
    try:
        codec.check(rec)
    except MrcFormatError as exc:
        raise MrcFormatError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise MrcFormatError(f"{path}: tensor {rec.name!r} has malformed {rec.codec} params ({exc})") from None
