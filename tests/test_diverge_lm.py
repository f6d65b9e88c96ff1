"""Language-model divergence end to end: a tiny GPT-2 built on the fly and loaded the way users'
models are (a Hugging Face directory, weights-only safetensors and .mrc files, a reference
cache), the command line contract, and the bad inputs users will feed it."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from diverge_models import texts, make_gpt2_dir, noisy  # noqa: E402
from diverge_threads import one_thread  # noqa: E402,F401  (autouse fixture)
from mlcompress.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from mlcompress.cli import main  # noqa: E402
from mlcompress.container import write_mrc  # noqa: E402
from mlcompress.divergence.compare import DivergeOptions, diverge  # noqa: E402
from mlcompress.divergence.data import Document, windows  # noqa: E402

@pytest.fixture(scope="module")
def lm(one_thread, tmp_path_factory):
    root = tmp_path_factory.mktemp("diverge_lm")
    ref = make_gpt2_dir(root / "ref")
    weights = load_checkpoint(ref)
    files = {}
    for scale in (0.01, 0.05, 0.2):
        files[scale] = root / f"noise{scale}.safetensors"
        save_checkpoint(noisy(weights, scale), files[scale])
    data = root / "val.jsonl"
    data.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts(12, 1))))
    return {"root": root, "ref": ref, "noise": files, "data": data, "weights": weights}


def run(ref, cmp, **kw) -> dict:
    kw.setdefault("device", "cpu")
    kw.setdefault("ctx", 32)
    if not kw.get("ref_logits"):
        kw.setdefault("score", "second-half")  # these tests are about per-document windows
    return diverge(ref, cmp, DivergeOptions(**kw)).report


def test_identical_models_have_zero_divergence(lm):
    r = run(lm["ref"], lm["ref"], data=lm["data"])
    assert r["positions"] > 100
    for name in ("kl", "reverse_kl", "js", "tv"):
        assert r[name]["mean"] == 0.0 and r[name]["stderr"] == 0.0
    assert r["kl"]["percentiles"]["max"] == 0.0
    assert r["same_top"]["rate"] == 1.0
    assert r["ppl"]["ratio"] == 1.0 and r["delta_p"]["rms"] == 0.0
    assert len(r["sequences"]) == 12
    assert all(s["loglik_ref"] == s["loglik_cmp"] < 0 for s in r["sequences"])


def test_kl_grows_with_weight_noise(lm):
    reports = [run(lm["ref"], lm["noise"][s], data=lm["data"]) for s in (0.01, 0.05, 0.2)]
    kls = [r["kl"]["mean"] for r in reports]
    assert 0 < kls[0] < kls[1] < kls[2], kls
    assert reports[0]["same_top"]["rate"] >= reports[2]["same_top"]["rate"]
    # Each mean is many standard errors from the next: the ordering is not noise.
    assert kls[1] - kls[0] > 3 * reports[1]["kl"]["stderr"]
    js = [r["js"]["mean"] for r in reports]
    assert js[0] < js[1] < js[2] <= math.log(2)
    r = reports[1]
    # The perplexity ratio is exp of the mean log-likelihood gap, per sequence sums agree.
    total_ref = sum(s["loglik_ref"] for s in r["sequences"])
    assert r["ppl"]["ref"] == pytest.approx(math.exp(-total_ref / r["positions"]), rel=1e-5)


def test_weights_only_side_borrows_architecture_and_mrc_works(lm):
    mrc = lm["root"] / "model.mrc"
    write_mrc(mrc, lm["weights"], lambda name, t: ("lossless", {}), {"source": "test"})
    r = run(lm["ref"], mrc, data=lm["data"])
    assert r["kl"]["mean"] == 0.0 and r["same_top"]["rate"] == 1.0
    noisy_mrc = lm["root"] / "noisy.mrc"
    write_mrc(noisy_mrc, load_checkpoint(lm["noise"][0.05]), lambda name, t: ("raw", {}), {})
    a = run(lm["ref"], noisy_mrc, data=lm["data"])
    b = run(lm["ref"], lm["noise"][0.05], data=lm["data"])
    assert a["kl"]["mean"] == b["kl"]["mean"] > 0
    # Both sides weights-only: the architecture comes from --arch.
    c = run(lm["noise"][0.05], noisy_mrc, data=lm["data"], arch=str(lm["ref"]))
    assert c["kl"]["mean"] == 0.0


def test_windows_scoring_rules():
    doc = Document(0, list(range(10)), "x")
    half = [(w.ids.tolist(), w.first) for w in windows(doc, ctx=4, stride=4, score="second-half")]
    assert half == [([0, 1, 2, 3], 2), ([4, 5, 6, 7], 2), ([8, 9], 1)]
    every = [(w.ids[0].item(), w.first) for w in windows(doc, ctx=4, stride=4, score="all")]
    assert every == [(0, 1), (4, 1), (8, 1)]
    # Overlapping windows score each token once, in the first window allowed to score it.
    sliding = list(windows(doc, ctx=4, stride=2, score="all"))
    scored = [int(w.ids[0]) + j for w in sliding for j in range(w.first, w.ids.numel())]
    assert scored == list(range(1, 10))
    sliding_half = list(windows(doc, ctx=4, stride=2, score="second-half"))
    scored = [int(w.ids[0]) + j for w in sliding_half for j in range(w.first, w.ids.numel())]
    assert scored == list(range(2, 10))


def test_score_all_scores_more_tokens_and_text_files_work(lm, tmp_path):
    text = tmp_path / "val.txt"
    text.write_text("\n\n".join(texts(6, 5)))
    half = run(lm["ref"], lm["noise"][0.05], data=text)
    every = run(lm["ref"], lm["noise"][0.05], data=text, score="all")
    assert half["documents"] == every["documents"] == 1
    assert every["positions"] > 1.8 * half["positions"]


def test_reference_cache_round_trip(lm, tmp_path):
    cache = tmp_path / "ref.logits"
    full = run(lm["ref"], lm["noise"][0.2], data=lm["data"], save_ref=cache, top_k=8)
    assert cache.is_file()
    cached = run(None, lm["noise"][0.2], ref_logits=cache, arch=str(lm["ref"]))
    assert cached["positions"] == full["positions"]
    # Exact quantities survive the cache exactly; divergences become lower bounds.
    assert cached["same_top"] == full["same_top"]
    assert cached["ppl"]["ref"] == pytest.approx(full["ppl"]["ref"], rel=1e-6)
    assert cached["ppl"]["cmp"] == pytest.approx(full["ppl"]["cmp"], rel=1e-6)
    assert cached["delta_p"]["rms"] == pytest.approx(full["delta_p"]["rms"], rel=1e-5)
    for name in ("kl", "reverse_kl", "js", "tv"):
        assert 0 < cached[name]["mean"] <= full[name]["mean"] * (1 + 1e-5)
    # With every token but one kept, the buckets are the vocabulary itself: KL is exact.
    exact_cache = tmp_path / "all.logits"
    run(lm["ref"], lm["ref"], data=lm["data"], save_ref=exact_cache, top_k=10_000)
    again = run(lm["ref"], lm["noise"][0.2], ref_logits=exact_cache)
    assert again["kl"]["mean"] == pytest.approx(full["kl"]["mean"], rel=1e-4)
    assert again["js"]["mean"] == pytest.approx(full["js"]["mean"], rel=1e-4)


def test_reference_cache_refuses_other_models_and_data(lm, tmp_path):
    cache = tmp_path / "ref.logits"
    run(lm["ref"], lm["ref"], data=lm["data"], save_ref=cache)
    with pytest.raises(Exception, match="different reference model"):
        run(lm["noise"][0.05], lm["ref"], ref_logits=cache, arch=str(lm["ref"]))
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "a lazy dog sleeps under the red blanket"}) + "\n")
    with pytest.raises(Exception, match="not the data the reference cache"):
        run(lm["ref"], lm["noise"][0.05], ref_logits=cache, data=other)
    assert run(lm["ref"], lm["noise"][0.05], ref_logits=cache, data=lm["data"])["positions"] > 0
    damaged = tmp_path / "damaged.logits"
    damaged.write_bytes(b"not a cache at all")
    with pytest.raises(Exception, match="not a reference cache"):
        run(None, lm["ref"], ref_logits=damaged)


def _cli(capsys, *args):
    code = main(["diverge", *map(str, args), "--device", "cpu", "--ctx", "32", "--score", "second-half"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_json_gates_and_plot(lm, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    args = (lm["ref"], lm["noise"][0.05], "--data", lm["data"])
    code, out, err = _cli(capsys, *args, "--json", "--fail-above", "kl=10", "--fail-above", "js=10")
    report = json.loads(out)
    assert code == 0 and len(out.splitlines()) == 1
    assert report["gates"]["kl"]["passed"] and report["headline"]["kl"] == report["kl"]["mean"]
    code, out, err = _cli(capsys, *args, "--json", "--fail-above", "kl=1e-9")
    assert code == 3 and json.loads(out)["gates"]["kl"]["passed"] is False
    assert err.startswith("error: divergence gate failed: kl") and len(err.splitlines()) == 1
    code, out, err = _cli(capsys, *args, "--fail-above", "kl_p99=1e-12", "--fail-above", "same_top=2")
    assert code == 3 and "FAIL" in out and "KL(ref‖cmp)" in out
    code, out, err = _cli(capsys, *args, "--fail-above", "klx=1")
    assert code == 2 and "unknown measure 'klx'" in err and out == ""
    code, out, err = _cli(capsys, *args, "--fail-above", "kl")
    assert code == 2 and "NAME=NUMBER" in err
    png = tmp_path / "kl.png"
    code, out, err = _cli(capsys, *args, "--plot", png, "--quiet")
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out == ""


@pytest.mark.parametrize(
    "lines, message",
    [
        ([{"text": "the fox"}, {"body": "no text here"}], r"val.jsonl:2: no 'text' field"),
        ([{"text": "the fox"}, "{not json"], r"val.jsonl:2: invalid JSON"),
        ([], r"holds no documents"),
        ([{"input_ids": [5, 6, 7]}, {"input_ids": [5]}], r"val.jsonl:2: has 1 token"),
        ([{"input_ids": [5, 6, 10_000]}], r"token id 10000 is outside"),
        ([{"input_ids": [5, "x"]}], r"list of non-negative integers"),
    ],
)
def test_bad_data_gives_one_clear_line(lm, tmp_path, capsys, lines, message):
    data = tmp_path / "val.jsonl"
    data.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    code, out, err = _cli(capsys, lm["ref"], lm["noise"][0.01], "--data", data)
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    import re

    assert re.search(message, err), err


def test_vocabulary_mismatch_and_shared_prefix(lm, tmp_path, capsys):
    import transformers

    big = transformers.AutoModelForCausalLM.from_pretrained(lm["ref"])
    big.resize_token_embeddings(big.config.vocab_size + 8)
    other = tmp_path / "bigger"
    big.save_pretrained(other)
    code, out, err = _cli(capsys, lm["ref"], other, "--data", lm["data"])
    assert code == 1 and "vocabularies differ" in err and "--shared-vocab" in err
    code, out, err = _cli(capsys, lm["ref"], other, "--data", lm["data"], "--shared-vocab", "--json")
    assert code == 0
    r = json.loads(out)
    assert r["vocab"]["compared"] == r["vocab"]["ref"] < r["vocab"]["cmp"]
    assert r["kl"]["mean"] >= 0


def test_non_finite_and_misfit_weights_are_refused(lm, tmp_path, capsys):
    broken = {k: v.clone() for k, v in lm["weights"].items()}
    name = next(k for k in broken if k.endswith("ln_f.weight"))
    broken[name][0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_checkpoint(broken, path)
    code, out, err = _cli(capsys, lm["ref"], path, "--data", lm["data"])
    assert code == 1 and "non-finite logits" in err
    misfit = {k: v for k, v in lm["weights"].items() if "h.1." not in k}
    path = tmp_path / "misfit.safetensors"
    save_checkpoint(misfit, path)
    code, out, err = _cli(capsys, lm["ref"], path, "--data", lm["data"])
    assert code == 1 and "does not fit the architecture" in err and "missing" in err
    code, out, err = _cli(capsys, lm["noise"][0.01], path, "--data", lm["data"])
    assert code == 2 and "--arch" in err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(lm, tmp_path):
    cpu = run(lm["ref"], lm["noise"][0.05], data=lm["data"], device="cpu")
    gpu = run(lm["ref"], lm["noise"][0.05], data=lm["data"], device="cuda")
    assert gpu["positions"] == cpu["positions"]
    assert gpu["kl"]["mean"] == pytest.approx(cpu["kl"]["mean"], rel=1e-3, abs=1e-7)
    assert gpu["ppl"]["ref"] == pytest.approx(cpu["ppl"]["ref"], rel=1e-4)
    cache = tmp_path / "gpu.logits"
    run(lm["ref"], lm["ref"], data=lm["data"], device="cuda", save_ref=cache)
    cached = run(None, lm["noise"][0.05], ref_logits=cache, arch=str(lm["ref"]), device="cuda")
    assert 0 < cached["kl"]["mean"] <= cpu["kl"]["mean"] * (1 + 1e-3)


def test_sample_mode_on_a_hugging_face_model(lm):
    same = run(lm["ref"], lm["ref"], mode="sample", samples=6, length=6, batch_size=3)
    assert same["joint_kl"]["mean"] == 0.0 and same["bos"] == 0  # bos from config.json
    r = run(lm["ref"], lm["noise"][0.2], mode="sample", samples=6, length=6, batch_size=3)
    assert r["joint_kl"]["mean"] > 0 and r["per_token_kl"]["mean"] == pytest.approx(r["joint_kl"]["mean"] / 6)
    again = run(lm["ref"], lm["noise"][0.2], mode="sample", samples=6, length=6, batch_size=3)
    assert again["joint_kl"] == r["joint_kl"]  # seeded: reproducible


def test_context_limits_stride_and_explicit_tokenizer(lm, capsys):
    code = main(["diverge", str(lm["ref"]), str(lm["noise"][0.05]), "--data", str(lm["data"]), "--ctx", "100"])
    assert code == 2 and "maximum context of 64" in capsys.readouterr().err  # n_positions = 64
    code, out, err = _cli(capsys, lm["ref"], lm["noise"][0.05], "--data", lm["data"], "--stride", "40")
    assert code == 2 and "--stride" in err
    from mlcompress.divergence.models import load_tokenizer

    tok = load_tokenizer(lm["ref"])
    lengths = [len(tok.encode(json.loads(line)["text"])) for line in lm["data"].read_text().splitlines()]
    a = run(lm["ref"], lm["noise"][0.05], data=lm["data"], ctx=16, stride=8, score="all")
    b = run(lm["ref"], lm["noise"][0.05], data=lm["data"], ctx=16, stride=16, score="all")
    # Overlapping windows score every token but each document's first, once; disjoint windows
    # also skip each later window's first token (it has no context inside its window).
    assert a["positions"] == sum(n - 1 for n in lengths)
    assert b["positions"] == sum(n - 1 - (n - 1) // 16 for n in lengths)
    c = run(lm["noise"][0.01], lm["noise"][0.05], data=lm["data"], arch=str(lm["ref"]),
            tokenizer=lm["ref"] / "tokenizer.json")
    assert c["settings"]["tokenizer"].endswith("tokenizer.json") and c["kl"]["mean"] > 0
