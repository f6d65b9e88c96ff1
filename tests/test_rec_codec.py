"""The ``rec`` codec end to end: exact regeneration, sizes, posterior files, bad inputs, CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mlcompress.container import open_mrc
from mlcompress.errors import InputError, MrcFormatError, UsageError
from mlcompress.posterior.file import Posterior, PosteriorTensor, save_posterior
from mlcompress.options import Rec as RecOptions
from mlcompress.rec.compress import encode_rec
from mlcompress.rec.encoder import score_coefficients, select_candidates, select_candidates_loop
from mlcompress.codecs.rec.layout import BlockLayout
from mlcompress.codecs.rec.payload import decode_indices, encode_indices, fixed_payload_bytes
from mlcompress.codecs.rec.sampler import candidate_weights, candidates
from mlcompress.inspection import summarize

REPO = Path(__file__).resolve().parents[1]


from single_thread import one_thread  # noqa: F401  (autouse fixture)


def _model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(8, 3, 5, 5, generator=g) * 0.2,
        "conv.bias": torch.randn(8, generator=g),
        "fc.weight": torch.randn(30, 200, generator=g) * 0.05,
        "fc.bias": torch.randn(30, generator=g),
        "norm.weight": torch.ones(30),
    }


def _encode(tmp_path: Path, name="m.mrc", tensors=None, **kw) -> tuple[Path, dict]:
    opts = dict(bits_per_block=10, bits_per_weight=1.0, min_rec_numel=500)
    opts.update(kw)
    dst = tmp_path / name
    summary = encode_rec("model.pt", dst, options=RecOptions(**opts), tensors=tensors or _model())
    return dst, summary


def _expected(record, indices: np.ndarray) -> torch.Tensor:
    """Weights rebuilt independently of the decoder: candidate by candidate, block by block."""
    p = record.params
    layout = BlockLayout(record.numel, p["blocks"], p["layout_seed"])
    out = torch.empty(record.numel)
    slots = layout.block_index_matrix()
    for b in range(p["blocks"]):
        size = int((slots[b] >= 0).sum())
        z = candidates(p["seed"], torch.tensor([int(indices[b])]), size)[0]
        out[slots[b, :size]] = candidate_weights(z, p["prior_mean"], p["prior_std"])
    return out.reshape(record.shape)


@pytest.mark.parametrize("selection", ["is", "greedy", "orc"])
def test_decode_regenerates_the_chosen_candidates(tmp_path, selection):
    path, summary = _encode(tmp_path, selection=selection, seed=123)
    mrc = open_mrc(path)
    assert {r.name: r.codec for r in mrc.records}["conv.weight"] == "rec"
    assert {r.name: r.codec for r in mrc.records}["fc.bias"] in ("raw", "lossless")
    for name in ("conv.weight", "fc.weight"):
        rec = mrc.record(name)
        indices = decode_indices(mrc.payload(name), rec.params["blocks"], rec.params["bits"], rec.params["index_coding"])
        decoded = mrc.tensor(name)
        assert torch.equal(decoded.view(torch.int32), _expected(rec, indices).view(torch.int32))
    # non-REC tensors are exact
    for name in ("conv.bias", "fc.bias", "norm.weight"):
        assert torch.equal(mrc.tensor(name), _model()[name])
    # decoding twice, and with another thread count, gives the same bits
    torch.set_num_threads(2)
    again = open_mrc(path).tensor("fc.weight")
    assert torch.equal(again.view(torch.int32), mrc.tensor("fc.weight").view(torch.int32))


def test_encoding_is_deterministic_and_seeded(tmp_path):
    a, _ = _encode(tmp_path, "a.mrc", seed=5)
    b, _ = _encode(tmp_path, "b.mrc", seed=5)
    c, _ = _encode(tmp_path, "c.mrc", seed=6)
    assert a.read_bytes() == b.read_bytes()
    assert open_mrc(a).payload("fc.weight") != open_mrc(c).payload("fc.weight")


@pytest.mark.parametrize("selection", ["is", "greedy", "orc"])
def test_batch_equals_single_blocks_and_loop(selection):
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(12, 9, generator=g) * 0.4
    sigma = torch.rand(12, 9, generator=g) * 0.5 + 0.3
    a, b = score_coefficients(mu, sigma, torch.zeros(()), torch.ones(()))
    a[3, 6:] = 0  # a shorter block, padded
    b[3, 6:] = 0
    sizes = torch.full((12,), 9)
    sizes[3] = 6
    batch = select_candidates(a, b, bits=13, seed=77, selection=selection)
    # chunking and grouping do not change anything
    assert torch.equal(batch, select_candidates(a, b, bits=13, seed=77, selection=selection, chunk_size=4096, group_size=5))
    # one block alone (with its block number) chooses what it chose in the batch
    for i in (0, 3, 11):
        alone = select_candidates(a[i : i + 1, : sizes[i]], b[i : i + 1, : sizes[i]], bits=13, seed=77,
                                  selection=selection, block_offset=i)
        assert alone.item() == batch[i].item()
    assert torch.equal(batch, select_candidates_loop(a, b, sizes, bits=13, seed=77, selection=selection))


def test_greedy_picks_the_best_candidate():
    mu, sigma = torch.tensor([[0.7, -0.2, 0.1]]), torch.tensor([[0.2, 0.3, 0.25]])
    a, b = score_coefficients(mu, sigma, torch.zeros(()), torch.ones(()))
    k = select_candidates(a, b, bits=12, seed=3, selection="greedy").item()
    z = candidates(3, torch.arange(4096), 3).double()
    scores = (z * z * a.double()).sum(1) + (z * b.double()).sum(1)
    assert k == int(scores.argmax())


def test_file_size_adds_up_as_inspect_reports(tmp_path):
    path, summary = _encode(tmp_path, selection="is")
    report = summarize(path)
    totals = report["totals"]
    assert totals["file_bytes"] == path.stat().st_size == summary["file_bytes"]
    rows = {r["name"]: r for r in report["tensors"]}
    rec_bytes = 0
    for name in ("conv.weight", "fc.weight"):
        d = rows[name]["details"]
        assert rows[name]["stored_bytes"] == fixed_payload_bytes(d["blocks"], d["bits_per_block"])
        assert d["selection"] == "is" and d["index_coding"] == "fixed"
        assert "kl_bits_mean" not in d  # version 2 keeps the KL summary out of the header
        rec_bytes += rows[name]["stored_bytes"]
    assert abs(summary["kl_bits_per_block_mean"] - 10) < 1e-2 and abs(summary["kl_bits_per_block_max"] - 10) < 1e-2
    assert summary["blocks"] == sum(rows[n]["details"]["blocks"] for n in ("conv.weight", "fc.weight"))
    # blocks follow the budget: round(numel * 1 bit / 10 bits)
    assert rows["fc.weight"]["details"]["blocks"] == 600 and rows["conv.weight"]["details"]["blocks"] == 60
    other = sum(r["stored_bytes"] for n, r in rows.items() if n not in ("conv.weight", "fc.weight"))
    assert totals["file_bytes"] == rec_bytes + other + totals["overhead_bytes"]


def test_target_size_is_met(tmp_path):
    path, summary = _encode(tmp_path, bits_per_weight=None, target_size=3000)
    assert path.stat().st_size <= 3000
    assert path.stat().st_size > 3000 - 400  # and most of it is used


def test_orc_entropy_coded_indices_save_bits(tmp_path):
    # a posterior whose blocks need far less than the block budget: ORC indices are small
    g = torch.Generator().manual_seed(2)
    mean = torch.randn(40, 50, generator=g) * 0.05
    post = Posterior(
        tensors={"w": PosteriorTensor(mean, torch.full((40, 50), 0.9), 0.0, 1.0, 200)},
        bits_per_block=16, layout_seed=9, fixed={"b": torch.zeros(3)},
    )
    src = save_posterior(post, tmp_path / "q.safetensors")
    summary = encode_rec(src, tmp_path / "q.mrc", options=RecOptions(selection="orc", seed=1))
    mrc = open_mrc(tmp_path / "q.mrc")
    rec = mrc.record("w")
    assert rec.params["index_coding"] == "entropy" and rec.params["blocks"] == 200
    assert summary["index_bits_stored"] < summary["index_bits_fixed"] / 2
    indices = decode_indices(mrc.payload("w"), 200, 16, "entropy")
    assert torch.equal(mrc.tensor("w").view(torch.int32), _expected(rec, indices).view(torch.int32))
    assert torch.equal(mrc.tensor("b"), torch.zeros(3))


def test_rec_is_not_a_one_tensor_codec_and_progress_counts_blocks(tmp_path):
    """REC blocks are chosen over the whole model (mlcompress.rec), so the codec alone cannot
    encode: a plan naming it is a clear error, and nothing is written."""
    from mlcompress.container import write_mrc
    from mlcompress.errors import CodecError

    model = {"w": torch.randn(20, 30, generator=torch.Generator().manual_seed(4)), "b": torch.ones(3)}
    with pytest.raises(CodecError, match="whole model"):
        write_mrc(tmp_path / "one.mrc", model, {"w": ("rec", {}), "b": ("raw", {})}, {})
    assert list(tmp_path.iterdir()) == []
    seen = []
    encode_rec("m.pt", tmp_path / "p.mrc", options=RecOptions(bits_per_block=8, bits_per_weight=1.0, min_rec_numel=500),
               tensors=_model(), progress=seen.append)
    assert seen and seen[-1].done == seen[-1].total == 60 * 10 // 8 + 6000 // 8
    assert all(a.done <= b.done for a, b in zip(seen, seen[1:]))


def test_index_payload_round_trips():
    rng = np.random.default_rng(0)
    for bits in (1, 7, 24):
        idx = rng.integers(0, 2**bits, 333)
        for coding in ("fixed", "entropy"):
            assert np.array_equal(decode_indices(encode_indices(idx, bits, coding), 333, bits, coding), idx)
    with pytest.raises(MrcFormatError):
        decode_indices(b"\x00" * 3, 5, 8, "fixed")


# ---------------------------------------------------------------- bad input: clear errors, nothing written
@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(bits_per_block=0), UsageError, r"\[1, 24\]"),
        (dict(bits_per_block=25), UsageError, r"\[1, 24\]"),
        (dict(bits_per_weight=11.0), InputError, "less than one weight"),
        (dict(bits_per_weight=None, target_size=200), InputError, "cannot be met"),
        (dict(bits_per_weight=1.0, kl_budget_bits=100.0), UsageError, "at most one"),
        (dict(selection="best"), UsageError, "--selection"),
    ],
)
def test_bad_options(tmp_path, options, error, message):
    with pytest.raises(error, match=message):
        _encode(tmp_path, **options)
    assert list(tmp_path.iterdir()) == []


def test_blocks_too_large_refused(tmp_path):
    with pytest.raises(InputError, match="above the limit"):
        _encode(tmp_path, tensors={"w": torch.randn(300, 250)}, bits_per_weight=1e-4)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_refused(tmp_path, bad):
    model = _model()
    model["fc.weight"][3, 4] = bad
    with pytest.raises(InputError, match="NaN or Inf"):
        _encode(tmp_path, tensors=model)
    assert list(tmp_path.iterdir()) == []


def test_bad_posterior_files_refused(tmp_path):
    from safetensors.torch import save_file

    good = Posterior(tensors={"w": PosteriorTensor(torch.zeros(10, 10), torch.ones(10, 10), 0.0, 1.0, 4)},
                     bits_per_block=8, layout_seed=1)
    src = save_posterior(good, tmp_path / "q.safetensors")
    from safetensors import safe_open

    with safe_open(str(src), "pt") as r:
        tensors, meta = {k: r.get_tensor(k) for k in r.keys()}, dict(r.metadata())
    out = tmp_path / "out"
    out.mkdir()
    bad_std = dict(tensors, **{"w.std": -torch.ones(10, 10)})
    save_file(bad_std, str(tmp_path / "neg.safetensors"), metadata=meta)
    with pytest.raises(InputError, match="std must be finite and > 0"):
        encode_rec(tmp_path / "neg.safetensors", out / "x.mrc")
    bad_shape = dict(tensors, **{"w.mean": torch.zeros(5, 10)})
    save_file(bad_shape, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(InputError, match="shape"):
        encode_rec(tmp_path / "shape.safetensors", out / "x.mrc")
    with pytest.raises(UsageError, match="fitted for 8 bits"):
        encode_rec(src, out / "x.mrc", options=RecOptions(bits_per_block=9))
    assert list(out.iterdir()) == []


def test_damaged_params_are_format_errors(tmp_path):
    # Rewrite the file with edited rec params (and valid checksums): the codec's check refuses it.
    from mlcompress.container import EncodedTensor, write_encoded

    path, _ = _encode(tmp_path)
    mrc = open_mrc(path)
    target = next(r for r in mrc.records if r.codec == "rec")
    edits = [
        lambda p: p.update(bits=p["bits"] + 1),
        lambda p: p.update(bits=99),
        lambda p: p.update(prior_sd=p.pop("prior_std")),
    ]
    for edit in edits:
        entries = []
        for r in mrc.records:
            params = dict(r.params)
            if r.name == target.name:
                edit(params)
            entries.append(EncodedTensor(r.name, r.shape, r.dtype, r.codec, params, mrc.payload(r.name)))
        bad = write_encoded(tmp_path / "bad.mrc", entries, mrc.metadata, force=True)
        with pytest.raises(MrcFormatError):
            open_mrc(bad)


# ---------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decode_and_encode_match_cpu(tmp_path):
    from mlcompress.codecs.rec import decode_device

    path, _ = _encode(tmp_path, selection="greedy", seed=3)
    cpu = open_mrc(path).tensors()
    with decode_device("cuda"):
        gpu = open_mrc(path).tensors()
    for name in cpu:
        assert torch.equal(cpu[name].view(torch.uint8), gpu[name].view(torch.uint8)), name
    cuda_path, _ = _encode(tmp_path, "cuda.mrc", selection="is", seed=3, device="cuda")
    cpu_path, _ = _encode(tmp_path, "cpu.mrc", selection="is", seed=3, device="cpu")
    # scores round differently on the GPU; near-ties aside, the same candidates are chosen
    a = decode_indices(open_mrc(cuda_path).payload("fc.weight"), 600, 10, "fixed")
    b = decode_indices(open_mrc(cpu_path).payload("fc.weight"), 600, 10, "fixed")
    assert (a == b).mean() > 0.95


# ---------------------------------------------------------------- CLI
def test_cli_encode_inspect_decode(tmp_path):
    torch.save(_model(), tmp_path / "model.pt")
    env = {k: v for k, v in os.environ.items() if k != "MLCOMPRESS_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # One process runs the four commands through the console script's main() (exit-code
    # mapping included), so torch is imported once.
    script = (
        "import contextlib, io, json, sys\n"
        "from mlcompress.cli import main\n"
        "out = []\n"
        "for args in sys.argv[1:]:\n"
        "    buf = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buf):\n"
        "        code = main(json.loads(args))\n"
        "    out.append([code, buf.getvalue()])\n"
        "print(json.dumps(out))\n"
    )
    calls = [
        ["encode", "model.pt", "-o", "m.mrc", "--bits-per-block", "10", "--bits-per-weight", "1",
         "--min-rec-numel", "500", "--selection", "greedy", "--json"],
        ["inspect", "m.mrc", "--json"],
        ["decode", "m.mrc", "-o", "m.safetensors", "--json"],
        ["encode", "model.pt", "-o", "bad.mrc", "--bits-per-block", "25"],
    ]
    proc = subprocess.run([sys.executable, "-c", script, *map(json.dumps, calls)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (enc_rc, enc_out), (ins_rc, ins_out), (dec_rc, _), (bad_rc, _) = json.loads(proc.stdout.splitlines()[-1])
    assert enc_rc == 0 and ins_rc == 0 and dec_rc == 0 and bad_rc == 2
    enc = json.loads(enc_out)
    assert enc["method"] == "rec" and enc["selection"] == "greedy" and enc["rec_tensors"] == 2
    rows = {r["name"]: r for r in json.loads(ins_out)["tensors"]}
    assert rows["fc.weight"]["details"]["blocks"] == 600
    assert rows["fc.weight"]["details"]["bits_per_block"] == 10
    assert not (tmp_path / "bad.mrc").exists()
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "m.safetensors"))["fc.weight"], open_mrc(tmp_path / "m.mrc").tensor("fc.weight"))
