"""The ``quant`` codec: integer levels, entropy-coded, plus how to turn them back into floats.

Two schemes share one payload shape (everything little-endian):

* ``uniform`` (data-free integer quantization, :mod:`mlcompress.codecs.quant.uniform`):
  params ``{scheme, bits, symmetric, rows, cols, group, scale_bytes, zp_bytes[, scale_dtype]}``;
  payload = scales (one per group, float32, or float16 with ``scale_dtype: "float16"``) |
  zero-point symbol stream | level section.
* ``step`` (entropy-constrained, :mod:`mlcompress.codecs.quant.step`): params
  ``{scheme, rows, cols, group, codes_bytes[, dq]}``; payload = step-code symbol stream (one code
  per group) | level section. ``w = step(code) * n``, no zero-point, no clipping; with ``dq: 1``
  (dependent quantization, :mod:`mlcompress.codecs.quant.trellis`) ``n`` is the level's
  reconstruction integer under the 4-state machine.
* ``l2`` (the L² dead-zone quantizer, :mod:`mlcompress.codecs.quant.l2`): params
  ``{scheme, edge, step}`` (float32 values stored as JSON numbers, exact); payload = level section.

The *level section* starts with one mode byte: ``0`` = a stream from
:func:`mlcompress.codecs.entropy.encode_symbols` (ANS with the tensor's own static frequency table), or
``1`` = bit-packed levels (``i32 lo``, ``u8 width``, then ``numel * width`` bits, LSB first). The
encoder keeps whichever is smaller, so the stored size never exceeds the nominal width times the
count (plus 6 bytes) even for tiny tensors whose frequency table would dominate.

Decoding calls the very reconstruction functions the quantizers use to evaluate a model, so a
decoded tensor equals bit for bit the weights whose accuracy was reported.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Mapping

from mlcompress.codecs import entropy
from mlcompress.codecs.quant import l2, trellis, uniform
from mlcompress.codecs.quant import step as step_grid
from mlcompress.errors import CodecError, MrcFormatError
from mlcompress.format.dtypes import torch_dtype
from mlcompress.lazy import numpy as np
from mlcompress.lazy import torch

_MODE_ANS = 0
_MODE_PACKED = 1
_PACKED_HEAD = struct.Struct("<iB")
SCHEMES = ("uniform", "step", "l2")
#: How a uniform scheme's scales are stored: numpy dtype and bytes per scale. Files without
#: ``scale_dtype`` (all before it existed, and per-tensor ones now) use float32.
_SCALE_DTYPES = {"float32": ("<f4", 4), "float16": ("<f2", 2)}


def _bit_slices(count: int, width: int) -> list[slice]:
    """Slices of whole bytes (multiples of 8 values) whose bit matrices stay a few MB."""
    return entropy.slices(count, max(entropy.CHUNK // max(width, 1) // 8, 1) * 8)


def pack_bits(values: np.ndarray, lo: int, width: int) -> bytes:
    """Bit-pack ``values - lo`` (each < 2**width) LSB first."""
    values = np.asarray(values).reshape(-1)
    if width == 0 or values.size == 0:
        return b""
    shifts = np.arange(width, dtype=np.uint32)
    out = []
    for sl in _bit_slices(values.size, width):
        u = (values[sl].astype(np.int64) - lo).astype(np.uint32)
        bits = ((u[:, None] >> shifts) & 1).astype(np.uint8)
        out.append(np.packbits(bits.reshape(-1), bitorder="little").tobytes())
    return b"".join(out)


def _unpacked(data: memoryview, count: int, lo: int, width: int, sizes):
    """The packed values (int32, as the level section holds int32 levels) in consecutive slices
    of ``sizes``; a slice may start inside a byte."""
    view = np.frombuffer(data, dtype=np.uint8)
    start = 0
    for size in sizes:
        out = np.empty(size, dtype=np.int32)
        for sl in _bit_slices(size, width):
            first, n = start + sl.start, sl.stop - sl.start
            if width == 0:
                out[sl] = lo
                continue
            byte0 = first * width // 8
            bits = np.unpackbits(view[byte0 : -(-(first + n) * width // 8)], bitorder="little")
            offset = first * width - 8 * byte0
            bits = bits[offset : offset + n * width].reshape(n, width)
            acc = np.full(n, lo, dtype=np.int64)
            for j in range(width):
                acc += bits[:, j].astype(np.int64) << j
            if n and (acc.max() > np.iinfo(np.int32).max or acc.min() < np.iinfo(np.int32).min):
                raise MrcFormatError("quant payload: packed levels fall outside int32")
            out[sl] = acc
        start += size
        yield out


def encode_levels(levels: np.ndarray) -> bytes:
    """The level section: ANS stream or bit-packed, whichever is smaller."""
    flat = np.ascontiguousarray(levels).reshape(-1)
    ans = bytes([_MODE_ANS]) + entropy.encode_symbols(flat)
    if flat.size == 0:
        return ans
    lo, hi = int(flat.min()), int(flat.max())
    width = max(hi - lo, 0).bit_length()
    if 1 + _PACKED_HEAD.size + math.ceil(flat.size * width / 8) < len(ans):
        return bytes([_MODE_PACKED]) + _PACKED_HEAD.pack(lo, width) + pack_bits(flat, lo, width)
    return ans


def level_slices(section: memoryview, count: int, sizes):
    """Inverse of :func:`encode_levels`, yielding the ``count`` levels (int32) in consecutive
    slices of ``sizes``; validates sizes before allocating (and the ANS stream's end state and
    histogram once the last slice is taken)."""
    if len(section) < 1:
        raise MrcFormatError("quant payload has no level section")
    mode = section[0]
    if mode == _MODE_ANS:
        yield from entropy.decode_slices(section[1:], sizes, expected_count=count)
        return
    if mode == _MODE_PACKED:
        if len(section) < 1 + _PACKED_HEAD.size:
            raise MrcFormatError("quant payload: packed level header is truncated")
        lo, width = _PACKED_HEAD.unpack_from(section, 1)
        if width > 32 or len(section) != 1 + _PACKED_HEAD.size + math.ceil(count * width / 8):
            raise MrcFormatError("quant payload: packed level section has the wrong length")
        yield from _unpacked(section[1 + _PACKED_HEAD.size :], count, lo, width, sizes)
        return
    raise MrcFormatError(f"quant payload: unknown level mode {mode}")


def decode_levels(section: memoryview, count: int) -> np.ndarray:
    """Inverse of :func:`encode_levels` (int32 levels); validates sizes before allocating."""
    (levels,) = level_slices(section, count, [count])
    return levels


def _level_blocks(section: memoryview, layout: uniform.GroupLayout):
    """``(block, levels)`` for each of ``layout``'s blocks, decoded in turn."""
    blocks = layout.blocks()
    for i, levels in enumerate(level_slices(section, layout.rows * layout.cols, [b.stop - b.start for b in blocks])):
        yield blocks[i], levels


