"""Turning a checkpoint into a ``.mrc`` container: the library side of ``mlcompress encode``.

Each method decides which codec stores which tensor (the *plan*); the container does the rest.
The lossless method stores every tensor with ``lossless`` unless its bytes as they are would be
no larger (tiny tensors, where the frequency tables cost more than they save), then ``raw``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from mlcompress import __version__
from mlcompress.atomic import check_destination
from mlcompress.container import EncodedTensor, encode_entries, encode_tensor, write_encoded


def default_output(src: str | os.PathLike, suffix: str = ".mrc") -> Path:
    """``model.pt`` -> ``model.mrc``; a model directory ``m/`` -> ``m.mrc`` beside it."""
    src = Path(src)
    return src.with_name(src.name + suffix) if src.is_dir() else src.with_suffix(suffix)


def base_metadata(src: str | os.PathLike, options: Mapping[str, Any]) -> dict[str, Any]:
    """Model-level header metadata every writer records: producer, source name and options."""
    return {"producer": f"mlcompress {__version__}", "source": Path(src).name, "options": dict(options)}


def smallest_lossless(name: str, tensor: torch.Tensor) -> EncodedTensor:
    """``lossless`` if it is smaller than the raw bytes, else ``raw``."""
    coded = encode_tensor(name, tensor, "lossless", {})
    if len(coded.payload) < _nbytes(tensor):
        return coded
    return encode_tensor(name, tensor, "raw", {})


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def encode_lossless(
    src: str | os.PathLike,
    dst: str | os.PathLike | None = None,
    *,
    force: bool = False,
    unsafe_pickle: bool = False,
    progress: Callable[[int], None] | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Losslessly encode the checkpoint at ``src`` into ``dst`` (default: beside it, ``.mrc``).

    Returns a summary: output path, tensor count, original and file bytes, ratio, seconds.
    ``tensors`` may be given to skip loading (``src`` is then only recorded as the source name).
    """
    from mlcompress.checkpoint import load_checkpoint

    start = time.perf_counter()
    dst = Path(dst) if dst is not None else default_output(src)
    check_destination(dst, force=force)
    if tensors is None:
        tensors = load_checkpoint(src, unsafe_pickle=unsafe_pickle)
    entries = encode_entries(tensors, smallest_lossless, progress)
    write_encoded(dst, entries, base_metadata(src, {"method": "lossless"}), force=force)
    stored = [e for e in entries if isinstance(e, EncodedTensor)]
    original = sum(_nbytes(tensors[e.name]) for e in stored)
    file_bytes = dst.stat().st_size
    return {
        "output": str(dst),
        "method": "lossless",
        "tensors": len(entries),
        "original_bytes": original,
        "file_bytes": file_bytes,
        "ratio": original / file_bytes if file_bytes else 0.0,
        "codecs": {c: sum(1 for e in stored if e.codec == c) for c in sorted({e.codec for e in stored})},
        "seconds": time.perf_counter() - start,
    }
