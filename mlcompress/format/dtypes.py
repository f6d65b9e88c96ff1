"""The dtypes a ``.mrc`` file can store, by the names the header uses (docs/format.md)."""

from __future__ import annotations

from typing import Any

from mlcompress.errors import InputError, MrcFormatError
from mlcompress.lazy import torch

#: Header name -> bytes per element. The order is the documented list.
ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")


def itemsize(name: str) -> int:
    """Bytes per element of the stored dtype ``name``."""
    try:
        return ITEMSIZE[name]
    except KeyError:
        raise MrcFormatError(f"unknown dtype {name!r} in header") from None


def torch_dtype(name: str) -> Any:
    """The torch dtype of a stored dtype name (an unknown name is a format error)."""
    if name not in ITEMSIZE:
        raise MrcFormatError(f"unknown dtype {name!r} in header")
    return getattr(torch, name)


def dtype_name(dtype: Any) -> str:
    """The container's name for a torch dtype; a dtype it cannot store is an :class:`InputError`."""
    name = str(dtype).removeprefix("torch.")
    if name not in ITEMSIZE or getattr(torch, name) != dtype:
        raise InputError(f"tensors of dtype {dtype} cannot be stored", hint=f"supported: {', '.join(ITEMSIZE)}")
    return name
