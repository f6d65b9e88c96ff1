"""Writing a ``.mrc`` file: encode each tensor with its codec, lay the payloads out, publish atomically.

Writes go through :func:`mlcompress.atomic.atomic_output` (temporary file, then rename), so an
interrupted encode never leaves a partial ``.mrc`` behind. Tensors that share storage (tied
embeddings) are stored once; the others record ``alias_of``.
"""

from __future__ import annotations

import os
import secrets
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from mlcompress import codecs
from mlcompress.atomic import atomic_output, check_destination
from mlcompress.codecs.lossless3 import crc32
from mlcompress.errors import InputError
from mlcompress.format.dtypes import dtype_name
from mlcompress.format.header import MAGIC, PREAMBLE, VERSION, Unit, has_payload, lay_out
from mlcompress.format.records import Alias, EncodedTensor, GroupRecord, TensorRecord

Entry = EncodedTensor | Alias
#: Chooses the codec of one tensor: ``(name, tensor) -> (codec name, codec options)``.
Plan = Mapping[str, tuple[str, Mapping[str, Any]]] | Callable[[str, Any], tuple[str, Mapping[str, Any]]]


def _record(entry: Entry) -> TensorRecord:
    """The header record of one entry (an encoded tensor's with its payload's length and CRC)."""
    if isinstance(entry, Alias):
        return TensorRecord(entry.name, (), "", alias_of=entry.target)
    return TensorRecord(entry.name, tuple(int(s) for s in entry.shape), entry.dtype, entry.codec, dict(entry.params),
                        length=len(entry.payload), crc32=crc32(entry.payload))


def _check_records(records: list[TensorRecord]) -> None:
    """Names unique, every alias pointing at a stored tensor."""
    seen: set[str] = set()
    for rec in records:
        if rec.name in seen:
            raise InputError(f"tensor name {rec.name!r} appears twice")
        seen.add(rec.name)
    stored = {r.name for r in records if r.alias_of is None}
    for rec in records:
        if rec.alias_of is not None and rec.alias_of not in stored:
            raise InputError(f"alias {rec.name!r} points at {rec.alias_of!r}, which is not stored")


def group_units(records: list[TensorRecord]) -> list[Unit]:
    """Version 2's stored units: records whose codec can group them and that share its group key
    become one :class:`GroupRecord`, at the place of the first of them; the rest stay as they
    are (aliases included; they have no payload)."""
    units: list[Unit] = []
    groups: dict[tuple, GroupRecord] = {}
    for rec in records:
        codec = codecs.get(rec.codec) if rec.alias_of is None else None
        key = codec.group_key(rec) if codec is not None and hasattr(codec, "group_key") else None
        if key is None:
            units.append(rec)
            continue
        group = groups.get((rec.codec, key))
        if group is None:
            group = groups[(rec.codec, key)] = GroupRecord(rec.codec, codec.group_params(rec), [])
            units.append(group)
        group.entries.append(codec.group_entry(rec))
        group.members.append(rec)
    for group in groups.values():
        group.length = sum(m.length for m in group.members)
    return units


def _stored_units(records: list[TensorRecord], payload: Callable[[str], bytes | memoryview]) -> list[Unit]:
    """Units of ``records``, each group's CRC32 computed over its members' payloads back to back
    (``payload(name)`` gives one; groups hold REC's few-byte payloads, so joining them is cheap)."""
    units = group_units(records)
    for unit in units:
        if isinstance(unit, GroupRecord):
            unit.crc32 = crc32(b"".join(bytes(payload(m.name)) for m in unit.members))
            for member in unit.members:
                member.crc32 = None
    return units


def file_size(entries: Iterable[Entry], metadata: Mapping[str, Any]) -> int:
    """The exact size :func:`write_encoded` would give these entries (nothing is written).

    A method that sizes its payloads for a target file size asks this with empty stand-in
    payloads; the answer is the writer's own layout, not an estimate.
    """
    entries = list(entries)
    records = [_record(e) for e in entries]
    _check_records(records)
    payloads = {e.name: e.payload for e in entries if isinstance(e, EncodedTensor)}
    return lay_out(_stored_units(records, payloads.__getitem__), metadata)[1]


@dataclass(frozen=True)
class Written:
    """A finished ``.mrc`` file as its writer knows it: the destination, the records (as
    :attr:`MrcFile.records <mlcompress.container.reader.MrcFile.records>` lists them) and the
    file's size. Enough for a report without opening the file again, which on a small model
    cost a tenth of the encode."""

    path: Path
    records: list[TensorRecord]
    file_size: int


