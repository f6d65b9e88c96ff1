"""``raw`` codec: the tensor's bytes as they are, little-endian. Any dtype; the fallback."""

from __future__ import annotations

import sys
from typing import Any, Mapping

from mlcompress.errors import MrcFormatError
from mlcompress.format.dtypes import itemsize, torch_dtype
from mlcompress.format.records import TensorRecord
from mlcompress.lazy import numpy as np
from mlcompress.lazy import torch


def tensor_to_le_bytes(tensor: torch.Tensor) -> bytes:
    """Little-endian bytes of a tensor (bfloat16 and bool included), whatever the host order."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:  # torch may give an empty tensor a stride of 0, which cannot be viewed as bytes
        return b""
    data = flat.view(torch.uint8).numpy()
    if sys.byteorder == "big" and flat.element_size() > 1:
        data = data.reshape(-1, flat.element_size())[:, ::-1]
    return data.tobytes()


def tensor_from_le_bytes(data: bytes | memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`tensor_to_le_bytes`; always returns a fresh, writable tensor."""
    size = itemsize(dtype)
    if len(data) == 0:
        return torch.empty(shape, dtype=torch_dtype(dtype))
    buf = np.frombuffer(data, dtype=np.uint8).copy()
    if sys.byteorder == "big" and size > 1:
        buf = np.ascontiguousarray(buf.reshape(-1, size)[:, ::-1]).reshape(-1)
    return torch.from_numpy(buf).view(torch_dtype(dtype)).reshape(shape)


class RawCodec:
    name = "raw"

    def encode(self, tensor: torch.Tensor, options: Mapping[str, Any]) -> tuple[bytes, dict]:
        return tensor_to_le_bytes(tensor), {}

    def check(self, record: TensorRecord) -> None:
        if record.params:
            raise MrcFormatError(f"raw tensor {record.name!r} must have empty params")
        if record.length != record.nbytes:
            raise MrcFormatError(
                f"raw tensor {record.name!r}: payload has {record.length} bytes, shape needs {record.nbytes}"
            )

    def decode(self, payload: bytes, record: TensorRecord, device: Any = "cpu") -> torch.Tensor:
        # A bool byte other than 0/1 would give a tensor whose values torch treats inconsistently.
        if record.dtype == "bool" and payload and int(np.frombuffer(payload, dtype=np.uint8).max()) > 1:
            raise MrcFormatError(f"raw tensor {record.name!r}: bool bytes must be 0 or 1")
        return tensor_from_le_bytes(payload, record.dtype, record.shape)


CODEC = RawCodec()
