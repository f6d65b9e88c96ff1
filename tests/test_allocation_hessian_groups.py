"""``--allocation hessian`` with ``--per-channel``/``--group-size``: group steps from the groups'
own Fisher diagonals, never coarser than the RMS scaling, on quarter octaves
(mlcompress/quant/rate.py ``group_step_factors``).

The constructed model is one linear classifier whose input features come in four blocks of 64
with scales 1, 2, 4 and 8: the Fisher diagonal of a linear softmax layer is ``p_k(1-p_k) x_j²``,
so with ``--group-size 64`` the four groups of every row are 1, 4, 16 and 64 times as sensitive
while their weights have the same scale (the RMS scaling gives them one step). Relative to the
tensor's mean Fisher (21.25) the Fisher rule asks for steps 4.6, 2.3, 1.15 and 0.58 times the
tensor step: the first three are capped at the RMS scaling (1), the last is kept, 3/4 octave
finer once on the quarter-octave grid.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mlcompress
from mlcompress.cli import main
from mlcompress.codecs import entropy
from mlcompress.codecs.quant import CODEC
from mlcompress.codecs.quant.step import CODES_PER_OCTAVE, estimated_payload_bytes, group_sizes, rms_factors, step_quantize
from mlcompress.codecs.quant.uniform import GroupLayout
from mlcompress.container import open_mrc
from mlcompress.errors import UsageError
from mlcompress.options import Quant
from mlcompress.quant.rate import fisher_group_factors, group_step_factors, quarter_octaves
from mlcompress.quant.sensitivity import fisher_diagonal, group_sensitivity
from mlcompress.tasks import TensorTask
from test_allocation_hessian import TASK as TWO_BRANCH, _model as two_branch, self_labelled

FEATURES, CLASSES, BLOCK = 256, 16, 64
SCALES = (1.0, 2.0, 4.0, 8.0)
TASK = "test_allocation_hessian_groups:scaled_task"


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(FEATURES, CLASSES, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _inputs(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, FEATURES, generator=torch.Generator().manual_seed(seed))
    return x * torch.tensor(SCALES).repeat_interleave(BLOCK)


def _model() -> Scaled:
    """Gaussian weights, each group of 64 rescaled to RMS 0.02 (so the RMS scaling is 1 for all)."""
    model = Scaled()
    w = torch.randn(CLASSES, len(SCALES), BLOCK, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = 0.02 * w / w.square().mean(dim=2, keepdim=True).sqrt()
    with torch.no_grad():
        model.fc.weight.copy_(w.reshape(CLASSES, FEATURES))
    return model


def scaled_task(data=None) -> TensorTask:
    """The plug-in task: labels drawn from :func:`_model`'s own outputs."""
    return self_labelled("scaled", Scaled, _model(), _inputs(2000, seed=1))


@pytest.fixture()
def checkpoint(tmp_path, monkeypatch) -> Path:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))
    path = tmp_path / "scaled.pt"
    torch.save(_model().state_dict(), path)
    return path


