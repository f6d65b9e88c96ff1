"""Peak memory and wall time of the streaming commands on GPT-2-shaped models, against a baseline.

Usage::

    .venv/bin/python benchmarks/memory.py [--sizes 124M 355M] [--baseline HEAD~1] [--write-docs]

Two GPT-2 shapes (GPT-2 small, 124M parameters, and GPT-2 medium, 355M) are built with random
initialisation by transformers (no download) and saved once as Hugging Face directories under
``runs/mem-models/``. Each command then runs in a fresh subprocess whose peak resident memory
(``ru_maxrss`` of the child) and wall time are recorded, first with the working tree's
mlcompress and then with the ``--baseline`` commit's (checked out into a git worktree under
``runs/``, put first on ``PYTHONPATH``), so both columns come from the same machine in the
same run. The goal (issue 13): peak RSS <= 400 MiB + 3 x the largest tensor's fp32 bytes, and
roughly flat from one size to the next.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from results_doc import record_run

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "runs" / "mem-models"
SHAPES = {"124M": dict(n_layer=12, n_embd=768, n_head=12), "355M": dict(n_layer=24, n_embd=1024, n_head=16)}
VOCAB, POSITIONS = 50257, 1024
MIB = 1 << 20


def build(size: str) -> Path:
    """The randomly initialised GPT-2 of ``size`` as a Hugging Face directory (built once)."""
    out = MODELS / f"gpt2-{size}"
    if (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, **SHAPES[size]))
    model.save_pretrained(out)
    return out


def largest_fp32_bytes(size: str) -> int:
    """The largest tensor of the shape (the token embedding) in fp32 bytes."""
    return VOCAB * SHAPES[size]["n_embd"] * 4


def token_data(work: Path) -> Path:
    """Held-out data for ``diverge`` as token ids (random models have no tokenizer): 8 documents
    of 512 ids, 2,048 scored positions at --ctx 256 with llama.cpp's rule."""
    import json
    import random

    work.mkdir(parents=True, exist_ok=True)
    path = work / "val-ids.jsonl"
    if not path.exists():
        rng = random.Random(0)
        path.write_text("".join(json.dumps({"input_ids": [rng.randrange(VOCAB) for _ in range(512)]}) + "\n"
                                for _ in range(8)))
    return path


def commands(model: Path, work: Path) -> dict[str, list[str]]:
    """Each streaming command, as ``mlcompress`` arguments, writing into ``work``."""
    lossless, q4 = work / "lossless.mrc", work / "q4.mrc"
    return {
        "encode --lossless": ["encode", str(model), "--lossless", "-o", str(lossless), "--force"],
        "quantize --bits 4 --group-size 128": ["quantize", str(model), "--bits", "4", "--group-size", "128",
                                               "-o", str(q4), "--force"],
        "prune --sparsity 0.5": ["prune", str(model), "--sparsity", "0.5", "-o", str(work / "pruned.safetensors"),
                                 "--force"],
        "decode (4-bit file)": ["decode", str(q4), "-o", str(work / "q4.safetensors"), "--force"],
        "diverge (4-bit file, 2,048 positions)": ["diverge", str(model), str(q4), "--data", str(token_data(work)),
                                                  "--ctx", "256", "--device", "cpu"],
    }


