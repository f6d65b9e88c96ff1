"""Streaming encoders (issue 13): memory bounded by the largest tensor, files unchanged, and the
tensor selection (``--include``/``--exclude``) with tied tensors counted once everywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from peak_rss import MALLOC_SLACK

import mlcompress
from mlcompress.checkpoint import load_checkpoint
from mlcompress.checkpoint.source import open_source
from mlcompress.cli import main
from mlcompress.container import MrcWriter, open_mrc
from mlcompress.errors import InputError
from mlcompress.format.records import Alias, EncodedTensor
from mlcompress.selection import Selection

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# the source and the writer


def test_source_reads_what_load_checkpoint_reads(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(3, 5, generator=g), "a.bias": torch.randn(5, generator=g).to(torch.bfloat16),
               "c.count": torch.tensor([7], dtype=torch.int64), "d.empty": torch.zeros(0, 4)}
    tensors["e.tied"] = tensors["b.weight"]
    path = tmp_path / "m.safetensors"
    mlcompress.checkpoint.save_checkpoint(tensors, path)
    source = open_source(path)
    want = load_checkpoint(path)
    assert source.names == list(want)
    assert source.aliases == {"e.tied": "b.weight"}
    got = source.load_all()
    assert all(torch.equal(got[n], want[n]) and got[n].dtype == want[n].dtype for n in want)
    assert got["e.tied"] is got["b.weight"]
    assert source.info("e.tied").shape == (3, 5) and source.info("e.tied").nbytes == 60


def test_source_refuses_a_truncated_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(100)}, str(path))
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(mlcompress.errors.CheckpointError, match="truncated"):
        open_source(path)


@pytest.mark.parametrize("spool_after", [0, 20, 1 << 30])
def test_spooled_writer_equals_the_in_memory_writer(tmp_path: Path, monkeypatch, spool_after: int) -> None:
    """Spooling from the first payload, from the second (the held one spilled), or never: the
    same bytes as the in-memory writer, and no spool left behind."""
    import mlcompress.container.writer as writer_module

    monkeypatch.setattr(writer_module, "SPOOL_AFTER", spool_after)
    entries = [EncodedTensor("a", (4,), "float32", "raw", {}, bytes(range(16))),
               EncodedTensor("b", (2,), "float32", "raw", {}, b"\x01" * 8), Alias("c", "a"),
               EncodedTensor("d", (3,), "float32", "raw", {}, memoryview(bytes(range(100, 112))))]
    paths = []
    for spool in (True, False):
        path = tmp_path / f"{spool}.mrc"
        with MrcWriter(path, spool=spool) as writer:
            for entry in entries:
                writer.add(entry)
            spooling = writer._spool is not None
            writer.finish({"method": "test"})
        paths.append(path)
        if spool:
            assert spooling == (spool_after < 36)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert not list(tmp_path.glob(".*spool"))  # the spool is gone
    decoded = open_mrc(paths[0]).tensors()
    assert decoded["c"] is decoded["a"]
    assert bytes(decoded["d"].numpy()) == bytes(range(100, 112))


def test_a_failed_stream_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "x.mrc"
    with pytest.raises(RuntimeError):
        with MrcWriter(path) as writer:
            writer.add(EncodedTensor("a", (1,), "float32", "raw", {}, b"\0" * 4))
            raise RuntimeError("encoder failed")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# selection


def test_selection_rules() -> None:
    names = ["wte.weight", "h.0.attn.c_attn.weight", "h.0.mlp.c_fc.weight", "lm_head.weight"]
    aliases = {"lm_head.weight": "wte.weight"}
    chosen = Selection(include=("h.*",)).resolve(names, aliases)
    assert [n for n in names if chosen(n)] == ["h.0.attn.c_attn.weight", "h.0.mlp.c_fc.weight"]
    chosen = Selection(include=("*.weight",), exclude=("*attn*",)).resolve(names, aliases)
    assert not chosen("h.0.attn.c_attn.weight") and chosen("h.0.mlp.c_fc.weight")
    # a glob matching only the tied name excludes the stored tensor, and so both names
    chosen = Selection(exclude=("lm_head.*",)).resolve(names, aliases)
    assert not chosen("wte.weight") and not chosen("lm_head.weight") and chosen("h.0.mlp.c_fc.weight")
    with pytest.raises(InputError, match="'decoder.\\*' matches no tensor"):
        Selection(include=("decoder.*",)).resolve(names, aliases)


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory) -> Path:
    """A small LM-like state dict with a tied embedding/head, as torch.save writes it."""
    g = torch.Generator().manual_seed(1)
    wte = torch.randn(256, 64, generator=g) * 0.02
    state = {"wte.weight": wte, "h.0.attn.weight": torch.randn(64, 192, generator=g) * 0.02,
             "h.0.mlp.weight": torch.randn(64, 256, generator=g) * 0.02, "h.0.ln.weight": torch.ones(64),
             "lm_head.weight": wte}
    path = tmp_path_factory.mktemp("tied") / "lm.pt"
    torch.save(state, path)
    return path


def _json_out(capsys) -> dict:
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


@pytest.mark.parametrize("flags, quantized", [
    ([], {"wte.weight", "h.0.attn.weight", "h.0.mlp.weight"}),
    (["--include", "h.*"], {"h.0.attn.weight", "h.0.mlp.weight"}),
    (["--exclude", "lm_head.weight"], {"h.0.attn.weight", "h.0.mlp.weight"}),
    (["--include", "*.weight", "--exclude", "*.attn.*"], {"wte.weight", "h.0.mlp.weight"}),
])
def test_quantize_selection_changes_exactly_the_chosen_codecs(tmp_path, tied_model, capsys, flags, quantized) -> None:
    out = tmp_path / "q.mrc"
    assert main(["quantize", str(tied_model), "--bits", "4", "--group-size", "64", "-o", str(out), "--json",
                 *flags]) == 0
    summary = _json_out(capsys)
    mrc = open_mrc(out)
    lossy = {r.name for r in mrc.records if r.alias_of is None and r.codec == "quant"}
    assert lossy == quantized
    assert {r.name for r in mrc.records if r.alias_of is not None} == {"lm_head.weight"}  # still tied
    decoded, source = mrc.tensors(), load_checkpoint(tied_model)
    for name in source:
        if name not in quantized and mrc.record(name).name not in quantized:
            assert torch.equal(decoded[name], source[name])  # stored losslessly
    # every ratio counts the tied tensor once, as inspect does
    assert main(["inspect", str(out), "--json"]) == 0
    seen = _json_out(capsys)["totals"]
    assert summary["fp32_bytes"] == seen["fp32_bytes"] == 4 * (256 * 64 + 64 * 192 + 64 * 256 + 64)
    assert summary["ratio"] == pytest.approx(seen["ratio"])
    assert summary["quantized_params"] == sum(source[n].numel() for n in quantized)


def test_a_glob_matching_nothing_is_one_line_and_writes_nothing(tmp_path, tied_model, capsys) -> None:
    out = tmp_path / "q.mrc"
    assert main(["quantize", str(tied_model), "--bits", "4", "--include", "decoder.*", "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'decoder.*'" in err[0] and "matches no tensor" in err[0], err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_rec_selection(tmp_path, tied_model, capsys) -> None:
    out = tmp_path / "r.mrc"
    assert main(["encode", str(tied_model), "--bits-per-weight", "0.5", "--exclude", "wte.weight", "-o", str(out),
                 "--json"]) == 0
    _json_out(capsys)
    mrc = open_mrc(out)
    assert {r.name for r in mrc.records if r.codec == "rec"} == {"h.0.attn.weight", "h.0.mlp.weight"}
    assert torch.equal(mrc.tensor("lm_head.weight"), load_checkpoint(tied_model)["wte.weight"])
    assert main(["encode", str(tied_model), "--lossless", "--include", "h.*", "-o", str(out), "--force"]) == 2


def test_fit_posterior_selection_narrows_the_coded_tensors() -> None:
    from mlcompress.posterior.fit import FitConfig, coded_names

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    assert coded_names(FitConfig(), model) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert coded_names(FitConfig(exclude=("*.bias",)), model) == ["0.weight", "2.weight"]
    assert coded_names(FitConfig(include=("2.*",)), model) == ["2.weight", "2.bias"]
    with pytest.raises(InputError, match="matches no tensor"):
        coded_names(FitConfig(include=("9.*",)), model)


def test_streamed_quantize_equals_the_in_memory_path(tmp_path, tied_model, capsys) -> None:
    """``--safetensors`` takes the in-memory path; the .mrc must be the same bytes."""
    for flags in (["--bits", "3", "--per-channel"], ["--step", "0.004"], ["--float", "fp8-e4m3"]):
        streamed, held = tmp_path / "s.mrc", tmp_path / "h.mrc"
        assert main(["quantize", str(tied_model), *flags, "-o", str(streamed), "--force", "-q"]) == 0
        assert main(["quantize", str(tied_model), *flags, "-o", str(held), "--force", "-q",
                     "--safetensors", str(tmp_path / "h.safetensors")]) == 0
        assert streamed.read_bytes() == held.read_bytes(), flags


# --------------------------------------------------------------------------------------------
# memory

_CHILD = textwrap.dedent("""
    import json, sys

    def peak():
        with open("/proc/self/status") as status:
            return next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmHWM"))

    import torch
    import mlcompress
    from mlcompress import checkpoint, lossless  # everything the encoders import, before the baseline
    from mlcompress.quant import quantize
    from mlcompress.codecs import quant
    base = peak()
    if sys.argv[1] == "lossless":
        mlcompress.encode(sys.argv[2], sys.argv[3], method=mlcompress.Lossless())
    else:
        mlcompress.encode(sys.argv[2], sys.argv[3], method=mlcompress.Quant(bits=4, group_size=128))
    print(json.dumps({"base": base, "peak": peak()}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
@pytest.mark.parametrize("method", ["lossless", "quant"])
def test_encode_memory_is_bounded_by_the_largest_tensor(tmp_path: Path, method: str) -> None:
    """8 tensors of 16 MiB (128 MiB of model): a streaming encode grows peak RSS by at most 3
    of them, which the old in-memory encoders (the model plus copies) could not."""
    g = torch.Generator().manual_seed(0)
    src = tmp_path / "big.safetensors"
    save_file({f"layer{i}.weight": torch.randn(2048, 2048, generator=g) * 0.02 for i in range(8)}, str(src))
    largest = 2048 * 2048 * 4
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "big.mrc"
    proc = subprocess.run([sys.executable, "-c", _CHILD, method, str(src), str(out)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    grown = figures["peak"] - figures["base"]
    # The quant codec also keeps fixed-size working buffers (blocks of 2^18 elements of several
    # arrays, the entropy coder's slices): a constant, which the goal's 400 MiB covers.
    fixed = (32 << 20) if method == "quant" else 0
    assert grown <= 3 * largest + MALLOC_SLACK + fixed, f"{method} encode grew peak RSS by {grown / 2**20:.1f} MiB"
    assert len(open_mrc(out).records) == 8
