"""``float`` codec: a tensor rounded onto a smaller floating-point format (seed 001, eq. 1).

Low-precision conversion replaces each weight by its rounding ``R(x)`` onto a smaller float
format: bf16 or fp16 directly, fp8 (e4m3fn or e5m2) after dividing by a float32 scale per tensor
or per output channel that maps the largest magnitude onto the format's largest finite value.
Rounding is to nearest, ties to even; fp8 saturates (values are clamped to the largest finite
value before the cast) because an fp8 infinity or NaN would poison every product it enters.

The record keeps the tensor's *original* dtype, so an ordinary decode hands back a tensor of the
dtype the model was trained in; ``params`` say the format and nest the record of the payload's
inner codec. The low-precision bit patterns themselves (fp8 as ``uint8`` bytes) are coded by the
default lossless codec (``lossless3`` for bf16/fp16, ``lossless2`` for fp8 bytes) through the
codecs' public ``encode``/``decode``, or stored ``raw`` when that is not smaller: a trained bf16
tensor's exponent byte is very predictable, so the file is smaller than the plain cast. The byte layout is docs/format.md, "4.5 float".

Decoding is specified bit for bit (widening is exact; fp8 values are multiplied by their scale
in float32), so every decoder reproduces the weights the encoder evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from mlcompress.codecs import lossless, lossless2, lossless3, raw
from mlcompress.errors import CodecError, MrcFormatError, UsageError
from mlcompress.format.records import TensorRecord
from mlcompress.format.dtypes import torch_dtype
from mlcompress.lazy import numpy as np
from mlcompress.lazy import torch


@dataclass(frozen=True)
class FloatFormat:
    """One target format: what it is called, how its bits are stored and what a scale maps to."""

    name: str
    torch_name: str  # the torch dtype of the rounded values
    storage: str  # the dtype the inner codec codes the bit patterns as
    max_finite: float | None  # fp8: the value a tensor's largest magnitude is scaled to
    sources: tuple[str, ...]  # record dtypes the format may convert (it must be narrower)

    @property
    def scaled(self) -> bool:
        return self.max_finite is not None

    @property
    def torch_dtype(self) -> Any:
        return getattr(torch, self.torch_name)


_ANY_FLOAT = ("float64", "float32", "float16", "bfloat16")
FORMATS: dict[str, FloatFormat] = {
    f.name: f
    for f in (
        FloatFormat("bf16", "bfloat16", "bfloat16", None, ("float64", "float32")),
        FloatFormat("fp16", "float16", "float16", None, ("float64", "float32")),
        FloatFormat("fp8-e4m3", "float8_e4m3fn", "uint8", 448.0, _ANY_FLOAT),
        FloatFormat("fp8-e5m2", "float8_e5m2", "uint8", 57344.0, _ANY_FLOAT),
    )
}
#: The bit-exact codecs the rounded bit patterns may be stored with, by their record names.
#: The encoder writes ``lossless3`` for bf16/fp16 patterns when its C extension is built and
#: ``lossless2`` otherwise (fp8 bytes, or no extension), unless the raw bytes are no larger;
#: ``lossless`` is read for files written before ``lossless2`` existed. (Imported, not looked up
#: in the registry: the registry imports this module.)
INNER_CODECS = {codec.name: codec for codec in (lossless3.CODEC, lossless2.CODEC, lossless.CODEC, raw.CODEC)}


def _inner_codec(storage: str) -> str:
    """The codec the encoder stores bit patterns of dtype ``storage`` with (raw aside)."""
    return lossless3.CODEC.name if lossless3.NATIVE and storage in lossless3.DTYPES else lossless2.CODEC.name


def float_format(name: str) -> FloatFormat:
    """The format called ``name``; an unknown name is a usage error listing the known ones."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise UsageError(f"unknown float format {name!r}", hint=f"use one of: {', '.join(FORMATS)}") from None


@dataclass
class Converted:
    """A tensor after rounding: ``values`` in the format's own torch dtype, and for fp8 the
    float32 ``scale`` per row (one row per output channel, or a single row)."""

    values: Any
    scale: Any | None


def _rows(tensor: Any, per_channel: bool) -> int:
    """Scale rows: one per output channel (dim 0) of a non-empty tensor of >= 2 dims, else one."""
    return int(tensor.shape[0]) if per_channel and tensor.dim() >= 2 and tensor.numel() else 1


