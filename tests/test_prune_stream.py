"""Streaming prune (one tensor at a time, a radix-selected global cut) against the in-memory path,
``--include``/``--exclude`` for prune, ties, and the memory bound.

The in-memory path (:func:`mlcompress.prune._prune_checkpoint_file`, still what a task or a
``.pt`` output uses) is the reference: the streamed files must be byte-identical to its files for
every scope, criterion, output and sparsity, including cuts through runs of equal scores. The
streaming constants are shrunk in some cases so that small models go through several histogram
passes, chunk boundaries and ties carried from one chunk (and tensor) to the next.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from single_thread import one_thread  # noqa: F401  (autouse fixture)

from peak_rss import MALLOC_SLACK

import mlcompress
from mlcompress import prune
from mlcompress.prune import ranking
from mlcompress.checkpoint import load_checkpoint, save_checkpoint
from mlcompress.cli import main
from mlcompress.container import open_mrc
from mlcompress.errors import InputError
from mlcompress.posterior.file import Posterior, PosteriorTensor, load_posterior, save_posterior
from mlcompress.progress import Update
from mlcompress.selection import Selection

REPO = Path(__file__).resolve().parents[1]


def _models() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(40, 16, generator=g)
    return {
        # fp32, fp16 and bf16 weights, a bias, a 1-D and an integer tensor (never pruned)
        "mixed": {"a.weight": torch.randn(30, 20, generator=g), "a.bias": torch.randn(30, generator=g),
                  "b.weight": torch.randn(8, 16, generator=g).half(), "c.weight": torch.randn(12, 9, generator=g).bfloat16(),
                  "steps": torch.arange(70).reshape(7, 10)},
        # runs of equal magnitudes and exact zeros: every cut falls inside a run
        "runs": {"r.weight": torch.randint(-3, 4, (17, 19), generator=g).float(), "z.weight": torch.zeros(10, 10),
                 "s.weight": torch.randint(-1, 2, (9, 11), generator=g).float(), "n.bias": torch.zeros(5)},
        # a tied embedding: one tensor under two names
        "tied": {"emb.weight": emb, "h.weight": torch.randn(16, 16, generator=g), "head.weight": emb},
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for name, tensors in _models().items():
        paths[name] = root / f"{name}.safetensors"
        save_checkpoint(tensors, paths[name])
    paths["mrc"] = root / "mixed.mrc"  # an .mrc input is read through open_source too
    mlcompress.encode(_models()["mixed"], paths["mrc"], method=mlcompress.Lossless())
    return paths


def _in_memory(monkeypatch) -> None:
    monkeypatch.setattr(prune._Job, "streams", property(lambda self: False))


def _both(monkeypatch, src: Path, out_dir: Path, suffix: str, **kwargs) -> tuple[bytes, bytes, dict, dict]:
    """The streamed and the in-memory file (bytes) and reports for the same call."""
    streamed = prune.prune_file(src, output=out_dir / f"s{suffix}", force=True, **kwargs)
    with monkeypatch.context() as m:
        _in_memory(m)
        reference = prune.prune_file(src, output=out_dir / f"m{suffix}", force=True, **kwargs)
    return ((out_dir / f"s{suffix}").read_bytes(), (out_dir / f"m{suffix}").read_bytes(), streamed.details,
            reference.details)


@pytest.mark.parametrize("limits", [(ranking.CANDIDATE_LIMIT, ranking.CHUNK), (0, 7), (40, 13)],
                         ids=["defaults", "four-histogram-passes", "mixed-passes"])
def test_streamed_files_equal_the_in_memory_files(models, tmp_path, monkeypatch, limits):
    monkeypatch.setattr(ranking, "CANDIDATE_LIMIT", limits[0])
    monkeypatch.setattr(ranking, "CHUNK", limits[1])
    cases = [("mixed", 0.5, "global", "magnitude", ".mrc", None), ("mixed", 0.77, "layer", "magnitude", ".mrc", 4),
             ("mixed", 0.3, "global", "random", ".safetensors", None), ("mrc", 0.6, "global", "magnitude", ".mrc", 4),
             ("mrc", 0.4, "layer", "random", ".mrc", None), ("tied", 0.5, "global", "magnitude", ".safetensors", None),
             ("tied", 0.9, "layer", "random", ".mrc", None), ("mixed", 0.0, "global", "magnitude", ".mrc", None)]
    cases += [("runs", s, scope, "magnitude", suffix, None) for s in (0.2, 0.45, 0.63, 0.95)
              for scope in ("global", "layer") for suffix in (".mrc", ".safetensors")]
    for model, sparsity, scope, criterion, suffix, bits in cases:
        a, b, da, db = _both(monkeypatch, models[model], tmp_path, suffix, sparsity=sparsity, scope=scope,
                             criterion=criterion, bits=bits, seed=3)
        case = (model, sparsity, scope, criterion, suffix, bits)
        assert a == b, case
        assert da["achieved_sparsity"] == db["achieved_sparsity"], case


def test_streamed_masks_are_the_reference_masks(models, tmp_path):
    """Independently of the in-memory file writer: the decoded weights are the input with
    exactly ``prune_masks``' entries zeroed, and the count is round(sparsity * n)."""
    tensors = load_checkpoint(models["runs"])
    for scope in ("global", "layer"):
        for criterion in ("magnitude", "random"):
            out = tmp_path / f"{scope}-{criterion}.mrc"
            prune.prune_file(models["runs"], sparsity=0.45, scope=scope, criterion=criterion, seed=1, output=out)
            masks = prune.prune_masks(tensors, 0.45, scope=scope, criterion=criterion, seed=1)
            decoded = open_mrc(out).tensors()
            for name, t in tensors.items():
                want = t.masked_fill(masks[name], 0) if name in masks else t
                assert torch.equal(decoded[name], want), (scope, criterion, name)
            if scope == "global":
                assert sum(int(m.sum()) for m in masks.values()) == round(0.45 * (17 * 19 + 100 + 99))