def _codes(path: Path, name: str) -> np.ndarray:
    """The step codes a file stores for ``name`` (one per group)."""
    f = open_mrc(path)
    rec = f.record(name)
    n = rec.params["rows"] * -(-rec.params["cols"] // rec.params["group"])
    return entropy.decode_symbols(memoryview(f.payload(name))[: rec.params["codes_bytes"]], expected_count=n)


def test_fisher_group_factors_rule():
    """``Δ_g² mean(F_g)`` is one constant; the tensor's size-weighted mean Fisher keeps the
    tensor step; an insensitive group gets the coarsest of the others; no sensitivity: 1."""
    fisher, sizes = np.array([1.0, 4.0, 16.0, 0.0]), np.array([64.0, 64.0, 64.0, 32.0])
    rel = fisher_group_factors(fisher, sizes)
    whole = float(np.sum(fisher * sizes) / sizes.sum())
    assert np.allclose(rel[:3] ** 2 * fisher[:3], whole)
    assert rel[3] == rel[0] == rel.max()
    assert np.array_equal(fisher_group_factors(np.zeros(3), np.ones(3)), np.ones(3))
    assert np.array_equal(fisher_group_factors(np.array([5.0]), np.array([10.0])), np.ones(1))


def test_cap_is_the_rms_scaling():
    """Where the Fisher asks a group for a coarser step than its RMS share, the RMS scaling
    holds; where it asks for a finer one, the Fisher's holds; both on quarter octaves."""
    x = torch.cat([torch.full((1, 64), 0.01), torch.full((1, 64), 1.0)], dim=1)
    layout = GroupLayout.for_shape((1, 128), group_size=64)
    fisher = {"w": np.array([1e-4, 1.0])}  # the small group is also the insensitive one
    factors = group_step_factors({"w": x}, fisher, group_size=64)["w"]
    rule, rms = fisher_group_factors(fisher["w"], group_sizes(layout)), rms_factors(x, layout)
    assert rule[0] > rms[0] and factors[0] == quarter_octaves(rms[:1])[0]  # capped
    assert rule[1] < rms[1] and factors[1] == quarter_octaves(rule[1:])[0]  # the Fisher's finer step kept
    assert np.allclose(4 * np.log2(factors), np.round(4 * np.log2(factors)))
    assert np.array_equal(quarter_octaves(np.array([1.0, 1.09, 1.0 / 1.2, 2.0 ** 0.3])),
                          np.exp2(np.array([0.0, 0.0, -0.25, 0.25])))


def test_file_group_steps_follow_the_rule(tmp_path, checkpoint):
    """In the written file each row's most sensitive group is 3/4 octave finer than the other
    three (capped at the RMS scaling, one step); ``auto``'s RMS-scaled groups all share one."""
    codes = {}
    for allocation in ("hessian", "auto"):
        out = tmp_path / f"{allocation}.mrc"
        mlcompress.encode(checkpoint, out, method=Quant(target_ratio=6, allocation=allocation, task=TASK, device="cpu",
                                                        group_size=BLOCK))
        codes[allocation] = _codes(out, "fc.weight").reshape(CLASSES, len(SCALES))
    # Codes are linear in the step's mantissa, so 3/4 octave is 44-52 codes, not exactly 48; a
    # row whose sampled-label estimate lands past -7/8 octave (log2 0.58 = -0.80) rounds to -1.
    offsets = codes["hessian"] - codes["hessian"][:, :1]
    assert (offsets[:, :3] == 0).all(), offsets
    last = offsets[:, 3]
    assert ((np.abs(last + 48) <= 4) | (last == -64)).all() and np.median(last) > -56, last
    assert (codes["auto"] == codes["auto"][0, 0]).all()


@pytest.mark.parametrize("grouping", [{"group_size": BLOCK}, {"per_channel": True},
                                      {"group_size": BLOCK, "dq": True}, {"per_channel": True, "rdo_lambda": 0.1}])
def test_target_ratio_reached(tmp_path, checkpoint, grouping):
    out = tmp_path / "q.mrc"
    report = mlcompress.encode(checkpoint, out, method=Quant(target_ratio=7, allocation="hessian", task=TASK,
                                                             device="cpu", calib_samples=300, **grouping))
    assert report.to_json()["ratio"] == pytest.approx(7, rel=0.05)
    options = open_mrc(out).metadata["options"]
    assert options["allocation"] == "hessian" and all(options[k] == v for k, v in grouping.items())
    decoded = mlcompress.decode(out)["fc.weight"]
    assert 0 < float((decoded - _model().fc.weight.detach()).abs().max()) < 0.05


def _digest(path: Path) -> str:
    """The tensor records of a file (name, codec, params, payload): what its header's
    ``producer`` version string would otherwise change."""
    f = open_mrc(path)
    h = hashlib.sha256()
    for rec in f.records:
        h.update(json.dumps([rec.name, rec.codec, rec.params], sort_keys=True).encode())
        h.update(f.payload(rec.name))
    return h.hexdigest()


#: Digests of files written before group steps came from the Fisher (commit ebac026), for the
#: two-branch model of tests/test_allocation_hessian.py at target ratio 6, 200 calibration inputs.
BEFORE = {
    (("allocation", "hessian"),): "7c2cbf5adc645db86d4449fa0f524594f1c24debdcc75b0e952a3a9cd2fbbef6",
    (("allocation", "hessian"), ("dq", True)): "ec4461d2b044e64dc025f9638d5495abe68514f484eee6d52eacde1e5bbfaed3",
    (("allocation", "hessian"), ("rdo_lambda", 0.1)): "b2c336320eadef10495beaa19e34be4640a3fa80487af68c098ae6a846b32462",
    (("allocation", "auto"), ("group_size", 32)): "570b07f7dbe21ed38a913a599c0a5e7622e88fbcc82714a829c9c4cc94e16f12",
    (("allocation", "norm"), ("per_channel", True), ("dq", True)):
        "c718d18b665cfd719f13ff639be660b262d715cf1b577f8ae800b7a68ecfb169",
}


@pytest.mark.parametrize("options", list(BEFORE), ids=lambda o: ",".join(f"{k}={v}" for k, v in o))
def test_files_without_hessian_groups_unchanged(tmp_path, monkeypatch, options):
    """One step per tensor (hessian with and without --dq/--rdo-lambda) and the other
    allocations with groups write the very files they wrote before."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))
    src = tmp_path / "two.pt"
    torch.save(two_branch().state_dict(), src)
    out = tmp_path / "q.mrc"
    mlcompress.encode(src, out, method=Quant(target_ratio=6, task=TWO_BRANCH, device="cpu", calib_samples=200,
                                             **dict(options)))
    assert _digest(out) == BEFORE[options]


def _weighted_error(x: torch.Tensor, fisher: torch.Tensor, budget: float, factors: np.ndarray | None) -> tuple[float, int]:
    """``Σ F_i (w_i - ŵ_i)²`` at the smallest step whose real payload fits ``budget`` bytes
    (bisection over the step), and that payload's size."""
    def payload(step: float) -> tuple[int, torch.Tensor]:
        options = {"scheme": "step", "step": step, "group_size": BLOCK}
        if factors is not None:
            options["group_factors"] = factors
        data, _ = CODEC.encode(x, options)
        return len(data), step_quantize(x, step, group_size=BLOCK, group_factors=factors).dequantize()

    lo, hi = 1e-4, 1.0
    for _ in range(40):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if payload(mid)[0] > budget else (lo, mid)
    size, rebuilt = payload(hi)
    return float((fisher * (x - rebuilt) ** 2).sum()), size


def test_fisher_groups_lower_the_weighted_error_at_equal_size():
    """A synthetic tensor whose groups' Fisher spans two decades while their weights are alike:
    at the same coded size the Fisher group steps give a clearly lower Fisher-weighted squared
    error (the expected KL up to ½) than the RMS-scaled ones."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 8 * BLOCK, generator=g, dtype=torch.float64).float() * 0.05
    per_group = 10.0 ** (2 * torch.rand(32, 8, generator=g, dtype=torch.float64))
    fisher = per_group.repeat_interleave(BLOCK, dim=1)
    layout = GroupLayout.for_shape(tuple(x.shape), group_size=BLOCK)
    means = group_sensitivity({"w": fisher}, group_size=BLOCK)["w"]
    factors = group_step_factors({"w": x}, {"w": means}, group_size=BLOCK)["w"]
    assert means.shape == (layout.n_groups,)
    budget = estimated_payload_bytes(step_quantize(x, 0.02, group_size=BLOCK))  # ~3 bits per weight
    rms_error, rms_size = _weighted_error(x, fisher, budget, None)
    fisher_error, fisher_size = _weighted_error(x, fisher, budget, factors)
    assert abs(rms_size - fisher_size) < 0.01 * budget
    assert fisher_error < 0.8 * rms_error, (fisher_error, rms_error)


def test_bad_input_one_line(tmp_path, checkpoint, capsys):
    layout = GroupLayout.for_shape((4, 128), group_size=64)
    with pytest.raises(UsageError, match="8 positive finite numbers"):
        step_quantize(torch.ones(4, 128), 0.1, group_size=64, group_factors=np.ones(3))
    with pytest.raises(UsageError, match="positive finite"):
        step_quantize(torch.ones(4, 128), 0.1, group_size=64, group_factors=np.zeros(layout.n_groups))
    out = tmp_path / "q.mrc"
    for flags in (["--per-channel", "--group-size", "8"], ["--group-size", "0"]):
        code = main(["quantize", str(checkpoint), "--target-ratio", "6", "--allocation", "hessian", "--task", TASK,
                     *flags, "-o", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scaled.pt"]
