"""Array backends of the REC integer recipe: the few operations numpy and torch spell differently.

The recipe (the counter hash in :mod:`.counter`, the Feistel layout in :mod:`.layout`, the
candidate lookup in :mod:`.sampler`, the decode in :mod:`.decoder`) is written once, against an
array module ``xp`` passed in by the caller: numpy for CPU decoding (it dispatches a small op in
about a microsecond, torch in several, and a LeNet-5 file is hundreds of small ops), torch for the
encoder and CUDA. Most of what the recipe does -- in-place ``^= += -= &= <<= |=``, ``*=`` by a
constant, ``bitwise_and``/``bitwise_xor`` with ``out=``, broadcasting, slicing, fancy indexing --
is spelled the same in both and is written inline there. What is not lives here:

* **32-bit words.** Hash values are 32-bit words, arithmetic modulo 2^32. numpy holds them as
  ``uint32``: multiplies wrap and right shifts are logical, so each hash step is one ufunc.
  torch holds them as ``int32`` bit patterns (torch 2.2, which the package supports, has no
  ``uint32``, and later versions implement few ops for it): multiplies and adds wrap modulo 2^32
  on CPU and CUDA alike, constants are passed as their signed equivalents, and a logical right
  shift is an arithmetic one plus a mask. Both give the same bits; tests/test_rec_backends.py
  checks it (and tests/test_rec_sampler.py the CUDA bits, where there is a GPU).
* **Signed int32** (Feistel halves, tables, positions) is ``int32`` in both; only the names of
  the gather and of the shift with ``out=`` differ.
* **Allocation, devices, float32 scalars, the unsigned readings of words.**

A third, scalar backend runs the same hash on Python ints (``stream_key``), so that too is the
one recipe.

Nothing here touches numpy or torch at import time (:mod:`mlcompress.lazy`): module-level code
only builds the backend objects, whose methods resolve the modules on first use.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from mlcompress.lazy import numpy as np
from mlcompress.lazy import torch

__all__ = ["MASK32", "Backend", "backend", "PYINT", "to_int32", "from_int32"]

MASK32 = 0xFFFFFFFF


def _signed32(c: int) -> int:
    """The int32 whose bit pattern is the word ``c`` in [0, 2^32)."""
    return c - (1 << 32) if c >= 1 << 31 else c


def to_int32(x: Any) -> Any:
    """torch int64 values in ``[0, 2^32)`` -> int32 tensor with the same bit patterns.

    (Explicit, rather than relying on how a narrowing ``.to(int32)`` treats out-of-range values.)
    """
    return (x - ((x >> 31) << 32)).to(torch.int32)


def from_int32(x: Any) -> Any:
    """torch int32 bit patterns -> int64 values in ``[0, 2^32)``."""
    return x.to(torch.int64).bitwise_and_(MASK32)


class Backend(ABC):
    """The operations of the recipe that differ between array modules (see the module docstring).

    Array kinds: ``"word"`` (32-bit hash words), ``"int32"``, ``"float32"``. ``out`` arguments
    may be views of a larger array; ``device`` arguments are ignored by numpy.
    """

    name = ""

    def slice_size(self, device: Any = None) -> int:
        """Values the recipe processes at once: on the CPU few enough for a slice's ~20 passes to
        stay in the cache (about twice as fast on large tensors as whole-tensor passes)."""
        return 1 << 16

    @abstractmethod
    def word(self, c: int) -> Any:
        """The constant word ``c`` in [0, 2^32), as this backend's word arithmetic takes it."""

    def mul(self, x: Any, c: int) -> Any:
        """``x * c mod 2^32`` for words ``x``, in place for arrays; returns the result."""
        x *= self.word(c)
        return x

    @abstractmethod
    def srl(self, x: Any, s: int, out: Any = None) -> Any:
        """Logical right shift of words by ``s`` in 1..31 (into ``out`` when given)."""

    def scratch_like(self, x: Any) -> Any:
        """A scratch array for ``x``-shaped intermediates (``out`` of :meth:`srl`), or ``None``."""
        return None


