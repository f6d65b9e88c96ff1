"""Dependent (trellis-coded) quantization on the step grid: the state machine, the encoder's
optimality and rate, exact round trips through files, old files unchanged, the usage errors."""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json

import numpy as np
import pytest
import torch

import mlcompress
from mlcompress.checkpoint import load_checkpoint
from mlcompress.cli import main
from mlcompress.codecs.quant import CODEC, trellis
from mlcompress.codecs.quant import step as step_grid
from mlcompress.container import open_mrc
from mlcompress.errors import MrcFormatError
from mlcompress.format.records import TensorRecord
from mlcompress.quant.rate import step_plan
from test_quant_step import _laplace
from test_quantize_cli import digits_ckpt  # noqa: F401  (an untrained, seeded mlp-digits checkpoint)


def test_state_machine_worked_example():
    # docs/format.md's example: levels 1, -1, 0, 2 from state 0 -> 2, -1, 0, 3 (states 0, 2, 3, 3).
    assert trellis.reconstruction(np.array([[1, -1, 0, 2]])).tolist() == [[2, -1, 0, 3]]
    # Q0 (states 0, 1) reconstructs 2k; Q1 (2, 3) reconstructs 2k - sgn(k); odd levels switch.
    assert trellis.reconstruction(np.array([[-3, 0, 0]])).tolist() == [[-6, 0, 0]]
    r = trellis.reconstruction(np.array([[1, 2, -2, 1, 1]]))[0].tolist()
    # states: 0 -(k=1)-> 2 -(k=2)-> 1 -(k=-2)-> 2 -(k=1)-> 3 -(k=1)-> 1
    assert r == [2, 3, -4, 1, 1]


def test_viterbi_finds_the_least_squared_error_sequence():
    rng = np.random.default_rng(0)
    for _ in range(25):
        t = rng.laplace(0, 1.5, size=4)
        best = min(float(((t - trellis.reconstruction(np.array([ks]))[0]) ** 2).sum())
                   for ks in itertools.product(range(-5, 6), repeat=4))
        levels = trellis.viterbi(t[None], np.ones((1, 4), dtype=bool), None)
        assert float(((t - trellis.reconstruction(levels)[0]) ** 2).sum()) == pytest.approx(best, abs=1e-12)


def test_runs_restart_the_state_at_group_and_run_starts():
    starts, lengths = trellis.run_bounds(2, 600, 300)  # 2 rows, 2 groups of 300: runs 256 + 44 each
    assert starts.tolist() == [0, 256, 300, 556, 600, 856, 900, 1156]
    assert lengths.tolist() == [256, 44, 256, 44] * 2
    q = step_grid.step_quantize(_laplace((2, 600)), 0.01, group_size=300, dq=True)
    # Each run decodes alone from state 0: the whole tensor is the runs decoded one by one.
    whole = q.dequantize().reshape(-1)
    for s, n in zip(starts, lengths):
        r = trellis.reconstruction(q.levels[s : s + n][None])[0]
        steps = step_grid.steps_of(q.codes)
        sl = slice(int(s), int(s + n))
        assert torch.equal(whole[sl], trellis.dequantize_chunk(r, steps, sl, 600, 300, torch.float32))


def test_chunks_change_no_level(monkeypatch):
    x = _laplace((7, 300), seed=3)
    one = step_grid.step_quantize(x, 0.02, per_channel=True, dq=True, lam=0.1)
    monkeypatch.setattr(trellis, "CHUNK_ELEMENTS", 256)  # one run per chunk
    many = step_grid.step_quantize(x, 0.02, per_channel=True, dq=True, lam=0.1)
    assert np.array_equal(one.levels, many.levels) and torch.equal(one.dequantize(), many.dequantize())


#: The trellis's rate weight in these tests (step**2 per bit; docs/quantize.md measures it).
LAM = 0.25


def _coded_bytes(x, step, dq):
    return len(CODEC.encode(x, {"scheme": "step", "step": step, "dq": dq, "lam": LAM if dq else 0.0})[0])


def _step_for_bytes(x, budget, dq):
    """The finest grid step (a step code's) whose payload fits ``budget`` bytes."""
    codes = range(-12 * step_grid.CODES_PER_OCTAVE, 0)  # steps 2**-12 .. 1
    fits = bisect.bisect_left(codes, True, key=lambda q: _coded_bytes(x, float(step_grid.steps_of(q)), dq) <= budget)
    return float(step_grid.steps_of(codes[fits]))


@pytest.mark.parametrize("make", [lambda: _laplace((64, 256), seed=1),
                                  lambda: torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * 0.05])
