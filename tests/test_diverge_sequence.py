"""Sequence-level KL (seed 001 §4.5) on tiny explicit bigram language models saved as TorchScript.

The seed's two worked sequential numbers are arithmetic slips, so the tests pin the correct
values and show the step that went wrong:

* Example (V = {A, B}): first token KL((.6,.4)||(.5,.5)) = 0.02014 (the seed's 0.0204 is the
  *reverse* KL); second token 0.6 KL((.7,.3)||(.6,.4)) + 0.4 KL((.2,.8)||(.3,.7))
  = 0.6 * 0.02160 + 0.4 * 0.02573 = 0.02325 (seed: 0.0125). Total 0.04339, not 0.0329.
* Exercise (V = {0, 1}): first token KL((.7,.3)||(.6,.4)) = 0.02160 (seed: 0.0224); the seed's
  bracket 0.2 log(.2/.3) + 0.8 log(.8/.7) is +0.02573, not -0.0033 (a KL cannot be negative).
  Total 0.02160 + 0.3 * 0.02014 + 0.7 * 0.02573 = 0.04565, not 0.0261.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from mlcompress.cli import main
from mlcompress.divergence.compare import DivergeOptions, diverge

BOS = 2
ZERO = -1.0e4  # a finite logit whose probability is exactly 0 in float64 (exp underflows)


class Bigram(torch.nn.Module):
    """Next-token logits depend on the previous token only: ``table[previous]``."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


def bigram_file(path, first, after0, after1):
    """Save a TorchScript bigram LM over tokens {0, 1} (+ BOS=2, never emitted)."""
    rows = [after0, after1, first]  # row index = previous token; BOS row gives the first token
    table = torch.tensor([[math.log(a), math.log(b), ZERO] for a, b in rows], dtype=torch.float64)
    torch.jit.save(torch.jit.script(Bigram(table)), str(path))
    return path


