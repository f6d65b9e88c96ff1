"""The ``mlcompress`` command line, run as users run it: a separate process.

Checks the contracts every command shares: exit codes (0 ok, 1 failure, 2 usage), exactly one
JSON object on stdout with ``--json``, a single ``error: ...`` line on stderr without a traceback
(unless ``--debug`` or MLCOMPRESS_DEBUG=1), no overwriting without ``--force``, nothing written on
failure, and pickled modules refused unless ``--unsafe-pickle``. Each process imports torch, so
the tests share one encoded model and combine checks per call to stay fast.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from bitexact import assert_same_tensors

from mlcompress.checkpoint import load_checkpoint
from mlcompress.codecs import lossless3

REPO = Path(__file__).resolve().parents[1]


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "MLCOMPRESS_DEBUG"}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "mlcompress", *map(str, args)],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120,
    )


def one_json(stdout: str) -> dict:
    """stdout must be exactly one JSON object (one line, nothing else)."""
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout
    obj = json.loads(lines[0])
    assert isinstance(obj, dict)
    return obj


def assert_failed(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """Exit ``code`` with a single ``error: ...`` line on stderr and no traceback."""
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def model_state() -> dict[str, torch.Tensor]:
    """A small state dict covering every dtype, special float values and a tied pair."""
    g = torch.Generator().manual_seed(0)
    nan_payloads = torch.tensor([0x7FC00123, 0x7F800001, -0x3FFFFF], dtype=torch.int32).view(torch.float32)
    special = torch.tensor([float("inf"), -float("inf"), -0.0, 1e-45, 1e-40])
    emb = torch.randn(40, 16, generator=g) * 0.05
    return {
        "conv.weight": torch.randn(6, 1, 5, 5, generator=g) * 0.1,
        "fc.weight": torch.cat([torch.randn(24000, generator=g) * 0.05, nan_payloads, special]).reshape(-1, 8),
        "fc.bias": torch.zeros(8),
        "emb.weight": emb,
        "head.weight": emb,  # tied
        "half": (torch.randn(100, generator=g) * 0.05).half(),
        "bf16": (torch.randn(100, generator=g) * 0.05).bfloat16(),
        "f64": torch.randn(50, generator=g, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "i32": torch.arange(-10, 10, dtype=torch.int32),
        "i16": torch.arange(20, dtype=torch.int16),
        "i8": torch.arange(-5, 5, dtype=torch.int8),
        "u8": torch.arange(10, dtype=torch.uint8),
        "mask": torch.arange(10) % 3 == 0,
        "empty": torch.empty(0, 3),
    }


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> tuple[Path, dict]:
    """A directory holding m.pt and the m.mrc that ``encode --lossless --json`` made from it."""
    d = tmp_path_factory.mktemp("cli")
    torch.save(model_state(), d / "m.pt")
    proc = run("encode", "m.pt", "--lossless", "--json", cwd=d)
    assert proc.returncode == 0, proc.stderr
    return d, one_json(proc.stdout)


@pytest.fixture
def work(encoded, tmp_path) -> Path:
    """A private copy of the encoded directory, for tests that write or damage files."""
    d = tmp_path / "w"
    shutil.copytree(encoded[0], d)
    return d


def test_version():
    proc = run("--version", cwd=REPO)
    assert proc.returncode == 0
    from mlcompress import __version__

    assert proc.stdout.strip() == f"mlcompress {__version__}"


def test_encode_json_summary(encoded):
    d, summary = encoded
    assert Path(summary["output"]).name == "m.mrc"
    assert (d / "m.mrc").stat().st_size == summary["file_bytes"]
    assert summary["method"] == "lossless"
    assert summary["tensors"] == len(model_state())
    assert summary["ratio"] == pytest.approx(summary["original_bytes"] / summary["file_bytes"])
    assert summary["ratio"] > 1.1  # mostly trained-like fp32 weights


def test_decode_default_output_is_bit_exact(work):
    proc = run("decode", "m.mrc", "--json", cwd=work)
    assert proc.returncode == 0, proc.stderr
    summary = one_json(proc.stdout)
    assert (work / summary["output"]).resolve() == (work / "m.safetensors").resolve()
    out = load_checkpoint(work / "m.safetensors")
    assert_same_tensors(out, model_state())
    assert out["head.weight"].data_ptr() == out["emb.weight"].data_ptr()


def test_decode_to_pt_refuses_to_overwrite_without_force(work):
    (work / "x.pt").write_bytes(b"keep me")
    proc = run("decode", "m.mrc", "-o", "x.pt", cwd=work)
    assert_failed(proc, 1, "already exists", "--force")
    assert (work / "x.pt").read_bytes() == b"keep me"

    proc = run("decode", "m.mrc", "-o", "x.pt", "--force", "--quiet", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    assert_same_tensors(torch.load(work / "x.pt", weights_only=True), model_state())
    assert not [p.name for p in work.iterdir() if p.name.endswith(".part")]


def test_inspect_json_adds_up(encoded):
    d, _ = encoded
    proc = run("inspect", "m.mrc", "--json", cwd=d)
    assert proc.returncode == 0, proc.stderr
    summary = one_json(proc.stdout)
    totals = summary["totals"]
    size = (d / "m.mrc").stat().st_size
    assert totals["stored_bytes"] + totals["overhead_bytes"] == totals["file_bytes"] == size
    assert sum(row["stored_bytes"] for row in summary["tensors"]) == totals["stored_bytes"]
    rows = {row["name"]: row for row in summary["tensors"]}
    assert set(rows) == set(model_state())
    assert rows["head.weight"]["codec"] == "alias" and rows["head.weight"]["alias_of"] == "emb.weight"
    assert rows["fc.weight"]["codec"] == ("lossless3" if lossless3.NATIVE else "lossless2")  # the default for float32
    assert rows["fc.weight"]["dtype"] == "float32" and rows["fc.weight"]["shape"] == [3001, 8]


def test_inspect_table_for_people(encoded, capsys, monkeypatch):
    # In-process (the subprocess contracts are covered above): the rich table renders.
    from mlcompress.cli import main

    d, _ = encoded
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["inspect", str(d / "m.mrc")]) == 0
    out = capsys.readouterr().out
    for fragment in ("fc.weight", "lossless", "ratio", "parameters"):
        assert fragment in out


def test_inspect_piped_keeps_long_names_and_shows_each_quant_grid(tmp_path):
    import mlcompress

    long = "transformer." + ".".join(f"block{i}" for i in range(16)) + ".attention.query_key_value.weight"
    assert len(long) > 100
    g = torch.Generator().manual_seed(0)
    torch.save({long: torch.randn(32, 64, generator=g), "head.weight": torch.randn(16, 64, generator=g),
                "bias": torch.zeros(16)}, tmp_path / "m.pt")
    mlcompress.encode(tmp_path / "m.pt", tmp_path / "g.mrc", method=mlcompress.Quant(bits=4, group_size=16))
    mlcompress.encode(tmp_path / "m.pt", tmp_path / "s.mrc",
                      method=mlcompress.Quant(target_ratio=6, per_channel=True))
    mlcompress.encode(tmp_path / "m.pt", tmp_path / "t.mrc", method=mlcompress.Quant(bits=3, symmetric=True))
    expected = {"g.mrc": "4-bit uniform, asymmetric, groups of 16, 128 float16 scales",
                "s.mrc": "entropy-constrained step, per channel, 32 steps",
                "t.mrc": "3-bit uniform, symmetric, per tensor"}
    for name, details in expected.items():
        proc = run("inspect", name, cwd=tmp_path)  # stdout is a pipe, not a terminal
        assert proc.returncode == 0, proc.stderr
        rows = [line for line in proc.stdout.splitlines() if long in line]  # the whole name, on one line
        assert len(rows) == 1 and details in rows[0], proc.stdout
        assert "…" not in proc.stdout
    proc = run("inspect", "g.mrc", "--json", cwd=tmp_path)
    rows = {row["name"]: row for row in one_json(proc.stdout)["tensors"]}
    assert rows[long]["details"] == {"scheme": "uniform", "bits": 4, "groups": 128, "scales": "float16",
                                     "grid": "group", "group_size": 16, "symmetric": False}
    assert "details" not in rows["bias"]


def test_inspect_describes_l2_tensors():
    from mlcompress.cli.inspect import _details
    from mlcompress.inspection import _grid

    assert _grid({"scheme": "l2", "edge": 0.00456, "step": 0.0123456}) == {"edge": 0.00456}  # no group layout
    row = {"codec": "quant", "details": {"scheme": "l2", "step": 0.0123456, "edge": 0.00456}}
    assert _details(row) == "L² dead zone, step 0.01235, edge 0.00456"


def test_missing_file_with_json(tmp_path):
    proc = run("decode", "nope.mrc", "--json", cwd=tmp_path)
    assert_failed(proc, 1, "nope.mrc", "does not exist")
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []


def _damage(path: Path) -> None:
    """Flip one byte in the middle of fc.weight's payload."""
    from mlcompress.container import open_mrc

    rec = open_mrc(path).record("fc.weight")
    data = bytearray(path.read_bytes())
    data[rec.offset + rec.length // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_container(work):
    _damage(work / "m.mrc")
    before = sorted(p.name for p in work.iterdir())
    proc = run("decode", "m.mrc", cwd=work)
    assert_failed(proc, 1, "checksum mismatch")
    assert sorted(p.name for p in work.iterdir()) == before


def test_traceback_only_with_debug(work):
    _damage(work / "m.mrc")
    proc = run("decode", "m.mrc", "--debug", cwd=work)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "MrcFormatError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("value, shown", [("1", True), ("0", False), ("", False)])
def test_traceback_with_mlcompress_debug(work, capsys, monkeypatch, value, shown):
    # In-process to keep the suite fast; main() is exactly what the console script runs.
    from mlcompress.cli import main

    _damage(work / "m.mrc")
    monkeypatch.setenv("MLCOMPRESS_DEBUG", value)
    assert main(["decode", str(work / "m.mrc")]) == 1
    err = capsys.readouterr().err
    assert ("Traceback" in err) == shown
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert not (work / "m.safetensors").exists()


def test_encode_refuses_existing_output(work):
    before = (work / "m.mrc").read_bytes()
    proc = run("encode", "m.pt", "--lossless", cwd=work)
    assert_failed(proc, 1, "m.mrc already exists", "--force")
    assert (work / "m.mrc").read_bytes() == before


def test_unknown_option_is_a_usage_error(tmp_path):
    proc = run("inspect", "m.mrc", "--no-such-option", cwd=tmp_path)
    assert_failed(proc, 2, "--no-such-option", "mlcompress inspect --help")
    assert proc.stdout == ""


@pytest.mark.parametrize("args, fragment", [
    (["fit-posterior", "--init", "m.pt", "-o", "p.safetensors"], "Missing option '--task'"),
    (["train", "-o", "m.pt"], "Missing option '--task'"),
    (["eval", "m.pt"], "Missing option '--task'"),
    (["prune", "m.pt"], "Missing option '--sparsity'"),
    (["quantize"], "Missing argument 'MODEL'"),
    (["diverge"], "Missing argument 'REF CMP'"),
    (["quantize", "m.pt", "--bits", "four"], "'four' is not a valid integer"),
    (["encode", "m.pt", "--bits-per-blok", "12"], "No such option"),
    (["decode", "m.mrc", "--fit-posterior"], "No such option"),
    (["no-such-command"], "No such command"),
])
def test_click_usage_errors_exit_2_with_one_line(args, fragment, tmp_path, capsys):
    # In-process: main() is what the console script runs, and these fail before any work.
    from mlcompress.cli import main

    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert lines[0].endswith("--help)") and "Traceback" not in captured.err
    assert list(tmp_path.iterdir()) == []


def test_a_click_usage_error_inside_another_exception_is_still_exit_2(monkeypatch, capsys):
    # A usage error can surface as the context of another exception (a display torn down while
    # it propagates); it is still the user's mistake, not an internal error.
    import typer

    import mlcompress.cli as cli

    class Broken:
        def main(self, **_: object) -> None:
            try:
                raise click.MissingParameter(param_type="option", param_hint="'--task'")
            except click.UsageError:
                raise RuntimeError("teardown failed")

    monkeypatch.setattr(typer.main, "get_command", lambda app: Broken())
    assert cli.main(["fit-posterior"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Missing option '--task'") and "internal error" not in err


def test_encode_without_a_method_is_a_usage_error(work):
    proc = run("encode", "m.pt", "-o", "new.mrc", cwd=work)
    line = assert_failed(proc, 2, "--lossless", "bit-exact")
    for flag in ("--bits-per-block", "--bits-per-weight", "--kl-budget", "--target-size"):  # REC, and how to size it
        assert flag in line
    assert not (work / "new.mrc").exists()


def test_pickled_module_needs_unsafe_pickle(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    torch.save(model, tmp_path / "whole.pt")

    proc = run("encode", "whole.pt", "--lossless", "--json", cwd=tmp_path)
    assert_failed(proc, 1, "--unsafe-pickle")
    assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["whole.pt"]

    proc = run("encode", "whole.pt", "--lossless", "--unsafe-pickle", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert one_json(proc.stdout)["tensors"] == 4
    from mlcompress.container import open_mrc

    assert_same_tensors(open_mrc(tmp_path / "whole.mrc").tensors(), {k: v.detach() for k, v in model.state_dict().items()})
