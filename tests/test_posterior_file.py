import json

import pytest
import torch

from mlcompress.errors import InputError
from mlcompress.posterior.file import Posterior, PosteriorTensor, is_posterior_file, load_posterior, save_posterior


def _posterior():
    g = torch.Generator().manual_seed(0)
    return Posterior(
        tensors={
            "conv.weight": PosteriorTensor(torch.randn(4, 3, generator=g), torch.rand(4, 3, generator=g) + 0.1, 0.0, 0.5, 3),
            "fc.weight": PosteriorTensor(torch.randn(20, generator=g), torch.rand(20, generator=g) + 0.1, 0.1, 1.0, 1),
        },
        bits_per_block=12,
        layout_seed=2**63 + 5,
        fixed={"fc.bias": torch.arange(3, dtype=torch.float16)},
        parameterization="mean-kl",
        extra={"steps": 10},
    )


def test_round_trip(tmp_path):
    p = _posterior()
    path = save_posterior(p, tmp_path / "q.safetensors")
    assert is_posterior_file(path)
    back = load_posterior(path)
    assert list(back.tensors) == ["conv.weight", "fc.weight"]
    assert back.bits_per_block == 12 and back.layout_seed == 2**63 + 5 and back.extra == {"steps": 10}
    for name, t in p.tensors.items():
        b = back.tensors[name]
        assert torch.equal(b.mean, t.mean) and torch.equal(b.std, t.std)
        assert (b.prior_mean, b.prior_std, b.num_blocks) == (pytest.approx(t.prior_mean), t.prior_std, t.num_blocks)
    assert torch.equal(back.fixed["fc.bias"], p.fixed["fc.bias"]) and back.fixed["fc.bias"].dtype == torch.float16


def _rewrite(tmp_path, tensors, meta):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


def _raw(tmp_path):
    from safetensors import safe_open

    path = save_posterior(_posterior(), tmp_path / "q.safetensors")
    with safe_open(str(path), "pt") as r:
        return {k: r.get_tensor(k) for k in r.keys()}, dict(r.metadata())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t, m: t.__setitem__("conv.weight.std", -t["conv.weight.std"]), "std must be finite and > 0"),
        (lambda t, m: t.__setitem__("conv.weight.std", torch.zeros(4, 3)), "std must be finite and > 0"),
        (lambda t, m: t.__setitem__("conv.weight.std", torch.ones(3, 4)), "has shape"),
        (lambda t, m: t.__setitem__("fc.weight.mean", torch.full((20,), float("nan"))), "NaN or Inf"),
        (lambda t, m: t.__setitem__("fc.weight.prior_std", torch.tensor(0.0)), "prior"),
        (lambda t, m: t.__setitem__("fc.weight.prior_std", torch.ones(2)), "scalar"),
        (lambda t, m: m.__setitem__("blocks", json.dumps({"conv.weight": 13, "fc.weight": 1})), "blocks"),
        (lambda t, m: m.__setitem__("blocks", json.dumps({"conv.weight": 3, "fc.weight": 1, "other": 2})), "no such tensor"),
        (lambda t, m: t.__setitem__("stray", torch.ones(1)), "not described"),
        (lambda t, m: m.__setitem__("bits_per_block", "25"), "bits_per_block"),
        (lambda t, m: m.__setitem__("bits_per_block", "x"), "not an integer"),
        (lambda t, m: m.__setitem__("version", "2"), "version"),
        (lambda t, m: m.__setitem__("format", "other"), "not a posterior file"),
        (lambda t, m: m.pop("layout_seed"), "lacks 'layout_seed'"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path, mutate, message):
    tensors, meta = _raw(tmp_path)
    mutate(tensors, meta)
    path = _rewrite(tmp_path, tensors, meta)
    with pytest.raises(InputError, match=message):
        load_posterior(path)


def test_not_safetensors(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"garbage")
    assert not is_posterior_file(p)
    with pytest.raises(InputError, match="not a readable safetensors"):
        load_posterior(p)


def test_save_refuses_invalid_and_writes_nothing(tmp_path):
    p = _posterior()
    p.tensors["fc.weight"].std[0] = 0.0
    with pytest.raises(InputError):
        save_posterior(p, tmp_path / "q.safetensors")
    assert list(tmp_path.iterdir()) == []