def kl2(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


@pytest.fixture
def seed_example(tmp_path):
    # P(A|())=.6, P(A|A)=.7, P(A|B)=.2; Q(A|())=.5, Q(A|A)=.6, Q(A|B)=.3 with A=0, B=1.
    p = bigram_file(tmp_path / "p.pt", (0.6, 0.4), (0.7, 0.3), (0.2, 0.8))
    q = bigram_file(tmp_path / "q.pt", (0.5, 0.5), (0.6, 0.4), (0.3, 0.7))
    return p, q


@pytest.fixture
def seed_exercise(tmp_path):
    # P(1|())=.3, P(1|1)=.6, P(1|0)=.2; Q(1|())=.4, Q(1|1)=.5, Q(1|0)=.3.
    p = bigram_file(tmp_path / "pe.pt", (0.7, 0.3), (0.8, 0.2), (0.4, 0.6))
    q = bigram_file(tmp_path / "qe.pt", (0.6, 0.4), (0.7, 0.3), (0.5, 0.5))
    return p, q


def exact(p, q, length=2):
    return diverge(p, q, DivergeOptions(mode="exact", length=length, bos=BOS, device="cpu")).report


def test_seed_sequential_example_exact(seed_example):
    r = exact(*seed_example)
    first = kl2((0.6, 0.4), (0.5, 0.5))
    second = 0.6 * kl2((0.7, 0.3), (0.6, 0.4)) + 0.4 * kl2((0.2, 0.8), (0.3, 0.7))
    assert first == pytest.approx(0.02014, abs=1e-5) and second == pytest.approx(0.02325, abs=1e-5)
    assert r["joint_kl"] == pytest.approx(first + second, abs=1e-12)
    assert r["joint_kl"] == pytest.approx(0.04339, abs=1e-5)
    assert r["kl_by_position"] == pytest.approx([first, second], abs=1e-12)  # the chain rule
    assert r["per_token_kl"] == pytest.approx(r["joint_kl"] / 2)
    assert r["mass_ref"] == pytest.approx(1.0, abs=1e-12) and r["mass_cmp"] == pytest.approx(1.0, abs=1e-12)
    assert r["sequences"] == 9  # {A, B, BOS}^2; sequences containing BOS have probability 0
    assert 0 < r["joint_js"] <= math.log(2) and 0 < r["joint_tv"] <= 1


def test_seed_sequential_exercise_exact(seed_exercise):
    r = exact(*seed_exercise)
    first = kl2((0.7, 0.3), (0.6, 0.4))
    second = 0.3 * kl2((0.4, 0.6), (0.5, 0.5)) + 0.7 * kl2((0.8, 0.2), (0.7, 0.3))
    assert r["joint_kl"] == pytest.approx(first + second, abs=1e-12)
    assert r["joint_kl"] == pytest.approx(0.04565, abs=1e-5)


def test_exact_joint_js_and_reverse_kl_by_brute_force(seed_example):
    r = exact(*seed_example)
    P = {(0, 0): 0.6 * 0.7, (0, 1): 0.6 * 0.3, (1, 0): 0.4 * 0.2, (1, 1): 0.4 * 0.8}
    Q = {(0, 0): 0.5 * 0.6, (0, 1): 0.5 * 0.4, (1, 0): 0.5 * 0.3, (1, 1): 0.5 * 0.7}
    js = sum(0.5 * P[t] * math.log(2 * P[t] / (P[t] + Q[t])) + 0.5 * Q[t] * math.log(2 * Q[t] / (P[t] + Q[t])) for t in P)
    assert r["joint_js"] == pytest.approx(js, abs=1e-12)
    assert r["joint_reverse_kl"] == pytest.approx(sum(Q[t] * math.log(Q[t] / P[t]) for t in P), abs=1e-12)
    assert r["joint_tv"] == pytest.approx(0.5 * sum(abs(P[t] - Q[t]) for t in P), abs=1e-12)


def test_identical_models_give_zero(seed_example):
    p, _ = seed_example
    r = exact(p, p, length=3)
    assert r["joint_kl"] == 0 and r["joint_js"] == 0 and r["joint_tv"] == 0


def test_sample_mode_estimates_the_exact_joint_kl(seed_example):
    p, q = seed_example
    r = diverge(p, q, DivergeOptions(mode="sample", samples=2000, length=2, bos=BOS, batch_size=500, device="cpu", seed=1)).report
    truth = 0.043388863
    for key in ("joint_kl", "joint_kl_logratio"):
        est = r[key]
        assert abs(est["mean"] - truth) < 4 * est["stderr"] + 1e-9, (key, est)
    # The chain-rule estimator has (much) lower variance than the plain log-ratio mean.
    assert r["joint_kl"]["stderr"] < r["joint_kl_logratio"]["stderr"]
    assert r["per_token_kl"]["mean"] == pytest.approx(r["joint_kl"]["mean"] / 2)


def test_dataset_kl_on_data_from_p_is_per_token_joint_kl(seed_example, tmp_path):
    # Seed 001 eq. 16: on data drawn from P, the dataset-averaged per-token KL estimates
    # KL(P^(n) || Q^(n)) / n. Draw sequences from P, write them pre-tokenized, score them all.
    p, q = seed_example
    g = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(3000):
        t1 = 0 if torch.rand(1, generator=g).item() < 0.6 else 1
        pa = 0.7 if t1 == 0 else 0.2
        t2 = 0 if torch.rand(1, generator=g).item() < pa else 1
        rows.append({"input_ids": [BOS, t1, t2]})
    data = tmp_path / "fromp.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = diverge(p, q, DivergeOptions(data=data, score="all", ctx=3, batch_size=512, device="cpu")).report
    assert r["positions"] == 6000
    assert abs(r["kl"]["mean"] - 0.043388863 / 2) < 4 * r["kl"]["stderr"]


def test_exact_mode_limits_and_cli(seed_example, capsys):
    p, q = seed_example
    code = main(["diverge", str(p), str(q), "--mode", "exact", "--length", "2", "--bos", "2", "--json", "--device", "cpu"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["joint_kl"] == pytest.approx(0.04339, abs=1e-5)
    code = main(["diverge", str(p), str(q), "--mode", "exact", "--length", "30", "--bos", "2"])
    assert code == 2 and "enumerate" in capsys.readouterr().err
    code = main(["diverge", str(p), str(q), "--mode", "exact", "--length", "2"])
    assert code == 2 and "--bos" in capsys.readouterr().err
    code = main(["diverge", str(p), str(q), "--mode", "exact", "--length", "2", "--bos", "2", "--fail-above", "joint_kl=0.01"])
    assert code == 3


def test_weights_only_side_borrows_a_torchscript_architecture(seed_example, tmp_path):
    from mlcompress.checkpoint import save_checkpoint

    p, q = seed_example
    weights = tmp_path / "q_weights.safetensors"
    save_checkpoint(dict(torch.jit.load(str(q)).state_dict()), weights)
    assert exact(p, weights)["joint_kl"] == pytest.approx(0.043388863, abs=1e-8)
