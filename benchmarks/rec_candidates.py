"""Decoded accuracy of one posterior against the number of REC candidates per block.

A posterior file fitted at C bits per block (every block's KL at or below C bits) is coded with
2^bits candidates for each ``--bits`` given (its ``bits_per_block`` raised, nothing else changed),
with several encoder seeds, then decoded and evaluated on its task. Importance sampling needs
somewhat more than exp(KL) candidates for the coded sample to be a close draw from the
posterior; this measures how much that matters (docs/results.md, "fit-posterior").

    python benchmarks/rec_candidates.py runs/lr3e-2/mean-kl.safetensors --bits 20,21,22 --seeds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mlcompress.api import decode_file
from mlcompress.posterior.file import load_posterior, save_posterior
from mlcompress.options import Rec as RecOptions
from mlcompress.rec.compress import encode_rec
from mlcompress.tasks import get_task
from mlcompress.posterior.evaluation import evaluate_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("posterior", type=Path)
    parser.add_argument("--task", help="task to evaluate on (default: the one recorded in the posterior file)")
    parser.add_argument("--bits", default="20,21,22", help="comma-separated candidate bits per block")
    parser.add_argument("--seeds", type=int, default=3, help="encoder seeds 0..N-1")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    posterior = load_posterior(args.posterior)
    task = get_task(args.task or posterior.extra.get("task", "lenet5"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for bits in [int(b) for b in args.bits.split(",")]:
            source = save_posterior(dataclasses.replace(posterior, bits_per_block=bits), work / f"q{bits}.safetensors")
            errors = []
            for seed in range(args.seeds):
                start = time.perf_counter()
                summary = encode_rec(source, work / "q.mrc", options=RecOptions(seed=seed, device="cpu"), force=True)
                seconds = time.perf_counter() - start
                decode_file(work / "q.mrc", work / "q.decoded.safetensors", force=True)
                errors.append(1 - evaluate_file(task, work / "q.decoded.safetensors")["accuracy"])
                print(f"{bits} bits, seed {seed}: test error {100 * errors[-1]:.2f}%, {summary['file_bytes']:,} bytes, "
                      f"KL/block max {summary['kl_bits_per_block_max']:.2f} bits, encode {seconds:.0f} s", flush=True)
            results[bits] = {"test_errors": errors, "mean": statistics.mean(errors), "file_bytes": summary["file_bytes"]}
    print("| candidates per block | decoded test error (seeds) | mean | .mrc bytes |")
    print("|---|---|---:|---:|")
    for bits, r in results.items():
        print(f"| 2^{bits} | {' / '.join(f'{100 * e:.1f}%' for e in r['test_errors'])} | {100 * r['mean']:.1f}% | {r['file_bytes']:,} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
