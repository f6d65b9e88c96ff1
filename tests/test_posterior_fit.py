"""Variational training under a KL budget: Mean-KL, Mean-Var, the wrapper, resumable fits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from single_thread import one_thread  # noqa: F401  (autouse fixture)
from torch import nn

from mlcompress.errors import CheckpointError, InputError, UsageError
from mlcompress.posterior.file import load_posterior
from mlcompress.posterior.fit import (
    FitConfig,
    TrainingDiverged,
    build_variational,
    fit_posterior,
    load_fit_checkpoint,
    save_fit,
)
from mlcompress.posterior.meankl import NATS_PER_BIT
from mlcompress.posterior.segments import segment_softmax, segment_sum
from mlcompress.posterior.variational import VariationalModel, default_coded_names
from mlcompress.codecs.rec.layout import BlockLayout
from mlcompress.tasks import TensorTask, get_task, train_task_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    return get_task("mlp-digits")


@pytest.fixture(scope="module")
def digits_init(digits):
    torch.set_num_threads(1)
    return train_task_model(digits, steps=400, seed=0, device="cpu").model.state_dict()


def _config(**kw) -> FitConfig:
    base = dict(bits_per_block=12, bits_per_weight=1.0, steps=20, lr=5e-3, eval_every=0,
                checkpoint_every=0, min_rec_numel=256)
    base.update(kw)
    return FitConfig(**base)


def test_segment_softmax_sums_to_one_per_block():
    logits = torch.randn(50, dtype=torch.float64) * 10
    block_of = torch.randint(0, 7, (50,))
    block_of[:7] = torch.arange(7)
    share = segment_softmax(logits, block_of, 7)
    assert torch.allclose(segment_sum(share, block_of, 7), torch.ones(7, dtype=torch.float64), atol=1e-12)
    # Within one block it is the ordinary softmax.
    mask = block_of == 3
    assert torch.allclose(share[mask], torch.softmax(logits[mask], 0))


def test_default_coded_names_are_every_parameter(digits):
    model = digits.make_model()
    assert default_coded_names(model) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert default_coded_names(model, min_numel=256) == ["fc1.weight", "fc2.weight"]
    conv = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 2))
    # parameters, norms included; the norm's running statistics are buffers and stay fixed
    assert default_coded_names(conv) == ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]


def test_training_layout_is_the_encoders_block_layout(digits, digits_init):
    model, layout = build_variational(digits, digits_init, _config(), CPU)
    assert layout.blocks_per_tensor() == {"fc1.weight": 341, "fc2.weight": 53}  # round(n * 1 / 12)
    offset = 0
    start = 0
    for name, block_layout in zip(layout.names, layout.layouts):
        assert block_layout == BlockLayout(block_layout.numel, block_layout.num_blocks, layout.seed)
        matrix = block_layout.block_index_matrix()
        for b in (0, block_layout.num_blocks - 1):
            members = matrix[b][matrix[b] >= 0]
            assert torch.all(layout.block_of[start + members] == offset + b)
        offset += block_layout.num_blocks
        start += block_layout.numel


def test_mean_kl_block_kl_equals_budget_at_init_and_after_training(digits, digits_init):
    config = _config(steps=30, lr=2e-2)
    model, _ = build_variational(digits, digits_init, config, CPU)
    budget = config.bits_per_block * NATS_PER_BIT
    kl = model.kl_per_block().detach()
    assert torch.allclose(kl, torch.full_like(kl, budget), rtol=1e-5, atol=0)
    result = fit_posterior(digits, digits_init, config, device="cpu")
    kl = result.model.kl_per_block().detach()
    assert torch.allclose(kl, torch.full_like(kl, budget), rtol=1e-5, atol=0)
    # Training moved the posterior: the per-weight KL shares are no longer the initial ones.
    assert not torch.allclose(result.model.q.tau, model.q.tau)


def test_mean_kl_posterior_file_keeps_the_budget(digits, digits_init, tmp_path):
    from mlcompress.posterior.meankl import kl_gaussian

    result = fit_posterior(digits, digits_init, _config(steps=10), device="cpu")
    path = save_fit(result, digits, tmp_path / "q.safetensors")
    posterior = load_posterior(path)
    assert posterior.bits_per_block == 12 and posterior.parameterization == "mean-kl"
    assert set(posterior.fixed) == {"fc1.bias", "fc2.bias"}
    for name, layout in zip(result.layout.names, result.layout.layouts):
        q = posterior.tensors[name]
        assert q.num_blocks == layout.num_blocks
        kl = kl_gaussian(q.mean.double(), q.std.double(), torch.tensor(0.0, dtype=torch.float64),
                         torch.tensor(q.prior_std, dtype=torch.float64)).flatten()
        matrix = layout.block_index_matrix()
        per_block = torch.where(matrix >= 0, kl[matrix.clamp(min=0)], 0.0).sum(1) / NATS_PER_BIT
        assert torch.allclose(per_block, torch.full_like(per_block, 12.0), rtol=1e-4)


def test_local_reparameterization_has_the_exact_output_distribution():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 3))
    block_of = torch.arange(15) % 3
    model = VariationalModel(base, ["0.weight"], block_of, torch.full((3,), 2.0), "mean-var")
    x = torch.randn(1, 5).expand(20000, 5)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        mu, sigma, _ = model.distribution()
        out = model(x, generator=g)
        w_mu, w_sigma = mu.float().view(3, 5), sigma.float().view(3, 5)
        expected_mean = x[0] @ w_mu.T + base[0].bias
        expected_std = torch.sqrt((x[0] ** 2) @ (w_sigma ** 2).T)
    assert torch.allclose(out.mean(0), expected_mean, atol=4 * float(expected_std.max()) / math.sqrt(20000))
    assert torch.allclose(out.std(0), expected_std, rtol=0.03)
    # Without local reparameterization one weight draw serves the whole batch.
    plain = VariationalModel(nn.Sequential(nn.Linear(5, 3)), ["0.weight"], block_of, torch.full((3,), 2.0),
                             "mean-var", local_reparam=False)
    with torch.no_grad():
        out = plain(x[:10], generator=g)
    assert torch.allclose(out, out[:1].expand_as(out))


def _toy_task() -> TensorTask:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 16, generator=g)
    # Noisy labels: the likelihood stops rewarding sharper weights, so a balance exists.
    y = (x @ torch.randn(16, 4, generator=g) + 2 * torch.randn(600, 4, generator=g)).argmax(1)
    return TensorTask("toy", lambda: nn.Sequential(nn.Linear(16, 4)), x[:500], y[:500], x[500:], y[500:],
                      batch_size=50, lr=1e-2, epochs=20)


def test_mean_var_annealing_brings_every_block_within_5_percent_of_budget():
    task = _toy_task()
    torch.manual_seed(0)
    init = train_task_model(task, seed=0, device="cpu").model.state_dict()
    config = FitConfig(parameterization="mean-var", bits_per_block=8, bits_per_weight=0.5, steps=1000,
                       lr=1e-2, eval_every=0, checkpoint_every=0, min_rec_numel=1)
    result = fit_posterior(task, init, config, device="cpu")
    kl_bits = result.model.kl_per_block().detach() / NATS_PER_BIT
    assert len(kl_bits) == result.layout.num_blocks >= 4
    assert torch.all((kl_bits - 8).abs() / 8 < 0.05), kl_bits
    assert not torch.allclose(result.model.q.beta, torch.ones(len(kl_bits), dtype=torch.float64))


def test_fit_is_deterministic_and_resume_matches_an_uninterrupted_run(digits, digits_init, tmp_path):
    config = _config(parameterization="mean-var", steps=30, checkpoint_every=13, batch_size=400)
    whole = fit_posterior(digits, digits_init, config, device="cpu", checkpoint=tmp_path / "a.ckpt")
    again = fit_posterior(digits, digits_init, config, device="cpu")
    for (name, x), (_, y) in zip(whole.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(x, y), name
    # Interrupt at step 13 (mid-epoch: 1437 examples in batches of 400), then resume to 30.
    def interrupt(update):
        if update.done == 13:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_posterior(digits, digits_init, config, device="cpu", checkpoint=tmp_path / "b.ckpt", progress=interrupt)
    assert load_fit_checkpoint(tmp_path / "b.ckpt")["step"] == 13
    resumed = fit_posterior(digits, None, config, device="cpu", checkpoint=tmp_path / "b.ckpt", resume=True)
    assert resumed.steps == 30
    for (name, x), (_, y) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(x, y), name
    with pytest.raises(UsageError, match="bits_per_block"):
        fit_posterior(digits, None, _config(bits_per_block=10, steps=30, parameterization="mean-var",
                                            checkpoint_every=13, batch_size=400),
                      device="cpu", checkpoint=tmp_path / "b.ckpt", resume=True)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_state(digits, digits_init, tmp_path):
    class Exploding(TensorTask):
        def loss(self, outputs, targets):
            self.calls = getattr(self, "calls", 0) + 1
            loss = super().loss(outputs, targets)
            return loss * float("nan") if self.calls > 7 else loss

    task = Exploding("mlp-digits", digits.model_factory, digits.train_inputs, digits.train_targets,
                     digits.test_inputs, digits.test_targets, batch_size=64)
    checkpoint = tmp_path / "fit.ckpt"
    with pytest.raises(TrainingDiverged) as info:
        fit_posterior(task, digits_init, _config(steps=20, checkpoint_every=5), device="cpu", checkpoint=checkpoint)
    message = info.value.one_line()
    assert "diverged" in message and "step 8" in message and str(checkpoint) in message and "--lr" in message
    saved = load_fit_checkpoint(checkpoint)
    assert saved["step"] == 7
    assert all(torch.isfinite(t).all() for t in saved["model"].values() if t.is_floating_point())


def test_kl_margin_trains_below_the_coding_bits(digits, digits_init, tmp_path):
    from mlcompress.container import open_mrc
    from mlcompress.options import Rec as RecOptions
    from mlcompress.rec.compress import encode_rec

    plain = fit_posterior(digits, digits_init, _config(steps=5), device="cpu")
    result = fit_posterior(digits, digits_init, _config(steps=5, kl_margin=1.5), device="cpu")
    kl_bits = result.model.kl_per_block().detach() / NATS_PER_BIT
    assert torch.allclose(kl_bits, torch.full_like(kl_bits, 10.5), rtol=1e-5, atol=0)
    # Same blocks (same file size), coded with 2^12 candidates.
    assert result.layout.num_blocks == plain.layout.num_blocks
    path = save_fit(result, digits, tmp_path / "q.safetensors")
    assert load_posterior(path).bits_per_block == 12
    summary = encode_rec(path, tmp_path / "q.mrc", options=RecOptions())
    assert summary["bits_per_block"] == 12 and abs(summary["kl_bits_per_block_max"] - 10.5) < 1e-3
    rec = open_mrc(tmp_path / "q.mrc").record("fc1.weight")
    assert rec.params["bits"] == 12
    with pytest.raises(InputError, match="--kl-margin"):
        build_variational(digits, digits_init, _config(kl_margin=12), CPU)
    with pytest.raises(InputError, match="--kl-margin"):
        build_variational(digits, digits_init, _config(kl_margin=-1), CPU)


def test_bad_inputs_are_clear_errors(digits, digits_init):
    with pytest.raises(InputError, match="less than one weight"):
        build_variational(digits, digits_init, _config(bits_per_weight=16), CPU)
    with pytest.raises(UsageError, match="bits-per-block"):
        build_variational(digits, digits_init, _config(bits_per_block=30), CPU)
    with pytest.raises(InputError, match="no floating-point parameter has 1000000"):
        build_variational(digits, digits_init, _config(min_rec_numel=10**6), CPU)
    wrong = get_task("mlp-digits").make_model().state_dict()
    wrong["fc1.weight"] = torch.zeros(32, 64)
    with pytest.raises(CheckpointError, match="fc1.weight is"):
        fit_posterior(digits, wrong, _config(), device="cpu")
    with pytest.raises(UsageError, match="--param"):
        fit_posterior(digits, digits_init, _config(parameterization="mean-std"), device="cpu")
    with pytest.raises(UsageError, match="--init"):
        fit_posterior(digits, None, _config(), device="cpu")
    with pytest.raises(InputError, match="no checkpoint"):
        fit_posterior(digits, None, _config(), device="cpu", checkpoint=Path("/nonexistent.ckpt"), resume=True)


def test_fit_encode_decode_eval_keeps_accuracy_at_one_bit_per_weight(digits, digits_init, tmp_path):
    from mlcompress.api import decode_file
    from mlcompress.rec.compress import encode_rec
    from mlcompress.tasks import evaluate_model, load_task_model
    from mlcompress.posterior.evaluation import evaluate_file

    base = evaluate_model(digits, load_task_model(digits, digits_init), device="cpu").metric
    config = _config(steps=800, lr=2e-2)
    result = fit_posterior(digits, digits_init, config, device="cpu")
    posterior = save_fit(result, digits, tmp_path / "q.safetensors")
    summary = encode_rec(posterior, tmp_path / "m.mrc")
    assert summary["rec_weights"] == 4736 and summary["blocks"] == 394
    assert summary["blocks"] * 12 <= summary["rec_weights"] * 1.0  # <= 1 bit per coded weight
    decode_file(tmp_path / "m.mrc", tmp_path / "m.safetensors")
    from_mrc = evaluate_file(digits, tmp_path / "m.mrc", device="cpu")
    decoded = evaluate_file(digits, tmp_path / "m.safetensors", device="cpu")
    assert from_mrc["accuracy"] == decoded["accuracy"]
    # One REC sample of the posterior: its accuracy varies by a few points from draw to draw
    # (posterior samples here: ~95% +- 2%), so allow 6 points below the uncompressed model.
    assert decoded["accuracy"] >= base - 0.06, (decoded["accuracy"], base)
    at_mean = evaluate_file(digits, posterior, device="cpu")
    assert at_mean["kind"] == "posterior" and at_mean["accuracy"] >= base - 0.03
    sampled = evaluate_file(digits, posterior, samples=5, device="cpu")
    assert sampled["samples"] == 5 and "accuracy_std" in sampled
    assert sampled["accuracy"] >= base - 0.04


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_runs_on_cuda_and_keeps_the_budget(digits, digits_init, tmp_path):
    for param in ("mean-kl", "mean-var"):
        result = fit_posterior(digits, digits_init, _config(parameterization=param, steps=10, eval_every=5),
                               device="cuda", checkpoint=tmp_path / f"{param}.ckpt")
        assert next(result.model.parameters()).device.type == "cuda"
        assert result.test is not None and result.test.metric > 0.5
        if param == "mean-kl":
            kl = result.model.kl_per_block().detach().cpu()
            assert torch.allclose(kl, torch.full_like(kl, 12 * NATS_PER_BIT), rtol=1e-5, atol=0)
        save_fit(result, digits, tmp_path / f"{param}.safetensors")
