"""Benchmark for ``mlcompress diverge`` on a small GPT-2-style model built on the fly.

Prints three sets of figures (recorded in docs/results.md, heading "diverge"):

1. Overhead: seconds spent in the two models' forward passes (the baseline, measured in the same
   run) against seconds spent computing the divergences, and scored tokens per second.
2. Memory: peak resident memory of a fresh process comparing the models on N and 4N tokens.
3. Reference cache: KL from a top-k cache against full-vocabulary KL, for several k and noise
   levels, with the models' mean entropy (the error depends on how peaked the distributions are).

Run:  .venv/bin/python benchmarks/diverge_lm.py [--quick]
The model is random (no download); its final layer norm is scaled so that next-token
distributions are peaked like a trained model's (about 3 nats) rather than nearly uniform.
``--threads`` sets torch's thread count (on a busy shared machine 1 thread is often faster).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TARGET_ENTROPY = 3.0  # nats; roughly a trained GPT-2's mean next-token entropy on web text
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlcompress.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from mlcompress.divergence.compare import DivergeOptions, diverge  # noqa: E402

#: The figures in docs/results.md were measured with per-window second-half scoring, the
#: default before --score llama-cpp; pinned so a rerun measures the same positions.
SCORE = "second-half"


def build_model(root: Path, *, vocab: int, d: int, layers: int, ctx: int, init: float) -> Path:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=ctx, n_embd=d, n_layer=layers, n_head=max(1, d // 64),
        bos_token_id=0, eos_token_id=0, initializer_range=init,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    # A random model's next-token distributions are nearly uniform; trained LMs' are peaked
    # (a few nats of entropy). Scaling the final layer norm acts as an inverse temperature:
    # pick the scale whose mean entropy is closest to TARGET_ENTROPY nats.
    probe = torch.randint(0, vocab, (2, ctx), generator=torch.Generator().manual_seed(5))
    best = None
    with torch.no_grad():
        for scale in (1, 2, 4, 8, 16, 32):
            model.transformer.ln_f.weight.fill_(scale)
            lp = torch.log_softmax(model(probe).logits.float(), -1)
            h = float(-(lp.exp() * lp).sum(-1).mean())
            if best is None or abs(h - TARGET_ENTROPY) < abs(best[1] - TARGET_ENTROPY):
                best = (scale, h)
        model.transformer.ln_f.weight.fill_(best[0])
    path = root / "ref"
    model.save_pretrained(path)
    return path


def noisy_copy(ref: Path, out: Path, scale: float) -> Path:
    g = torch.Generator().manual_seed(1)
    tensors = load_checkpoint(ref)
    noisy = {
        k: v + scale * v.std() * torch.randn(v.shape, generator=g) if v.dim() > 1 else v.clone()
        for k, v in tensors.items()
    }
    save_checkpoint(noisy, out, force=True)
    return out


def write_tokens(path: Path, *, tokens: int, vocab: int, doc_len: int, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    with path.open("w") as fh:
        for _ in range(max(1, tokens // doc_len)):
            ids = torch.randint(1, vocab, (doc_len,), generator=g).tolist()
            fh.write(json.dumps({"input_ids": ids}) + "\n")
    return path


def overhead(ref: Path, cmp: Path, data: Path, ctx: int, batch: int, reps: int, compiled: bool = False) -> dict:
    best = None
    for _ in range(reps):
        opts = DivergeOptions(data=data, ctx=ctx, batch_size=batch, device="cpu", compiled=compiled, score=SCORE)
        r = diverge(ref, cmp, opts).report
        t = r["timing"]
        if best is None or t["forward_s"] + t["measures_s"] < best["forward_s"] + best["measures_s"]:
            best = dict(t, positions=r["positions"], kl=r["kl"]["mean"])
    return best


def peak_memory(ref: Path, cmp: Path, data: Path, ctx: int, batch: int) -> float:
    """Peak RSS (MiB) of a fresh process running the whole comparison."""
    code = (
        "import resource, sys, torch; sys.path.insert(0, %r); torch.set_num_threads(%d)\n"
        "from mlcompress.divergence.compare import DivergeOptions, diverge\n"
        "r = diverge(%r, %r, DivergeOptions(data=%r, ctx=%d, batch_size=%d, device='cpu', score=%r)).report\n"
        "print(r['positions'], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    ) % (str(REPO), torch.get_num_threads(), str(ref), str(cmp), str(data), ctx, batch, SCORE)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    positions, kib = out.stdout.split()
    return int(positions), int(kib) / 1024


def cache_error(ref: Path, cmps: dict[float, Path], data: Path, ctx: int, ks: list[int], root: Path) -> list[dict]:
    rows = []
    for scale, cmp in cmps.items():
        full = diverge(ref, cmp, DivergeOptions(data=data, ctx=ctx, device="cpu", score=SCORE)).report
        for k in ks:
            cache = root / f"ref_k{k}.logits"
            if not cache.exists():
                diverge(ref, ref, DivergeOptions(data=data, ctx=ctx, device="cpu", save_ref=cache, top_k=k, score=SCORE))
            approx = diverge(None, cmp, DivergeOptions(ref_logits=cache, device="cpu", arch=str(ref))).report
            rows.append({
                "noise": scale, "k": k, "kl_full": full["kl"]["mean"], "kl_topk": approx["kl"]["mean"],
                "rel_error": (full["kl"]["mean"] - approx["kl"]["mean"]) / full["kl"]["mean"],
                "js_rel_error": (full["js"]["mean"] - approx["js"]["mean"]) / full["js"]["mean"],
                "cache_bytes": cache.stat().st_size, "positions": full["positions"],
            })
    return rows


def mean_entropy(ref: Path, data: Path, ctx: int) -> float:
    from mlcompress.divergence.models import load_pair

    model, _ = load_pair(ref, ref, device=torch.device("cpu"))
    ids = torch.tensor([json.loads(data.read_text().splitlines()[0])["input_ids"][:ctx]])
    lp = torch.log_softmax(model.logits(ids)[0].float(), -1)
    return float(-(lp.exp() * lp).sum(-1).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes, one repetition")
    ap.add_argument("--gpt2", action="store_true", help="GPT-2 small's shape (d 768, 12 layers, 50257 tokens)")
    ap.add_argument("--overhead-only", action="store_true", help="skip the memory and cache parts")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    vocab, d, layers, ctx = (8192, 128, 2, 128) if args.quick else (16384, 256, 4, 256)
    batch, reps = 4, 1 if args.quick else 3
    tokens = 4096 if args.quick else 16384
    if args.gpt2:
        vocab, d, layers, ctx, batch, reps, tokens = 50257, 768, 12, 512, 2, 1, 4096
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    print(f"model: GPT-2 style, vocab {vocab}, d_model {d}, {layers} layers, ctx {ctx}; batch {batch} windows")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ref = build_model(root, vocab=vocab, d=d, layers=layers, ctx=ctx, init=0.02)
        cmp = noisy_copy(ref, root / "cmp.safetensors", 0.05)
        data = write_tokens(root / "data.jsonl", tokens=tokens, vocab=vocab, doc_len=ctx)
        print(f"mean next-token entropy of the reference: {mean_entropy(ref, data, ctx):.2f} nats")

        print("\n== overhead (best of %d): divergence computation vs the two forward passes ==" % reps)
        t0 = time.perf_counter()
        overhead(ref, cmp, write_tokens(root / "warm.jsonl", tokens=ctx, vocab=vocab, doc_len=ctx), ctx, 1, 1, True)
        print(f"torch.compile warm-up (one-time, --compile): {time.perf_counter() - t0:.1f} s")
        for compiled in (False, True):
            t = overhead(ref, cmp, data, ctx, batch, reps, compiled)
            total = t["forward_s"] + t["measures_s"]
            label = "--compile" if compiled else "eager    "
            print(f"{label}: {t['positions']} scored tokens, KL {t['kl']:.4g}; forward {t['forward_s']:.2f} s "
                  f"(CPU {t['forward_cpu_s']:.2f}), measures {t['measures_s']:.2f} s (CPU {t['measures_cpu_s']:.2f}) "
                  f"= {100 * t['measures_s'] / t['forward_s']:.1f}% of forward wall, "
                  f"{100 * t['measures_cpu_s'] / t['forward_cpu_s']:.1f}% CPU; "
                  f"{t['positions'] / total:.0f} scored tokens/s ({2 * t['positions'] / total:.0f} tokens/s through each model)")
        if args.overhead_only:
            return

        print("\n== peak memory, fresh process ==")
        small = write_tokens(root / "small.jsonl", tokens=tokens // 4, vocab=vocab, doc_len=ctx, seed=1)
        large = write_tokens(root / "large.jsonl", tokens=tokens * 2, vocab=vocab, doc_len=ctx, seed=2)
        for name, path in (("N", small), ("8N", large)):
            positions, mib = peak_memory(ref, cmp, path, ctx, batch)
            print(f"{name}: {positions} scored tokens -> peak RSS {mib:.0f} MiB")

        print("\n== reference cache: top-k KL vs full-vocabulary KL ==")
        cmps = {s: noisy_copy(ref, root / f"cmp{s}.safetensors", s) for s in (0.01, 0.05, 0.2)}
        cache_data = write_tokens(root / "cache.jsonl", tokens=tokens // 4, vocab=vocab, doc_len=ctx, seed=3)
        ks = [1, 8, 64] if args.quick else [1, 8, 64, 256]
        print(f"{'noise':>6} {'k':>5} {'KL full':>11} {'KL top-k':>11} {'KL rel err':>10} {'JS rel err':>10} {'cache B/token':>13}")
        for row in cache_error(ref, cmps, cache_data, ctx, ks, root):
            print(f"{row['noise']:>6} {row['k']:>5} {row['kl_full']:>11.4g} {row['kl_topk']:>11.4g} "
                  f"{100 * row['rel_error']:>9.1f}% {100 * row['js_rel_error']:>9.1f}% {row['cache_bytes'] / row['positions']:>13.0f}")


if __name__ == "__main__":
    main()
