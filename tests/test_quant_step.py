"""Entropy-constrained quantization: the exact step grid, RDO rounding, rate control, the codec."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlcompress.codecs.quant import CODEC
from mlcompress.codecs.quant.rdo import DEFAULT_LAMBDA, HIGH_RATE_LAMBDA, rdo_round
from mlcompress.codecs.quant.step import (CODES_PER_OCTAVE, MAX_CODE, MIN_CODE, code_for, estimated_payload_bytes,
                                          step_quantize, steps_of)
from mlcompress.errors import InputError, MrcFormatError, UsageError
from mlcompress.format.records import TensorRecord
from mlcompress.quant.plan import write_plan
from mlcompress.quant.rate import resolve_allocation, search_step, step_factors, step_plan


def _laplace(shape, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=g, dtype=torch.float64) - 0.5
    return (-scale * torch.sign(u) * torch.log1p(-2 * u.abs())).float()


def test_step_grid_is_exact_binary_and_nearest():
    # step(q) = (64 + q mod 64) * 2**(floor(q/64) - 6): spot values from the spec.
    assert steps_of(np.array([0, 1, 63, 64, -1, -64, -65])).tolist() == [
        1.0, 1.015625, 1.984375, 2.0, 0.9921875, 0.5, 0.49609375]
    rng = np.random.default_rng(0)
    s = np.exp(rng.uniform(-20, 5, 10000))
    q = code_for(s)
    best = np.abs(steps_of(q) - s)
    assert np.all(np.abs(steps_of(q - 1) - s) >= best) and np.all(np.abs(steps_of(q + 1) - s) >= best)
    assert np.max(np.abs(steps_of(q) / s - 1)) < 1 / CODES_PER_OCTAVE
    assert code_for(1e-300)[0] == MIN_CODE and code_for(1e300)[0] == MAX_CODE


def test_rdo_lambda_zero_is_nearest_rounding():
    t = np.random.default_rng(1).normal(0, 3, 5000)
    assert np.array_equal(rdo_round(t, 0.0), np.rint(t).astype(np.int64))
    n = rdo_round(t)
    assert np.all((n == np.floor(t)) | (n == np.floor(t) + 1))


def _coded_bits(x, step, lam):
    return 8 * len(CODEC.encode(x, {"scheme": "step", "step": step, "lam": lam})[0])


def _step_for_bits(x, bits, lam):
    lo, hi = -14.0, 2.0
    for _ in range(36):
        mid = 0.5 * (lo + hi)
        if _coded_bits(x, 2 ** mid, lam) > bits:
            lo = mid
        else:
            hi = mid
    return 2 ** hi


@pytest.mark.parametrize("bits_per_weight", [0.5, 1.0, 2.0])
def test_rdo_gives_lower_distortion_than_nearest_at_equal_coded_size(bits_per_weight):
    x = _laplace((200, 300))
    budget = bits_per_weight * x.numel()
    mse = {}
    for lam in (0.0, HIGH_RATE_LAMBDA):
        step = _step_for_bits(x, budget, lam)
        assert _coded_bits(x, step, lam) <= budget
        mse[lam] = float(((step_quantize(x, step, lam=lam).dequantize() - x) ** 2).mean())
    assert mse[HIGH_RATE_LAMBDA] < 0.95 * mse[0.0]


def test_default_rounding_is_nearest():
    # The measured default (docs/quantize.md): RDO is opt-in with --rdo-lambda.
    x = _laplace((50, 40), seed=5)
    assert DEFAULT_LAMBDA == 0.0
    assert torch.equal(step_quantize(x, 0.05).dequantize(), step_quantize(x, 0.05, lam=0.0).dequantize())


def test_codec_round_trip_is_the_evaluated_reconstruction():
    x = _laplace((64, 40), seed=3)
    for opts in ({"step": 0.01}, {"step": 0.03, "per_channel": True}, {"step": 0.02, "group_size": 16}):
        payload, params = CODEC.encode(x, {"scheme": "step", **opts})
        record = TensorRecord("w", tuple(x.shape), "float32", "quant", params, 0, len(payload))
        out = CODEC.decode(payload, record)
        q = step_quantize(x, opts["step"], per_channel=opts.get("per_channel", False), group_size=opts.get("group_size"))
        assert torch.equal(out, q.dequantize())
        # the reconstruction rule: float64(step) * level, rounded once
        steps = q.layout.expand(torch.from_numpy(steps_of(q.codes))).reshape(-1)
        expect = (steps * torch.from_numpy(q.levels).double()).float().reshape(x.shape)
        assert torch.equal(out, expect)
        t = x.double().reshape(-1) / steps
        assert torch.all((torch.from_numpy(q.levels) - t).abs() < 1)  # one of the two nearest levels


def test_codec_rejects_malformed_step_payloads():
    x = _laplace((16, 16))
    payload, params = CODEC.encode(x, {"scheme": "step", "step": 0.01})
    bad = dict(params, rows=3)
    with pytest.raises(MrcFormatError):
        CODEC.decode(payload, TensorRecord("w", (16, 16), "float32", "quant", bad, 0, len(payload)))
    with pytest.raises(MrcFormatError):
        CODEC.decode(payload[:5], TensorRecord("w", (16, 16), "float32", "quant", params, 0, 5))


def test_step_errors():
    with pytest.raises(UsageError):
        step_quantize(torch.ones(4, 4), 0.0)
    with pytest.raises(UsageError):
        step_quantize(torch.ones(4, 4), float("nan"))
    with pytest.raises(InputError):
        step_quantize(torch.full((4, 4), float("inf")), 0.1)
    with pytest.raises(InputError, match="too small"):
        step_quantize(torch.ones(4, 4), 1e-30)


def test_norm_allocation_scales_steps_with_the_frobenius_norm():
    tensors = {"big": _laplace((100, 100), 0.05), "small": _laplace((10, 10), 0.2), "bias": torch.zeros(10)}
    f = step_factors(tensors, "norm")
    assert set(f) == {"big", "small"} and f["big"] == 1.0
    expect = float(torch.linalg.vector_norm(tensors["small"].double()) / torch.linalg.vector_norm(tensors["big"].double()))
    assert f["small"] == pytest.approx(expect)
    assert step_factors(tensors, "equal") == {"big": 1.0, "small": 1.0}
    plan = step_plan(tensors, 0.1)
    assert plan["bias"] == ("lossless", {}) and plan["small"][1]["step"] == pytest.approx(0.1 * expect)
    with pytest.raises(UsageError):
        step_factors(tensors, "bogus")


def test_auto_allocation_is_equal_for_normalized_transformers_and_norm_otherwise():
    w = torch.ones(8, 8)
    gpt2 = {"transformer.wte.weight": w, "transformer.h.0.ln_1.weight": torch.ones(8),
            "transformer.h.0.attn.c_attn.weight": w}
    llama = {"model.embed_tokens.weight": w, "model.layers.0.input_layernorm.weight": torch.ones(8),
             "model.norm.weight": torch.ones(8), "lm_head.weight": w}
    bert = {"embeddings.LayerNorm.weight": torch.ones(8), "encoder.layer.0.attention.self.query.weight": w}
    lenet = {"conv1.weight": torch.ones(6, 1, 5, 5), "conv1.bias": torch.ones(6), "fc1.weight": w}
    resnet = {"conv1.weight": torch.ones(8, 3, 3, 3), "bn1.weight": torch.ones(8), "bn1.running_mean": torch.zeros(8),
              "layer1.0.norm.weight": torch.ones(8), "fc.weight": w}  # BatchNorm: output scale divided out
    assert [resolve_allocation(t, "auto") for t in (gpt2, llama, bert)] == ["equal"] * 3
    assert [resolve_allocation(t, "auto") for t in (lenet, resnet)] == ["norm"] * 2
    assert resolve_allocation(gpt2, "norm") == "norm" and resolve_allocation(lenet, "equal") == "equal"
    assert step_factors(gpt2, "auto") == step_factors(gpt2, "equal")
    with pytest.raises(UsageError):
        resolve_allocation(lenet, "bogus")


@pytest.mark.parametrize("ratio", [6.0, 12.0, 25.0])
def test_target_ratio_lands_within_5_percent(tmp_path, ratio):
    tensors = {"a.weight": _laplace((300, 200), 0.04, 1), "b.weight": _laplace((50, 100), 0.1, 2),
               "a.bias": torch.randn(300) * 0.01}
    step, plan, size = search_step(tensors, ratio, lambda p: write_plan(tmp_path / "m.mrc", tensors, p, {}, force=True))
    assert abs(size.fp32_ratio / ratio - 1) < 0.05
    assert size.file_bytes == (tmp_path / "m.mrc").stat().st_size


def test_target_ratio_out_of_reach_is_a_usage_error(tmp_path):
    tensors = {"a.weight": _laplace((16, 16)), "a.bias": torch.randn(4000)}
    with pytest.raises(UsageError, match="out of reach"):
        search_step(tensors, 50.0, lambda p: write_plan(tmp_path / "m.mrc", tensors, p, {}, force=True))
    for bad in (1.0, 0.5, float("nan")):
        with pytest.raises(UsageError):
            search_step(tensors, bad, lambda p: write_plan(tmp_path / "m.mrc", tensors, p, {}, force=True))


def test_estimate_is_close_to_the_real_payload():
    x = _laplace((300, 300))
    for step in (0.005, 0.03, 0.1):
        q = step_quantize(x, step)
        real = len(CODEC.encode(x, {"scheme": "step", "step": step})[0])
        assert abs(estimated_payload_bytes(q) - real) <= max(24, 0.01 * real)
    assert math.isfinite(estimated_payload_bytes(step_quantize(torch.zeros(3, 3), 1.0)))
