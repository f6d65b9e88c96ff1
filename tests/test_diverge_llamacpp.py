"""``--score llama-cpp``: llama.cpp's scoring rule, its quantized-base KL, its statistics and its
``.kld`` base files, each checked against a brute-force reimplementation written here from the
description in docs/diverge.md (not by calling the code under test)."""

from __future__ import annotations

import io
import json
import math
import re
import struct

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from diverge_models import make_gpt2_dir, noisy, texts  # noqa: E402
from diverge_threads import one_thread  # noqa: E402,F401  (autouse fixture)
from mlcompress.cli import main  # noqa: E402
from mlcompress.divergence.compare import DivergeOptions, diverge  # noqa: E402
from mlcompress.divergence.data import Document, read_token_stream, windows  # noqa: E402
from mlcompress.divergence.kld_file import KldWriter, quantize_rows, read_kld  # noqa: E402
from mlcompress.divergence.llamacpp import LlamaCppRun, LlamaCppTokens, chunk_windows, score_rows  # noqa: E402
from mlcompress.divergence.llamacpp_stats import statistics  # noqa: E402
from mlcompress.divergence.lm import scored_index  # noqa: E402
from mlcompress.divergence.models import load_tokenizer  # noqa: E402

CTX = 16
F32 = np.float32


@pytest.fixture(scope="module")
def lms(one_thread, tmp_path_factory):
    """A peaked tiny GPT-2 (log-probs spanning more than 16 nats, so the .kld window clips), a
    noisy copy, the same pair with a tokenizer that adds BOS, and text of ~600 tokens."""
    import transformers

    root = tmp_path_factory.mktemp("llamacpp")
    out = {"root": root}
    for name, adds_bos in (("plain", False), ("bos", True)):
        ref = make_gpt2_dir(root / name, adds_bos=adds_bos)
        model = transformers.GPT2LMHeadModel.from_pretrained(ref)
        with torch.no_grad():
            model.transformer.ln_f.weight.mul_(12.0)  # peaked: top-to-bottom range > 16 nats
        model.save_pretrained(ref)
        model.load_state_dict(noisy(model.state_dict(), 0.05))
        cmp = root / f"{name}_cmp"
        model.save_pretrained(cmp)
        (cmp / "tokenizer.json").write_bytes((ref / "tokenizer.json").read_bytes())
        out[name] = (ref, cmp)
    data = root / "val.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(8, 3)))
    out["data"] = data
    return out


def run(ref, cmp, **kw) -> dict:
    kw.setdefault("device", "cpu")
    kw.setdefault("ctx", CTX)
    return diverge(ref, cmp, DivergeOptions(**kw)).report


