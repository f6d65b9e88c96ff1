"""``--allocation hessian``: the Fisher diagonal from a task's calibration inputs, and the steps
it gives (mlcompress/quant/sensitivity.py, mlcompress/quant/rate.py).

The constructed model is two linear branches summed into one classifier's logits. Branch ``b``
reads inputs 4x larger than branch ``a`` (each of its weights is ~16x as sensitive) and holds
the larger weights, so ``norm`` gives the sensitive tensor the *coarser* step and ``equal`` the
same one: the case the weighting is for.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mlcompress
from mlcompress.cli import main
from mlcompress.errors import UsageError
from mlcompress.options import Quant
from mlcompress.quant.rate import step_factors
from mlcompress.quant.sensitivity import fisher_diagonal, tensor_sensitivity
from mlcompress.tasks import TensorTask

FEATURES, CLASSES = 128, 16
TASK = "test_allocation_hessian:two_branch_task"


class TwoBranch(nn.Module):
    """``logits = a(x[..., :128]) + b(x[..., 128:])`` (any leading dimensions)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(FEATURES, CLASSES, bias=False)
        self.b = nn.Linear(FEATURES, CLASSES, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x[..., :FEATURES]) + self.b(x[..., FEATURES:])


def _inputs(n: int, seed: int, positions: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 2 * FEATURES) if positions is None else (n, positions, 2 * FEATURES)
    x = torch.randn(shape, generator=g)
    x[..., FEATURES:] *= 4.0
    return x


def _model(seed: int = 0) -> TwoBranch:
    g = torch.Generator().manual_seed(seed)
    model = TwoBranch()
    with torch.no_grad():
        model.a.weight.copy_(0.03 * torch.randn(CLASSES, FEATURES, generator=g))
        model.b.weight.copy_(0.05 * torch.randn(CLASSES, FEATURES, generator=g))
    return model


def self_labelled(name: str, architecture: type[nn.Module], model: nn.Module, x: torch.Tensor) -> TensorTask:
    """A task on inputs ``x`` whose labels are drawn from ``model``'s own outputs (seeded): the
    first 1,000 for training and calibration, the rest for testing."""
    with torch.no_grad():
        y = torch.multinomial(F.softmax(model(x), dim=-1), 1, generator=torch.Generator().manual_seed(2))[:, 0]
    return TensorTask(name, architecture, x[:1000], y[:1000], x[1000:], y[1000:])


def two_branch_task(data=None) -> TensorTask:
    """The plug-in task of the end-to-end tests."""
    return self_labelled("two-branch", TwoBranch, _model(), _inputs(3000, seed=1))