def test_dq_has_lower_weight_error_at_equal_size(make):
    x = make()
    for bits_per_weight in (2.0, 3.0):  # below 2, one step code moves the size by over 1%
        budget = x.numel() * bits_per_weight / 8
        mse, size = {}, {}
        for dq in (False, True):
            step = _step_for_bytes(x, budget, dq)
            size[dq] = _coded_bytes(x, step, dq)
            mse[dq] = float(((step_grid.step_quantize(x, step, dq=dq, lam=LAM if dq else 0.0).dequantize() - x) ** 2).mean())
        assert abs(size[True] / size[False] - 1) < 0.01
        assert mse[True] < 0.9 * mse[False], (bits_per_weight, mse)  # measured: 12-19% lower


def _checkpoint(tmp_path, dtype):
    torch.manual_seed(0)
    sd = {"a.weight": _laplace((12, 300), seed=4).to(dtype), "b.weight": _laplace((5, 3, 3, 3), seed=5).to(dtype),
          "b.bias": torch.randn(5).to(dtype)}
    path = tmp_path / f"m-{dtype}.pt"
    torch.save(sd, path)
    return path, sd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grid", [{}, {"per_channel": True}, {"group_size": 64}])
def test_round_trip_through_a_file_is_bit_exact(tmp_path, dtype, grid):
    path, sd = _checkpoint(tmp_path, dtype)
    out, st = tmp_path / "q.mrc", tmp_path / "q.safetensors"
    report = mlcompress.encode(path, out, method=mlcompress.Quant(step=0.01, dq=True, **grid),
                               dequantized=st).to_json()
    assert report["dq"] is True
    records = {r.name: r for r in open_mrc(out).records}
    assert records["a.weight"].params["dq"] == trellis.VERSION and records["b.bias"].codec != "quant"
    decoded = mlcompress.decode(out, keep_dtype=True)
    evaluated = load_checkpoint(st)  # the weights the quantizer evaluated
    plan = step_plan(sd, report["step"], allocation=report["allocation"], dq=True, **grid)
    for name in ("a.weight", "b.weight"):
        opts = plan[name][1]
        q = step_grid.step_quantize(sd[name], opts["step"], dq=True, **grid)
        assert decoded[name].dtype == dtype and torch.equal(decoded[name], evaluated[name].to(dtype))
        assert torch.equal(decoded[name], q.dequantize())
        assert not torch.equal(decoded[name], sd[name])


def test_dq_levels_are_what_the_codec_stores(tmp_path):
    x = _laplace((9, 500), seed=6)
    for opts in ({"step": 0.01}, {"step": 0.02, "per_channel": True, "lam": 0.1155}, {"step": 0.005, "group_size": 100}):
        payload, params = CODEC.encode(x, {"scheme": "step", "dq": True, **opts})
        rec = TensorRecord(name="w", dtype="float32", shape=(9, 500), codec="quant", params=params, offset=0,
                           length=len(payload), crc32=0)
        q = step_grid.step_quantize(x, opts["step"], per_channel=opts.get("per_channel", False),
                                    group_size=opts.get("group_size"), lam=opts.get("lam", 0.0), dq=True)
        assert torch.equal(CODEC.decode(payload, rec), q.dequantize())
        bad = TensorRecord(name="w", dtype="float32", shape=(9, 500), codec="quant", params=dict(params, dq=2),
                           offset=0, length=len(payload), crc32=0)
        with pytest.raises(MrcFormatError, match="dq"):
            CODEC.decode(payload, bad)


# Payload hashes of the step scheme written before dependent quantization existed (commit
# 70d4d09): files without --dq must stay byte-identical.
_OLD_PAYLOADS = [
    ({"step": 0.01}, torch.float32, "07b2af91fb3889ef"),
    ({"step": 0.01}, torch.bfloat16, "deb10bb13763b8eb"),
    ({"step": 0.01, "per_channel": True}, torch.float32, "fcd169febfbdcf0f"),
    ({"step": 0.01, "per_channel": True}, torch.bfloat16, "283d6b89e069fbda"),
    ({"step": 0.01, "group_size": 16, "lam": 0.1155}, torch.float32, "3f93f168ea07700c"),
    ({"step": 0.01, "group_size": 16, "lam": 0.1155}, torch.bfloat16, "60178e2cefc66dc0"),
]


