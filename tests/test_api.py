"""The public API: the README's examples run as written, and each call keeps its contract."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import mlcompress
from mlcompress.errors import InputError, UsageError

README = Path(__file__).resolve().parents[1] / "README.md"


def _api_examples() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.parametrize("index", range(2))
def test_readme_examples_run(index, tmp_path, monkeypatch):
    examples = _api_examples()
    assert len(examples) == 2
    monkeypatch.chdir(tmp_path)
    exec(compile(examples[index], f"README.md example {index + 1}", "exec"), {})


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(1)
    tensors = {"w": torch.randn(64, 96) * 0.1, "b": torch.randn(64)}
    torch.save(tensors, tmp_path / "m.pt")
    return tensors


def test_options_are_frozen_and_never_changed(tmp_path, weights):
    rec = mlcompress.Rec(bits_per_weight=1.0)
    with pytest.raises(AttributeError):
        rec.bits_per_block = 12  # type: ignore[misc]
    report = mlcompress.encode(tmp_path / "m.pt", method=rec)
    assert rec.bits_per_block is None and report["bits_per_block"] == 16


def test_one_ratio_everywhere(tmp_path, weights):
    """Every report's ratio is stored bytes over file bytes, and equals inspect's."""
    for method in (mlcompress.Lossless(), mlcompress.Quant(bits=4), mlcompress.Rec(bits_per_weight=2.0)):
        out = tmp_path / f"{method.name}.mrc"
        r = mlcompress.encode(tmp_path / "m.pt", out, method=method)
        seen = mlcompress.inspect(out)
        assert r.file_bytes == out.stat().st_size == seen.file_bytes
        assert r.ratio == pytest.approx(seen.ratio) == pytest.approx(r.original_bytes / r.file_bytes)
        assert r.original_bytes == sum(t.numel() * 4 for t in weights.values()) == r.fp32_bytes


def test_lossless_report_is_the_files_own(tmp_path):
    """encode_lossless builds its report from what the writer laid out, not by reading the file
    back: every field must still equal the one read from the file (ties, dtypes, raw tensors)."""
    from mlcompress.container import open_mrc
    from mlcompress.lossless import encode_lossless
    from mlcompress.report import Report

    torch.manual_seed(2)
    emb = torch.randn(40, 16)
    tensors = {"emb": emb, "head": emb, "w16": torch.randn(300, 7).to(torch.bfloat16),
               "h": torch.randn(33).half(), "steps": torch.arange(5), "tiny": torch.ones(1)}
    out = tmp_path / "t.mrc"
    report = encode_lossless("t.pt", out, tensors=tensors, threads=1)
    again = Report.of(open_mrc(out), "lossless", report.seconds, report.details)
    assert report == again
    assert report.file_bytes == out.stat().st_size and report.tensors == 6
    assert report.parameters == 40 * 16 + 300 * 7 + 33 + 5 + 1


def test_bytes_round_trip(weights):
    blob = mlcompress.encode_bytes(weights, method=mlcompress.Lossless())
    back = mlcompress.decode_bytes(blob)
    assert set(back) == set(weights) and all(torch.equal(back[k], weights[k]) for k in weights)
    assert mlcompress.decode(blob)["w"].equal(weights["w"])


def test_bytes_round_trip_keeps_ties():
    emb = torch.randn(32, 8)
    back = mlcompress.decode_bytes(mlcompress.encode_bytes({"a": emb, "b": emb}, method=mlcompress.Lossless()))
    assert back["a"] is back["b"]


def test_clear_errors(tmp_path, weights):
    with pytest.raises(InputError, match="does not exist"):
        mlcompress.encode(tmp_path / "missing.pt", method=mlcompress.Lossless())
    with pytest.raises(UsageError, match="choose how to encode"):
        mlcompress.encode(tmp_path / "m.pt")
    with pytest.raises(UsageError, match="bits-per-block"):
        mlcompress.encode(tmp_path / "m.pt", method=mlcompress.Rec(bits_per_block=40))
    with pytest.raises(UsageError, match="needs dst"):
        mlcompress.encode(weights, method=mlcompress.Lossless())
    assert list(tmp_path.iterdir()) == [tmp_path / "m.pt"]


def test_progress_updates_are_absolute_per_phase(tmp_path, weights):
    updates: list[mlcompress.Update] = []
    mlcompress.encode(tmp_path / "m.pt", method=mlcompress.Rec(bits_per_weight=1.0), progress=updates.append)
    blocks = [u for u in updates if u.phase == "REC blocks"]
    assert blocks and blocks[-1].done == blocks[-1].total and blocks[-1].unit == "blocks"
    assert all(a.done <= b.done for a, b in zip(blocks, blocks[1:]))