class QuantCodec:
    """Integer levels + dequantization parameters; see the module docstring for the layout."""

    name = "quant"

    def encode(self, tensor: torch.Tensor, options: Mapping[str, Any]) -> tuple[bytes, dict]:
        """Options: ``scheme`` (``uniform`` default, ``step`` or ``l2``). Uniform: ``bits``, ``symmetric``,
        ``per_channel``, ``group_size``. Step: ``step``, ``per_channel``, ``group_size``, ``lam``,
        ``dq`` and optionally ``group_factors`` (each group's step relative to ``step``; not
        stored as such, the payload holds the codes). L²: ``edge`` and ``step`` (levels are ``round(T(w))``)."""
        if not torch.is_floating_point(tensor):
            raise CodecError(f"quant codec needs a floating-point tensor, got {tensor.dtype}")
        scheme = options.get("scheme", "uniform")
        if scheme == "uniform":
            q = uniform.quantize_tensor(
                tensor,
                int(options.get("bits", 8)),
                symmetric=bool(options.get("symmetric", False)),
                per_channel=bool(options.get("per_channel", False)),
                group_size=options.get("group_size"),
            )
            scales = q.scale.numpy().astype("<f2" if q.half_scales else "<f4").tobytes()
            zps = entropy.encode_symbols(q.zero_point.numpy())
            payload = b"".join((scales, zps, encode_levels(q.levels.numpy())))
            params = {
                "scheme": "uniform",
                "bits": q.bits,
                "symmetric": q.symmetric,
                "rows": q.layout.rows,
                "cols": q.layout.cols,
                "group": q.layout.group,
                "scale_bytes": len(scales),
                "zp_bytes": len(zps),
            }
            if q.half_scales:
                params["scale_dtype"] = "float16"
            return payload, params
        if scheme == "step":
            q = step_grid.step_quantize(
                tensor, float(options["step"]), per_channel=bool(options.get("per_channel", False)),
                group_size=options.get("group_size"), lam=float(options.get("lam", step_grid.DEFAULT_LAMBDA)),
                dq=bool(options.get("dq", False)), group_factors=options.get("group_factors"),
            )
            codes = entropy.encode_symbols(q.codes)
            params = {"scheme": "step", "rows": q.layout.rows, "cols": q.layout.cols, "group": q.layout.group,
                      "codes_bytes": len(codes)}
            if q.dq:  # only then: files without dependent quantization stay as they were
                params["dq"] = q.dq
            return b"".join((codes, encode_levels(q.levels))), params
        if scheme == "l2":
            edge = float(torch.tensor(float(options["edge"]), dtype=torch.float32))
            step = float(torch.tensor(float(options["step"]), dtype=torch.float32))
            if not (edge > 0 and step > 0 and math.isfinite(edge) and math.isfinite(step)):
                raise CodecError(f"L² edge and step must be positive and finite, got {edge}, {step}")
            levels = l2.levels(tensor, edge, step, dtype=torch.int32)
            return encode_levels(levels.numpy()), {"scheme": "l2", "edge": edge, "step": step}
        raise CodecError(f"unknown quant scheme {scheme!r}", hint=f"use one of: {', '.join(SCHEMES)}")

    def check(self, record) -> None:
        p = record.params
        where = f"tensor {record.name!r}"
        if not record.dtype.startswith(("float", "bfloat")):
            raise MrcFormatError(f"{where}: quant codec stores floating-point tensors, header says {record.dtype}")
        scheme = p.get("scheme")
        if scheme == "l2":
            for key in ("edge", "step"):
                v = p.get(key)
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not (math.isfinite(v) and v > 0):
                    raise MrcFormatError(f"{where}: L² {key} must be a positive number")
            if record.length < 1:
                raise MrcFormatError(f"{where}: quant payload is empty")
            return
        if scheme == "step":
            for key in ("rows", "cols", "group", "codes_bytes"):
                v = p.get(key)
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise MrcFormatError(f"{where}: quant param {key!r} must be a non-negative integer")
            if p["rows"] * p["cols"] != record.numel or p["group"] < 1:
                raise MrcFormatError(f"{where}: quant group layout {p['rows']}x{p['cols']} does not match shape {record.shape}")
            if p["codes_bytes"] + 1 > record.length:
                raise MrcFormatError(f"{where}: quant payload is shorter than its step-code section")
            dq = p.get("dq", 0)
            if not isinstance(dq, int) or isinstance(dq, bool) or dq not in (0, trellis.VERSION):
                raise MrcFormatError(f"{where}: quant param 'dq' must be 0 or {trellis.VERSION}, got {dq!r}",
                                     hint="a newer mlcompress wrote this file; upgrade to decode it")
            return
        if scheme != "uniform":
            raise MrcFormatError(f"{where}: unknown quant scheme {scheme!r}")
        ints = ("bits", "rows", "cols", "group", "scale_bytes", "zp_bytes")
        for key in ints:
            v = p.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise MrcFormatError(f"{where}: quant param {key!r} must be a non-negative integer")
        if not isinstance(p.get("symmetric"), bool):
            raise MrcFormatError(f"{where}: quant param 'symmetric' must be true or false")
        if not uniform.MIN_BITS <= p["bits"] <= uniform.MAX_BITS or (p["symmetric"] and p["bits"] < 2):
            raise MrcFormatError(f"{where}: quant bit width {p['bits']} is out of range")
        if p["rows"] * p["cols"] != record.numel or p["group"] < 1:
            raise MrcFormatError(f"{where}: quant group layout {p['rows']}x{p['cols']} does not match shape {record.shape}")
        layout = uniform.GroupLayout(p["rows"], p["cols"], p["group"])
        if p.get("scale_dtype", "float32") not in _SCALE_DTYPES:
            raise MrcFormatError(f"{where}: quant scale_dtype must be float32 or float16")
        if p["scale_bytes"] != _SCALE_DTYPES[p.get("scale_dtype", "float32")][1] * layout.n_groups:
            raise MrcFormatError(f"{where}: quant scale section size does not match {layout.n_groups} groups")
        if p["scale_bytes"] + p["zp_bytes"] + 1 > record.length:
            raise MrcFormatError(f"{where}: quant payload is shorter than its parameter sections")

    def decode(self, payload: bytes, record, device: Any = "cpu") -> torch.Tensor:
        """The tensor, rebuilt a block of levels at a time (no whole-tensor level array)."""
        self.check(record)
        p = record.params
        dtype = torch_dtype(record.dtype)
        view = memoryview(payload)
        if p["scheme"] == "l2":
            layout = uniform.GroupLayout(1, record.numel, max(record.numel, 1))
            pieces = ((b, l2.dequantize_slice(torch.from_numpy(n), p["edge"], p["step"], dtype))
                      for b, n in _level_blocks(view, layout))
            return uniform.blockwise(layout, pieces, dtype, record.shape)
        if p["scheme"] == "step":
            return self._decode_step(view, record, dtype)
        layout = uniform.GroupLayout(p["rows"], p["cols"], p["group"])
        sb, zb = p["scale_bytes"], p["zp_bytes"]
        scale = torch.from_numpy(np.frombuffer(view[:sb], dtype=_SCALE_DTYPES[p.get("scale_dtype", "float32")][0]).astype(np.float32))
        if not torch.isfinite(scale).all() or (scale <= 0).any():
            raise MrcFormatError(f"tensor {record.name!r}: quant scales must be positive and finite")
        zero = torch.from_numpy(entropy.decode_symbols(view[sb : sb + zb], expected_count=layout.n_groups).astype(np.int64))
        lo, hi = uniform.level_range(p["bits"], p["symmetric"])

        def pieces():
            for block, n in _level_blocks(view[sb + zb :], layout):
                if n.size and (n.min() < lo or n.max() > hi):
                    raise MrcFormatError(f"tensor {record.name!r}: quant levels fall outside the {p['bits']}-bit range")
                yield block, uniform.dequantize_block(torch.from_numpy(n), scale, zero, layout, block, dtype)

        return uniform.blockwise(layout, pieces(), dtype, record.shape)

    def describe(self, record) -> dict[str, Any]:
        """What ``inspect`` shows: the scheme and its grid (groups, bit width, step codes)."""
        p = record.params
        out: dict[str, Any] = {"scheme": p.get("scheme")}
        if p.get("scheme") == "uniform":
            out["bits"] = p.get("bits")
        if p.get("scheme") in ("uniform", "step"):
            groups = p["rows"] * (-(-p["cols"] // p["group"]) if p.get("cols") else 0)
            out["groups"] = groups
            if p.get("scale_dtype"):
                out["scales"] = p["scale_dtype"]
            if p.get("dq"):
                out["dq"] = p["dq"]
        if p.get("scheme") == "l2":
            out["step"] = p.get("step")
        return out

    @staticmethod
    def _decode_step(view: memoryview, record, dtype) -> torch.Tensor:
        p = record.params
        layout = uniform.GroupLayout(p["rows"], p["cols"], p["group"])
        cb = p["codes_bytes"]
        codes = entropy.decode_symbols(view[:cb], expected_count=layout.n_groups).astype(np.int64)
        if codes.size and (codes.min() < step_grid.MIN_CODE or codes.max() > step_grid.MAX_CODE):
            raise MrcFormatError(f"tensor {record.name!r}: quant step codes fall outside {step_grid.MIN_CODE}..{step_grid.MAX_CODE}")

        steps = torch.from_numpy(step_grid.steps_of(codes))

        def checked(n: np.ndarray) -> np.ndarray:
            if n.size and (n.min() < -step_grid.MAX_LEVEL or n.max() > step_grid.MAX_LEVEL):
                raise MrcFormatError(f"tensor {record.name!r}: quant levels exceed +-{step_grid.MAX_LEVEL}")
            return n

        if p.get("dq", 0):
            sizes = [sl.stop - sl.start for sl, _, _ in trellis.chunks(layout.rows, layout.cols, layout.group)]
            chunks = (checked(n) for n in level_slices(view[cb:], layout.rows * layout.cols, sizes))
            return step_grid.dequantize_dq(chunks, codes, layout, dtype, record.shape)

        def pieces():
            for block, n in _level_blocks(view[cb:], layout):
                yield block, step_grid.dequantize_block(torch.from_numpy(checked(n)), steps, layout, block, dtype)

        return uniform.blockwise(layout, pieces(), dtype, record.shape)


CODEC = QuantCodec()
