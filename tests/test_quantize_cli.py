"""``mlcompress quantize`` and ``mlcompress prune`` through the CLI entry point (in-process for speed).

Bad input must give one ``error:`` line, the right exit code, and leave nothing behind.
"""

from __future__ import annotations

import json

import pytest
import torch

from mlcompress.checkpoint import load_checkpoint
from mlcompress.cli import main
from mlcompress.container import open_mrc
from mlcompress.prune import apply_masks, prune_masks
from mlcompress.quant.plan import uniform_plan
from mlcompress.quant.quantize import dequantize_uniform
from mlcompress.tasks import get_task


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    """An (untrained, seeded) mlp-digits checkpoint: shapes are what these tests need."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "digits.pt"
    torch.save(get_task("mlp-digits").make_model().state_dict(), path)
    return path


def _json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    return json.loads(out[0])


def _error(capsys, *fragments: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for f in fragments:
        assert f in err[0], err[0]


def test_quantize_uniform_writes_exact_mrc(tmp_path, digits_ckpt, capsys):
    out, st = tmp_path / "q.mrc", tmp_path / "q.safetensors"
    code = main(["quantize", str(digits_ckpt), "--bits", "4", "--group-size", "16", "-o", str(out),
                 "--safetensors", str(st), "--task", "mlp-digits", "--device", "cpu", "--json"])
    assert code == 0
    summary = _json(capsys)
    tensors = load_checkpoint(digits_ckpt)
    want = dequantize_uniform(tensors, uniform_plan(tensors, 4, group_size=16))
    decoded = open_mrc(out).tensors()
    fallback = load_checkpoint(st)
    for name, t in want.items():
        assert torch.equal(decoded[name], t) and torch.equal(fallback[name], t)
    assert summary["file_bytes"] == out.stat().st_size
    assert summary["ratio"] == pytest.approx(4 * 4810 / out.stat().st_size)
    assert 0 <= summary["metric_after"] <= 1 and summary["quantized_tensors"] == 2


@pytest.mark.parametrize("bits", ["0", "17"])
def test_bits_out_of_range(tmp_path, digits_ckpt, capsys, bits):
    out = tmp_path / "q.mrc"
    assert main(["quantize", str(digits_ckpt), "--bits", bits, "-o", str(out)]) == 2
    _error(capsys, "--bits")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sparsity", ["1.0", "-0.1", "1.5"])
def test_sparsity_out_of_range(tmp_path, digits_ckpt, capsys, sparsity):
    out = tmp_path / "p.mrc"
    assert main(["prune", str(digits_ckpt), "--sparsity", sparsity, "-o", str(out)]) == 2
    _error(capsys, "--sparsity")
    assert list(tmp_path.iterdir()) == []


def test_task_checkpoint_mismatch(tmp_path, capsys):
    ckpt = tmp_path / "other.pt"
    torch.save({"fc1.weight": torch.randn(32, 64), "fc1.bias": torch.randn(32)}, ckpt)
    for args in (["quantize", str(ckpt), "--method", "l2", "--task", "mlp-digits", "-o", str(tmp_path / "q.mrc")],
                 ["quantize", str(ckpt), "--bits", "4", "--task", "mlp-digits", "-o", str(tmp_path / "q.mrc")],
                 ["prune", str(ckpt), "--sparsity", "0.5", "--task", "mlp-digits", "-o", str(tmp_path / "p.mrc")]):
        assert main(args) == 1
        _error(capsys, "does not fit task 'mlp-digits'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.pt"]


def test_empty_calibration_set(tmp_path, digits_ckpt, capsys):
    out = tmp_path / "q.mrc"
    assert main(["quantize", str(digits_ckpt), "--method", "l2", "--task", "mlp-digits", "--calib-samples", "0",
                 "-o", str(out)]) == 1
    _error(capsys, "calibration set is empty")
    assert list(tmp_path.iterdir()) == []


def test_l2_needs_task_and_existing_output_refused(tmp_path, digits_ckpt, capsys):
    assert main(["quantize", str(digits_ckpt), "--method", "l2", "-o", str(tmp_path / "q.mrc")]) == 2
    _error(capsys, "--task")
    existing = tmp_path / "x.mrc"
    existing.write_bytes(b"keep")
    assert main(["quantize", str(digits_ckpt), "--bits", "8", "-o", str(existing)]) == 1
    _error(capsys, "already exists")
    assert existing.read_bytes() == b"keep"


def test_prune_magnitude_global_and_layer(digits_ckpt):
    tensors = load_checkpoint(digits_ckpt)
    weights = ["fc1.weight", "fc2.weight"]
    total = sum(tensors[n].numel() for n in weights)
    for scope in ("global", "layer"):
        masks = prune_masks(tensors, 0.7, criterion="magnitude", scope=scope)
        assert set(masks) == set(weights)  # biases are never pruned
        pruned = apply_masks(tensors, masks)
        if scope == "global":
            assert sum(int(m.sum()) for m in masks.values()) == round(0.7 * total)
            kept_min = min(float(pruned[n][~masks[n]].abs().min()) for n in weights)
            cut_max = max(float(tensors[n][masks[n]].abs().max()) for n in weights)
            assert cut_max <= kept_min
        else:
            for n in weights:
                assert int(masks[n].sum()) == round(0.7 * tensors[n].numel())
    r1 = prune_masks(tensors, 0.5, criterion="random", seed=3)
    r2 = prune_masks(tensors, 0.5, criterion="random", seed=3)
    assert all(torch.equal(r1[n], r2[n]) for n in weights)


def test_prune_finetune_keeps_zeros_and_mrc_round_trips(tmp_path, digits_ckpt, capsys):
    out = tmp_path / "p.mrc"
    code = main(["prune", str(digits_ckpt), "--sparsity", "0.8", "--task", "mlp-digits", "--finetune-steps", "20",
                 "--device", "cpu", "-o", str(out), "--json"])
    assert code == 0
    summary = _json(capsys)
    assert summary["achieved_sparsity"] == pytest.approx(0.8, abs=1e-3)
    decoded = open_mrc(out).tensors()
    masks = prune_masks(load_checkpoint(digits_ckpt), 0.8)
    for n, m in masks.items():
        assert bool((decoded[n][m] == 0).all())
    # with --bits the pruned weights are quantized and zeros stay exact zeros
    out2 = tmp_path / "p4.mrc"
    assert main(["prune", str(digits_ckpt), "--sparsity", "0.8", "--bits", "4", "-o", str(out2), "--json"]) == 0
    s2 = _json(capsys)
    assert s2["file_bytes"] < summary["file_bytes"] and s2["achieved_sparsity"] >= 0.8 - 1e-3


def test_quantize_target_ratio_is_entropy_constrained(tmp_path, digits_ckpt, capsys):
    out, st = tmp_path / "e.mrc", tmp_path / "e.safetensors"
    code = main(["quantize", str(digits_ckpt), "--target-ratio", "8", "-o", str(out), "--safetensors", str(st),
                 "--json"])
    assert code == 0
    summary = _json(capsys)
    assert summary["method"] == "step" and summary["allocation"] == "norm" and summary["step"] > 0
    assert abs(summary["fp32_ratio"] / 8 - 1) < 0.05
    decoded, fallback = open_mrc(out).tensors(), load_checkpoint(st)
    assert all(torch.equal(decoded[n], fallback[n]) for n in decoded)
    assert {r.params.get("scheme") for r in open_mrc(out).records if r.codec == "quant"} == {"step"}
    # --step with the searched step gives the very same payloads (the header records the options)
    again = tmp_path / "s.mrc"
    assert main(["quantize", str(digits_ckpt), "--step", repr(summary["step"]), "-o", str(again), "--quiet"]) == 0
    assert [(r.name, r.crc32, r.params) for r in open_mrc(again).records] == \
        [(r.name, r.crc32, r.params) for r in open_mrc(out).records]


@pytest.mark.parametrize("flags, fragment", [
    (["--bits", "4", "--target-ratio", "10"], "--bits and --target-ratio"),
    (["--bits", "4", "--step", "0.1"], "--bits and --step"),
    (["--step", "0.1", "--target-ratio", "10"], "--step and --target-ratio"),
    (["--per-channel", "--group-size", "8"], "--per-channel and --group-size"),
    (["--step", "0"], "--step must be a positive number"),
    (["--step", "nan"], "--step must be a positive number"),
    (["--step", "-1"], "--step must be a positive number"),
    (["--target-ratio", "1"], "--target-ratio must be a number above 1"),
    (["--target-ratio", "0.5"], "--target-ratio must be a number above 1"),
    (["--step", "0.1", "--allocation", "median"], "unknown --allocation"),
    (["--step", "0.1", "--rdo-lambda", "-1"], "--rdo-lambda"),
    (["--method", "l2", "--task", "mlp-digits", "--step", "0.1"], "does not take --step"),
])
def test_quantize_conflicting_or_bad_grid_flags(tmp_path, digits_ckpt, capsys, flags, fragment):
    out = tmp_path / "bad.mrc"
    assert main(["quantize", str(digits_ckpt), *flags, "-o", str(out)]) == 2
    _error(capsys, fragment)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_quantize_unreachable_target_is_one_line(tmp_path, digits_ckpt, capsys):
    out = tmp_path / "bad.mrc"
    assert main(["quantize", str(digits_ckpt), "--target-ratio", "5000", "-o", str(out)]) == 2
    _error(capsys, "out of reach")
    assert not out.exists()
