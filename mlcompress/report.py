"""The one result every encoding call returns, with the one definition of compression ratio.

``ratio`` is the source's bytes *as stored* (each tensor in its own dtype, tied tensors once)
over the file's bytes; ``fp32_ratio`` puts the same tensors at 4 bytes per weight beside it, the
figure papers quote. Both come from the written file's header, so every command and ``inspect``
give the same numbers for the same file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from mlcompress.container import MrcFile, Written


@dataclass(frozen=True)
class Report:
    path: Path | None  # the written file (None for bytes)
    method: str
    tensors: int  # entries, aliases included
    parameters: int  # stored weights (tied tensors once)
    original_bytes: int  # the source as stored
    fp32_bytes: int
    file_bytes: int
    seconds: float = 0.0
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.original_bytes / self.file_bytes if self.file_bytes else 0.0

    @property
    def fp32_ratio(self) -> float:
        return self.fp32_bytes / self.file_bytes if self.file_bytes else 0.0

    @classmethod
    def of(cls, mrc: MrcFile | Written, method: str, seconds: float = 0.0, details: Mapping[str, Any] | None = None,
           path: Path | None = None) -> "Report":
        """The report of a written file, from its header alone (read back, or as its writer
        laid it out)."""
        stored = [r for r in mrc.records if r.alias_of is None]
        return cls(
            path=path if path is not None else mrc.path,
            method=method,
            tensors=len(mrc.records),
            parameters=sum(r.numel for r in stored),
            original_bytes=sum(r.nbytes for r in stored),
            fp32_bytes=4 * sum(r.numel for r in stored),
            file_bytes=mrc.file_size,
            seconds=seconds,
            details=dict(details or {}),
        )

    def __getitem__(self, key: str) -> Any:
        """``report[key]`` is ``report.to_json()[key]``: the same names as ``--json``."""
        return self.to_json()[key]

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object: the common fields, then the method's own."""
        return {
            "output": str(self.path) if self.path is not None else None,
            "method": self.method,
            "tensors": self.tensors,
            "parameters": self.parameters,
            "original_bytes": self.original_bytes,
            "fp32_bytes": self.fp32_bytes,
            "file_bytes": self.file_bytes,
            "ratio": self.ratio,
            "fp32_ratio": self.fp32_ratio,
            "seconds": self.seconds,
            **{k: v for k, v in self.details.items() if k not in _COMMON},
        }


_COMMON = {"output", "method", "tensors", "parameters", "original_bytes", "fp32_bytes", "file_bytes", "ratio",
           "fp32_ratio", "seconds"}
