"""``mlcompress prune`` on posterior files (KL, magnitude and random ranking) and on ``.mrc`` inputs.

The posteriors are built by hand, so every variable's KL to its prior is known; one tensor is
hashed (its ranked units are its free variables). Bad inputs give one ``error:`` line, the right
exit code, and leave nothing behind.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from single_thread import one_thread  # noqa: F401  (autouse fixture)

import mlcompress
from mlcompress.checkpoint import load_checkpoint
from mlcompress.cli import main
from mlcompress.errors import InputError
from mlcompress.posterior.file import Posterior, PosteriorTensor, load_posterior, save_posterior
from mlcompress.prune import posterior_masks, prune_masks

PRIOR_MEAN, PRIOR_STD = 0.25, 0.5


def _kl(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(PRIOR_MEAN, PRIOR_STD^2)) in nats, written out independently."""
    r = std.double() / PRIOR_STD
    d = (mean.double() - PRIOR_MEAN) / PRIOR_STD
    return -torch.log(r) + 0.5 * (r * r + d * d) - 0.5


def _coded(numel: int, generator: torch.Generator, shape=None, blocks: int = 4) -> PosteriorTensor:
    """Means and stds drawn so that KL order and |mean - prior mean| order disagree."""
    mean = PRIOR_MEAN + PRIOR_STD * torch.randn(numel, generator=generator)
    std = PRIOR_STD * (0.05 + 0.9 * torch.rand(numel, generator=generator))
    if shape is None:
        mean, std = mean.reshape(8, numel // 8), std.reshape(8, numel // 8)
    return PosteriorTensor(mean=mean, std=std, prior_mean=PRIOR_MEAN, prior_std=PRIOR_STD, num_blocks=blocks,
                           shape=shape)


def _toy() -> Posterior:
    g = torch.Generator().manual_seed(0)
    return Posterior(
        tensors={
            "a.weight": _coded(64, g),  # 8 x 8
            "h.weight": _coded(40, g, shape=(16, 8)),  # hashed: 128 weights tied to 40 variables
            "b.bias": PosteriorTensor(mean=torch.randn(64, generator=g), std=torch.full((64,), 0.1),
                                      prior_mean=PRIOR_MEAN, prior_std=PRIOR_STD, num_blocks=2),  # 1-D: kept
        },
        bits_per_block=8, layout_seed=12345, fixed={"a.bias": torch.randn(8, generator=g)},
        parameterization="mean-kl",
    )


@pytest.fixture()
def toy(tmp_path):
    path = tmp_path / "post.safetensors"
    save_posterior(_toy(), path)
    return path


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _lowest_set(scores: dict[str, torch.Tensor], k: int) -> set[tuple[str, int]]:
    units = sorted((float(v), n, i) for n, s in scores.items() for i, v in enumerate(s.reshape(-1).tolist()))
    return {(n, i) for _, n, i in units[:k]}


def _mask_set(masks: dict[str, torch.Tensor]) -> set[tuple[str, int]]:
    return {(n, int(i)) for n, m in masks.items() for i in torch.nonzero(m.reshape(-1)).reshape(-1)}


def test_kl_prunes_exactly_the_lowest_kl_variables_first():
    post = _toy()
    kls = {n: _kl(post.tensors[n].mean, post.tensors[n].std) for n in ("a.weight", "h.weight")}
    total = 64 + 40
    previous: set = set()
    for sparsity in (0.1, 0.3, 0.6, 0.9):
        masks = posterior_masks(post, sparsity, criterion="kl")
        assert set(masks) == {"a.weight", "h.weight"}  # the 1-D coded tensor is never pruned
        assert masks["h.weight"].shape == (40,)  # hashed: one unit per free variable
        chosen = _mask_set(masks)
        assert chosen == _lowest_set(kls, round(sparsity * total))
        assert previous <= chosen  # more pruning only adds variables
        previous = chosen
    # KL is not magnitude: the two rankings differ on this posterior
    magnitude = posterior_masks(post, 0.3, criterion="magnitude")
    assert _mask_set(magnitude) != _mask_set(posterior_masks(post, 0.3, criterion="kl"))
    layer = posterior_masks(post, 0.5, criterion="kl", scope="layer")
    for n in kls:
        assert _mask_set({n: layer[n]}) == _lowest_set({n: kls[n]}, round(0.5 * kls[n].numel()))


def test_magnitude_and_random_on_a_posterior():
    post = _toy()
    gaps = {n: (post.tensors[n].mean.double() - PRIOR_MEAN).abs() for n in ("a.weight", "h.weight")}
    masks = posterior_masks(post, 0.4, criterion="magnitude")
    assert _mask_set(masks) == _lowest_set(gaps, round(0.4 * 104))
    r1 = posterior_masks(post, 0.4, criterion="random", seed=3)
    r2 = posterior_masks(post, 0.4, criterion="random", seed=3)
    r3 = posterior_masks(post, 0.4, criterion="random", seed=4)
    assert _mask_set(r1) == _mask_set(r2) != _mask_set(r3)
    assert len(_mask_set(r1)) == round(0.4 * 104)


def test_pruned_variables_become_the_prior_in_the_output_posterior(toy, tmp_path, capsys):
    out = tmp_path / "pruned.safetensors"
    code, stdout, err = _run(capsys, "prune", toy, "--criterion", "kl", "--sparsity", "0.5", "-o", out, "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["output_kind"] == "posterior" and summary["pruned_variables"] == 52
    source, pruned = _toy(), load_posterior(out)
    masks = posterior_masks(source, 0.5, criterion="kl")
    kept_kl = 0.0
    for name, before in source.tensors.items():
        after = pruned.tensors[name]
        assert after.shape == before.shape and after.num_blocks == before.num_blocks
        mask = masks.get(name, torch.zeros(before.mean.shape, dtype=torch.bool))
        assert bool((after.mean[mask] == PRIOR_MEAN).all()) and bool((after.std[mask] == PRIOR_STD).all())
        assert torch.equal(after.mean[~mask], before.mean[~mask]) and torch.equal(after.std[~mask], before.std[~mask])
        assert bool((_kl(after.mean, after.std)[mask] == 0).all())  # exactly no information left
        kept_kl += float(_kl(before.mean, before.std)[~mask].sum())
    assert torch.equal(pruned.fixed["a.bias"], source.fixed["a.bias"])
    assert pruned.layout_seed == source.layout_seed and pruned.bits_per_block == source.bits_per_block
    assert summary["kl_bits_after"] == pytest.approx(kept_kl / math.log(2), rel=1e-9)
    assert summary["kl_bits_after"] < summary["kl_bits_before"]


def test_pruned_posterior_round_trips_through_mrc_bit_exactly(toy, tmp_path, capsys):
    out = tmp_path / "pruned.mrc"
    code, _, err = _run(capsys, "prune", toy, "--criterion", "kl", "--sparsity", "0.7", "-o", out, "--quiet")
    assert code == 0, err
    source = _toy()
    masks = posterior_masks(source, 0.7, criterion="kl")
    expected = dict(source.fixed)
    for name, pt in source.tensors.items():
        values = pt.mean.masked_fill(masks[name], PRIOR_MEAN) if name in masks else pt.mean
        expected[name] = source.weights(name, values)
    decoded = mlcompress.decode(out)
    assert set(decoded) == set(expected)
    for name, weights in expected.items():
        assert decoded[name].dtype == weights.dtype and torch.equal(decoded[name], weights), name
    # every weight tied to a pruned free variable is at the prior mean
    assert int((decoded["h.weight"] == PRIOR_MEAN).sum()) >= int(masks["h.weight"].sum())


def test_posterior_with_task_reports_the_metric_at_the_means(tmp_path, capsys):
    g = torch.Generator().manual_seed(1)
    post = Posterior(
        tensors={"fc1.weight": PosteriorTensor(mean=0.2 * torch.randn(64, 64, generator=g), std=torch.full((64, 64), 0.05),
                                               prior_mean=0.0, prior_std=0.2, num_blocks=8),
                 "fc2.weight": PosteriorTensor(mean=0.2 * torch.randn(300, generator=g), std=torch.full((300,), 0.05),
                                               prior_mean=0.0, prior_std=0.2, num_blocks=4, shape=(10, 64))},
        bits_per_block=8, layout_seed=7, fixed={"fc1.bias": torch.zeros(64), "fc2.bias": torch.zeros(10)},
    )
    src, out = tmp_path / "digits.safetensors", tmp_path / "pruned.safetensors"
    save_posterior(post, src)
    code, stdout, err = _run(capsys, "prune", src, "--criterion", "kl", "--sparsity", "0.5", "--task", "mlp-digits",
                             "--device", "cpu", "-o", out, "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    for path, key in ((src, "metric_before"), (out, "metric_after")):
        code, stdout, err = _run(capsys, "eval", path, "--task", "mlp-digits", "--device", "cpu", "--json")
        assert code == 0, err
        assert json.loads(stdout)["accuracy"] == summary[key]


@pytest.fixture()
def checkpoint_and_mrc(tmp_path, capsys):
    g = torch.Generator().manual_seed(2)
    ckpt = tmp_path / "model.pt"
    torch.save({"fc1.weight": torch.randn(16, 8, generator=g), "fc1.bias": torch.randn(16, generator=g)}, ckpt)
    mrc = tmp_path / "model.mrc"
    code, _, err = _run(capsys, "encode", ckpt, "--lossless", "-o", mrc, "--quiet")
    assert code == 0, err
    return ckpt, mrc


def test_mrc_input_prunes_like_its_checkpoint(checkpoint_and_mrc, tmp_path, capsys):
    ckpt, mrc = checkpoint_and_mrc
    outs = []
    for src in (ckpt, mrc):
        out = tmp_path / f"pruned-{src.suffix[1:]}.safetensors"
        code, _, err = _run(capsys, "prune", src, "--criterion", "magnitude", "--sparsity", "0.6", "-o", out, "--quiet")
        assert code == 0, err
        outs.append(load_checkpoint(out))
    expected = load_checkpoint(ckpt)
    mask = prune_masks(expected, 0.6)["fc1.weight"]
    assert int(mask.sum()) == round(0.6 * 128)
    for pruned in outs:
        assert torch.equal(pruned["fc1.weight"], expected["fc1.weight"].masked_fill(mask, 0))
        assert torch.equal(pruned["fc1.bias"], expected["fc1.bias"])


def test_method_is_a_deprecated_alias_of_criterion(checkpoint_and_mrc, tmp_path, capsys):
    ckpt, _ = checkpoint_and_mrc
    out = tmp_path / "p.safetensors"
    code, _, err = _run(capsys, "prune", ckpt, "--method", "random", "--sparsity", "0.5", "-o", out, "--json")
    assert code == 0 and "deprecated" in err
    expected = prune_masks(load_checkpoint(ckpt), 0.5, criterion="random")["fc1.weight"]
    assert torch.equal(load_checkpoint(out)["fc1.weight"] == 0, expected)


def _fails(capsys, tmp_path, argv, code, message):
    before = sorted(p.name for p in tmp_path.iterdir())
    got, _, err = _run(capsys, "prune", *argv)
    assert got == code, err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporaries


def test_kl_needs_a_posterior(checkpoint_and_mrc, tmp_path, capsys):
    for src in checkpoint_and_mrc:
        _fails(capsys, tmp_path, [src, "--criterion", "kl", "--sparsity", "0.5", "-o", tmp_path / "p.mrc"], 1,
               "KL ranking needs a posterior file (fit-posterior's output)")
    with pytest.raises(InputError, match="needs a posterior file"):
        prune_masks(load_checkpoint(checkpoint_and_mrc[0]), 0.5, criterion="kl")


def test_bad_posterior_inputs_fail_cleanly(toy, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    base = [toy, "--sparsity", "0.5"]
    _fails(capsys, tmp_path, [*base, "--criterion", "fisher", "-o", out], 2, "unknown pruning criterion 'fisher'")
    _fails(capsys, tmp_path, [*base, "--scope", "row", "-o", out], 2, "unknown pruning scope 'row'")
    _fails(capsys, tmp_path, [*base, "--bits", "4", "-o", out], 2, "--bits quantizes into the .mrc")
    _fails(capsys, tmp_path, [*base, "--finetune-steps", "5", "--task", "mlp-digits", "-o", out], 2,
           "--finetune-steps applies to checkpoints")
    _fails(capsys, tmp_path, [*base, "--criterion", "kl", "--method", "random", "-o", out], 2, "disagree")
    _fails(capsys, tmp_path, [toy, "--sparsity", "1", "-o", out], 2, "--sparsity")
    _fails(capsys, tmp_path, [*base, "--task", "mlp-digits", "-o", out], 1, "does not fit task 'mlp-digits'")
    _fails(capsys, tmp_path, [*base, "-o", toy], 1, "already exists")
    _fails(capsys, tmp_path, [tmp_path / "missing.safetensors", "--sparsity", "0.5", "-o", out], 1, "does not exist")


def test_unusable_posteriors_fail_cleanly(tmp_path, capsys):
    biases_only = Posterior(tensors={"b": PosteriorTensor(mean=torch.zeros(64), std=torch.ones(64), prior_mean=0.0,
                                                          prior_std=1.0, num_blocks=1)},
                            bits_per_block=8, layout_seed=0)
    save_posterior(biases_only, tmp_path / "biases.safetensors")
    _fails(capsys, tmp_path, [tmp_path / "biases.safetensors", "--criterion", "kl", "--sparsity", "0.5",
                              "-o", tmp_path / "p.mrc"], 1, "no coded tensors with >= 2 dimensions")
    from safetensors.torch import save_file

    save_file({"a.weight.mean": torch.zeros(8, 8)}, str(tmp_path / "broken.safetensors"),
              metadata={"format": "mlcompress.posterior", "version": "1"})
    _fails(capsys, tmp_path, [tmp_path / "broken.safetensors", "--criterion", "kl", "--sparsity", "0.5",
                              "-o", tmp_path / "p.mrc"], 1, "broken.safetensors")
