"""train / eval / fit-posterior through the CLI entry point (in-process: ``main(argv)``)."""

from __future__ import annotations

import json

import pytest
import torch
from single_thread import one_thread  # noqa: F401  (autouse fixture)

from mlcompress.cli import main


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "digits.pt"
    torch.set_num_threads(1)
    assert main(["train", "--task", "mlp-digits", "--steps", "150", "-o", str(path), "--quiet"]) == 0
    return path


def test_train_then_eval_report_the_same_accuracy(trained, capsys):
    code, out, err = _run(capsys, "eval", trained, "--task", "mlp-digits", "--json")
    assert code == 0 and err == ""
    report = json.loads(out)
    assert report["kind"] == "checkpoint" and report["examples"] == 360 and report["accuracy"] > 0.85
    code, _, err = _run(capsys, "train", "--task", "mlp-digits", "--steps", "5", "-o", trained)
    assert code == 1 and "already exists" in err and "--force" in err


def test_fit_posterior_writes_a_file_encode_reads(trained, tmp_path, capsys):
    out_path = tmp_path / "q.safetensors"
    code, out, err = _run(capsys, "fit-posterior", "--task", "mlp-digits", "--init", trained, "-o", out_path,
                          "--bits-per-block", "12", "--bits-per-weight", "1", "--steps", "20",
                          "--min-rec-numel", "256", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["blocks"] == 394 and abs(summary["kl_bits_mean"] - 12) < 1e-4
    assert (tmp_path / "q.safetensors.ckpt").is_file()  # resumable checkpoint beside the output
    code, out, err = _run(capsys, "eval", out_path, "--task", "mlp-digits", "--samples", "2", "--json")
    assert code == 0 and json.loads(out)["kind"] == "posterior"
    code, out, err = _run(capsys, "fit-posterior", "--task", "mlp-digits", "-o", out_path, "--steps", "30",
                          "--bits-per-block", "12", "--bits-per-weight", "1", "--min-rec-numel", "256",
                          "--resume", "--force", "--json")
    assert code == 0, err
    assert json.loads(out)["steps"] == 30


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task", "nosuchtask"], "unknown task 'nosuchtask'"),
        (["--task", "lenet5", "--data", "/nonexistent-dir"], "apt-get install dataset-fashion-mnist"),
        (["--task", "mlp-digits", "--bits-per-weight", "30", "--bits-per-block", "20"], "less than one weight"),
        (["--task", "mlp-digits", "--bits-per-block", "40"], "--bits-per-block must be an integer in [1, 24]"),
        (["--task", "mlp-digits", "--param", "mean-std"], "unknown --param"),
    ],
)
def test_fit_posterior_bad_inputs_fail_cleanly(trained, tmp_path, capsys, argv, message):
    out_path = tmp_path / "q.safetensors"
    code, out, err = _run(capsys, "fit-posterior", "--init", trained, "-o", out_path, "--steps", "5",
                          "--min-rec-numel", "256", *argv)
    assert code in (1, 2)
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out_path.exists()


def test_fit_posterior_refuses_an_init_of_another_task(tmp_path, capsys):
    from mlcompress.checkpoint import save_checkpoint
    from mlcompress.tasks.lenet5 import LeNet5

    save_checkpoint(LeNet5().state_dict(), tmp_path / "lenet.safetensors")
    code, _, err = _run(capsys, "fit-posterior", "--task", "mlp-digits", "--init", tmp_path / "lenet.safetensors",
                        "-o", tmp_path / "q.safetensors", "--steps", "5")
    assert code == 1 and "does not fit task 'mlp-digits'" in err
    assert not (tmp_path / "q.safetensors").exists()