def convert(tensor: Any, fmt: FloatFormat, *, per_channel: bool = False) -> Converted:
    """Round ``tensor`` onto ``fmt`` (round to nearest, ties to even).

    bf16/fp16: torch's own cast of the tensor. fp8: in float32, ``s = amax / max_finite`` per
    row (1 where that is 0 or not finite), then ``clamp(x / s, -max_finite, max_finite)`` cast
    to fp8. Non-finite values cannot be scaled and are refused.
    """
    tensor = tensor.detach().cpu()
    if not fmt.scaled:
        return Converted(tensor.to(fmt.torch_dtype), None)
    x = tensor.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise CodecError(f"{fmt.name} conversion needs finite values; this tensor has NaN, infinite values "
                         "or values beyond float32's range")
    rows = x.reshape(_rows(x, per_channel), -1)
    amax = rows.abs().amax(dim=1) if rows.numel() else torch.zeros(rows.shape[0])
    scale = amax / torch.tensor(fmt.max_finite, dtype=torch.float32)
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    scaled = (rows / scale[:, None]).clamp(-fmt.max_finite, fmt.max_finite)
    return Converted(scaled.to(fmt.torch_dtype).reshape(x.shape), scale)


def _widen_half(values: Any) -> Any:
    """bf16/fp16 -> float32, exactly, with one NaN rule for every platform: a NaN keeps its sign
    and payload (moved to the top of the float32 mantissa) and is made quiet. torch's own
    fp16 cast gives different NaN bits on its scalar and vector paths, hence bit operations."""
    u = values.contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1).astype(np.uint32)
    if values.dtype == torch.bfloat16:
        out = u << np.uint32(16)
        nan = ((u & 0x7F80) == 0x7F80) & ((u & 0x7F) != 0)
    else:
        out = u.astype(np.uint16).view(np.float16).astype(np.float32).view(np.uint32)
        nan = ((u & 0x7C00) == 0x7C00) & ((u & 0x3FF) != 0)
        out = np.where(nan, ((u & 0x8000) << np.uint32(16)) | np.uint32(0x7F800000) | ((u & 0x3FF) << np.uint32(13)),
                       out)
    out = np.where(nan, out | np.uint32(0x00400000), out).astype(np.uint32)
    return torch.from_numpy(out.view(np.float32).copy()).reshape(values.shape)


def restore(converted: Converted, dtype: Any) -> Any:
    """The weights a decoder rebuilds in ``dtype``: the exact float32 value of each rounded
    element, times its row's scale (fp8; one float32 multiplication), rounded to ``dtype``."""
    values = converted.values
    if converted.scale is None:
        wide = _widen_half(values)
    else:
        rows = values.reshape(converted.scale.shape[0], -1).to(torch.float32)
        wide = (rows * converted.scale[:, None]).reshape(values.shape)
    return wide.to(dtype)


def _bit_patterns(values: Any, fmt: FloatFormat) -> Any:
    """What the inner codec stores: bf16/fp16 as they are, fp8 as its bytes."""
    return values.view(torch.uint8) if fmt.storage == "uint8" else values


def _inner_record(record: TensorRecord, fmt: FloatFormat, scale_bytes: int) -> TensorRecord:
    p = record.params
    return TensorRecord(record.name, record.shape, fmt.storage, p["codec"], p["params"],
                        length=record.length - scale_bytes)


def _nan_or_infinite_codes(codes: Any, fmt: FloatFormat) -> bool:
    """fp8 codes the encoder never writes: e4m3fn's NaN (S1111111), e5m2's Inf/NaN (S11111xx)."""
    mask = 0x7F if fmt.name == "fp8-e4m3" else 0x7C
    return bool(((codes & mask) == mask).any())