class _PyInt(Backend):
    """Python ints in [0, 2^32): the scalar backend of the hash (stream keys)."""

    name = "int"

    def word(self, c: int) -> int:
        return c

    def mul(self, x: int, c: int) -> int:
        return (x * c) & MASK32

    def srl(self, x: int, s: int, out: Any = None) -> int:
        return x >> s


class _Numpy(Backend):
    name = "numpy"

    def __init__(self) -> None:
        self._words: dict[int, Any] = {}

    def slice_size(self, device: Any = None) -> int:
        # 2^13 to 2^16 were timed on a LeNet-5 file: 2^15 and 2^16 tied, 2^13 was 25% slower.
        return 1 << 15

    def word(self, c: int) -> Any:
        w = self._words.get(c)
        if w is None:
            w = self._words[c] = np.uint32(c)
        return w

    def words(self, a: Any) -> Any:
        """Integer counters in [0, 2^32) (any integer dtype) -> a new array of words."""
        return np.asarray(a).astype(np.uint32)

    def arange_words(self, n: int, device: Any = None) -> Any:
        return np.arange(n, dtype=np.uint32)

    def srl(self, x: Any, s: int, out: Any = None) -> Any:
        return np.right_shift(x, self.word(s), out=out)

    def scratch_like(self, x: Any) -> Any:
        return np.empty_like(x)

    def sra(self, x: Any, s: int, out: Any = None) -> Any:
        """Arithmetic right shift of int32 values (into ``out`` when given)."""
        return np.right_shift(x, s, out=out)

    def take(self, table: Any, idx: Any, out: Any = None) -> Any:
        """``table[idx]`` for a 1-D ``table`` and int32 ``idx`` (into ``out`` when given)."""
        # mode="clip": the recipe's indices are in range by construction, and in the default
        # mode numpy allocates and copies through a buffer for ``out`` (~1.5x slower a slice).
        return np.take(table, idx, out=out, mode="clip")

    def nonzero(self, mask: Any) -> Any:
        """1-D indices of the true elements of a 1-D mask."""
        return np.flatnonzero(mask)

    def empty(self, shape: tuple[int, ...], kind: str, device: Any = None) -> Any:
        return np.empty(shape, dtype=_NUMPY_KINDS[kind])

    def arange_int32(self, start: int, stop: int, device: Any = None) -> Any:
        return np.arange(start, stop, dtype=np.int32)

    def umod_int32(self, w: Any, m: int) -> Any:
        """Words read as unsigned, modulo ``m`` in [1, 2^31), as int32."""
        return (w % np.uint32(m)).astype(np.int32)

    def unsigned_f64(self, w: Any) -> Any:
        """Words read as unsigned, as float64 (exact)."""
        return w.astype(np.float64)

    def high_bit(self, w: Any) -> Any:
        """Boolean array: bit 31 of each word is set."""
        return w >= np.uint32(1 << 31)

    def negate_where(self, x: Any, mask: Any) -> Any:
        """``x`` with the elements under ``mask`` negated, in place (a sign flip: exact)."""
        return np.negative(x, out=x, where=mask)

    def float32(self, v: Any, like: Any) -> Any:
        """``v`` (a number or an array) rounded to float32, to combine with ``like``."""
        return np.asarray(v, dtype=np.float32)

    def as_int64(self, a: Any, device: Any = None) -> Any:
        return np.asarray(a, dtype=np.int64)

    def int32(self, a: Any) -> Any:
        return np.asarray(a, dtype=np.int32)

    def astype(self, a: Any, dtype: Any) -> Any:
        """``a`` as ``dtype`` (``None``: int64), not copied when it already is."""
        return a.astype(np.int64 if dtype is None else dtype, copy=False)

    def to_device(self, a: Any, device: Any) -> Any:
        return np.asarray(a)

    def device(self, x: Any) -> Any:
        return None


