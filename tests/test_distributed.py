"""Scaling out under torchrun: the same files and reports as one process, and clean failures.

Each torchrun test launches ``python -m torch.distributed.run --nproc-per-node N -m mlcompress``
on gloo (CPU) in a subprocess, the way a user would; the one-process reference runs in-process on
one thread, which is what torchrun gives each of its processes (OMP_NUM_THREADS=1), so results
that are bit-identical per process compare exactly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from single_thread import one_thread  # noqa: F401  (autouse fixture)

from mlcompress.cli import main
from mlcompress.distributed import FAULT_ENV, SINGLE, World, join

sys.path.insert(0, str(Path(__file__).parent))
from diverge_models import make_gpt2_dir, noisy, texts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, *argv, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``mlcompress ARGV`` on ``n`` processes (gloo), as torchrun starts them."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "mlcompress", *map(str, argv)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MLCOMPRESS_DIST_TIMEOUT": "60", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


def one(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _report(text: str) -> dict:
    """A diverge --json report without what depends on the run (wall and CPU times)."""
    report = json.loads(text)
    report.pop("timing")
    return report


# --- shares and the one-process world ---------------------------------------------------------


@pytest.mark.parametrize("count, unit, size", [(10, 1, 3), (10, 4, 2), (3, 4, 3), (0, 1, 2), (4097, 2048, 2), (5, 1, 8)])
def test_shares_are_contiguous_whole_units_in_order(count, unit, size):
    shares = [World(rank, size).share(count, unit) for rank in range(size)]
    assert [i for s in shares for i in s] == list(range(count))
    assert all(s.start % unit == 0 for s in shares if len(s))
    if count:
        assert len(shares[0]) > 0  # process 0 always has work when there is any
    units = [-(-len(s) // unit) for s in shares]
    assert max(units) - min(units) <= 1 and units == sorted(units, reverse=True)


def test_one_process_has_no_process_group():
    assert join("cpu") is SINGLE
    assert not torch.distributed.is_initialized()
    assert SINGLE.gather(3) == [3] and SINGLE.broadcast("x") == "x" and SINGLE.share(5) == range(5)
    with SINGLE.guard():
        pass


# --- REC encode --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Two REC tensors: 9,216 + 960 weights at 2 bits per weight and 4 bits per block make
    5,088 blocks, three groups of 2,048 (the last short), so two processes share unevenly."""
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("rec") / "model.safetensors"
    save_file({"fc1.weight": torch.randn(96, 96, generator=g) * 0.1, "fc1.bias": torch.randn(96, generator=g),
               "fc2.weight": torch.randn(10, 96, generator=g) * 0.3}, str(path))
    return path


REC = ("--bits-per-block", "4", "--bits-per-weight", "2", "--min-rec-numel", "500")


def test_torchrun_encode_writes_the_file_one_process_writes(checkpoint, tmp_path, capsys):
    code, out, err = one(capsys, "encode", checkpoint, "-o", tmp_path / "one.mrc", *REC, "--json")
    assert code == 0, err
    assert json.loads(out)["blocks"] == 5088
    run = torchrun(2, "encode", checkpoint, "-o", tmp_path / "two.mrc", *REC, "--selection", "is", "--json")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "two.mrc").read_bytes() == (tmp_path / "one.mrc").read_bytes()
    assert len(run.stdout.strip().splitlines()) == 1  # process 0 alone prints
    assert json.loads(run.stdout)["blocks"] == 5088


@pytest.mark.slow
def test_more_processes_than_block_groups_idle(checkpoint, tmp_path, capsys):
    """One group of blocks for three processes: two idle, same file."""
    small = ("--bits-per-block", "4", "--bits-per-weight", "0.2", "--min-rec-numel", "500", "--selection", "greedy")
    code, _, err = one(capsys, "encode", checkpoint, "-o", tmp_path / "one.mrc", *small)
    assert code == 0, err
    run = torchrun(3, "encode", checkpoint, "-o", tmp_path / "three.mrc", *small, "--quiet")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "three.mrc").read_bytes() == (tmp_path / "one.mrc").read_bytes()


@pytest.mark.slow
def test_a_failing_process_stops_all_and_writes_nothing(checkpoint, tmp_path):
    run = torchrun(2, "encode", checkpoint, "-o", tmp_path / "out.mrc", *REC, env={FAULT_ENV: "1"})
    assert run.returncode != 0
    assert "error: injected fault on process 1" in run.stderr  # the failing process's own line
    assert "error: process 1 of 2 failed: injected fault on process 1" in run.stderr  # the other's
    assert "internal error" not in run.stderr
    assert list(tmp_path.iterdir()) == []


def test_commands_that_do_not_shard_refuse_torchrun(checkpoint, tmp_path):
    run = torchrun(2, "encode", checkpoint, "-o", tmp_path / "x.mrc", "--lossless")
    assert run.returncode != 0
    assert "error: encode --lossless runs in one process, not under torchrun" in run.stderr
    assert list(tmp_path.iterdir()) == []