class LowPrecisionCodec:
    """Rounded float bit patterns through an inner codec; see the module docstring."""

    name = "float"

    def encode(self, tensor: Any, options: Mapping[str, Any]) -> tuple[bytes, dict]:
        """Options: ``format`` (a :data:`FORMATS` name) and, for fp8, ``per_channel``."""
        if not torch.is_floating_point(tensor):
            raise CodecError(f"float codec needs a floating-point tensor, got {tensor.dtype}")
        fmt = FORMATS.get(options.get("format"))
        if fmt is None:
            raise CodecError(f"unknown float format {options.get('format')!r}", hint=f"use one of: {', '.join(FORMATS)}")
        source = str(tensor.dtype).removeprefix("torch.")
        if source not in fmt.sources:
            raise CodecError(f"{fmt.name} conversion of a {source} tensor would not narrow it",
                             hint=f"it converts {', '.join(fmt.sources)}")
        converted = convert(tensor, fmt, per_channel=bool(options.get("per_channel", False)))
        stored = _bit_patterns(converted.values, fmt).contiguous()
        inner = _inner_codec(fmt.storage)
        payload, inner_params = INNER_CODECS[inner].encode(stored, {})
        if len(payload) >= stored.numel() * stored.element_size():
            inner = raw.CODEC.name
            payload, inner_params = raw.CODEC.encode(stored, {})
        params: dict[str, Any] = {"format": fmt.name}
        scales = b""
        if converted.scale is not None:
            scales = converted.scale.numpy().astype("<f4").tobytes()
            params["scales"] = int(converted.scale.numel())
        params.update(codec=inner, params=inner_params)
        return scales + bytes(payload), params

    def check(self, record: TensorRecord) -> None:
        p = record.params
        where = f"tensor {record.name!r}"
        fmt = FORMATS.get(p.get("format")) if isinstance(p.get("format"), str) else None
        if fmt is None:
            raise MrcFormatError(f"{where}: unknown float format {p.get('format')!r}")
        expected = {"format", "codec", "params"} | ({"scales"} if fmt.scaled else set())
        if set(p) != expected:
            raise MrcFormatError(f"{where}: float params must have exactly {', '.join(sorted(expected))}")
        if record.dtype not in fmt.sources:
            raise MrcFormatError(f"{where}: {fmt.name} cannot hold a {record.dtype} tensor")
        scale_bytes = 0
        if fmt.scaled:
            n = p["scales"]
            if not isinstance(n, int) or isinstance(n, bool) or not (
                    n == 1 or (len(record.shape) >= 2 and record.numel > 0 and n == record.shape[0])):
                raise MrcFormatError(f"{where}: float scales must be 1 or the {record.shape[:1]} output channels")
            scale_bytes = 4 * n
            if scale_bytes > record.length:
                raise MrcFormatError(f"{where}: float payload is shorter than its scales")
        if p["codec"] not in INNER_CODECS or not isinstance(p["params"], dict):
            raise MrcFormatError(f"{where}: float payload codec must be one of {', '.join(INNER_CODECS)} "
                                 "with a params object")
        INNER_CODECS[p["codec"]].check(_inner_record(record, fmt, scale_bytes))

    def decode_converted(self, payload: bytes, record: TensorRecord) -> Converted:
        """The rounded values in the format's dtype and the float32 scales, as stored."""
        self.check(record)
        fmt = FORMATS[record.params["format"]]
        n = record.params.get("scales", 0)
        view = memoryview(payload)
        inner = _inner_record(record, fmt, 4 * n)
        stored = INNER_CODECS[inner.codec].decode(bytes(view[4 * n:]), inner, "cpu")
        if not fmt.scaled:
            return Converted(stored, None)
        if _nan_or_infinite_codes(stored, fmt):
            raise MrcFormatError(f"tensor {record.name!r}: {fmt.name} payload holds a NaN or infinite code")
        scale = torch.from_numpy(np.frombuffer(view[: 4 * n], dtype="<f4").astype(np.float32))
        if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise MrcFormatError(f"tensor {record.name!r}: float scales must be positive and finite")
        return Converted(stored.view(fmt.torch_dtype), scale)

    def decode(self, payload: bytes, record: TensorRecord, device: Any = "cpu") -> Any:
        return restore(self.decode_converted(payload, record), torch_dtype(record.dtype))

    def describe(self, record: TensorRecord) -> dict[str, Any]:
        p = record.params
        out: dict[str, Any] = {"format": p["format"]}
        if "scales" in p:
            out["scales"] = "per tensor" if p["scales"] == 1 else f"{p['scales']} channels"
        out["stored"] = p["codec"]
        return out


CODEC = LowPrecisionCodec()
