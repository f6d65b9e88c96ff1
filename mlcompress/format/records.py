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

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor as it was stored in the source (its dtype, not fp32)."""
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass
class Alias:
    """A tensor that shares storage with ``target`` and is stored only once."""

    name: str
    target: str
