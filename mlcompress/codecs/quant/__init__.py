"""The ``quant`` codec: integer levels, entropy-coded, plus how to turn them back into floats.

Two schemes share one payload shape (everything little-endian):

* ``uniform`` (data-free integer quantization, :mod:`mlcompress.codecs.quant.uniform`):
  params ``{scheme, bits, symmetric, rows, cols, group, scale_bytes, zp_bytes[, scale_dtype]}``;
  payload = scales (one per group, float32, or float16 with ``scale_dtype: "float16"``) |
  zero-point symbol stream | level section.
* ``step`` (entropy-constrained, :mod:`mlcompress.codecs.quant.step`): params
  ``{scheme, rows, cols, group, codes_bytes}``; payload = step-code symbol stream (one code per
  group) | level section. ``w = step(code) * n``, no zero-point, no clipping.
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
from mlcompress.codecs.quant import l2, uniform
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


def pack_bits(values: np.ndarray, lo: int, width: int) -> bytes:
    """Bit-pack ``values - lo`` (each < 2**width) LSB first."""
    u = (values.astype(np.int64) - lo).astype(np.uint32)
    if width == 0 or u.size == 0:
        return b""
    bits = ((u[:, None] >> np.arange(width, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: memoryview, count: int, lo: int, width: int) -> np.ndarray:
    if width == 0:
        return np.full(count, lo, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little", count=count * width)
    weights = (1 << np.arange(width, dtype=np.int64))
    return bits.reshape(count, width).astype(np.int64) @ weights + lo


def encode_levels(levels: np.ndarray) -> bytes:
    """The level section: ANS stream or bit-packed, whichever is smaller."""
    flat = np.ascontiguousarray(levels, dtype=np.int64).reshape(-1)
    ans = bytes([_MODE_ANS]) + entropy.encode_symbols(flat)
    if flat.size == 0:
        return ans
    lo, hi = int(flat.min()), int(flat.max())
    width = max(hi - lo, 0).bit_length()
    if 1 + _PACKED_HEAD.size + math.ceil(flat.size * width / 8) < len(ans):
        return bytes([_MODE_PACKED]) + _PACKED_HEAD.pack(lo, width) + pack_bits(flat, lo, width)
    return ans


def decode_levels(section: memoryview, count: int) -> np.ndarray:
    """Inverse of :func:`encode_levels`; validates sizes before allocating."""
    if len(section) < 1:
        raise MrcFormatError("quant payload has no level section")
    mode = section[0]
    if mode == _MODE_ANS:
        return entropy.decode_symbols(section[1:], expected_count=count).astype(np.int64)
    if mode == _MODE_PACKED:
        if len(section) < 1 + _PACKED_HEAD.size:
            raise MrcFormatError("quant payload: packed level header is truncated")
        lo, width = _PACKED_HEAD.unpack_from(section, 1)
        if width > 32 or len(section) != 1 + _PACKED_HEAD.size + math.ceil(count * width / 8):
            raise MrcFormatError("quant payload: packed level section has the wrong length")
        return unpack_bits(section[1 + _PACKED_HEAD.size :], count, lo, width)
    raise MrcFormatError(f"quant payload: unknown level mode {mode}")


class QuantCodec:
    """Integer levels + dequantization parameters; see the module docstring for the layout."""

    name = "quant"

    def encode(self, tensor: torch.Tensor, options: Mapping[str, Any]) -> tuple[bytes, dict]:
        """Options: ``scheme`` (``uniform`` default, or ``l2``). Uniform: ``bits``, ``symmetric``,
        ``per_channel``, ``group_size``. L²: ``edge`` and ``step`` (levels are ``round(T(w))``)."""
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
            payload = scales + zps + encode_levels(q.levels.numpy())
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
            )
            codes = entropy.encode_symbols(q.codes)
            params = {"scheme": "step", "rows": q.layout.rows, "cols": q.layout.cols, "group": q.layout.group,
                      "codes_bytes": len(codes)}
            return codes + encode_levels(q.levels), params
        if scheme == "l2":
            edge = float(torch.tensor(float(options["edge"]), dtype=torch.float32))
            step = float(torch.tensor(float(options["step"]), dtype=torch.float32))
            if not (edge > 0 and step > 0 and math.isfinite(edge) and math.isfinite(step)):
                raise CodecError(f"L² edge and step must be positive and finite, got {edge}, {step}")
            levels = l2.levels(tensor, edge, step)
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
        self.check(record)
        p = record.params
        dtype = torch_dtype(record.dtype)
        view = memoryview(payload)
        if p["scheme"] == "l2":
            n = torch.from_numpy(decode_levels(view, record.numel))
            return l2.dequantize_levels(n, p["edge"], p["step"], dtype).reshape(record.shape)
        if p["scheme"] == "step":
            return self._decode_step(view, record, dtype)
        layout = uniform.GroupLayout(p["rows"], p["cols"], p["group"])
        sb, zb = p["scale_bytes"], p["zp_bytes"]
        scale = torch.from_numpy(np.frombuffer(view[:sb], dtype=_SCALE_DTYPES[p.get("scale_dtype", "float32")][0]).astype(np.float32))
        if not torch.isfinite(scale).all() or (scale <= 0).any():
            raise MrcFormatError(f"tensor {record.name!r}: quant scales must be positive and finite")
        zero = torch.from_numpy(entropy.decode_symbols(view[sb : sb + zb], expected_count=layout.n_groups).astype(np.int64))
        n = decode_levels(view[sb + zb :], record.numel)
        lo, hi = uniform.level_range(p["bits"], p["symmetric"])
        if n.size and (n.min() < lo or n.max() > hi):
            raise MrcFormatError(f"tensor {record.name!r}: quant levels fall outside the {p['bits']}-bit range")
        levels = torch.from_numpy(n).reshape(record.shape)
        return uniform.dequantize_grouped(levels, scale, zero, layout, dtype)

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
        n = decode_levels(view[cb:], record.numel)
        if n.size and int(np.abs(n).max()) > step_grid.MAX_LEVEL:
            raise MrcFormatError(f"tensor {record.name!r}: quant levels exceed +-{step_grid.MAX_LEVEL}")
        return step_grid.dequantize(n.reshape(record.shape), codes, layout, dtype)


CODEC = QuantCodec()