def _closed_form(model: TwoBranch, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The exact Fisher diagonal of a linear softmax layer: ``d log p_y / dW_kj = (1[y=k] - p_k) x_j``,
    whose square averaged over ``y ~ p`` is ``p_k (1 - p_k) x_j**2``; mean over every position."""
    with torch.no_grad():
        p = F.softmax(model(x).double(), dim=-1).reshape(-1, CLASSES)
    flat = x.double().reshape(-1, 2 * FEATURES)
    v = p * (1 - p)
    return {"a.weight": v.T @ flat[:, :FEATURES] ** 2 / len(flat), "b.weight": v.T @ flat[:, FEATURES:] ** 2 / len(flat)}


@pytest.mark.parametrize("positions", [None, 8])
def test_fisher_estimate_agrees_with_closed_form(positions):
    """The sampled-label estimate against the exact expectation, for a classifier (one
    distribution per input) and a sequence model (8 per input, one backward pass each input)."""
    model = _model()
    x = _inputs(3000 if positions is None else 400, seed=3, positions=positions)
    estimate = fisher_diagonal(model, x, ["a.weight", "b.weight"])
    exact = _closed_form(model, x)
    for name in exact:
        assert estimate[name].shape == exact[name].shape and estimate[name].dtype == torch.float64
        assert float(estimate[name].mean()) == pytest.approx(float(exact[name].mean()), rel=0.04)
        rows, rows_exact = estimate[name].mean(1), exact[name].mean(1)
        assert torch.allclose(rows, rows_exact, rtol=0.15), (rows / rows_exact)
    # The model is left as it was: weights, flags, mode.
    assert all(p.requires_grad for p in model.parameters()) and model.training
    assert torch.equal(model.a.weight, _model().a.weight)


def test_hessian_gives_the_sensitive_tensor_the_finer_step():
    model = _model()
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    sensitivity = tensor_sensitivity(fisher_diagonal(model, _inputs(1000, seed=4), list(tensors)))
    hessian = step_factors(tensors, "hessian", sensitivity=sensitivity)
    norm = step_factors(tensors, "norm")
    # b's weights are ~16x as sensitive: step ratio ~ 1/4 (mean(F)**-0.5), the largest factor 1.
    assert hessian["a.weight"] == 1.0
    assert 0.2 < hessian["b.weight"] < 0.3
    assert norm["b.weight"] == 1.0 and norm["a.weight"] < 1.0  # norm: the opposite order
    with pytest.raises(UsageError, match="Fisher"):
        step_factors(tensors, "hessian")


def _kl(tensors: dict[str, torch.Tensor], reference: nn.Module, x: torch.Tensor) -> float:
    model = TwoBranch()
    model.load_state_dict(tensors)
    with torch.no_grad():
        return float(F.kl_div(F.log_softmax(model(x), -1), F.log_softmax(reference(x), -1), log_target=True,
                              reduction="batchmean"))


@pytest.fixture()
def checkpoint(tmp_path, monkeypatch) -> Path:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))
    path = tmp_path / "two.pt"
    torch.save(_model().state_dict(), path)
    return path


def test_equal_size_files_hessian_lowers_the_loss(tmp_path, checkpoint):
    reports, kls, losses = {}, {}, {}
    test_x = two_branch_task().test_inputs
    for allocation in ("hessian", "equal", "norm"):
        out = tmp_path / f"{allocation}.mrc"
        reports[allocation] = mlcompress.encode(checkpoint, out, method=Quant(target_ratio=8, allocation=allocation,
                                                                              task=TASK, device="cpu"))
        decoded = mlcompress.decode(out)
        kls[allocation] = _kl(decoded, _model(), test_x)
        losses[allocation] = mlcompress.evaluate(TASK, out, device="cpu")["loss"]
    for allocation, report in reports.items():
        assert report.to_json()["ratio"] == pytest.approx(8, rel=0.05), allocation
    assert reports["hessian"].to_json()["allocation"] == "hessian"
    # Expected KL at equal rate (high-rate model): hessian ~8, equal ~17, norm ~40 (units of step^2).
    assert kls["hessian"] < 0.7 * kls["equal"] and kls["equal"] < kls["norm"], kls
    assert losses["hessian"] < losses["equal"] and losses["hessian"] < losses["norm"], losses


def test_same_bytes_twice(tmp_path, checkpoint):
    outs = [tmp_path / "1.mrc", tmp_path / "2.mrc"]
    for out in outs:
        mlcompress.encode(checkpoint, out, method=Quant(target_ratio=6, allocation="hessian", task=TASK, device="cpu",
                                                        calib_samples=200))
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert mlcompress.inspect(outs[0]).to_json()["metadata"]["options"]["calib_samples"] == 200


def test_hessian_needs_task(tmp_path, checkpoint, capsys):
    out = tmp_path / "q.mrc"
    for size in (["--target-ratio", "8"], ["--step", "0.01"]):
        assert main(["quantize", str(checkpoint), *size, "--allocation", "hessian", "-o", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "--allocation hessian needs --task" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.pt"]
    with pytest.raises(UsageError, match="needs --task"):
        Quant(target_ratio=8, allocation="hessian").validate()
    with pytest.raises(UsageError, match="--calib-samples"):
        Quant(target_ratio=8, allocation="hessian", task=TASK, calib_samples=0).validate()
