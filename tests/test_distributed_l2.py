"""``quantize --method l2`` data-parallel under torchrun: one process's training up to round-off.

The short runs launch this file itself under ``python -m torch.distributed.run`` (its
``__main__`` calls :func:`quantize_checkpoint` with a short :class:`L2Config`, which the command
line does not expose); the full command line runs in the slow test. The one-process reference
runs in-process on one thread, which is what torchrun gives each of its processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from single_thread import one_thread  # noqa: F401  (autouse fixture)
from test_distributed import _free_port, digits  # noqa: F401  (digits: a trained mlp-digits checkpoint)

from mlcompress.container import open_mrc
from mlcompress.distributed import FAULT_ENV
from mlcompress.quant.calibrate import L2Config
from mlcompress.quant.quantize import quantize_checkpoint

ROOT = Path(__file__).resolve().parents[1]
#: Short enough for a test, long enough to cross both phases, a re-measure and the lambda steering.
SHORT = dict(target_ratio=12.0, rounds=1, transform_steps=12, weight_steps=8, remeasure_every=10)


def _launch(n: int, target: list[str], env: dict | None, timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), *target]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MLCOMPRESS_DIST_TIMEOUT": "60", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


def torchrun_short(n: int, ckpt: Path, out: Path, batch_size: int = 16, env: dict | None = None,
                   timeout: float = 120) -> subprocess.CompletedProcess:
    """A short L² run (:data:`SHORT`) of ``ckpt`` on ``n`` processes, written to ``out``."""
    return _launch(n, [__file__, str(ckpt), str(out), str(batch_size)], env, timeout)


def torchrun_cli(n: int, *argv, timeout: float = 180) -> subprocess.CompletedProcess:
    return _launch(n, ["-m", "mlcompress", *map(str, argv)], None, timeout)


def short_run(ckpt: Path, out: Path, batch_size: int = 16):
    return quantize_checkpoint(ckpt, method="l2", task="mlp-digits", calib_samples=200, output=out, device="cpu",
                               l2_config=L2Config(**SHORT, batch_size=batch_size))


def _close(a: Path, b: Path, atol: float) -> None:
    """The reconstructed weights of two files agree to ``atol`` (and every tensor is there)."""
    ta, tb = open_mrc(a).tensors(), open_mrc(b).tensors()
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k].double(), tb[k].double(), rtol=0, atol=atol), (k, (ta[k] - tb[k]).abs().max())


def test_torchrun_l2_is_one_process_up_to_rounding(digits, tmp_path):
    """Batches of 16 split 8 + 8, the gradients summed: the same training as one process."""
    run = torchrun_short(2, digits, tmp_path / "two.mrc")
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.mrc"]  # process 0 alone wrote, no leftovers
    report = short_run(digits, tmp_path / "one.mrc")
    header = open_mrc(tmp_path / "two.mrc").metadata
    assert header["options"]["method"] == "l2" and header["metric_after"] is not None  # process 0 evaluated
    _close(tmp_path / "one.mrc", tmp_path / "two.mrc", atol=1e-5)
    assert report.file_bytes == (tmp_path / "two.mrc").stat().st_size


def test_torchrun_l2_is_deterministic_and_shares_uneven_batches(digits, tmp_path):
    """Batches of 5 split 3 + 2 (whole examples): two runs write the same bytes."""
    for name in ("a", "b"):
        run = torchrun_short(2, digits, tmp_path / f"{name}.mrc", batch_size=5)
        assert run.returncode == 0, run.stderr
    assert (tmp_path / "a.mrc").read_bytes() == (tmp_path / "b.mrc").read_bytes()
    short_run(digits, tmp_path / "one.mrc", batch_size=5)
    _close(tmp_path / "one.mrc", tmp_path / "a.mrc", atol=1e-5)


@pytest.mark.slow
def test_more_processes_than_examples_idle(digits, tmp_path):
    """Batches of 2 for 3 processes: the third has no examples, idles in step, same training."""
    run = torchrun_short(3, digits, tmp_path / "three.mrc", batch_size=2, timeout=180)
    assert run.returncode == 0, run.stderr
    short_run(digits, tmp_path / "one.mrc", batch_size=2)
    _close(tmp_path / "one.mrc", tmp_path / "three.mrc", atol=1e-5)


@pytest.mark.slow
def test_a_failing_process_stops_all_and_writes_nothing(digits, tmp_path):
    out = tmp_path / "out" / "q.mrc"
    out.parent.mkdir()
    run = torchrun_short(2, digits, out, env={FAULT_ENV: "1"})
    assert run.returncode != 0
    assert "error: injected fault on process 1" in run.stderr
    assert "error: process 1 of 2 failed: injected fault on process 1" in run.stderr
    assert list(out.parent.iterdir()) == []


def test_other_quantize_methods_refuse_torchrun(digits, tmp_path):
    run = torchrun_cli(2, "quantize", digits, "--bits", "4", "-o", tmp_path / "q.mrc")
    assert run.returncode != 0
    assert "error: quantize --method uniform runs in one process, not under torchrun" in run.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_torchrun_quantize_l2_command_line(digits, tmp_path):
    """The command as a user types it: one report line (process 0's), one file."""
    run = torchrun_cli(2, "quantize", digits, "--method", "l2", "--task", "mlp-digits", "--calib-samples", "200",
                       "-o", tmp_path / "q.mrc", "--json")
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.strip().splitlines()) == 1
    summary = json.loads(run.stdout)
    assert summary["method"] == "l2" and summary["file_bytes"] == (tmp_path / "q.mrc").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.mrc"]


if __name__ == "__main__":  # one process of torchrun_short: CHECKPOINT OUTPUT BATCH_SIZE
    from mlcompress.errors import MlcompressError

    try:
        short_run(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
    except MlcompressError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 1))
