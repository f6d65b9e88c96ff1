"""Whole-file decode speed of .mrc files on the CPU, hashed REC files beside their baselines.

    python benchmarks/rec_decode_file.py runs/miracle/mean-kl-3kB.mrc runs/miracle/baseline-lossless.mrc
    python benchmarks/rec_decode_file.py --lenet5-shapes          # synthetic: hashed vs not, same blocks

Each file is opened and fully decoded (``open_mrc(path).tensors()``: header, CRCs, indices,
candidates, layout, and for hashed tensors the expansion to every weight), best of ``--repeats``
after one warm-up, one thread. Weights/s counts the decoded weights (431,080 for LeNet-5
whatever the hashing), which is what a user waits for. ``--lenet5-shapes`` writes two files in
the same run as the baseline: MIRACLE's hashed LeNet-5 (fc1 50:1, conv2 2:1) and the same
tensors unhashed with the same number of blocks.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from mlcompress.container import open_mrc


def decode_speed(path: Path, repeats: int) -> tuple[int, float]:
    f = open_mrc(path)
    numel = sum(r.numel for r in f.records if r.alias_of is None)
    f.tensors()  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        open_mrc(path).tensors()
        best = min(best, time.perf_counter() - t0)
    return numel, best


def lenet5_files(directory: Path) -> list[Path]:
    """A hashed LeNet-5 REC file and its unhashed twin with the same blocks (random posteriors)."""
    from mlcompress.posterior.file import Posterior, PosteriorTensor
    from mlcompress.rec.compress import encode_rec

    shapes = {"conv1.weight": (20, 1, 5, 5), "conv1.bias": (20,), "conv2.weight": (50, 20, 5, 5),
              "conv2.bias": (50,), "fc1.weight": (500, 800), "fc1.bias": (500,), "fc2.weight": (10, 500),
              "fc2.bias": (10,)}
    hashing = {"conv2.weight": 2, "fc1.weight": 50}
    out = []
    for hashed in (True, False):
        g = torch.Generator().manual_seed(0)
        tensors = {}
        for name, shape in shapes.items():
            numel = math.prod(shape)
            free = numel // hashing[name] if hashed and name in hashing else numel
            blocks = max(1, round(math.prod(shape) // hashing.get(name, 1) * 0.85 / 16))
            tensors[name] = PosteriorTensor(
                mean=torch.randn(free if hashed and name in hashing else numel, generator=g).reshape(
                    (free,) if hashed and name in hashing else shape) * 0.05,
                std=torch.full((free,) if hashed and name in hashing else shape, 0.03), prior_mean=0.0,
                prior_std=0.1, num_blocks=blocks, shape=shape if hashed and name in hashing else None)
        path = directory / ("lenet5-hashed.mrc" if hashed else "lenet5-unhashed.mrc")
        encode_rec("synthetic", path, posterior=Posterior(tensors=tensors, bits_per_block=16, layout_seed=0))
        out.append(path)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--lenet5-shapes", action="store_true")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    files = list(args.files)
    with tempfile.TemporaryDirectory() as tmp:
        if args.lenet5_shapes:
            files += lenet5_files(Path(tmp))
        print(f"| file | bytes | weights | decode ms | M weights/s |\n|---|---:|---:|---:|---:|")
        for path in files:
            numel, seconds = decode_speed(path, args.repeats)
            print(f"| {path.name} | {path.stat().st_size:,} | {numel:,} | {1e3 * seconds:.1f} | {numel / seconds / 1e6:.1f} |")


if __name__ == "__main__":
    main()
