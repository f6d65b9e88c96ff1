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


def base_metadata(src: str | os.PathLike, options: Mapping[str, Any]) -> dict[str, Any]:
    """Model-level header metadata every writer records: producer, source name and options."""
    return {"producer": f"mlcompress {__version__}", "source": Path(src).name, "options": dict(options)}


def smallest_lossless(name: str, tensor: Any) -> EncodedTensor:
    """``lossless`` if it is smaller than the raw bytes, else ``raw``."""
    coded = encode_tensor(name, tensor, "lossless", {})
    if len(coded.payload) < tensor.numel() * tensor.element_size():
        return coded
    return encode_tensor(name, tensor, "raw", {})
