"""Low-precision float conversion (``quantize --float``, the ``float`` codec, docs/format.md §4.5).

bf16/fp16 must be torch's own casts bit for bit; fp8 must be torch's fp8 casts of the scaled,
clamped values; decoding restores the original dtype or, with ``keep_dtype``, keeps the small
one; a decoder written from docs/format.md alone (numpy, plus mlcompress's inner codec) must
give the same bits as mlcompress.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import mlcompress
from mlcompress import codecs
from mlcompress.cli import main
from mlcompress.codecs import low_precision
from mlcompress.container import encode_tensor, open_mrc
from mlcompress.errors import CodecError, InputError, MrcFormatError, UsageError
from mlcompress.format.records import TensorRecord
from mlcompress.tasks import get_task

MAX_FINITE = {"fp8-e4m3": 448.0, "fp8-e5m2": 57344.0}
FP8_DTYPE = {"fp8-e4m3": torch.float8_e4m3fn, "fp8-e5m2": torch.float8_e5m2}
HALF_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _bits(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.view(torch.uint8).numpy().view(UINT[t.element_size()]).reshape(t.shape)


def _save(path, tensors: dict[str, torch.Tensor]):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _encode(tmp_path, tensors, fmt, per_channel=False, name="m"):
    src = _save(tmp_path / f"{name}.safetensors", tensors)
    dst = tmp_path / f"{name}.mrc"
    mlcompress.encode(src, dst, method=mlcompress.Float(format=fmt, per_channel=per_channel))
    return dst


def _special_float32() -> torch.Tensor:
    """Ties to even on both sides, signed zeros, subnormals, overflow, infinities, NaNs with
    payloads and signs, and random bit patterns of every kind."""
    fixed = torch.tensor([0x3F808000, 0x3F818000, 0x3F800001, 0x80000000, 0x00000001, 0x000116C2, 0x7F7FFFFF,
                          0x477FF000, 0x477FEFFF, 0x33000000, 0x33000001, 0x7F800000, 0xFF800000, 0x7FC00000,
                          0xFFC00001, 0x7F800001, 0x3F801000, 0x3F802000, 0x3F803000], dtype=torch.int64)
    rand = torch.randint(-2**31, 2**31, (4000,), generator=torch.Generator().manual_seed(1), dtype=torch.int64)
    return torch.cat([fixed, rand]).to(torch.int32).view(torch.float32)


# --------------------------------------------------------------------------------------------
# bf16 / fp16: torch's casts, bit for bit
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
@pytest.mark.parametrize("source", [torch.float32, torch.float64])
def test_half_formats_are_torch_casts_bit_for_bit(tmp_path, fmt, source):
    x = _special_float32().to(source)
    if source == torch.float64:  # values float32 cannot hold either, and float64's own ties
        g = torch.Generator().manual_seed(2)
        x = torch.cat([x, torch.randn(3000, generator=g, dtype=torch.float64)
                       * torch.pow(10.0, torch.randint(-45, 45, (3000,), generator=g).double()),
                       torch.tensor([1.0 + 2.0**-8, 1.0 + 2.0**-8 + 2.0**-40, 1e300, -1e-300], dtype=torch.float64)])
    dst = _encode(tmp_path, {"w": x.reshape(-1, 1)}, fmt)
    cast = x.reshape(-1, 1).to(HALF_DTYPE[fmt])
    kept = mlcompress.decode(dst, keep_dtype=True)["w"]
    assert kept.dtype == HALF_DTYPE[fmt] and np.array_equal(_bits(kept), _bits(cast))  # NaN bits included
    back = mlcompress.decode(dst)["w"]
    want = cast.to(source)
    assert back.dtype == source
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(back), nan) and nan.any() and torch.isinf(want).any()
    assert np.array_equal(_bits(back)[~nan.numpy()], _bits(want)[~nan.numpy()])


def test_half_nan_widening_follows_the_spec():
    """A NaN keeps its sign and payload and becomes quiet, on every path (torch's own fp16 cast
    gives 0x7FFFFFFF on its scalar path and 0x7FC00000 on its vector path)."""
    h = torch.tensor([0x7C01, 0xFE01, 0x7E00, 0xFC00], dtype=torch.int32).to(torch.int16).view(torch.float16)
    b = torch.tensor([0x7F81, 0xFFC1, 0xFFFF, 0xFF80], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    for one in (False, True):
        for values, want in ((h, [0x7FC02000, 0xFFC02000, 0x7FC00000, 0xFF800000]),
                             (b, [0x7FC10000, 0xFFC10000, 0xFFFF0000, 0xFF800000])):
            values = values[:1] if one else values
            got = low_precision.restore(low_precision.Converted(values, None), torch.float32)
            assert [int(v) for v in _bits(got)] == want[: len(values)]


# --------------------------------------------------------------------------------------------
# fp8: torch's fp8 casts of the scaled, clamped values
# --------------------------------------------------------------------------------------------

def _reference_fp8(x: torch.Tensor, fmt: str, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec's recipe written out with plain torch ops: float32 scale amax / M per row, then
    the fp8 cast of clamp(x / s, -M, M)."""
    m = MAX_FINITE[fmt]
    x32 = x.to(torch.float32)
    rows = x32.reshape(x.shape[0] if per_channel else 1, -1)
    s = rows.abs().amax(dim=1) / torch.tensor(m, dtype=torch.float32)
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (rows / s[:, None]).clamp(-m, m).to(FP8_DTYPE[fmt]).reshape(x.shape), s