def measure(args: list[str], pythonpath: Path | None) -> tuple[float, float, bool]:
    """Peak RSS of one command, measured in a wrapper process so children never mask each other."""
    wrapper = (
        "import resource, subprocess, sys, time, os\n"
        "t = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "w = time.perf_counter() - t\n"
        "sys.stderr.write(p.stderr[-2000:] if p.returncode else '')\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, w, p.returncode)\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    extra = ["--threads", "1"] if args[0] in ("encode", "decode") else []
    proc = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "mlcompress", *args, *extra, "--quiet"],
                          env=env, capture_output=True, text=True)
    kib, wall, rc = proc.stdout.split()
    if rc != "0":
        print(f"  {' '.join(args[:2])}: exit {rc}: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    return int(kib) / 1024, float(wall), rc == "0"


def baseline_tree(rev: str) -> Path:
    """A git worktree of ``rev`` under runs/ (reused when it is already at that commit)."""
    tree = ROOT / "runs" / "mem-baseline"
    commit = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    if tree.exists():
        at = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True).stdout.strip()
        if at == commit:
            return tree
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT, check=True,
                   capture_output=True)
    so = next((ROOT / "mlcompress" / "codecs").glob("_lossless3*.so"), None)
    if so is not None:  # the optional C extension is built, not committed: give the baseline the same one
        (tree / "mlcompress" / "codecs" / so.name).write_bytes(so.read_bytes())
    return tree


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--baseline", default="HEAD", help="the commit to compare with (default: HEAD, the "
                        "last commit, when the working tree holds the change)")
    parser.add_argument("--only", nargs="*", help="run only the commands whose label starts with one of these")
    parser.add_argument("--side", choices=("before", "after", "both", "cached"), default="both",
                        help="measure only one column (the other comes from the last run's cache, "
                        "runs/mem-models/results.json, so the slow baseline can run while the change is made), "
                        "or none: 'cached' prints (and with --write-docs records) the cached figures")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    base = baseline_tree(args.baseline)
    cache_path = MODELS / "results.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    rows = []
    for size in args.sizes:
        model = build(size)
        ceiling = 400 + 3 * largest_fp32_bytes(size) / MIB
        for label, cmd in commands(model, MODELS / f"work-{size}").items():
            if args.only and not any(label.startswith(o) for o in args.only):
                continue
            (MODELS / f"work-{size}").mkdir(exist_ok=True)
            key = f"{size} {label}"
            entry = cache.setdefault(key, {})
            if args.side in ("before", "both"):
                # the baseline's 4-bit file is written by its own quantize first, in the same order
                entry["before"] = measure(cmd, base)
            if args.side in ("after", "both"):
                entry["after"] = measure(cmd, ROOT)
            # merge into the file as it is now: a pass of the other side may be writing it too
            latest = json.loads(cache_path.read_text()) if cache_path.exists() else {}
            latest.setdefault(key, {}).update(entry)
            cache_path.write_text(json.dumps(latest, indent=1))
            if "before" not in entry or "after" not in entry:
                print(f"{key}: {entry}", flush=True)
                continue
            old, new = entry["before"], entry["after"]
            rows.append((size, label, old, new, ceiling))
            print(f"{size} {label}: before {old[0]:,.0f} MiB {old[1]:.1f} s; after {new[0]:,.0f} MiB {new[1]:.1f} s; "
                  f"ceiling {ceiling:,.0f} MiB", flush=True)
    lines = [f"| model | command | before: peak RSS / wall | after: peak RSS / wall | ceiling (400 MiB + 3x largest) |",
             "|---|---|---:|---:|---:|"]
    for size, label, old, new, ceiling in rows:
        cell = lambda r: f"{r[0]:,.0f} MiB / {r[1]:.1f} s" + ("" if r[2] else " (failed)")
        lines.append(f"| GPT-2 {size} | `{label}` | {cell(old)} | {cell(new)} | {ceiling:,.0f} MiB |")
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        measured = sum(r[1] for _, _, old, new, _ in rows for r in (old, new))  # the commands' own wall time
        record_run("memory", f"benchmarks/memory.py --sizes {' '.join(args.sizes)} --baseline {args.baseline} "
                   "(run as --side before, then --side after)", measured,
                   f"Before: commit `{args.baseline}` (a git worktree); after: the working tree. Each cell is one "
                   "command in a fresh process: peak RSS (ru_maxrss) / wall time. The two sides were measured in "
                   "separate passes while other jobs shared the 2 cores, so wall times compare only roughly; peak "
                   "RSS does not depend on the load.\n\n" + table,
                   heading="## Memory of the streaming commands (issue 13)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