#: Bytes copied per call from the spool into the final file.
COPY_CHUNK = 1 << 24


#: :class:`MrcWriter` holds payloads in memory up to this many bytes before it spools them.
SPOOL_AFTER = 8 << 20


class MrcWriter:
    """A ``.mrc`` file built from entries handed over one at a time.

    The header, which comes first in the file, holds every payload's offset and length, so it
    is known only once the last tensor is encoded. With ``spool`` (what streaming encoders use)
    payloads are held in memory until they add up to :data:`SPOOL_AFTER` bytes; from then on
    each goes to a temporary file beside the destination as soon as it is added, and only its
    record stays in memory: memory is bounded by one tensor (plus that much), whatever the
    model's size. :meth:`finish` then writes the preamble and header and copies the payloads
    after them (in the kernel where it can, ``copy_file_range``), atomically. Why not spool at
    once: for a small model, creating, copying and removing the spool file cost as much as
    encoding it. Without ``spool`` payloads are always kept in memory, which is cheaper for the
    many small trial files a size search writes.

    Use as a context manager: leaving it by an exception removes the spool and writes nothing.
    """

    def __init__(self, path: str | os.PathLike, *, force: bool = False, spool: bool = True) -> None:
        self.path = check_destination(path, force=force)
        self.force = force
        self.records: list[TensorRecord] = []
        self._names: set[str] = set()
        self._memory: dict[str, bytes | memoryview] = {}
        self._spooled: dict[str, tuple[int, int]] = {}  # name -> (offset in the spool, length)
        self._spool_path: Path | None = None
        self._spool: Any = None
        self._may_spool = spool
        self._held = 0  # payload bytes in _memory
        self._spool_end = 0

    def __enter__(self) -> "MrcWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove the spool (idempotent)."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        if self._spool_path is not None:
            self._spool_path.unlink(missing_ok=True)
            self._spool_path = None

    def add(self, entry: Entry) -> None:
        """Record one tensor (its payload written to the spool at once) or alias."""
        if entry.name in self._names:
            raise InputError(f"tensor name {entry.name!r} appears twice")
        self._names.add(entry.name)
        rec = _record(entry)
        self.records.append(rec)
        if isinstance(entry, Alias):
            return
        if self._spool is None:
            self._memory[entry.name] = entry.payload
            self._held += rec.length
            if self._may_spool and self._held > SPOOL_AFTER:
                self._spill()
            return
        self._write_spool(entry.name, entry.payload)

    def _spill(self) -> None:
        """Start the spool: the payloads held so far go to it, and every later one."""
        self._spool_path = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.spool")
        self._spool = open(self._spool_path, "xb+")
        for name, payload in self._memory.items():
            self._write_spool(name, payload)
        self._memory.clear()
        self._held = 0

    def _write_spool(self, name: str, payload: bytes | memoryview) -> None:
        self._spool.write(payload)
        length = memoryview(payload).nbytes
        self._spooled[name] = (self._spool_end, length)
        self._spool_end += length

    def _payload(self, name: str) -> bytes | memoryview:
        if name in self._memory:
            return self._memory[name]
        offset, length = self._spooled[name]
        self._spool.seek(offset)
        return self._spool.read(length)

    def _copy(self, out: Any, name: str) -> None:
        """Append ``name``'s payload to the open file ``out``."""
        if name in self._memory:
            out.write(self._memory[name])
            return
        offset, length = self._spooled[name]
        out.flush()
        src, dst = self._spool.fileno(), out.fileno()
        while length:
            try:
                n = os.copy_file_range(src, dst, min(length, COPY_CHUNK), offset, None)
            except (AttributeError, OSError):  # not Linux, or a file system that refuses it
                os.lseek(src, offset, os.SEEK_SET)
                n = os.write(dst, os.read(src, min(length, COPY_CHUNK)))
            if n <= 0:
                raise OSError(f"could not copy the payload of {name!r} into {self.path}")
            offset += n
            length -= n
        out.seek(0, os.SEEK_END)

    def finish(self, metadata: Mapping[str, Any]) -> Written:
        """Lay the file out, write it atomically, remove the spool; returns what was written."""
        try:
            _check_records(self.records)
            if self._spool is not None:
                self._spool.flush()
            units = _stored_units(self.records, self._payload)
            header, size = lay_out(units, metadata)
            with atomic_output(self.path, force=self.force) as tmp, open(tmp, "wb") as f:
                f.write(PREAMBLE.pack(MAGIC, VERSION, zlib.crc32(header), len(header)))
                f.write(header)
                pos = PREAMBLE.size + len(header)
                for unit in sorted((u for u in units if has_payload(u)), key=lambda u: u.offset):
                    f.write(b"\0" * (unit.offset - pos))
                    for member in unit.members if isinstance(unit, GroupRecord) else [unit]:
                        self._copy(f, member.name)
                    pos = unit.offset + unit.length
        finally:
            self.close()
        return Written(self.path, self.records, size)