# --- diverge -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm")
    ref = make_gpt2_dir(root / "ref")
    save_file(noisy(load_file(str(ref / "model.safetensors")), 0.05), str(root / "cmp.safetensors"))
    with open(root / "data.jsonl", "w") as fh:
        for text in texts(40, 3):
            fh.write(json.dumps({"text": text}) + "\n")
    return root


def test_torchrun_diverge_reports_what_one_process_reports(lm, tmp_path, capsys):
    """llama.cpp chunks shared out in whole batches (an odd number of batches for two
    processes), with the .kld base file written by process 0 from both processes' rows."""
    args = (lm / "ref", lm / "cmp.safetensors", "--arch", lm / "ref", "--data", lm / "data.jsonl", "--ctx", "16",
            "--batch-size", "3")
    code, out, err = one(capsys, "diverge", *args, "--save-ref", tmp_path / "one.kld", "--json")
    assert code == 0, err
    expected = _report(out)
    assert expected["windows"] > 6 and expected["llama_cpp"]["positions"] > 0
    run = torchrun(2, "diverge", *args, "--save-ref", tmp_path / "two.kld", "--json")
    assert run.returncode == 0, run.stderr
    got = _report(run.stdout)
    assert got.pop("saved_ref") == str(tmp_path / "two.kld")
    expected.pop("saved_ref")
    assert got == expected
    assert (tmp_path / "two.kld").read_bytes() == (tmp_path / "one.kld").read_bytes()


@pytest.mark.slow
def test_torchrun_diverge_of_a_classifier_reports_what_one_process_reports(tmp_path, capsys):
    for seed in (0, 1):
        assert main(["train", "--task", "mlp-digits", "--steps", "20", "--seed", str(seed), "-o",
                     str(tmp_path / f"m{seed}.pt"), "--quiet"]) == 0
    args = ("diverge", tmp_path / "m0.pt", tmp_path / "m1.pt", "--arch", "mlp-digits", "--json")
    code, out, err = one(capsys, *args)
    assert code == 0, err
    run = torchrun(2, *args)
    assert run.returncode == 0, run.stderr
    assert _report(run.stdout) == _report(out)


def test_a_bad_window_on_one_process_stops_both_and_leaves_no_file(lm, tmp_path):
    """A token id beyond the vocabulary in the last document only: the second process sees it."""
    data = tmp_path / "bad.jsonl"
    with open(data, "w") as fh:
        for i in range(8):
            fh.write(json.dumps({"input_ids": [1 + (7 * j + i) % 200 for j in range(32)]}) + "\n")
        fh.write(json.dumps({"input_ids": [5] * 31 + [9999]}) + "\n")
    out = tmp_path / "ref.cache"
    run = torchrun(2, "diverge", lm / "ref", lm / "cmp.safetensors", "--arch", lm / "ref", "--data", data,
                   "--ctx", "16", "--score", "second-half", "--save-ref", out)
    assert run.returncode != 0
    assert "error: process 1 of 2 failed: document 8: token id 9999 is outside" in run.stderr
    assert "error: document 8: token id 9999 is outside" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


# --- fit-posterior -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("digits") / "digits.pt"
    torch.set_num_threads(1)
    assert main(["train", "--task", "mlp-digits", "--steps", "30", "-o", str(path), "--quiet"]) == 0
    return path


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


FIT = ("fit-posterior", "--task", "mlp-digits", "--bits-per-block", "12", "--bits-per-weight", "1", "--steps", "6",
       "--min-rec-numel", "256", "--eval-every", "0", "--checkpoint-every", "3", "--batch-size", "33")


def test_torchrun_fit_posterior_is_one_process_up_to_rounding(digits, tmp_path, capsys):
    """The batch's examples split 17 + 16, the gradients summed: the same training as one
    process, up to the float rounding of the split sums."""
    run = torchrun(2, *FIT, "--init", digits, "-o", tmp_path / "two.safetensors", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["steps"] == 6
    assert (tmp_path / "two.safetensors.ckpt").is_file()  # written by process 0
    code, _, err = one(capsys, *FIT, "--init", digits, "-o", tmp_path / "one.safetensors", "--quiet")
    assert code == 0, err
    single, two = _tensors(tmp_path / "one.safetensors"), _tensors(tmp_path / "two.safetensors")
    assert single.keys() == two.keys()
    for k in single:
        assert torch.allclose(single[k].double(), two[k].double(), rtol=1e-4, atol=1e-5), k


@pytest.mark.slow
def test_torchrun_fit_posterior_is_deterministic(digits, tmp_path):
    runs = []
    for name in ("a", "b"):
        run = torchrun(2, *FIT, "--init", digits, "-o", tmp_path / f"{name}.safetensors", "--quiet")
        assert run.returncode == 0, run.stderr
        runs.append(_tensors(tmp_path / f"{name}.safetensors"))
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])  # same seed, same world size
