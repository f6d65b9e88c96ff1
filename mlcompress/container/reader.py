"""Reading a ``.mrc`` file: validate everything from one small read, decode tensors on demand."""

from __future__ import annotations

import io
import os
import stat
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from mlcompress import codecs
from mlcompress.codecs.lossless3 import crc32
from mlcompress.errors import InputError, MrcFormatError
from mlcompress.workers import resolve_threads, submit
from mlcompress.format.dtypes import torch_dtype
from mlcompress.format.header import ALIGN, PREAMBLE, Unit, check_layout, decode_header, parse_header, read_preamble
from mlcompress.format.records import GroupRecord, TensorRecord
from mlcompress.lazy import numpy as np
from mlcompress.lazy import torch

#: Payloads at least this large have their CRC computed on a worker thread while a parallel
#: codec decodes them (docs/lossless.md): below it the hand-off costs more than it saves.
CONCURRENT_CRC_BYTES = 1 << 20
#: :meth:`MrcFile.tensors` reads and decodes payloads in runs of about this many bytes.
RUN_BYTES = 64 << 20


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
                        handle: BinaryIO | None = None, scratch: bool = True) -> bytes | memoryview:
        """The payload bytes at ``offset``; from a file opened in memory, a view of them when
        ``view`` (for codecs that take any buffer), else a copy. ``handle``: the file, already
        open (unbuffered), when several payloads are read in a row. A ``view`` read from the
        file lies in this thread's scratch buffer (valid until its next read) unless not
        ``scratch``."""
        if self._data is not None:
            data = memoryview(self._data)[offset : offset + length] if view else self._data[offset : offset + length]
        elif handle is not None:
            data = _read_into_array(handle, offset, length, scratch) if view else _read_bytes(handle, offset, length)
        else:
            with open(self.path, "rb", buffering=0) as f:
                data = _read_into_array(f, offset, length, scratch) if view else _read_bytes(f, offset, length)
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
        if rec.group is None:
            if hasattr(codec, "decode_many"):
                return self._decode_run([rec], device, threads, handle)[rec.name]
            parallel = getattr(codec, "parallel", False)
            data = self._read_unchecked(rec.offset, rec.length, repr(rec.name), view=parallel, handle=handle)
            return self._decode_one(codec, data, rec, device, threads)
        data = self.payload(rec.name, handle=handle)
        if getattr(codec, "parallel", False):
            return self._checked(codec.decode(data, rec, device, threads=threads), rec, device)
        return self._checked(codec.decode(data, rec, device), rec, device)

    def _checked(self, out: Any, rec: TensorRecord, device: Any) -> Any:
        """``out`` on ``device``, once its shape and dtype are the header's."""
        if tuple(out.shape) != rec.shape or out.dtype != torch_dtype(rec.dtype):
            raise MrcFormatError(
                f"{self.path}: {rec.name!r} decoded to {tuple(out.shape)} {out.dtype}, header says {rec.shape} {rec.dtype}"
            )
        return out if out.device == device else out.to(device)

    def tensors(self, *, device: Any = "cpu", threads: int | None = None) -> dict[str, Any]:
        """Decode every tensor on ``device``; aliases are restored as the very same tensor object.
        ``threads`` is :meth:`tensor`'s.

        Why in runs: for a small model, opening the file, reading each payload and calling the
        codec once per chunk cost as much as decoding. So the file is opened once, consecutive
        payloads are read together (:data:`RUN_BYTES` at a time), and the tensors of a codec
        that decodes in batches (``decode_many``: ``lossless3``) are decoded in one batch with
        the CRCs, every chunk of every tensor sharing the threads.
        """
        out: dict[str, Any] = {}
        threads = resolve_threads(threads)
        device = _as_device(device)
        # threads woken now are running once the payloads are read
        codecs.prepare((r.codec for r in self.units if isinstance(r, TensorRecord)), threads)
        run: list[TensorRecord] = []
        pending = 0  # payload bytes in run
        with self._open() as handle, _reusing_large_reads():
            for rec in self.records:
                if rec.alias_of is not None:
                    continue
                if rec.group is not None:
                    out[rec.name] = self._decode(rec, device, threads, handle)
                    continue
                run.append(rec)
                pending += rec.length
                if pending >= RUN_BYTES:
                    out.update(self._decode_run(run, device, threads, handle))
                    run, pending = [], 0
            if run:
                out.update(self._decode_run(run, device, threads, handle))
        return {r.name: out[r.alias_of or r.name] for r in self.records}

    def _decode_run(self, run: list[TensorRecord], device: Any, threads: int,
                    handle: BinaryIO | None) -> dict[str, Any]:
        """Decode the records of ``run`` (payloads of their own, no group), each CRC checked
        before its tensor is returned; damage is reported as damage, not as what it broke."""
        views = self._read_run(run, handle)
        batches: dict[str, list[tuple[memoryview, TensorRecord]]] = {}
        decoded: dict[str, Any] = {}
        for view, rec in zip(views, run):
            codec = codecs.get(rec.codec)
            if hasattr(codec, "decode_many"):
                batches.setdefault(rec.codec, []).append((view, rec))
            else:
                decoded[rec.name] = self._decode_one(codec, view, rec, device, threads)
        for name, items in batches.items():
            try:
                tensors, crcs = codecs.get(name).decode_many(items, threads, crc=True)
            except MrcFormatError:
                for view, rec in items:
                    if crc32(view) != rec.crc32:
                        raise self._checksum_error(repr(rec.name)) from None
                raise
            for (_, rec), crc, tensor in zip(items, crcs, tensors):
                if crc != rec.crc32:
                    raise self._checksum_error(repr(rec.name))
                decoded[rec.name] = self._checked(tensor, rec, device)
        return decoded

    def _decode_one(self, codec: Any, data: bytes | memoryview, rec: TensorRecord, device: Any, threads: int) -> Any:
        """One payload already read, with a codec that does not batch. A codec that takes
        ``threads`` (``lossless2``) gets the buffer itself, and a large payload's CRC is computed
        on a worker meanwhile (the tensor is returned only once the CRC matched); the others get
        ``bytes``, as the codec protocol says."""
        if not getattr(codec, "parallel", False):
            if crc32(data) != rec.crc32:
                raise self._checksum_error(repr(rec.name))
            payload = data if isinstance(data, bytes) else bytes(data)
            return self._checked(codec.decode(payload, rec, device), rec, device)
        if threads == 1 or rec.length < CONCURRENT_CRC_BYTES:
            if crc32(data) != rec.crc32:
                raise self._checksum_error(repr(rec.name))
            return self._checked(codec.decode(data, rec, device, threads=threads), rec, device)
        crc = submit(threads, crc32, data)
        try:
            out = codec.decode(data, rec, device, threads=threads)
        except MrcFormatError:
            if crc.result() != rec.crc32:
                raise self._checksum_error(repr(rec.name)) from None
            raise
        if crc.result() != rec.crc32:
            raise self._checksum_error(repr(rec.name))
        return self._checked(out, rec, device)

    def _read_run(self, run: list[TensorRecord], handle: BinaryIO | None) -> list[memoryview]:
        """The payloads of ``run``: views of one read when they follow each other in the file
        (the writer lays them out in order, ``ALIGN``-padded), else one read each."""
        consecutive = all(0 <= b.offset - (a.offset + a.length) < ALIGN for a, b in zip(run, run[1:]))
        if not consecutive:
            return [self._read_unchecked(r.offset, r.length, repr(r.name), view=True, handle=handle, scratch=False)
                    for r in run]
        start = run[0].offset
        span = self._read_unchecked(start, run[-1].offset + run[-1].length - start, repr(run[0].name), view=True,
                                    handle=handle)
        return [span[r.offset - start : r.offset - start + r.length] for r in run]

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


