"""Classifier divergence (--arch TASK): accuracies, flips in both directions, KL/JS per example."""

from __future__ import annotations

import json

import pytest
import torch

from diverge_threads import one_thread  # noqa: E402,F401  (autouse fixture)
from mlcompress.checkpoint import save_checkpoint
from mlcompress.cli import main
from mlcompress.divergence.compare import DivergeOptions, diverge
from mlcompress.tasks import evaluate_model, get_task, train_task_model


@pytest.fixture(scope="module")
def digits(one_thread, tmp_path_factory):
    root = tmp_path_factory.mktemp("diverge_digits")
    task = get_task("mlp-digits")
    trained = train_task_model(task, steps=60, seed=0, device="cpu").model
    ref = {k: v.detach().clone() for k, v in trained.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    cmp = {k: v + 0.3 * v.std() * torch.randn(v.shape, generator=g) for k, v in ref.items()}
    save_checkpoint(ref, root / "ref.pt")
    save_checkpoint(cmp, root / "cmp.safetensors")
    # A TorchScript copy of the reference: the other accepted form of a task model.
    model = task.make_model()
    model.load_state_dict(ref)
    torch.jit.save(torch.jit.trace(model.eval(), task.calibration(4)), str(root / "ref_ts.pt"))
    return {"root": root, "task": task, "ref": ref, "cmp": cmp}


def _model(task, state):
    m = task.make_model()
    m.load_state_dict(state)
    return m.eval()


def test_accuracies_and_flips_match_a_direct_count(digits):
    task = digits["task"]
    r = diverge(digits["root"] / "ref.pt", digits["root"] / "cmp.safetensors",
                DivergeOptions(arch="mlp-digits", device="cpu")).report
    ref_m, cmp_m = _model(task, digits["ref"]), _model(task, digits["cmp"])
    ref_ok, cmp_ok = [], []
    with torch.no_grad():
        for x, y in task.test_batches(1000):
            ref_ok.append(ref_m(x).argmax(-1) == y)
            cmp_ok.append(cmp_m(x).argmax(-1) == y)
    ref_ok, cmp_ok = torch.cat(ref_ok), torch.cat(cmp_ok)
    assert r["positions"] == ref_ok.numel()
    assert r["accuracy"]["ref"] == pytest.approx(evaluate_model(task, ref_m, device="cpu").metric)
    assert r["accuracy"]["cmp"] == pytest.approx(float(cmp_ok.float().mean()))
    assert r["flips"]["correct_to_wrong"] == int((ref_ok & ~cmp_ok).sum())
    assert r["flips"]["wrong_to_correct"] == int((~ref_ok & cmp_ok).sum())
    assert r["flips"]["total"] > 0  # noise this large flips answers
    # Flips move accuracy by their difference only, which is why accuracy hides them.
    drop = (r["flips"]["correct_to_wrong"] - r["flips"]["wrong_to_correct"]) / r["positions"]
    assert r["headline"]["accuracy_drop"] == pytest.approx(drop)
    assert r["kl"]["mean"] > 0 and 0 < r["js"]["mean"] < 0.7


def test_identical_classifiers_and_torchscript(digits, capsys):
    root = digits["root"]
    r = diverge(root / "ref_ts.pt", root / "ref.pt", DivergeOptions(arch="mlp-digits", device="cpu")).report
    assert r["flips"]["total"] == 0 and r["same_top"]["rate"] == 1.0
    assert r["kl"]["mean"] < 1e-9  # traced and eager forward may differ in the last ulp
    code = main(["diverge", str(root / "ref.pt"), str(root / "cmp.safetensors"), "--arch", "mlp-digits",
                 "--json", "--device", "cpu", "--fail-above", "flips=0"])
    out = json.loads(capsys.readouterr().out)
    assert code == 3 and out["gates"]["flips"]["passed"] is False
    code = main(["diverge", str(root / "ref.pt"), str(root / "cmp.safetensors"), "--arch", "no-such-task"])
    assert code == 1 and "unknown task" in capsys.readouterr().err
