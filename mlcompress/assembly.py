"""What every method does the same way when it assembles a ``.mrc``: names, metadata, fallbacks.

Methods (lossless, REC, quantization, pruning) import this; nothing here knows any method.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from mlcompress.version import __version__
from mlcompress.checkpoint.hf_output import FILES_KEY, stored_files
from mlcompress.codecs import lossless3
from mlcompress.container import EncodedTensor, encode_tensor
from mlcompress.format.dtypes import dtype_name


def default_output(src: str | os.PathLike, suffix: str = ".mrc") -> Path:
    """``model.pt`` -> ``model.mrc``; a model directory ``m/`` -> ``m.mrc`` beside it."""
    src = Path(src)
    return src.with_name(src.name + suffix) if src.is_dir() else src.with_suffix(suffix)


def base_metadata(src: str | os.PathLike | None, options: Mapping[str, Any], *,
                  record_source: bool = True) -> dict[str, Any]:
    """Model-level header metadata every writer records: producer, source name (unless
    ``record_source`` is false: REC leaves it out, its header being most of a small file) and
    options; and, when ``src`` is a Hugging Face model directory, its ``config.json`` and
    ``generation_config.json`` (``files``), so that a decode can rebuild a directory that
    ``from_pretrained`` loads (docs/checkpoints.md gives what they cost)."""
    out: dict[str, Any] = {"producer": f"mlcompress {__version__}"}
    if src is not None and record_source:
        out["source"] = Path(src).name
    out["options"] = dict(options)
    files = stored_files(Path(src)) if src is not None and Path(src).is_dir() else {}
    if files:
        out[FILES_KEY] = files
    return out


def lossless_codec(tensor: Any) -> str:
    """The lossless codec mlcompress writes for ``tensor``: ``lossless3`` (Huffman-coded exponent
    and top mantissa bits, docs/lossless.md) for float32, bfloat16 and float16 when its C
    extension is built, else ``lossless2`` (zstd-coded byte planes, any dtype)."""
    return "lossless3" if lossless3.NATIVE and dtype_name(tensor.dtype) in lossless3.DTYPES else "lossless2"


def smallest_lossless(name: str, tensor: Any, threads: int | None = None) -> EncodedTensor:
    """:func:`lossless_codec`'s payload if it is smaller than the raw bytes, else ``raw``.

    ``threads`` is how many threads code the tensor's chunks (default: all cores); the bytes
    never depend on it. (Older files hold ``lossless2`` or ``lossless`` tensors; they still
    decode.)
    """
    coded = encode_tensor(name, tensor, lossless_codec(tensor), {"threads": threads})
    if len(coded.payload) < tensor.numel() * tensor.element_size():
        return coded
    return encode_tensor(name, tensor, "raw", {})
