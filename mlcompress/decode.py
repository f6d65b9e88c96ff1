"""Restoring weights from a ``.mrc`` container: the library side of ``mlcompress decode``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from mlcompress.atomic import check_destination
from mlcompress.container import open_mrc
from mlcompress.errors import InputError

OUTPUT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def decode_file(
    src: str | os.PathLike,
    dst: str | os.PathLike | None = None,
    *,
    force: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Decode every tensor of ``src`` and save them to ``dst`` (default: ``src`` as .safetensors).

    The output keeps names, dtypes, shapes and tied tensors. Nothing is written unless every
    tensor decodes.
    """
    from mlcompress.checkpoint import save_checkpoint

    start = time.perf_counter()
    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_suffix(".safetensors")
    if dst.suffix not in OUTPUT_SUFFIXES:
        raise InputError(f"cannot write {dst.name}: unknown output format", hint="use .safetensors or .pt")
    check_destination(dst, force=force)
    mrc = open_mrc(src)
    from mlcompress.codecs.rec import decode_device

    with decode_device(device):  # where REC candidates are regenerated; same bits everywhere
        tensors = mrc.tensors()
    save_checkpoint(tensors, dst, force=force)
    return {
        "output": str(dst),
        "tensors": len(tensors),
        "parameters": sum(r.numel for r in mrc.records if r.alias_of is None),
        "output_bytes": dst.stat().st_size,
        "seconds": time.perf_counter() - start,
    }