def write_encoded(path: str | os.PathLike, entries: Iterable[Entry], metadata: Mapping[str, Any], *,
                  force: bool = False) -> Path:
    """Write pre-encoded tensors (held in memory) as a ``.mrc`` file, atomically. Returns the
    destination path."""
    with MrcWriter(path, force=force, spool=False) as writer:
        for entry in entries:
            writer.add(entry)
        return writer.finish(metadata).path


def shared_storage_aliases(tensors: Mapping[str, Any]) -> dict[str, str]:
    """Map each tensor that is a view of the same memory as an earlier one to that earlier name.

    Only exact ties count (same storage, offset, shape, stride and dtype), as in tied embeddings;
    partial overlaps are stored separately.
    """
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, t in tensors.items():
        if t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def encode_tensor(name: str, tensor: Any, codec_name: str, options: Mapping[str, Any]) -> EncodedTensor:
    """Encode one tensor with one codec (on CPU, contiguous) into an :class:`EncodedTensor`."""
    tensor = tensor.detach().to("cpu").contiguous()
    dtype = dtype_name(tensor.dtype)
    payload, params = codecs.encoder(codec_name).encode(tensor, options)
    # A memoryview (of bytes) is kept as it is: lossless2/3 hand one over a numpy buffer, and
    # copying a large payload into a fresh bytes object costs page faults for nothing.
    if not isinstance(payload, memoryview):
        payload = bytes(payload)
    return EncodedTensor(name, tuple(tensor.shape), dtype, codec_name, params, payload)


def encode_entries(tensors: Mapping[str, Any], encode_one: Callable[[str, Any], EncodedTensor],
                   progress: Callable[[int], None] | None = None) -> list[Entry]:
    """Encode every tensor once (tied tensors become aliases), in the checkpoint's order.

    ``progress`` is called with the number of tensors handled so far.
    """
    aliases = shared_storage_aliases(tensors)
    entries: list[Entry] = []
    for name, tensor in tensors.items():
        entries.append(Alias(name, aliases[name]) if name in aliases else encode_one(name, tensor))
        if progress is not None:
            progress(len(entries))
    return entries


def write_stream(path: str | os.PathLike, source: Any, encode_one: Callable[[str, Any], EncodedTensor],
                 metadata: Mapping[str, Any] | Callable[[], Mapping[str, Any]], *, force: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> Written:
    """Encode a checkpoint tensor by tensor into ``path``: read one, encode it, spool its
    payload, drop it. Memory holds one tensor and its payload at a time, whatever the model.

    ``source`` is a :class:`~mlcompress.checkpoint.source.TensorSource` (anything with
    ``names``, ``aliases``, ``info(name).nbytes`` and ``get(name)``); its ties become aliases.
    ``metadata`` may be a function, called once every tensor is encoded, for headers that
    depend on the encoding. ``progress(done, total)`` is called in source bytes. Returns what
    was written (the records with their payload lengths and codecs, the file's size).
    """
    total = sum(source.info(n).nbytes for n in source.names if n not in source.aliases)
    done = 0
    with MrcWriter(path, force=force) as writer:
        for name in source.names:
            if name in source.aliases:
                writer.add(Alias(name, source.aliases[name]))
                continue
            writer.add(encode_one(name, source.get(name)))
            done += source.info(name).nbytes
            if progress is not None:
                progress(done, total)
        return writer.finish(metadata() if callable(metadata) else metadata)


def write_mrc(path: str | os.PathLike, tensors: Mapping[str, Any], plan: Plan, metadata: Mapping[str, Any], *,
              force: bool = False) -> Path:
    """Encode ``tensors`` with the codec chosen per tensor by ``plan`` and write a ``.mrc`` file.

    ``plan`` maps a name to ``(codec_name, options)``, or is a function of (name, tensor) giving
    the same. Tied tensors are encoded once.
    """
    path = check_destination(path, force=force)

    def encode_one(name: str, tensor: Any) -> EncodedTensor:
        codec_name, options = plan(name, tensor) if callable(plan) else plan[name]
        return encode_tensor(name, tensor, codec_name, options)

    return write_encoded(path, encode_entries(tensors, encode_one), metadata, force=force)