def _stable_lowest(keys: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(keys.numel(), dtype=torch.bool)
    mask[torch.sort(keys, stable=True).indices[:k]] = True
    return mask


@pytest.mark.parametrize("limit", [0, 5, 1 << 20])
def test_find_cut_is_a_stable_sort_cut(monkeypatch, limit):
    """Scores with ties, zeros, inf and NaN, read in uneven chunks: the cut keeps exactly the
    first k of a stable sort, for every k."""
    monkeypatch.setattr(ranking, "CANDIDATE_LIMIT", limit)
    g = torch.Generator().manual_seed(2)
    scores = torch.cat([torch.randint(0, 6, (150,), generator=g).double() / 4, torch.rand(50, generator=g).double(),
                        torch.tensor([float("inf"), float("nan"), 0.0, float("nan"), 1e-300, 3.5e38])])
    keys = ranking.score_keys(scores)
    bounds = [0, 1, 7, 80, 81, 150, scores.numel()]

    def passes():
        return (keys[a:b] for a, b in zip(bounds, bounds[1:]))

    for k in [0, 1, 2, 37, 60, 100, 150, 199, 203, scores.numel()]:
        cut = ranking.find_cut(passes, scores.numel(), k)
        mask_of = ranking.CutMask(cut)
        got = torch.cat([mask_of(c) for c in passes()])
        assert torch.equal(got, _stable_lowest(scores, k)), k


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_include_exclude_prune_exactly_the_selected_tensors(models, tmp_path, capsys):
    source = load_checkpoint(models["mixed"])
    for suffix, extra in ((".mrc", []), (".mrc", ["--bits", "4"]), (".safetensors", [])):
        out = tmp_path / f"sel{suffix}"
        code, _, err = _cli(capsys, "prune", models["mixed"], "--sparsity", "0.5", "--include", "*.weight",
                            "--exclude", "b.*", "-o", out, "--force", "--quiet", *extra)
        assert code == 0, err
        decoded = open_mrc(out).tensors() if suffix == ".mrc" else load_checkpoint(out)
        for name, t in source.items():
            if name in ("a.weight", "c.weight"):
                assert not torch.equal(decoded[name], t) and int((decoded[name] == 0).sum()) > 0, name
            else:
                assert torch.equal(decoded[name], t), name  # bit-identical: never pruned, never quantized
        if suffix == ".mrc":
            mrc = open_mrc(out)
            assert mrc.metadata["options"]["include"] == ["*.weight"]
            assert mrc.metadata["options"]["exclude"] == ["b.*"]
            codecs = {r.name: r.codec for r in mrc.records}
            assert codecs["b.weight"] != "quant"
            assert (codecs["a.weight"] == "quant") == bool(extra)


def test_a_glob_matching_nothing_is_one_line_and_writes_nothing(models, tmp_path, capsys):
    for model, flag in (("mixed", "--include"), ("mixed", "--exclude"), ("tied", "--include")):
        for suffix in (".mrc", ".safetensors"):
            out = tmp_path / f"none{suffix}"
            code, stdout, err = _cli(capsys, "prune", models[model], "--sparsity", "0.5", flag, "nope.*", "-o", out)
            lines = err.strip().splitlines()
            assert code == 1 and stdout == ""
            assert len(lines) == 1 and lines[0].startswith("error: ") and "'nope.*'" in lines[0], lines
            assert list(tmp_path.iterdir()) == []
    # a selection with no weight in it says so
    code, _, err = _cli(capsys, "prune", models["mixed"], "--sparsity", "0.5", "--include", "*.bias",
                        "-o", tmp_path / "b.mrc")
    assert code == 1 and "--include/--exclude" in err and list(tmp_path.iterdir()) == []


def test_a_tie_is_pruned_as_one_tensor(models, tmp_path):
    tensors = load_checkpoint(models["tied"])
    assert tensors["emb.weight"] is tensors["head.weight"]
    n = 40 * 16 + 16 * 16  # the tie counted once
    for suffix in (".mrc", ".safetensors"):
        out = tmp_path / f"tied{suffix}"
        report = prune.prune_file(models["tied"], sparsity=0.5, output=out)
        decoded = open_mrc(out).tensors() if suffix == ".mrc" else load_checkpoint(out)
        assert decoded["emb.weight"] is decoded["head.weight"]  # still one tensor
        zeros = int((decoded["emb.weight"] == 0).sum()) + int((decoded["h.weight"] == 0).sum())
        assert zeros == round(0.5 * n) and report.details["achieved_sparsity"] == zeros / n
        assert report.parameters == n
    # a glob naming only the alias selects the tie; excluding the alias keeps it whole
    only = prune.prune_file(models["tied"], sparsity=0.5, output=tmp_path / "a.mrc", select=Selection(("head.*",)))
    kept = open_mrc(tmp_path / "a.mrc").tensors()
    assert torch.equal(kept["h.weight"], tensors["h.weight"]) and only.details["achieved_sparsity"] == 0.5
    prune.prune_file(models["tied"], sparsity=0.5, output=tmp_path / "b.mrc", select=Selection((), ("head.*",)))
    kept = open_mrc(tmp_path / "b.mrc").tensors()
    assert torch.equal(kept["emb.weight"], tensors["emb.weight"]) and not torch.equal(kept["h.weight"],
                                                                                       tensors["h.weight"])


def test_selection_on_a_posterior_leaves_unselected_coded_tensors_alone(tmp_path):
    g = torch.Generator().manual_seed(0)

    def coded(rows: int) -> PosteriorTensor:
        return PosteriorTensor(mean=torch.randn(rows, 8, generator=g), std=torch.full((rows, 8), 0.1), prior_mean=0.0,
                               prior_std=1.0, num_blocks=2)

    post = Posterior(tensors={"a.weight": coded(8), "b.weight": coded(10)}, bits_per_block=8, layout_seed=1,
                     fixed={"a.bias": torch.randn(8, generator=g)}, parameterization="mean-kl")
    src = tmp_path / "post.safetensors"
    save_posterior(post, src)
    out = tmp_path / "pruned.safetensors"
    prune.prune_file(src, sparsity=0.5, criterion="kl", output=out, select=Selection((), ("b.*",)))
    pruned = load_posterior(out)
    assert torch.equal(pruned.tensors["b.weight"].mean, post.tensors["b.weight"].mean)
    assert int((pruned.tensors["a.weight"].mean == 0).sum()) == 32  # half of a.weight at its prior mean 0
    with pytest.raises(InputError, match="'c.*'"):
        prune.prune_file(src, sparsity=0.5, output=tmp_path / "x.safetensors", select=Selection(("c.*",)))


def test_progress_names_the_ranking_passes_and_the_writing(models, tmp_path):
    phases: list[str] = []

    def progress(update: Update) -> None:
        if not phases or phases[-1] != update.phase:
            phases.append(update.phase)

    prune.prune_file(models["mixed"], sparsity=0.5, output=tmp_path / "p.mrc", progress=progress)
    assert phases[0] == "prune: ranking, pass 1" and phases[-1] == "prune: writing"
    phases.clear()
    prune.prune_file(models["mixed"], sparsity=0.5, scope="layer", output=tmp_path / "q.mrc", progress=progress)
    assert phases == ["prune: writing"]  # a layer cut is found tensor by tensor while writing


# --------------------------------------------------------------------------------------------
# memory

_CHILD = textwrap.dedent("""
    import json, sys

    def peak():
        with open("/proc/self/status") as status:
            return next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmHWM"))

    import torch
    import mlcompress
    from mlcompress import prune  # everything the prune imports, before the baseline
    base = peak()
    prune.prune_file(sys.argv[1], sparsity=0.6, output=sys.argv[2])
    mrc = peak()
    prune.prune_file(sys.argv[1], sparsity=0.6, output=sys.argv[3])
    print(json.dumps({"base": base, "mrc": mrc, "peak": peak()}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_prune_memory_is_bounded_by_the_largest_tensor(tmp_path: Path) -> None:
    """8 weights of 16 MiB (128 MiB): the in-memory path held the model and its float64 scores
    (about 4x the model); streaming must stay within 3 tensors whether it writes .mrc or
    safetensors."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(2048, 2048, generator=g) for i in range(8)}
    largest = 2048 * 2048 * 4
    src = tmp_path / "big.safetensors"
    save_checkpoint(tensors, src)
    del tensors
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(tmp_path / "out.mrc"),
                           str(tmp_path / "out.safetensors")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    grown = figures["peak"] - figures["base"]
    assert grown <= 3 * largest + MALLOC_SLACK, f"prune grew peak RSS by {grown / 2**20:.1f} MiB"
    assert (tmp_path / "out.safetensors").stat().st_size > 8 * largest
    decoded = load_checkpoint(tmp_path / "out.safetensors")
    assert sum(int((t == 0).sum()) for t in decoded.values()) == round(0.6 * 8 * 2048 * 2048)
