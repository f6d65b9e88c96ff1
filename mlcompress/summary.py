"""What a ``.mrc`` file holds: per-tensor sizes, bits per weight and compression ratio.

The figures add up exactly: the stored bytes of all tensors plus ``overhead_bytes`` (preamble,
JSON header and alignment padding) equal the file size.
"""

from __future__ import annotations

import os
from typing import Any

from mlcompress import codecs
from mlcompress.container import open_mrc


def summarize(path: str | os.PathLike) -> dict[str, Any]:
    """Per-tensor rows and totals for ``path``; codecs with ``describe(record)`` add their fields."""
    mrc = open_mrc(path)
    rows: list[dict[str, Any]] = []
    original = stored = 0
    for rec in mrc.records:
        if rec.alias_of is not None:
            target = mrc.record(rec.name)
            rows.append({"name": rec.name, "alias_of": rec.alias_of, "shape": list(target.shape),
                         "dtype": target.dtype, "codec": "alias", "original_bytes": 0,
                         "stored_bytes": 0, "bits_per_weight": 0.0})
            continue
        row: dict[str, Any] = {
            "name": rec.name,
            "codec": rec.codec,
            "shape": list(rec.shape),
            "dtype": rec.dtype,
            "original_bytes": rec.nbytes,
            "stored_bytes": rec.length,
            "bits_per_weight": (8.0 * rec.length / rec.numel) if rec.numel else 0.0,
        }
        describe = getattr(codecs.get(rec.codec), "describe", None)
        if describe is not None:
            row["details"] = describe(rec)
        rows.append(row)
        original += rec.nbytes
        stored += rec.length
    numel = sum(mrc.record(r.name).numel for r in mrc.records if r.alias_of is None)
    return {
        "path": str(path),
        "format_version": mrc.version,
        "metadata": mrc.metadata,
        "tensors": rows,
        "totals": {
            "tensors": len(rows),
            "parameters": numel,
            "original_bytes": original,
            "stored_bytes": stored,
            "overhead_bytes": mrc.file_size - stored,
            "file_bytes": mrc.file_size,
            "bits_per_weight": (8.0 * mrc.file_size / numel) if numel else 0.0,
            "ratio": (original / mrc.file_size) if mrc.file_size else 0.0,
        },
    }