_NUMPY_KINDS = {"word": "uint32", "int32": "int32", "float32": "float32"}


class _Torch(Backend):
    name = "torch"

    def slice_size(self, device: Any = None) -> int:
        # Off the CPU there is no cache to fit, and each op on a slice is a kernel launch.
        return 1 << 16 if device is None or torch.device(device).type == "cpu" else 1 << 20

    def word(self, c: int) -> int:
        return _signed32(c)

    def words(self, a: Any) -> Any:
        if a.dtype == torch.int32:
            return a.clone()
        return to_int32(a.to(torch.int64))

    def arange_words(self, n: int, device: Any = None) -> Any:
        return torch.arange(n, dtype=torch.int32, device=device)

    def srl(self, x: Any, s: int, out: Any = None) -> Any:
        # Shift into a contiguous temporary, then mask into ``out``: ``out`` (often a strided
        # view, the codes' high halves) is written once.
        if out is None:
            return (x >> s).bitwise_and_((1 << (32 - s)) - 1)
        return torch.bitwise_and(x >> s, (1 << (32 - s)) - 1, out=out)

    def scratch_like(self, x: Any) -> Any:
        # torch ops allocate their results anyway (srl above): a scratch array would only add
        # memory, which on large encoder grids costs page faults.
        return None

    def sra(self, x: Any, s: int, out: Any = None) -> Any:
        return torch.bitwise_right_shift(x, s, out=out)

    def take(self, table: Any, idx: Any, out: Any = None) -> Any:
        return torch.index_select(table, 0, idx, out=out)

    def nonzero(self, mask: Any) -> Any:
        return mask.nonzero().squeeze(1)

    def empty(self, shape: tuple[int, ...], kind: str, device: Any = None) -> Any:
        return torch.empty(shape, dtype=getattr(torch, _TORCH_KINDS[kind]), device=device)

    def arange_int32(self, start: int, stop: int, device: Any = None) -> Any:
        return torch.arange(start, stop, dtype=torch.int32, device=device)

    def umod_int32(self, w: Any, m: int) -> Any:
        return (from_int32(w) % m).to(torch.int32)

    def unsigned_f64(self, w: Any) -> Any:
        return from_int32(w).to(torch.float64)

    def high_bit(self, w: Any) -> Any:
        return w < 0  # int32 bit patterns: bit 31 is the sign

    def negate_where(self, x: Any, mask: Any) -> Any:
        return x.copy_(torch.where(mask, x.neg(), x))

    def float32(self, v: Any, like: Any) -> Any:
        # A float32 tensor, not a Python float: the product is then float32 * float32 on every
        # device (a Python scalar may be carried in higher precision by some kernels).
        return torch.as_tensor(v, dtype=torch.float32, device=like.device)

    def as_int64(self, a: Any, device: Any = None) -> Any:
        return torch.as_tensor(a, dtype=torch.int64, device=device)

    def int32(self, a: Any) -> Any:
        return a.to(torch.int32)

    def astype(self, a: Any, dtype: Any) -> Any:
        return a.to(torch.int64 if dtype is None else dtype)

    def to_device(self, a: Any, device: Any) -> Any:
        return a.to(device=device)

    def device(self, x: Any) -> Any:
        return x.device


_TORCH_KINDS = {"word": "int32", "int32": "int32", "float32": "float32"}

PYINT = _PyInt()
_BACKENDS: dict[str, Backend] = {"numpy": _Numpy(), "torch": _Torch()}


def backend(xp: Any) -> Backend:
    """The backend of the array module ``xp``: numpy or torch (the modules or their lazy proxies)."""
    try:
        return _BACKENDS[xp.__name__]
    except (KeyError, AttributeError):
        raise ValueError(f"REC recipe: unsupported array module {xp!r} (numpy or torch)") from None
