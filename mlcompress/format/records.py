"""What the header says about one tensor, and what a writer hands the container."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mlcompress.format.dtypes import itemsize


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
    crc32: int | None = 0  # None: the payload is covered by its group's CRC (version 2)
    alias_of: str | None = None
    group: int | None = None  # index of the GroupRecord holding this payload (version 2)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the decoded tensor in bytes."""
        return self.numel * itemsize(self.dtype)

    def to_json(self, version: int = 2) -> dict[str, Any]:
        """The record's header object; version 2 leaves out ``dtype`` float32 and empty ``params``."""
        if self.alias_of is not None:
            return {"name": self.name, "alias_of": self.alias_of}
        if version >= 2:
            out: dict[str, Any] = {"name": self.name, "shape": list(self.shape)}
            if self.dtype != "float32":
                out["dtype"] = self.dtype
            out["codec"] = self.codec
            if self.params:
                out["params"] = self.params
            out.update(offset=self.offset, length=self.length, crc32=self.crc32)
            return out
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
    """A tensor already encoded by a codec, ready to be placed in a container. ``payload`` is
    bytes, or a memoryview of bytes (format ``B``, so its ``len`` is its size)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    codec: str
    params: dict[str, Any]
    payload: bytes | memoryview

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor as it was stored in the source (its dtype, not fp32)."""
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass
class Alias:
    """A tensor that shares storage with ``target`` and is stored only once."""

    name: str
    target: str


@dataclass
class GroupRecord:
    """Version 2: several tensors of one codec whose payloads are stored back to back as one.

    A REC file's tensors share their bits, seeds and selection, and each payload is a few bytes:
    one record with a compact entry per tensor (``entries``, the codec's own JSON arrays) and
    one offset, length and CRC32 for all of them is what keeps a small file's header small.
    ``members`` are the tensors' own records (codec, full params, offset inside the file,
    length), derived from the entries by the codec.
    """

    codec: str
    params: dict[str, Any]
    entries: list[Any]
    members: list[TensorRecord] = field(default_factory=list)
    offset: int = 0
    length: int = 0
    crc32: int = 0

    @property
    def name(self) -> str:
        return f"{self.codec} group of {len(self.entries)} tensors"

    def to_json(self, version: int = 2) -> dict[str, Any]:
        return {"codec": self.codec, "params": self.params, "group": self.entries, "offset": self.offset,
                "length": self.length, "crc32": self.crc32}
