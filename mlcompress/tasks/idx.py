"""Reader for IDX files, the format of MNIST and Fashion-MNIST.

IDX is a tiny big-endian format: two zero bytes, a type code, the number of dimensions, one
uint32 size per dimension, then the raw array. We read it ourselves (a few lines) rather than
depend on torchvision, and validate sizes before allocating so a truncated or foreign file is a
clear error instead of a reshape failure.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from mlcompress.errors import InputError

# Type codes defined by the IDX format, mapped to big-endian numpy dtypes.
_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: Path) -> torch.Tensor:
    """The array stored in the IDX file ``path`` (gzip-compressed or not), as a CPU tensor."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise InputError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _DTYPES or raw[3] == 0:
        raise InputError(f"{path} is not an IDX (MNIST-format) file")
    dtype, ndim = _DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InputError(f"IDX file {path} is truncated in its header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise InputError(
            f"IDX file {path} holds {len(raw) - header} data bytes but its header"
            f" {tuple(shape)} needs {expected}"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def find_idx(directory: Path, stem: str) -> Path | None:
    """The file for ``stem`` (e.g. ``train-images-idx3-ubyte``) in ``directory``, accepting the
    usual spellings: ``.gz`` or not, and the original MNIST ``train-images.idx3-ubyte``."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem + ".gz", stem, dotted + ".gz", dotted):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None
