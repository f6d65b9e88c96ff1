"""What a ``.mrc`` file holds: per-tensor sizes, bits per weight and compression ratio.

The figures add up exactly: the stored bytes of all tensors plus ``overhead_bytes`` (preamble,
JSON header and alignment padding) equal the file size. Only the header is read, and neither
torch nor numpy is imported, so ``mlcompress inspect`` answers at once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mlcompress import codecs
from mlcompress.container import open_mrc
from mlcompress.report import Report


def inspect_file(path: Path) -> Report:
    """The file's :class:`Report`; details: ``format_version``, ``metadata``, per-tensor ``rows``
    (codecs that describe their records add ``details``) and ``overhead_bytes``."""
    mrc = open_mrc(path)
    rows: list[dict[str, Any]] = []
    stored = 0
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
        described = {**codecs.describe(rec), **_grid(rec.params)}
        if described:
            row["details"] = described
        rows.append(row)
        stored += rec.length
    details = {"format_version": mrc.version, "metadata": mrc.metadata, "rows": rows, "stored_bytes": stored,
               "overhead_bytes": mrc.file_size - stored}
    return Report.of(mrc, mrc.metadata.get("options", {}).get("method", "?"), 0.0, details)


def _grid(params: dict[str, Any]) -> dict[str, Any]:
    """How a quantized tensor shares its scales or steps, read off its group layout (``rows`` x
    ``cols`` cut into groups of ``group`` columns): ``grid`` per-tensor, per-channel or group
    (with ``group_size``), and the uniform grid's ``symmetric`` and L²'s ``edge``. These are
    what ``--per-channel``, ``--group-size`` and ``--symmetric`` chose, which the codec's own
    summary leaves out; empty for records without a layout."""
    out: dict[str, Any] = {}
    layout = [params.get(k) for k in ("rows", "cols", "group")]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in layout):
        rows, cols, group = layout
        out["grid"] = "group" if group < cols else "per-tensor" if rows == 1 else "per-channel"
        if group < cols:
            out["group_size"] = group
    if isinstance(params.get("symmetric"), bool):
        out["symmetric"] = params["symmetric"]
    if isinstance(params.get("edge"), (int, float)) and not isinstance(params.get("edge"), bool):
        out["edge"] = params["edge"]
    return out


def inspection_document(report: Report) -> dict[str, Any]:
    """The ``inspect --json`` document of an :func:`inspect_file` report: per-tensor rows and totals."""
    d = report.details
    return {
        "path": str(report.path),
        "format_version": d["format_version"],
        "metadata": d["metadata"],
        "tensors": d["rows"],
        "totals": {
            "tensors": report.tensors,
            "parameters": report.parameters,
            "original_bytes": report.original_bytes,
            "fp32_bytes": report.fp32_bytes,
            "stored_bytes": d["stored_bytes"],
            "overhead_bytes": d["overhead_bytes"],
            "file_bytes": report.file_bytes,
            "bits_per_weight": 8.0 * report.file_bytes / report.parameters if report.parameters else 0.0,
            "ratio": report.ratio,
            "fp32_ratio": report.fp32_ratio,
        },
    }


def summarize(path: str | os.PathLike) -> dict[str, Any]:
    """:func:`inspection_document` of the file at ``path``."""
    return inspection_document(inspect_file(Path(path)))
