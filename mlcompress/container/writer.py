"""Writing a ``.mrc`` file: encode each tensor with its codec, lay the payloads out, publish atomically.

Writes go through :func:`mlcompress.atomic.atomic_output` (temporary file, then rename), so an
interrupted encode never leaves a partial ``.mrc`` behind. Tensors that share storage (tied
embeddings) are stored once; the others record ``alias_of``.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from mlcompress import codecs
from mlcompress.atomic import atomic_output, check_destination
from mlcompress.codecs.lossless3 import crc32
from mlcompress.errors import InputError
from mlcompress.format.dtypes import dtype_name
from mlcompress.format.header import MAGIC, PREAMBLE, VERSION, Unit, lay_out
from mlcompress.format.records import Alias, EncodedTensor, GroupRecord, TensorRecord

Entry = EncodedTensor | Alias
#: Chooses the codec of one tensor: ``(name, tensor) -> (codec name, codec options)``.
Plan = Mapping[str, tuple[str, Mapping[str, Any]]] | Callable[[str, Any], tuple[str, Mapping[str, Any]]]


def _records(entries: list[Entry]) -> list[TensorRecord]:
    seen: set[str] = set()
    for entry in entries:
        if entry.name in seen:
            raise InputError(f"tensor name {entry.name!r} appears twice")
        seen.add(entry.name)
    stored = {e.name for e in entries if isinstance(e, EncodedTensor)}
    records: list[TensorRecord] = []
    for entry in entries:
        if isinstance(entry, Alias):
            if entry.target not in stored:
                raise InputError(f"alias {entry.name!r} points at {entry.target!r}, which is not stored")
            records.append(TensorRecord(entry.name, (), "", alias_of=entry.target))
        else:
            records.append(TensorRecord(entry.name, tuple(int(s) for s in entry.shape), entry.dtype, entry.codec,
                                        dict(entry.params), length=len(entry.payload), crc32=crc32(entry.payload)))
    return records


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


def _payload_units(records: list[TensorRecord], payloads: Mapping[str, bytes]) -> tuple[list[Unit], dict[int, bytes]]:
    """Units of ``records`` and each stored unit's payload bytes (a group's members back to back)."""
    units = group_units(records)
    data: dict[int, bytes] = {}
    for unit in units:
        if isinstance(unit, GroupRecord):
            data[id(unit)] = b"".join(payloads[m.name] for m in unit.members)
            unit.crc32 = crc32(data[id(unit)])
            for member in unit.members:
                member.crc32 = None
        elif unit.alias_of is None:
            data[id(unit)] = payloads[unit.name]
    return units, data


def file_size(entries: Iterable[Entry], metadata: Mapping[str, Any]) -> int:
    """The exact size :func:`write_encoded` would give these entries (nothing is written).

    A method that sizes its payloads for a target file size asks this with empty stand-in
    payloads; the answer is the writer's own layout, not an estimate.
    """
    entries = list(entries)
    units, _ = _payload_units(_records(entries), {e.name: e.payload for e in entries if isinstance(e, EncodedTensor)})
    return lay_out(units, metadata)[1]


def write_encoded(path: str | os.PathLike, entries: Iterable[Entry], metadata: Mapping[str, Any], *,
                  force: bool = False) -> Path:
    """Write pre-encoded tensors as a ``.mrc`` file, atomically. Returns the destination path."""
    path = Path(path)
    entries = list(entries)
    units, data = _payload_units(_records(entries), {e.name: e.payload for e in entries if isinstance(e, EncodedTensor)})
    header, _ = lay_out(units, metadata)
    with atomic_output(path, force=force) as tmp, open(tmp, "wb") as f:
        f.write(PREAMBLE.pack(MAGIC, VERSION, zlib.crc32(header), len(header)))
        f.write(header)
        pos = PREAMBLE.size + len(header)
        for unit in sorted((u for u in units if id(u) in data), key=lambda u: u.offset):
            f.write(b"\0" * (unit.offset - pos))
            f.write(data[id(unit)])
            pos = unit.offset + unit.length
    return path


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
