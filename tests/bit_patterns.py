"""Test tensors for the lossless codecs: special bit patterns and weight-like random values.

Shared by tests/test_lossless.py (the ``lossless`` codec) and tests/test_lossless_v2.py
(``lossless2`` and what every lossless codec must do), so both codecs face the same values.
"""

from __future__ import annotations

import numpy as np
import torch

ALL_DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
]
FLOAT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
INT_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
_UNSIGNED = {8: np.uint64, 4: np.uint32, 2: np.uint16, 1: np.uint8}

# Special bit patterns per float format: several distinct NaNs (quiet, signalling, negative, with
# payload), +-Inf, +-0, the smallest and largest subnormals, the largest finite value and 1.0.
SPECIALS = {
    torch.float32: [0x7FC00000, 0x7F800001, 0xFFC00001, 0x7FFFFFFF, 0x7FA5A5A5,
                    0x7F800000, 0xFF800000, 0x00000000, 0x80000000,
                    0x00000001, 0x007FFFFF, 0x80000001, 0x7F7FFFFF, 0x3F800000],
    torch.float64: [0x7FF8000000000000, 0x7FF0000000000001, 0xFFF8000000000001, 0x7FFFFFFFFFFFFFFF, 0x7FFA5A5A5A5A5A5A,
                    0x7FF0000000000000, 0xFFF0000000000000, 0x0, 0x8000000000000000,
                    0x1, 0x000FFFFFFFFFFFFF, 0x8000000000000001, 0x7FEFFFFFFFFFFFFF, 0x3FF0000000000000],
    torch.float16: [0x7E00, 0x7C01, 0xFE01, 0x7FFF, 0x7D55,
                    0x7C00, 0xFC00, 0x0000, 0x8000, 0x0001, 0x03FF, 0x8001, 0x7BFF, 0x3C00],
    torch.bfloat16: [0x7FC0, 0x7F81, 0xFFC1, 0x7FFF, 0x7FA5,
                     0x7F80, 0xFF80, 0x0000, 0x8000, 0x0001, 0x007F, 0x8001, 0x7F7F, 0x3F80],
}


def from_bits(words: list[int], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of any stored dtype holding exactly the given unsigned bit patterns."""
    size = torch.empty(0, dtype=dtype).element_size()
    if len(words) == 0:
        return torch.empty(0, dtype=dtype)
    arr = np.asarray(words, dtype=np.uint64).astype(_UNSIGNED[size])
    return torch.from_numpy(arr.copy()).view(torch.uint8).view(dtype) if size == 1 else \
        torch.from_numpy(arr.view(f"i{size}").copy()).view(dtype)


def integer_extremes(dtype: torch.dtype, repeat: int) -> torch.Tensor:
    """The range ends and their neighbours (bool: a True/False pattern), ``repeat`` times."""
    if dtype == torch.bool:
        return torch.tensor([True, False, True, True] * repeat)
    info = torch.iinfo(dtype)
    return torch.tensor([info.min, info.max, 0, -1 if info.min < 0 else 1, info.min + 1, info.max - 1] * repeat,
                        dtype=dtype)


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Weight-like values for floats (N(0, 0.05^2)), uniform over (most of) the range for integers."""
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 0.05).to(dtype)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.3
    info = torch.iinfo(dtype)
    lo = info.min if dtype != torch.int64 else -(1 << 62)
    hi = info.max if dtype != torch.int64 else (1 << 62)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dtype)
