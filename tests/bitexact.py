"""Bit-exact tensor comparison for the tests: equality of bit patterns, never of values.

``==`` would call NaN != NaN and -0.0 == 0.0; comparing bytes catches a codec that canonicalises
NaN payloads or loses the sign of zero.
"""

from __future__ import annotations

from typing import Mapping

import torch


def bit_pattern(t: torch.Tensor) -> bytes:
    """The tensor's exact bytes in row-major order, independent of its strides."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_exact(got: torch.Tensor, ref: torch.Tensor, name: str = "") -> None:
    assert got.dtype == ref.dtype, name
    assert tuple(got.shape) == tuple(ref.shape), name
    assert bit_pattern(got) == bit_pattern(ref), name


def assert_same_tensors(got: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor]) -> None:
    """Same names (in any order) and every tensor bit-exact."""
    assert set(got) == set(ref)
    for name, t in ref.items():
        assert_bit_exact(got[name], t, name)
