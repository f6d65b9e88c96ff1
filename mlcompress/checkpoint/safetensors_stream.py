"""Writing a safetensors file one tensor at a time, with its header fixed before any tensor exists.

``safetensors.torch.save_file`` needs every tensor in memory at once, so a decoder using it holds
the whole model (measured: 6.9x the fp32 size on a 124M GPT-2). A safetensors header only needs
each tensor's name, dtype and shape, which a ``.mrc`` header (or any encoder's plan) already
knows. So the header is computed from :class:`TensorEntry` objects, written first, and each
tensor's bytes follow at their offset as soon as the tensor exists; the writer keeps none of them.

Layout written (what ``safetensors.safe_open`` reads): an 8-byte little-endian header length N,
N bytes of JSON (``{"__metadata__": {...}, name: {"dtype", "shape", "data_offsets"}}``, padded
with spaces to a multiple of 8 so that every tensor starts 8-byte aligned), then the tensors'
bytes back to back in entry order, little-endian, C order.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Mapping, Sequence

import torch

from mlcompress.errors import CheckpointError

#: safetensors' dtype codes, for the torch dtypes it can store (some exist only in newer torch).
DTYPE_CODES: dict[torch.dtype, str] = {
    dtype: code
    for name, code in (
        ("float64", "F64"), ("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16"),
        ("complex64", "C64"), ("int64", "I64"), ("int32", "I32"), ("int16", "I16"), ("int8", "I8"),
        ("uint8", "U8"), ("bool", "BOOL"), ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
        ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
    )
    if (dtype := getattr(torch, name, None)) is not None
}  # fmt: skip


@dataclass(frozen=True)
class TensorEntry:
    """One tensor known before its values are: what a stream will hold, or what a checkpoint's
    header says of a tensor (:mod:`mlcompress.checkpoint.source` calls it ``TensorInfo``)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def check_storable(name: str, dtype: torch.dtype) -> None:
    """Refuse a dtype safetensors has no code for, naming the format that can hold it."""
    if dtype not in DTYPE_CODES:
        raise CheckpointError(
            f"tensor {name!r} has dtype {dtype}, which safetensors cannot store",
            hint="write a .pt file instead",
        )


def header_bytes(entries: Sequence[TensorEntry], metadata: Mapping[str, str]) -> bytes:
    """The length prefix and JSON header of a file holding ``entries`` in this order."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for entry in entries:
        end = offset + entry.nbytes
        header[entry.name] = {"dtype": DTYPE_CODES[entry.dtype], "shape": list(entry.shape),
                              "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


class SafetensorsStream:
    """Receives the tensors of a header already written, in entry order, and writes their bytes.

    Each :meth:`write` checks the tensor is the next entry's (name, shape, dtype), so a file can
    never get bytes at the wrong offset; :meth:`finish` checks none is missing.
    """

    def __init__(self, handle: BinaryIO, entries: Sequence[TensorEntry]) -> None:
        self._handle = handle
        self._entries = list(entries)
        self._next = 0

    @property
    def remaining(self) -> list[TensorEntry]:
        """The entries not written yet, in order."""
        return self._entries[self._next :]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``'s bytes (copied to the CPU first when it lives elsewhere)."""
        if self._next >= len(self._entries):
            raise CheckpointError(f"tensor {name!r} was not announced in the safetensors header")
        entry = self._entries[self._next]
        if name != entry.name or tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise CheckpointError(
                f"safetensors stream expected {entry.name!r} {list(entry.shape)} {entry.dtype}, "
                f"got {name!r} {list(tensor.shape)} {tensor.dtype}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._handle.write(memoryview(data))
        self._next += 1

    def write_from(self, tensors: Iterator[tuple[str, torch.Tensor]],
                   written: Callable[[str], None] | None = None) -> None:
        """Write every remaining entry, pulling exactly that many ``(name, tensor)`` pairs from
        ``tensors`` (which may go on into the next file); ``written(name)`` after each. No
        tensor is referenced here while the next one is produced, so a generator that decodes
        one at a time keeps memory at one tensor."""
        for _ in range(len(self.remaining)):
            try:
                name, tensor = next(tensors)
            except StopIteration:
                raise CheckpointError(f"no tensor came for {self.remaining[0].name!r}") from None
            self.write(name, tensor)
            del tensor
            if written is not None:
                written(name)

    def finish(self) -> None:
        if self._next != len(self._entries):
            raise CheckpointError(f"safetensors stream ended before tensor {self._entries[self._next].name!r}")


def check_entries(entries: Sequence[TensorEntry]) -> None:
    """Names non-empty and unique, dtypes storable: checked before a file is created."""
    seen: set[str] = set()
    for entry in entries:
        if not isinstance(entry.name, str) or not entry.name or entry.name == "__metadata__":
            raise CheckpointError(f"tensor name {entry.name!r} cannot be stored in safetensors")
        if entry.name in seen:
            raise CheckpointError(f"tensor {entry.name!r} is listed twice")
        seen.add(entry.name)
        check_storable(entry.name, entry.dtype)


@contextmanager
def stream_safetensors(path: str | Path, entries: Sequence[TensorEntry],
                       metadata: Mapping[str, str] | None = None) -> Iterator[SafetensorsStream]:
    """Write the header of ``entries`` to ``path`` and yield the stream that takes their values.

    The caller makes the write atomic (write to a temporary path, as
    :func:`mlcompress.atomic.atomic_output` yields, and rename). ``metadata`` is the header's
    string-to-string ``__metadata__``; build it with
    :func:`mlcompress.checkpoint.safetensors_file.header_metadata` to record tied tensors.
    The file is complete when the block exits normally; :meth:`SafetensorsStream.finish` is
    called then.
    """
    check_entries(entries)
    head = header_bytes(entries, metadata or {})
    with open(path, "wb") as handle:
        handle.write(head)
        stream = SafetensorsStream(handle, entries)
        yield stream
        stream.finish()
