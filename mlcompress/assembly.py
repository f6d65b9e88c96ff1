"""What every method does the same way when it assembles a ``.mrc``: names, metadata, fallbacks.

Methods (lossless, REC, quantization, pruning) import this; nothing here knows any method.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from mlcompress.version import __version__
from mlcompress.container import EncodedTensor, encode_tensor


def default_output(src: str | os.PathLike, suffix: str = ".mrc") -> Path:
    """``model.pt`` -> ``model.mrc``; a model directory ``m/`` -> ``m.mrc`` beside it."""
    src = Path(src)
    return src.with_name(src.name + suffix) if src.is_dir() else src.with_suffix(suffix)


def base_metadata(src: str | os.PathLike | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """Model-level header metadata every writer records: producer, source name (unless ``src``
    is None: REC leaves it out, its header being most of a small file) and options."""
    out: dict[str, Any] = {"producer": f"mlcompress {__version__}"}
    if src is not None:
        out["source"] = Path(src).name
    out["options"] = dict(options)
    return out


def smallest_lossless(name: str, tensor: Any, threads: int | None = None) -> EncodedTensor:
    """``lossless2`` (zstd-coded byte planes) if it is smaller than the raw bytes, else ``raw``.

    ``threads`` is how many threads code the tensor's chunks (default: all cores); the bytes
    never depend on it. (Files from before ``lossless2`` hold ``lossless`` tensors; they still
    decode, but nothing writes that codec by default any more: docs/lossless.md.)
    """
    coded = encode_tensor(name, tensor, "lossless2", {"threads": threads})
    if len(coded.payload) < tensor.numel() * tensor.element_size():
        return coded
    return encode_tensor(name, tensor, "raw", {})