def _cli(capsys, *args):
    code = main(["diverge", *map(str, args), "--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- brute force, from the description -----------------------------------------------------------


def bf_quantize(row: np.ndarray) -> tuple[F32, F32, list[int]]:
    """One row of float32 logits -> (scale, min_log_prob, codes), llama.cpp's save rule."""
    top = row.max()
    lo = max(row.min(), F32(top - F32(16)))
    total = sum(float(np.exp(F32(x - top))) for x in row)
    lse = F32(math.log(total))
    min_lp = F32(F32(lo - top) - lse)
    scale = F32(F32(top - lo) / F32(65535))
    inv = F32(F32(1) / scale)
    return scale, min_lp, [int(np.rint(F32(inv * F32(x - lo)))) if x > lo else 0 for x in row]


def bf_token(scale, min_lp, codes, q: np.ndarray, tok: int) -> dict:
    """llama.cpp's per-token KL, NLLs, Δp and same-top of compared logits ``q``."""
    top, imax = q[0], 0
    for i, x in enumerate(q):
        if x > top:
            top, imax = x, i
    lse = F32(math.log(sum(float(np.exp(F32(x - top))) for x in q)))
    norm = F32(top + lse)
    nll = F32(norm - q[tok])
    lpb = [F32(F32(scale * F32(c)) + min_lp) for c in codes]
    kl, best, ibest = 0.0, lpb[0], 0
    for i, lp in enumerate(lpb):
        if lp > best:
            best, ibest = lp, i
        if lp > F32(-16):
            kl += float(F32(np.exp(lp) * F32(F32(lp - q[i]) + norm)))
    nll_base = -lpb[tok]
    return {"kl": kl, "nll": float(nll), "nll_base": float(nll_base), "same": imax == ibest,
            "p_diff": float(F32(np.exp(-nll) - np.exp(-nll_base)))}


def hf_logits(model_dir, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(model_dir).float().eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def bf_chunks(tokenizer_dir, data, bos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunks llama.cpp would score (inputs with BOS applied, and the stream's tokens)."""
    tok = load_tokenizer(tokenizer_dir)
    lines = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    stream = tok.encode("\n".join(lines))
    n = len(stream) // CTX
    original = torch.tensor(stream[: n * CTX]).view(n, CTX)
    inputs = original.clone()
    if bos:
        inputs[:, 0] = tok.encode("x")[0]  # the token this tokenizer puts before every text
    return inputs, original


# --- the scoring rule -------------------------------------------------------------------------


def test_sixteen_token_window_scores_the_documented_targets():
    stream = list(range(100, 140))  # 40 tokens: two chunks of 16, a tail of 8 dropped
    chunks = chunk_windows(stream, CTX, bos=None)
    assert [w.ids.tolist() for w in chunks] == [stream[:16], stream[16:32]]
    rows, targets = scored_index(chunks, CTX)
    # Logit rows 8..14 predict targets 9..15 of each chunk; target 8 and row 15 are never used.
    assert rows.tolist() == list(range(8, 15)) + list(range(16 + 8, 16 + 15))
    assert targets.tolist() == stream[9:16] + stream[25:32]
    with_bos = chunk_windows(stream, CTX, bos=7)
    assert [int(w.ids[0]) for w in with_bos] == [7, 7]
    assert [w.ids[1:].tolist() for w in with_bos] == [stream[1:16], stream[17:32]]
    # The per-document rules on one 16-token window, as the worked example in docs/diverge.md.
    doc = Document(0, stream[:16], "x")
    assert [w.first for w in windows(doc, ctx=CTX, stride=CTX, score="second-half")] == [8]  # 8..15
    assert [w.first for w in windows(doc, ctx=CTX, stride=CTX, score="all")] == [1]  # 1..15
    # Odd ctx: first = ctx // 2 = 7, targets 8..14 (ctx - 1 - ctx // 2 = 7 of them).
    assert chunk_windows(list(range(15)), 15, None)[0].n_scored == 7


def test_one_token_stream_over_documents(lms, tmp_path):
    ref, _ = lms["plain"]
    tok = load_tokenizer(ref)
    lines = [json.loads(line)["text"] for line in lms["data"].read_text().splitlines()]
    stream = read_token_stream(lms["data"], tokenize=tok.encode)
    assert stream == tok.encode("\n".join(lines))  # joined by newlines, tokenized once
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [4, 5]}\n')
    assert read_token_stream(ids) == [1, 2, 3, 4, 5]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"input_ids": [1, 2, 3]}\n{"text": "the fox"}\n')
    with pytest.raises(Exception, match="mixed.jsonl:2: the file mixes text and input_ids"):
        read_token_stream(mixed, tokenize=tok.encode)


def test_end_to_end_matches_brute_force(lms):
    """Which targets are scored, the exact KL, and llama.cpp's quantized-base KL, all against a
    brute-force pass over the chunks (with the BOS overwrite of the tokenizer that adds BOS)."""
    ref, cmp = lms["bos"]
    r = run(ref, cmp, data=lms["data"])
    inputs, original = bf_chunks(ref, lms["data"], bos=True)
    assert r["settings"]["bos"] == 0 and r["settings"]["chunks"] == inputs.shape[0]
    lp = torch.log_softmax(hf_logits(ref, inputs).double(), -1)[:, 8:15]
    lq = torch.log_softmax(hf_logits(cmp, inputs).double(), -1)[:, 8:15]
    targets = original[:, 9:16]
    assert r["positions"] == targets.numel() == 7 * inputs.shape[0]
    ll = lp.gather(-1, targets.unsqueeze(-1)).mean()
    assert r["ppl"]["ref"] == pytest.approx(math.exp(-float(ll)), rel=1e-5)
    exact_kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    assert r["kl"]["mean"] == pytest.approx(exact_kl, rel=1e-5)
    # llama.cpp's KL: quantize each reference row, then its rule against the compared row.
    ref32 = hf_logits(ref, inputs)[:, 8:15].reshape(-1, lp.shape[-1]).numpy()
    cmp32 = hf_logits(cmp, inputs)[:, 8:15].reshape(-1, lp.shape[-1]).numpy()
    toks = [bf_token(*bf_quantize(a), b, int(t)) for a, b, t in zip(ref32, cmp32, targets.reshape(-1))]
    block = r["llama_cpp"]
    assert block["positions"] == len(toks) >= 100 and block["summary"]
    assert block["kld"]["mean"] == pytest.approx(np.mean([t["kl"] for t in toks]), rel=1e-6)
    assert block["same_top"]["value"] == pytest.approx(np.mean([t["same"] for t in toks]), abs=1e-12)
    ppl_base = math.exp(np.mean([t["nll_base"] for t in toks]))
    assert block["ppl_base"]["value"] == pytest.approx(ppl_base, rel=1e-6)
    clipped = sum(1 for row in ref32 if row.max() - row.min() > 16)
    assert clipped > 0  # the 16-nat window really clipped some rows
    # Both KLs are reported, and the difference is the quantization's, i.e. small.
    assert block["kld"]["mean"] == pytest.approx(r["kl"]["mean"], rel=2e-2)
    assert r["headline"]["llama_cpp_kld"] == block["kld"]["mean"]
    assert any("exact full-vocabulary KL" in n for n in r["notes"])


def test_no_bos_and_tokenizers_without_bos(lms):
    ref, cmp = lms["bos"]
    with_bos = run(ref, cmp, data=lms["data"])
    without = run(ref, cmp, data=lms["data"], no_bos=True)
    assert with_bos["settings"]["bos"] == 0 and without["settings"]["bos"] is None
    assert without["positions"] == with_bos["positions"]
    inputs, original = bf_chunks(ref, lms["data"], bos=False)
    assert torch.equal(inputs, original)
    lp = torch.log_softmax(hf_logits(ref, inputs).double(), -1)[:, 8:15]
    ll = lp.gather(-1, original[:, 9:16].unsqueeze(-1)).mean()
    assert without["ppl"]["ref"] == pytest.approx(math.exp(-float(ll)), rel=1e-5)
    assert without["ppl"]["ref"] != pytest.approx(with_bos["ppl"]["ref"], rel=1e-7)
    plain = run(*lms["plain"], data=lms["data"])  # GPT-2-style tokenizer: adds no BOS
    assert plain["settings"]["bos"] is None
    assert load_tokenizer(ref).added_bos == 0 and load_tokenizer(lms["plain"][0]).added_bos is None


def test_kl_rule_on_fixed_tensors_floor_and_first_index_ties():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(40, 53, generator=g) * 6.0  # ranges of ~40 nats: most rows clip
    cmp = ref + 0.3 * torch.randn(40, 53, generator=g)
    targets = torch.randint(0, 53, (40,), generator=g)
    # Ties: row 0 of cmp has equal maxima at 3 and 7, the base its maximum at 7 (so a
    # "some tied top token agrees" rule would say same top; llama.cpp's first index says not);
    # row 1 ties at 3 and 7 in both.
    ref[0], cmp[0] = ref[0].clamp(max=5.0), cmp[0].clamp(max=5.0)
    ref[0, 7], cmp[0, 3], cmp[0, 7] = 9.0, 8.0, 8.0
    ref[1], cmp[1] = ref[1].clamp(max=5.0), cmp[1].clamp(max=5.0)
    ref[1, 3] = ref[1, 7] = cmp[1, 3] = cmp[1, 7] = 9.0
    got = score_rows(quantize_rows(ref), cmp, targets)
    want = [bf_token(*bf_quantize(a), b, int(t)) for a, b, t in zip(ref.numpy(), cmp.numpy(), targets)]
    assert float(got.kld.mean()) == pytest.approx(np.mean([w["kl"] for w in want]), rel=1e-6)
    np.testing.assert_allclose(got.kld.numpy(), [w["kl"] for w in want], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(got.nll_base.numpy(), [w["nll_base"] for w in want], rtol=1e-6)
    np.testing.assert_allclose(got.p_diff.numpy(), [w["p_diff"] for w in want], atol=1e-6)
    assert got.same_top.tolist() == [w["same"] for w in want]
    assert got.same_top[0].item() is False and got.same_top[1].item() is True


# --- statistics -------------------------------------------------------------------------------


def bf_mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, (math.sqrt(var / n) if n > 10 and var > 0 else 0.0)


def bf_cov_of_means(a: list[float], b: list[float]) -> float:
    n = len(a)
    if n < 10:
        return 0.0
    ma, mb = sum(a) / n, sum(b) / n
    return sum((x - ma) * (y - mb) for x, y in zip(a, b)) / (n * (n - 1))


def _random_tokens(n: int, seed: int) -> LlamaCppTokens:
    """Per-token values on grids whose float32 products are exact, so the brute force below
    (exact float64 arithmetic) and llama.cpp's float32 products agree to float64 rounding."""
    g = np.random.default_rng(seed)
    nll = g.integers(0, 8 * 64, n) / 64.0
    nll_base = np.clip(nll + g.integers(-64, 64, n) / 64.0, 0, None)
    p_diff = g.integers(-512, 512, n) / 1024.0
    kld = g.exponential(0.02, n)
    t = lambda x, dtype: torch.tensor(x, dtype=dtype)  # noqa: E731
    return LlamaCppTokens(t(kld, torch.float64), t(nll, torch.float32), t(nll_base, torch.float32),
                          t(p_diff, torch.float32), t(g.random(n) < 0.9, torch.bool))


@pytest.mark.parametrize("n, chunks", [(250, 5), (60, 4), (10, 1)])
def test_statistics_match_a_brute_force_reimplementation(n, chunks):
    tokens = _random_tokens(n, seed=n)
    block = statistics(LlamaCppRun(tokens, ctx=2 * (n // chunks) + 1, chunks=chunks, bos=None))
    nll, base = tokens.nll.tolist(), tokens.nll_base.tolist()
    kld, pd = tokens.kld.tolist(), tokens.p_diff.tolist()
    m, se = bf_mean_se(nll)
    mb, seb = bf_mean_se(base)
    cov = bf_cov_of_means(nll, base)
    ln_se = math.sqrt(se**2 + seb**2 - 2 * cov) if se**2 + seb**2 - 2 * cov >= 0 else math.nan
    approx = lambda x: pytest.approx(x, rel=1e-9, abs=1e-12, nan_ok=True)  # noqa: E731
    assert block["summary"] is (n >= 100)
    assert block["ppl_cmp"] == {"value": approx(math.exp(m)), "uncertainty": approx(math.exp(m) * se)}
    assert block["ln_ppl_ratio"] == {"value": approx(m - mb), "uncertainty": approx(ln_se)}
    k, kse = bf_mean_se(kld)
    assert block["kld"]["mean"] == approx(k) and block["kld"]["uncertainty"] == approx(kse)
    mse, mse_se = bf_mean_se([x * x for x in pd])
    rms = math.sqrt(mse)
    assert block["rms_delta_p"] == {"value": approx(rms), "uncertainty": approx(0.5 / rms * mse_se)}
    top = float(tokens.same_top.double().mean())
    assert block["same_top"] == {"value": approx(top), "uncertainty": approx(math.sqrt(top * (1 - top) / (n - 1)))}
    if n <= 10:
        assert block["kld"]["uncertainty"] == 0.0 and block["ppl_cmp"]["uncertainty"] == 0.0
    # Running lines after each chunk: the last is the total, the first the first chunk alone.
    assert len(block["by_chunk"]) == chunks and block["by_chunk"][-1]["kld"]["value"] == approx(k)
    first = bf_mean_se(kld[: n // chunks])[0]
    assert block["by_chunk"][0]["kld"]["value"] == approx(first)
    if n < 100:  # llama.cpp prints no summary below 100 tokens
        assert "ppl_base" not in block and "percentiles" not in block["kld"]
        return
    ppl, ppl_b = math.exp(m), math.exp(mb)
    assert block["ppl_base"] == {"value": approx(ppl_b), "uncertainty": approx(ppl_b * seb)}
    assert block["ln_ppl_correlation"] == approx(cov / (se * seb))
    assert block["ppl_ratio"] == {"value": approx(math.exp(m - mb)), "uncertainty": approx(math.exp(m - mb) * ln_se)}
    diff_se = math.sqrt((ppl * se) ** 2 + (ppl_b * seb) ** 2 - 2 * ppl * ppl_b * cov)
    assert block["ppl_difference"] == {"value": approx(ppl - ppl_b), "uncertainty": approx(diff_se)}
    dp, dp_se = bf_mean_se(pd)
    assert block["delta_p"]["mean"] == approx(dp) and block["delta_p"]["uncertainty"] == approx(dp_se)
    for values, pct, labels in (
        (kld, block["kld"]["percentiles"], ["p99.9", "p99", "p95", "p90", "p10", "p5", "p1", "p0.1"]),
        (pd, block["delta_p"]["percentiles"], ["p99.9", "p99", "p95", "p90", "p75", "p25", "p10", "p5", "p1", "p0.1"]),
    ):
        ordered = sorted(float(F32(v)) for v in values)
        assert pct["max"] == ordered[-1] and pct["min"] == ordered[0]
        assert pct["median"] == pytest.approx((ordered[n // 2 - 1] + ordered[n // 2]) / 2, rel=1e-7)
        for label in labels:  # linear interpolation at fraction * (n - 1), in float32
            f = float(label[1:]) / 100
            pos = f * (n - 1)
            lo = int(pos)
            want = ordered[lo] + (pos - lo) * (ordered[min(lo + 1, n - 1)] - ordered[lo])
            assert pct[label] == pytest.approx(want, rel=1e-5, abs=1e-7), label


# --- .kld files -------------------------------------------------------------------------------


def test_kld_round_trip_layout_and_quantization_error(tmp_path):
    n_ctx, vocab, n_chunk = 9, 37, 3  # odd vocabulary: each record ends with one zero pad
    scored = n_ctx - 1 - n_ctx // 2
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(n_chunk * scored, vocab, generator=g) * 5.0
    cmp = logits + 0.5 * torch.randn(logits.shape, generator=g)
    tokens = torch.randint(0, vocab, (n_chunk * n_ctx,), generator=g).tolist()
    q = quantize_rows(logits)
    path = tmp_path / "base.kld"
    with path.open("wb") as fh:
        writer = KldWriter(fh, n_ctx=n_ctx, tokens=tokens)
        writer.add(q)
        writer.finish()
    # The layout, read back with struct alone (what llama.cpp's reader does).
    raw = path.read_bytes()
    width = 2 * ((vocab + 1) // 2) + 4
    assert raw[:8] == b"_logits_" and struct.unpack_from("<iii", raw, 8) == (n_ctx, vocab, n_chunk)
    assert list(struct.unpack_from(f"<{n_chunk * n_ctx}i", raw, 20)) == tokens
    offset = 20 + 4 * n_chunk * n_ctx
    assert len(raw) == offset + 2 * width * n_chunk * scored
    for i in range(n_chunk * scored):
        rec = raw[offset + 2 * width * i : offset + 2 * width * (i + 1)]
        scale, min_lp = struct.unpack_from("<ff", rec)
        codes = struct.unpack_from(f"<{vocab}H", rec, 8)
        assert rec[-2:] == b"\0\0"  # the pad
        want_scale, want_min, want_codes = bf_quantize(logits[i].numpy())
        assert (scale, min_lp) == (float(want_scale), float(want_min)) and list(codes) == want_codes
    # Our reader gives back the same codes, per chunk.
    base = read_kld(path)
    assert (base.n_ctx, base.n_vocab, base.n_chunk) == (n_ctx, vocab, n_chunk)
    assert base.tokens.reshape(-1).tolist() == tokens
    back = [base.chunk(i) for i in range(n_chunk)]
    assert torch.equal(torch.cat([b.codes for b in back]), q.codes)
    assert torch.equal(torch.cat([b.scale for b in back]), q.scale)
    # Quantization error: each decoded log-prob within scale/2 (+ float32 rounding) where the
    # window does not clip it; llama.cpp's KL differs from the exact KL by at most
    # max|error| * (1 + sum p |log p - log q|) plus the terms of the tokens below -16 nats.
    lp = torch.log_softmax(logits.double(), -1)
    lq = torch.log_softmax(cmp.double(), -1)
    decoded = q.log_probs().double()
    inside = lp > (lp.amax(-1, keepdim=True) - 16)
    err = (decoded - lp).abs()
    assert bool((err[inside] <= (q.scale.double().unsqueeze(-1) / 2 + 1e-5).expand_as(err)[inside]).all())
    assert float(err[inside].max()) < 2e-4
    exact = (lp.exp() * (lp - lq)).sum(-1)
    got = score_rows(q, cmp, torch.zeros(len(cmp), dtype=torch.long)).kld
    tail = torch.where(decoded > -16, 0.0, lp.exp() * (lp - lq).abs()).sum(-1)
    bound = 2e-4 * (1 + (lp.exp() * (lp - lq).abs()).sum(-1)) + tail + 1e-6
    assert bool(((got - exact).abs() <= bound).all())
    assert float((got - exact).abs().max()) < 5e-3


def test_save_and_read_kld_through_the_cli(lms, tmp_path, capsys):
    ref, cmp = lms["bos"]
    kld = tmp_path / "base.kld"
    code, out, err = _cli(capsys, ref, ref, "--data", lms["data"], "--ctx", CTX, "--save-ref", kld, "--json")
    assert code == 0, err
    saved = json.loads(out)
    assert saved["saved_ref_format"] == "llama-cpp" and saved["llama_cpp"]["kld"]["mean"] < 1e-6
    base = read_kld(kld)
    inputs, original = bf_chunks(ref, lms["data"], bos=True)
    assert torch.equal(torch.from_numpy(base.tokens).long(), original)  # the stream, not the BOS'd batch
    live = run(ref, cmp, data=lms["data"])
    code, out, err = _cli(capsys, cmp, "--ref-logits", kld, "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["positions"] == live["positions"] and got["settings"]["bos"] == 0
    for key in ("mean", "uncertainty"):
        assert got["llama_cpp"]["kld"][key] == pytest.approx(live["llama_cpp"]["kld"][key], rel=1e-6)
    assert got["llama_cpp"]["kld"]["percentiles"] == pytest.approx(live["llama_cpp"]["kld"]["percentiles"], rel=1e-6)
    assert got["llama_cpp"]["same_top"] == live["llama_cpp"]["same_top"]
    assert got["kl"]["mean"] == pytest.approx(got["llama_cpp"]["kld"]["mean"], rel=1e-6)
    assert got["reverse_kl"] is None and "reverse_kl" not in got["headline"]
    # --data next to the file must be the data it was made from.
    code, out, err = _cli(capsys, cmp, "--ref-logits", kld, "--data", lms["data"], "--json")
    assert code == 0, err
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(8, 4)))
    code, out, err = _cli(capsys, cmp, "--ref-logits", kld, "--data", other)
    assert code == 1 and "does not tokenize to the tokens stored" in err and out == ""
    # Human output shows both blocks.
    code, out, err = _cli(capsys, cmp, "--ref-logits", kld)
    assert code == 0 and "Mean PPL(base)" in out and "Same top p" in out


def _one_line_error(code, out, err, pattern):
    assert code == 1 and out == "" and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(pattern, err), err


def test_bad_kld_files_and_too_little_data(lms, tmp_path, capsys):
    ref, cmp = lms["plain"]
    bad = tmp_path / "bad.kld"
    bad.write_bytes(b"_notlog_" + bytes(40))
    _one_line_error(*_cli(capsys, cmp, "--ref-logits", bad), r"not a llama\.cpp \.kld file")
    vocab = json.loads((ref / "config.json").read_text())["vocab_size"]
    wrong = tmp_path / "wrong.kld"
    with wrong.open("wb") as fh:
        writer = KldWriter(fh, n_ctx=CTX, tokens=[1] * CTX)
        writer.add(quantize_rows(torch.zeros(7, vocab + 1)))
        writer.finish()
    _one_line_error(*_cli(capsys, cmp, "--ref-logits", wrong), rf"n_vocab {vocab + 1} .* has {vocab} tokens")
    _one_line_error(*_cli(capsys, cmp, "--ref-logits", wrong, "--ctx", "32"), r"--ctx 32 differs from n_ctx 16")
    truncated = tmp_path / "short.kld"
    truncated.write_bytes(wrong.read_bytes()[:-2])
    _one_line_error(*_cli(capsys, cmp, "--ref-logits", truncated), r"damaged \.kld file")
    # Too few tokens for one chunk: a one-line error, and no partial output file.
    short = tmp_path / "short.jsonl"
    short.write_text('{"input_ids": [1, 2, 3, 4, 5]}\n')
    out_file = tmp_path / "never.kld"
    _one_line_error(*_cli(capsys, ref, cmp, "--data", short, "--ctx", CTX, "--save-ref", out_file),
                    r"needs at least 16 tokens for one chunk of --ctx 16; the data tokenize to 5")
    assert list(tmp_path.glob("*never*")) == []
    # Usage errors (exit 2).
    code, out, err = _cli(capsys, ref, cmp, "--data", lms["data"], "--stride", "8")
    assert code == 2 and "--stride does not apply" in err
    code, out, err = _cli(capsys, ref, cmp, "--data", lms["data"], "--score", "all", "--save-ref", tmp_path / "x.kld")
    assert code == 2 and "--score llama-cpp positions only" in err


def test_kld_writer_streams_in_order():
    buf = io.BytesIO()
    writer = KldWriter(buf, n_ctx=4, tokens=[1, 2, 3, 4])
    with pytest.raises(Exception, match="wrote 0 scored positions, expected 1"):
        writer.finish()
    writer.add(quantize_rows(torch.tensor([[0.0, 1.0, 2.0]])))
    writer.finish()
    assert len(buf.getvalue()) == 20 + 16 + 2 * (2 * 2 + 4)


def test_top_k_cache_keeps_the_llama_cpp_chunks(lms, tmp_path):
    """Our own top-k cache (--format mlcompress) also works with --score llama-cpp: it stores the
    chunks as fed (BOS applied) and checks --data by re-cutting the stream."""
    ref, cmp = lms["bos"]
    cache = tmp_path / "ref.logits"
    full = run(ref, cmp, data=lms["data"], save_ref=cache, top_k=500)
    assert full["saved_ref_format"] == "mlcompress"
    cached = run(None, cmp, ref_logits=cache, data=lms["data"])
    assert cached["positions"] == full["positions"]
    assert cached["ppl"]["ref"] == pytest.approx(full["ppl"]["ref"], rel=1e-6)
    assert cached["kl"]["mean"] == pytest.approx(full["kl"]["mean"], rel=1e-4)  # k >= vocab - 1: exact