@pytest.mark.parametrize("fmt", ["fp8-e4m3", "fp8-e5m2"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("source", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_fp8_is_the_torch_cast_of_scaled_values(tmp_path, fmt, per_channel, source):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(16, 3, 5, 5, generator=g) * torch.logspace(-3, 1, 16)[:, None, None, None]).to(source)
    x[2] = 0.0  # an all-zero channel gets scale 1
    x[5, 0, 0, 0] = -x[5].abs().max() * 3  # a negative extreme
    dst = _encode(tmp_path, {"conv.weight": x}, fmt, per_channel)
    codes, scale = _reference_fp8(x, fmt, per_channel)
    kept = mlcompress.decode(dst, keep_dtype=True)
    assert kept["conv.weight"].dtype == FP8_DTYPE[fmt]
    assert np.array_equal(_bits(kept["conv.weight"]), _bits(codes))
    assert kept["conv.weight_scale"].dtype == torch.float32
    assert kept["conv.weight_scale"].shape == ((16, 1, 1, 1) if per_channel else (1, 1, 1, 1))
    assert torch.equal(kept["conv.weight_scale"].reshape(-1), scale)
    back = mlcompress.decode(dst)["conv.weight"]
    want = (codes.to(torch.float32).reshape(scale.numel(), -1) * scale[:, None]).reshape(x.shape).to(source)
    assert back.dtype == source and np.array_equal(_bits(back), _bits(want))
    if source == torch.float32:  # the inference engines' dequantization gives the same bits
        assert np.array_equal(_bits(kept["conv.weight"].float() * kept["conv.weight_scale"]), _bits(back))


@pytest.mark.parametrize("fmt", ["fp8-e4m3", "fp8-e5m2"])
def test_fp8_largest_magnitude_is_the_largest_finite_code(fmt):
    x = torch.randn(64, 40, generator=torch.Generator().manual_seed(4))
    x[7, 3] = -10.0
    converted = low_precision.convert(x, low_precision.FORMATS[fmt])
    codes = _bits(converted.values)
    top = 0x7E if fmt == "fp8-e4m3" else 0x7B
    assert codes[7, 3] == 0x80 | top and ((codes & 0x7F) <= top).all()


@pytest.mark.parametrize("fmt", ["fp8-e4m3", "fp8-e5m2"])
def test_fp8_saturates_where_the_cast_would_overflow(fmt):
    """A tiny tensor's scale is a float32 subnormal, rounded down by a third: x / s reaches
    1.4 M, which e5m2's cast turns into an infinity. The clamp saturates it to M instead."""
    m = MAX_FINITE[fmt]
    s_exact = 1.4 * 2.0**-149  # amax / M: rounds down to the smallest subnormal
    amax = torch.tensor(s_exact * m, dtype=torch.float32)
    x = torch.linspace(-1, 1, 64 * 4).reshape(64, 4) * amax
    s = amax / torch.tensor(m, dtype=torch.float32)
    assert float(s) == 2.0**-149 and float((x / s).abs().max()) > 1.3 * m
    converted = low_precision.convert(x, low_precision.FORMATS[fmt])
    assert torch.equal(converted.scale, s.reshape(1))
    codes = _bits(converted.values)
    top = 0x7E if fmt == "fp8-e4m3" else 0x7B
    assert ((codes & 0x7F) <= top).all() and codes[0, 0] == 0x80 | top and codes[-1, -1] == top
    assert np.array_equal(codes, _bits((x / s).clamp(-m, m).to(FP8_DTYPE[fmt])))
    if fmt == "fp8-e5m2":
        assert torch.isinf((x / s).to(FP8_DTYPE[fmt]).float()).any()  # what saturation prevents


def test_fp8_refuses_nan_and_infinity(tmp_path, capsys):
    w = torch.randn(16, 16)
    w[3, 4] = float("nan")
    src = _save(tmp_path / "nan.safetensors", {"fc.weight": w, "fc.bias": torch.zeros(16)})
    out = tmp_path / "nan.mrc"
    assert main(["quantize", str(src), "--float", "fp8-e4m3", "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "'fc.weight'" in err[0] and "NaN" in err[0]
    assert not out.exists()
    with pytest.raises(CodecError):
        low_precision.convert(torch.tensor([1.0, float("inf")]), low_precision.FORMATS["fp8-e5m2"])
    # bf16 keeps them, as torch's cast does
    assert main(["quantize", str(src), "--float", "bf16", "-o", str(out)]) == 0
    assert torch.isnan(mlcompress.decode(out)["fc.weight"][3, 4])


# --------------------------------------------------------------------------------------------
# Which tensors, sizes, decode
# --------------------------------------------------------------------------------------------

def _model() -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    return {"conv.weight": torch.randn(6, 1, 5, 5) * 0.2, "conv.bias": torch.randn(6) * 0.1,
            "fc.weight": torch.randn(10, 96) * 0.1, "fc.bias": torch.randn(10) * 0.1,
            "norm.weight": torch.ones(10, dtype=torch.float16), "steps": torch.arange(3)}


@pytest.mark.parametrize("fmt,converted", [("bf16", {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}),
                                           ("fp8-e4m3", {"conv.weight", "fc.weight"})])
def test_which_tensors_are_converted(tmp_path, fmt, converted):
    tensors = _model()
    dst = _encode(tmp_path, tensors, fmt)
    mrc = open_mrc(dst)
    assert {r.name for r in mrc.records if r.codec == "float"} == converted
    back = mlcompress.decode(dst)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        if name not in converted:
            assert torch.equal(back[name], t)
    rows = {r["name"]: r for r in mlcompress.inspect(dst).details["rows"]}
    assert rows["fc.weight"]["codec"] == "float" and rows["fc.weight"]["details"]["format"] == fmt
    assert rows["fc.weight"]["dtype"] == "float32"


def _trained_like() -> dict[str, torch.Tensor]:
    """Heavy-tailed weights with per-row spread, as trained layers have (Student-t, 4 dof)."""
    g = torch.Generator().manual_seed(6)
    out = {}
    for name, (rows, cols) in {"a.weight": (256, 512), "b.weight": (512, 256), "c.weight": (64, 512)}.items():
        t = torch.distributions.StudentT(4.0).sample((rows, cols))
        out[name] = t * (0.02 * torch.exp(0.3 * torch.randn(rows, 1, generator=g)))
    return out


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "fp8-e4m3", "fp8-e5m2"])
def test_file_is_smaller_than_the_plain_cast(tmp_path, fmt):
    torch.manual_seed(7)
    tensors = _trained_like()
    dst = _encode(tmp_path, tensors, fmt)
    if fmt in HALF_DTYPE:
        plain = {k: v.to(HALF_DTYPE[fmt]) for k, v in tensors.items()}
    else:
        plain = {}
        for k, v in tensors.items():
            codes, scale = _reference_fp8(v, fmt, False)
            plain.update({k: codes, k + "_scale": scale})
    plain_file = _save(tmp_path / "plain.safetensors", plain)
    numel = sum(t.numel() for t in tensors.values())
    size = dst.stat().st_size
    assert size < plain_file.stat().st_size
    width = 2 if fmt in HALF_DTYPE else 1
    assert size < 0.95 * width * numel, (size, width * numel)


def test_decode_file_restores_or_keeps_the_dtype(tmp_path, capsys):
    tensors = _model()
    tensors["tied.weight"] = tensors["fc.weight"]
    src = tmp_path / "m.pt"
    torch.save(tensors, src)
    mrc = tmp_path / "m.mrc"
    assert main(["quantize", str(src), "--float", "fp8-e5m2", "--per-channel", "-o", str(mrc)]) == 0
    capsys.readouterr()
    plain, kept, kept_pt = tmp_path / "plain.safetensors", tmp_path / "kept.safetensors", tmp_path / "kept.pt"
    assert main(["decode", str(mrc), "-o", str(plain)]) == 0
    assert main(["decode", str(mrc), "-o", str(kept), "--keep-dtype", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["output"] == str(kept)
    assert main(["decode", str(mrc), "-o", str(kept_pt), "--keep-dtype", "-q"]) == 0
    restored = load_file(str(plain))
    assert {k: v.dtype for k, v in restored.items()} == {k: v.dtype for k, v in tensors.items() if k != "tied.weight"}
    for small in (load_file(str(kept)), torch.load(kept_pt)):
        assert small["conv.weight"].dtype == torch.float8_e5m2 and small["conv.weight_scale"].shape == (6, 1, 1, 1)
        assert small["fc.weight_scale"].shape == (10, 1) and small["conv.bias"].dtype == torch.float32
        assert small["steps"].dtype == torch.int64 and small["norm.weight"].dtype == torch.float16
        assert torch.equal(small["fc.weight"].float() * small["fc.weight_scale"], restored["fc.weight"])
    lib = mlcompress.decode(mrc, keep_dtype=True)
    assert lib["tied.weight"] is lib["fc.weight"] and lib["tied.weight_scale"] is lib["fc.weight_scale"]
    assert set(lib) == set(tensors) | {"conv.weight_scale", "fc.weight_scale", "tied.weight_scale"}


def test_keep_dtype_refuses_a_scale_name_already_taken(tmp_path, capsys):
    dst = _encode(tmp_path, {"w": torch.randn(8, 8), "w_scale": torch.ones(1)}, "fp8-e4m3")
    out = tmp_path / "w.safetensors"
    assert main(["decode", str(dst), "-o", str(out), "--keep-dtype"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'w_scale'" in err[0] and not out.exists()
    with pytest.raises(InputError):
        mlcompress.decode(dst, keep_dtype=True)
    assert main(["decode", str(dst), "-o", str(out)]) == 0  # the plain decode is unaffected


def test_safetensors_copy_and_task_metric(tmp_path, capsys):
    torch.manual_seed(0)
    src = tmp_path / "digits.pt"
    torch.save(get_task("mlp-digits").make_model().state_dict(), src)
    out, st = tmp_path / "d.mrc", tmp_path / "d.safetensors"
    assert main(["quantize", str(src), "--float", "fp8-e4m3", "--task", "mlp-digits", "--device", "cpu",
                 "-o", str(out), "--safetensors", str(st), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "float" and summary["format"] == "fp8-e4m3" and summary["quantized_tensors"] == 2
    assert 0 <= summary["metric_before"] <= 1 and 0 <= summary["metric_after"] <= 1
    assert summary["file_bytes"] == out.stat().st_size and summary["bits_per_quantized_weight"] < 8.1  # codes + one scale
    decoded, copy = mlcompress.decode(out), load_file(str(st))
    assert all(torch.equal(decoded[k], copy[k]) for k in decoded)
    evaluated = mlcompress.evaluate("mlp-digits", out, device="cpu")
    assert evaluated["accuracy"] == pytest.approx(summary["metric_after"], abs=0)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,fragment", [
    (["--float", "fp9"], "unknown float format 'fp9'"),
    (["--float", "bf16", "--bits", "4"], "--bits"),
    (["--float", "fp8-e4m3", "--method", "l2", "--task", "mlp-digits"], "--method"),
    (["--float", "bf16", "--method", "uniform"], "--method"),
    (["--float", "fp8-e4m3", "--group-size", "8"], "--group-size"),
    (["--float", "fp16", "--symmetric"], "--symmetric"),
    (["--float", "bf16", "--target-ratio", "4"], "--target-ratio"),
    (["--float", "bf16", "--per-channel"], "--per-channel"),
])
def test_usage_errors(tmp_path, capsys, args, fragment):
    src = _save(tmp_path / "m.safetensors", {"w": torch.randn(8, 8)})
    out = tmp_path / "out" / "m.mrc"
    out.parent.mkdir()
    assert main(["quantize", str(src), *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert list(out.parent.iterdir()) == []


def test_library_usage_errors(tmp_path):
    src = _save(tmp_path / "m.safetensors", {"w": torch.randn(8, 8)})
    for method in (mlcompress.Float(format="int4"), mlcompress.Float(format="fp16", per_channel=True)):
        with pytest.raises(UsageError):
            mlcompress.encode(src, tmp_path / "m.mrc", method=method)
    assert not (tmp_path / "m.mrc").exists()


def _crafted(params: dict, payload: bytes, shape=(2, 3), dtype="float32") -> TensorRecord:
    return TensorRecord("w", shape, dtype, "float", params, length=len(payload))


def test_reader_rejects_inconsistent_records():
    codec = codecs.get("float")
    ok = {"format": "fp8-e4m3", "scales": 1, "codec": "raw", "params": {}}
    scale = struct.pack("<f", 0.5)
    codec.check(_crafted(ok, scale + bytes(6)))
    bad = [
        (dict(ok, format="fp4"), scale + bytes(6), "float32"),
        (dict(ok, scales=2, codec="raw"), scale + bytes(6), "float32"),  # payload too short for 2 scales + codes
        (dict(ok, scales=3), scale * 3 + bytes(6), "float32"),  # neither 1 nor shape[0]
        ({k: v for k, v in ok.items() if k != "scales"}, scale + bytes(6), "float32"),
        (dict(ok, codec="quant"), scale + bytes(6), "float32"),
        (dict(ok, extra=1), scale + bytes(6), "float32"),
        ({"format": "bf16", "codec": "raw", "params": {}}, bytes(12), "float16"),  # not a narrowing
        ({"format": "bf16", "codec": "raw", "params": {}}, bytes(10), "float32"),  # inner raw length
    ]
    for params, payload, dtype in bad:
        with pytest.raises(MrcFormatError):
            codec.check(_crafted(params, payload, dtype=dtype))
    for payload in (scale + bytes([0, 0, 0x7F, 0, 0, 0]),  # e4m3fn NaN code
                    struct.pack("<f", 0.0) + bytes(6), struct.pack("<f", float("nan")) + bytes(6)):
        with pytest.raises(MrcFormatError):
            codec.decode(payload, _crafted(ok, payload))
    e5 = dict(ok, format="fp8-e5m2")
    with pytest.raises(MrcFormatError):
        codec.decode(scale + bytes([0x7C, 0, 0, 0, 0, 0]), _crafted(e5, scale + bytes(6)))


# --------------------------------------------------------------------------------------------
# An independent decoder, written from docs/format.md §4.5
# --------------------------------------------------------------------------------------------

def spec_fp8_values(fmt: str) -> np.ndarray:
    """float32 value of every code byte (NaN where the spec says a reader rejects it)."""
    mant_bits, bias = (3, 7) if fmt == "fp8-e4m3" else (2, 15)
    out = np.empty(256, dtype=np.float64)
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        e, m = (code & 0x7F) >> mant_bits, code & ((1 << mant_bits) - 1)
        if fmt == "fp8-e4m3" and e == 15 and m == 7 or fmt == "fp8-e5m2" and e == 31:
            out[code] = np.nan
        elif e == 0:
            out[code] = sign * m / 2**mant_bits * 2.0 ** (1 - bias)
        else:
            out[code] = sign * (1 + m / 2**mant_bits) * 2.0 ** (e - bias)
    return out.astype(np.float32)


def spec_widen_half(u: np.ndarray, fmt: str) -> np.ndarray:
    """bf16/fp16 bit patterns -> float32 bit patterns (§4.5 Decoding)."""
    u = u.astype(np.uint32)
    if fmt == "bf16":
        nan = ((u >> 7) & 0xFF == 0xFF) & (u & 0x7F != 0)
        return np.where(nan, (u << 16) | 0x00400000, u << 16).astype(np.uint32)
    nan = ((u >> 10) & 0x1F == 0x1F) & (u & 0x3FF != 0)
    widened = u.astype(np.uint16).view(np.float16).astype(np.float32).view(np.uint32)
    return np.where(nan, ((u & 0x8000) << 16) | 0x7FC00000 | ((u & 0x3FF) << 13), widened).astype(np.uint32)


def spec_round_float32(bits32: np.ndarray, dtype: str) -> np.ndarray:
    """R from float32 bits to the record dtype's bits (finite values; to nearest, ties to even)."""
    f = bits32.view(np.float32)
    if dtype == "float32":
        return bits32
    if dtype == "float64":
        return f.astype(np.float64).view(np.uint64)
    if dtype == "float16":
        return f.astype(np.float16).view(np.uint16)
    u = bits32.astype(np.uint64)  # bfloat16: round the low 16 bits away, ties to even
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def spec_decode_float(payload: bytes, shape: tuple[int, ...], dtype: str, params: dict) -> np.ndarray:
    fmt = params["format"]
    n_scales = params.get("scales", 0)
    storage = {"bf16": "bfloat16", "fp16": "float16"}.get(fmt, "uint8")
    inner_payload = payload[4 * n_scales:]
    inner = TensorRecord("w", shape, storage, params["codec"], params["params"], length=len(inner_payload))
    stored = codecs.get(params["codec"]).decode(inner_payload, inner, "cpu")  # the inner codec, as allowed
    u = _bits(stored).reshape(-1)
    numel = u.size
    if n_scales == 0:
        bits32 = spec_widen_half(u, fmt)
        if dtype == "float64":
            return bits32.view(np.float32).astype(np.float64).view(np.uint64).reshape(shape)
        return bits32.reshape(shape)
    scale = np.frombuffer(payload[: 4 * n_scales], dtype="<f4").astype(np.float32)
    values = spec_fp8_values(fmt)[u]
    assert not np.isnan(values).any() and np.isfinite(scale).all() and (scale > 0).all()
    rows = np.zeros(numel, dtype=np.int64) if n_scales == 1 else np.arange(numel) // (numel // n_scales)
    w = (values * scale[rows]).astype(np.float32)  # one float32 multiplication
    return spec_round_float32(w.view(np.uint32), dtype).reshape(shape)


def test_independent_decoder_reads_every_kind_of_file(tmp_path):
    g = torch.Generator().manual_seed(8)
    base = torch.randn(12, 7, 3, generator=g) * torch.logspace(-4, 2, 12)[:, None, None]
    cases = [("fp8-e4m3", True, torch.float32), ("fp8-e4m3", False, torch.bfloat16), ("fp8-e5m2", True, torch.float16),
             ("fp8-e5m2", False, torch.float64), ("bf16", False, torch.float32), ("fp16", False, torch.float64)]
    for i, (fmt, per_channel, dtype) in enumerate(cases):
        x = base.clone().to(dtype)
        if fmt in HALF_DTYPE:
            x.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e5], dtype=dtype)
        big = torch.randn(300, 300, generator=g).to(dtype) * 0.03  # large enough for the lossless inner codec
        dst = _encode(tmp_path, {"x": x, "big": big}, fmt, per_channel, name=f"case{i}")
        mrc = open_mrc(dst)
        decoded = mrc.tensors()
        inner = set()
        for rec in mrc.records:
            assert rec.codec == "float"
            inner.add(rec.params["codec"])
            mine = spec_decode_float(mrc.payload(rec.name), rec.shape, rec.dtype, rec.params)
            assert np.array_equal(mine, _bits(decoded[rec.name])), (fmt, rec.name)
        assert inner & {"lossless", "lossless2", "lossless3"}  # the default lossless codec, for the large tensor


@pytest.mark.parametrize("fmt,per_channel,params,payload,bits", [
    ("fp8-e4m3", True, {"format": "fp8-e4m3", "scales": 2, "codec": "raw", "params": {}},
     "2549123b2549923b76fe6e7e00f2", [0x3F000000, 0xBF800000, 0x3E800000, 0x40000000, 0x00000000, 0xBF36DB6E]),
    ("fp8-e5m2", False, {"format": "fp8-e5m2", "scales": 1, "codec": "raw", "params": {}},
     "2549123873f76f7b00f5", [0x3F000000, 0xBF800000, 0x3E800000, 0x40000000, 0x00000000, 0xBF36DB6E]),
])
def test_fp8_vectors_from_the_doc(fmt, per_channel, params, payload, bits):
    x = torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.0, -0.75]])
    encoded = encode_tensor("w", x, "float", {"format": fmt, "per_channel": per_channel})
    assert encoded.params == params and encoded.payload.hex() == payload
    assert [int(b) for b in spec_decode_float(bytes.fromhex(payload), (2, 3), "float32", params).reshape(-1)] == bits
    rec = TensorRecord("w", (2, 3), "float32", "float", params, length=len(encoded.payload))
    assert [int(b) for b in _bits(codecs.get("float").decode(encoded.payload, rec)).reshape(-1)] == bits


def test_bf16_vector_from_the_doc():
    x = torch.tensor([0x3F800000, 0x3F808000, 0x3F818000, 0x80000000, 0x7F61B1E6, 0x000116C2],
                     dtype=torch.int64).to(torch.int32).view(torch.float32)
    encoded = encode_tensor("b", x, "float", {"format": "bf16"})
    params = {"format": "bf16", "codec": "raw", "params": {}}
    assert encoded.params == params and encoded.payload.hex() == "803f803f823f0080627f0100"
    want = [0x3F800000, 0x3F800000, 0x3F820000, 0x80000000, 0x7F620000, 0x00010000]
    assert [int(b) for b in spec_decode_float(encoded.payload, (6,), "float32", params)] == want