def _read_into_array(f: BinaryIO, offset: int, length: int, scratch: bool = True) -> memoryview:
    """``length`` bytes of the unbuffered file ``f`` from ``offset`` (fewer at the end of the
    file) in a numpy buffer: with ``scratch``, this thread's scratch buffer (:func:`_scratch`)
    when it is small enough, else a fresh one. Why not ``f.read``: numpy backs large buffers with huge pages,
    and on the machines measured (docs/lossless.md) first touching a large ``bytes`` object's
    4 KiB pages cost about as much as decoding it.

    A scratch view is valid until this thread's next read: callers decode from it (codecs copy what
    they keep, see :mod:`mlcompress.codecs`) and drop it before reading again."""
    buffer = _scratch(length) if scratch else memoryview(np.empty(length, dtype=np.uint8))
    got = 0
    f.seek(offset)
    while got < length:
        n = f.readinto(buffer[got:])
        if not n:
            break
        got += n
    return buffer[:got]


#: Reads up to this size reuse one buffer per thread. Why: a fresh buffer of 128 KiB to a few
#: MiB is mapped by malloc page by page and unmapped again when freed, so every read paid a page
#: fault per 4 KiB (and the freed mapping also moved the decoded tensors onto fresh pages): on a
#: LeNet-5 (1.4 MB file) that was 1.1 of 1.8 ms of ``tensors()`` (docs/lossless.md). Larger
#: buffers get huge pages from numpy, where first touch is cheap; keeping one that large alive
#: would cost memory for nothing.
SCRATCH_BYTES = 4 << 20
_SCRATCH = threading.local()


def _scratch(length: int) -> memoryview:
    """A writable buffer of ``length`` bytes: a view of this thread's buffer, which is replaced
    by a larger one (the next power of two, at least 64 KiB) when too small. A read above
    :data:`SCRATCH_BYTES` outside :func:`_reusing_large_reads` gets a fresh buffer instead, so
    nothing that size outlives its read."""
    buffer = getattr(_SCRATCH, "buffer", None)
    if buffer is not None and len(buffer) >= length:
        return buffer[:length]
    if length > SCRATCH_BYTES:
        buffer = memoryview(np.empty(length, dtype=np.uint8))
        if getattr(_SCRATCH, "depth", 0):
            _SCRATCH.buffer = buffer
        return buffer
    buffer = _SCRATCH.buffer = memoryview(np.empty(max(1 << 16, 1 << (length - 1).bit_length()), dtype=np.uint8))
    return buffer[:length]


@contextmanager
def _reusing_large_reads() -> Iterator[None]:
    """While inside, this thread's large reads share its buffer too (the largest so far)
    instead of each getting a fresh one, which on the VM measured faulted in at 2.3 GB/s: a
    model's runs (:data:`RUN_BYTES` each) are read one after another, each dropped before the
    next. On the way out of the outermost call a buffer above :data:`SCRATCH_BYTES` is freed."""
    _SCRATCH.depth = getattr(_SCRATCH, "depth", 0) + 1
    try:
        yield
    finally:
        _SCRATCH.depth -= 1
        buffer = getattr(_SCRATCH, "buffer", None)
        if not _SCRATCH.depth and buffer is not None and len(buffer) > SCRATCH_BYTES:
            _SCRATCH.buffer = None


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
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{path} is not a file")
    with open(path, "rb") as f:
        return _open(path, f, info.st_size, None)


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
