"""Whole-file REC decode speed on the CPU: one source tree against another, in one run.

Why a benchmark of its own: REC decode on the CPU is dominated by fixed per-op costs (a LeNet-5
file has eight small REC tensors), so a refactor of the integer recipe can slow it down without
changing a single bit. This script decodes a LeNet-5-shaped set of tensors (431,080 weights,
~611 blocks of 20-bit indices, fixed seeds) with each tree's ``decode_weights(..., device="cpu")``
and, for reference, its torch path (``decode_weights_torch``), one thread, best of ``--repeats``.
Each tree runs in its own subprocess (``PYTHONPATH=<tree>``); trees alternate for ``--rounds``
rounds so that drift on a shared machine hits both, and every round checks that all trees
decode to the same bits.

    git worktree add /tmp/old 263d480
    python benchmarks/rec_decode_backends.py --tree old=/tmp/old --tree new=.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path


def _worker(shapes: dict[str, tuple[int, ...]], repeats: int, blocks_total: int, bits: int) -> dict:
    import torch

    try:  # the package layout after the codecs move, then the one before it
        from mlcompress.codecs.rec.decoder import decode_weights, decode_weights_torch
        from mlcompress.codecs.rec.layout import BlockLayout
    except ModuleNotFoundError:
        from mlcompress.rec.decoder import decode_weights, decode_weights_torch
        from mlcompress.rec.layout import BlockLayout
    import mlcompress

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    total = sum(math.prod(s) for s in shapes.values())
    jobs = []
    for i, shape in enumerate(shapes.values()):
        numel = math.prod(shape)
        blocks = max(1, round(numel * blocks_total / total))
        layout = BlockLayout(numel, blocks, seed=1000 + i)
        jobs.append((layout, torch.randint(0, 2**bits, (blocks,), generator=g)))
    kwargs = dict(seed=2024, prior_mean=0.0, prior_std=0.05)

    def run(fn, **extra):
        return [fn(layout, idx, **kwargs, **extra) for layout, idx in jobs]

    result = {"mlcompress": str(Path(mlcompress.__file__).parent), "numel": total}
    for name, fn, extra in (("cpu", decode_weights, {"device": "cpu"}), ("torch", decode_weights_torch, {})):
        out = run(fn, **extra)  # warm-up (tables, first-call costs)
        digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in out)).hexdigest()
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(fn, **extra)
            best = min(best, time.perf_counter() - t0)
        result[name] = {"seconds": best, "mweights_per_s": total / best / 1e6, "sha256": digest}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                    help="a source tree to time (repeatable); default: this one")
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds over the trees")
    ap.add_argument("--repeats", type=int, default=10, help="timed decodes per round (best counts)")
    ap.add_argument("--blocks", type=int, default=611, help="blocks over the whole model")
    ap.add_argument("--bits", type=int, default=20, help="bits per block index")
    ap.add_argument("--worker", metavar="SHAPES_JSON", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        shapes = {k: tuple(v) for k, v in json.loads(args.worker).items()}
        print(json.dumps(_worker(shapes, args.repeats, args.blocks, args.bits)))
        return
    # The worker may run an older tree, so the shapes come from this one (the REC benchmark's).
    from rec_encode import LENET5
    trees = [t.split("=", 1) for t in args.tree] or [["this", str(Path(__file__).resolve().parents[1])]]
    best: dict[str, dict[str, float]] = {}
    for r in range(args.rounds):
        digests = set()
        for name, path in trees:
            env = dict(os.environ, PYTHONPATH=str(Path(path).resolve()), OMP_NUM_THREADS="1")
            cmd = [sys.executable, __file__, "--worker", json.dumps(LENET5), "--repeats", str(args.repeats),
                   "--blocks", str(args.blocks), "--bits", str(args.bits)]
            res = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
            if not res["mlcompress"].startswith(str(Path(path).resolve())):
                raise SystemExit(f"{name}: imported mlcompress from {res['mlcompress']}, not {path}")
            digests |= {res["cpu"]["sha256"], res["torch"]["sha256"]}
            line = "  ".join(f"{k} {res[k]['mweights_per_s']:6.2f} M/s" for k in ("cpu", "torch"))
            print(f"round {r}  {name:>6}: {line}", flush=True)
            for k in ("cpu", "torch"):
                best.setdefault(name, {})[k] = max(best.get(name, {}).get(k, 0.0), res[k]["mweights_per_s"])
        if len(digests) != 1:
            raise SystemExit(f"round {r}: the trees or paths decode to different bits: {sorted(digests)}")
    print(f"bit-identical across trees and paths; best of {args.rounds} rounds x {args.repeats} repeats, 1 thread:")
    for name, v in best.items():
        print(f"  {name:>6}: decode_weights(cpu) {v['cpu']:6.2f} M weights/s   torch path {v['torch']:6.2f} M weights/s")


if __name__ == "__main__":
    main()