@pytest.mark.parametrize("opts, dtype, digest", _OLD_PAYLOADS)
def test_files_without_dq_are_unchanged(opts, dtype, digest):
    x = torch.randn(48, 40, generator=torch.Generator().manual_seed(11)) * 0.05
    payload, params = CODEC.encode(x.to(dtype), {"scheme": "step", **opts})
    assert hashlib.sha256(payload).hexdigest()[:16] == digest and "dq" not in params
    rec = TensorRecord(name="w", dtype=str(dtype).replace("torch.", ""), shape=(48, 40), codec="quant", params=params,
                       offset=0, length=len(payload), crc32=0)
    q = step_grid.step_quantize(x.to(dtype), opts["step"], per_channel=opts.get("per_channel", False),
                                group_size=opts.get("group_size"), lam=opts.get("lam", 0.0))
    # The old rule, written out: float64 step of the element's group times the level.
    steps = torch.from_numpy(step_grid.steps_of(q.codes)).reshape(q.layout.rows, -1)
    per_element = steps.repeat_interleave(q.layout.group, dim=1)[:, : q.layout.cols].reshape(-1)
    old = (per_element * torch.from_numpy(q.levels.astype(np.float64))).to(dtype).reshape(48, 40)
    assert torch.equal(CODEC.decode(payload, rec), old)


def _one_line(capsys, fragment):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err


@pytest.mark.parametrize("flags, fragment", [
    (["--bits", "4", "--dq"], "--dq"),
    (["--dq"], "--dq applies to --step/--target-ratio"),
    (["--float", "bf16", "--dq"], "--dq"),
    (["--method", "l2", "--task", "mlp-digits", "--dq"], "--dq"),
])
def test_dq_usage_errors_write_nothing(tmp_path, digits_ckpt, capsys, flags, fragment):
    out = tmp_path / "bad.mrc"
    assert main(["quantize", str(digits_ckpt), *flags, "-o", str(out)]) == 2
    _one_line(capsys, fragment)
    assert list(tmp_path.iterdir()) == []


def test_target_ratio_with_dq_lands_and_streaming_matches(tmp_path, digits_ckpt, capsys):
    out = tmp_path / "t.mrc"
    assert main(["quantize", str(digits_ckpt), "--target-ratio", "8", "--dq", "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["dq"] is True and abs(summary["fp32_ratio"] / 8 - 1) < 0.05
    quant = [r for r in open_mrc(out).records if r.codec == "quant"]
    assert quant and all(r.params["dq"] == trellis.VERSION for r in quant)
    # --step (streamed, one tensor at a time) with the searched step writes the same payloads.
    again = tmp_path / "s.mrc"
    assert main(["quantize", str(digits_ckpt), "--step", repr(summary["step"]), "--dq", "-o", str(again), "--quiet"]) == 0
    assert [(r.name, r.crc32, r.params) for r in open_mrc(again).records] == \
        [(r.name, r.crc32, r.params) for r in open_mrc(out).records]
    # Without --dq nothing in the file mentions it.
    plain = tmp_path / "p.mrc"
    assert main(["quantize", str(digits_ckpt), "--step", repr(summary["step"]), "-o", str(plain), "--quiet"]) == 0
    assert "dq" not in open_mrc(plain).metadata["options"]
    assert all("dq" not in r.params for r in open_mrc(plain).records)


def test_format_test_vector():
    # docs/format.md, "Dependent quantization": the bytes and the decoded tensor.
    x = torch.tensor([[0.5, -0.25, 0.0], [0.75, 0.0, 0.0]])
    payload, params = CODEC.encode(x, {"scheme": "step", "step": 0.25, "dq": True})
    assert params == {"scheme": "step", "rows": 1, "cols": 6, "group": 6, "codes_bytes": 28, "dq": 1}
    assert payload.hex() == "0100000080ffffff010000000000000001000000000000000000000001ffffffff02d205"
    rec = TensorRecord(name="w", dtype="float32", shape=(2, 3), codec="quant", params=params, offset=0,
                       length=len(payload), crc32=0)
    assert torch.equal(CODEC.decode(payload, rec), x)


def test_inspect_names_dependent_quantization():
    x = _laplace((4, 300), seed=7)
    payload, params = CODEC.encode(x, {"scheme": "step", "step": 0.01, "dq": True})
    rec = TensorRecord(name="w", dtype="float32", shape=(4, 300), codec="quant", params=params, offset=0,
                       length=len(payload), crc32=0)
    assert CODEC.describe(rec) == {"scheme": "step", "groups": 1, "dq": 1}
    plain, params = CODEC.encode(x, {"scheme": "step", "step": 0.01})
    assert "dq" not in CODEC.describe(TensorRecord(name="w", dtype="float32", shape=(4, 300), codec="quant",
                                                   params=params, offset=0, length=len(plain), crc32=0))
