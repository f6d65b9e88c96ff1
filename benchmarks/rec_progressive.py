"""Progressive REC (retraining between groups) against one-shot REC and 4-bit quantization.

    python benchmarks/rec_progressive.py --seeds 0 1 --target-size 900

For each seed: train the mlp-digits model (a differently trained model per seed), fit a Mean-KL
posterior (every parameter coded) for a ``--target-size``-byte file, then encode it one-shot
and progressively (``--retrain-steps`` per group), and quantize the model data-free to 4 bits as
the baseline measured in the same run. Prints one markdown row per file: bytes, ratio against
fp32, test accuracy of the decoded weights, and the seconds each encode took.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import mlcompress
from mlcompress.options import Quant, Rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--target-size", type=int, default=900)
    parser.add_argument("--fit-steps", type=int, default=600)
    parser.add_argument("--retrain-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| seed | file | bytes | ratio vs fp32 | accuracy | encode s |\n|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for seed in args.seeds:
            model, post = d / f"m{seed}.pt", d / f"p{seed}.safetensors"
            mlcompress.train("mlp-digits", model, seed=seed, device="cpu")
            mlcompress.fit_posterior("mlp-digits", model, post, device="cpu", bits_per_block=12, seed=seed,
                                     target_size=args.target_size, steps=args.fit_steps, eval_every=0)
            runs = [("uncompressed", model, None),
                    ("data-free 4-bit", d / f"q{seed}.mrc", lambda src, dst: mlcompress.encode(src, dst, method=Quant(bits=4))),
                    ("REC one-shot", d / f"o{seed}.mrc", lambda src, dst: mlcompress.encode(post, dst, method=Rec(device="cpu"))),
                    (f"REC progressive, {args.retrain_steps} steps/group", d / f"r{seed}.mrc",
                     lambda src, dst: mlcompress.encode(post, dst, method=Rec(task="mlp-digits", retrain_steps=args.retrain_steps, device="cpu")))]
            for label, path, make in runs:
                seconds = 0.0
                if make is not None:
                    t0 = time.perf_counter()
                    make(model, path)
                    seconds = time.perf_counter() - t0
                acc = mlcompress.evaluate("mlp-digits", path, device="cpu")["accuracy"]
                size = path.stat().st_size if make is not None else 4 * 4810
                print(f"| {seed} | {label} | {size:,} | {4 * 4810 / size:.1f}x | {acc:.4f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
