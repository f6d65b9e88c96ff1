"""REC engine speed on a LeNet-5-sized posterior: batched encode vs a per-block loop, and decode.

The posterior has LeNet-5's (Caffe variant) tensors, 431,080 weights, split into ~608 blocks of
20 bits (MIRACLE's 1.52 kB LeNet-5). Its means and stds come from the data-free construction on
synthetic He-initialised weights, so every block's KL is exactly 20 bits, as after training. The
file is written through the real path (posterior file -> ``encode_rec`` -> ``.mrc``), and the
per-block loop baseline is timed on a few blocks of the same problem (same candidates and
selection rule; it is checked to choose the same indices) and extrapolated to all blocks.

    python benchmarks/rec_encode.py                 # the figures in docs/results.md
    python benchmarks/rec_encode.py --bits 14       # a quick smoke run
    python benchmarks/rec_encode.py --bits 16 --selection orc --kl-gap 6 --loop-blocks 1
                                                    # ORC index bits when KL < the block budget
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import torch

from mlcompress.container import open_mrc
from mlcompress.posterior.datafree import datafree_posterior
from mlcompress.posterior.file import Posterior, PosteriorTensor, save_posterior
from mlcompress.codecs.rec.decoder import decode_weights_torch
from mlcompress.options import Rec as RecOptions
from mlcompress.rec.blocks import RecItem, coefficient_matrix
from mlcompress.rec.compress import encode_rec
from mlcompress.rec.encoder import select_candidates_loop
from mlcompress.codecs.rec.layout import BlockLayout
from mlcompress.codecs.rec.payload import decode_indices

LENET5 = {
    "conv1.weight": (20, 1, 5, 5), "conv1.bias": (20,),
    "conv2.weight": (50, 20, 5, 5), "conv2.bias": (50,),
    "fc1.weight": (500, 800), "fc1.bias": (500,),
    "fc2.weight": (10, 500), "fc2.bias": (10,),
}  # fmt: skip


def build_posterior(bits: int, target_blocks: int, seed: int = 0, kl_gap: int = 0) -> Posterior:
    """LeNet-5 posterior at ``bits`` per block whose blocks hold ``bits - kl_gap`` bits of KL."""
    g = torch.Generator().manual_seed(seed)
    total = sum(math.prod(s) for s in LENET5.values())
    tensors = {}
    for name, shape in LENET5.items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 100
        w = torch.randn(shape, generator=g) * math.sqrt(2.0 / fan_in)
        blocks = max(1, round(w.numel() * target_blocks / total))
        layout = BlockLayout(w.numel(), blocks, seed)
        mean, std, rho, _ = datafree_posterior(w, layout, bits - kl_gap)
        tensors[name] = PosteriorTensor(mean, std, 0.0, rho, blocks)
    return Posterior(tensors=tensors, bits_per_block=bits, layout_seed=seed, parameterization="data-free")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=20)
    ap.add_argument("--blocks", type=int, default=608)
    ap.add_argument("--selection", default="is", choices=["is", "greedy", "orc"])
    ap.add_argument("--loop-blocks", type=int, default=2, help="blocks timed with the per-block loop")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--decode-repeats", type=int, default=10, help="decode runs; best and median reported")
    ap.add_argument("--kl-gap", type=int, default=0, help="blocks hold this many bits less KL than the budget")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    post = build_posterior(args.bits, args.blocks, kl_gap=args.kl_gap)
    weights = sum(t.mean.numel() for t in post.tensors.values())
    blocks = sum(t.num_blocks for t in post.tensors.values())
    with tempfile.TemporaryDirectory() as tmp:
        src = save_posterior(post, Path(tmp) / "lenet5.posterior.safetensors")
        dst = Path(tmp) / "lenet5.mrc"
        start = time.perf_counter()
        summary = encode_rec(src, dst, options=RecOptions(selection=args.selection, seed=1, device=args.device))
        encode_s = time.perf_counter() - start

        # The per-block loop on the first blocks of fc1 (the widest blocks, the typical case).
        items = [RecItem(n, tuple(t.mean.shape), "float32", t.mean.reshape(-1), t.std.reshape(-1),
                         t.prior_mean, t.prior_std, BlockLayout(t.mean.numel(), t.num_blocks, post.layout_seed))
                 for n, t in post.tensors.items()]
        width = max(it.layout.max_block_size for it in items)
        a, b = coefficient_matrix(items, width)
        first_fc1 = sum(it.layout.num_blocks for it in items[: list(LENET5).index("fc1.weight")])
        rows = slice(first_fc1, first_fc1 + args.loop_blocks)
        sizes = torch.full((args.loop_blocks,), items[4].layout.max_block_size)
        start = time.perf_counter()
        loop_idx = select_candidates_loop(a[rows], b[rows], sizes, bits=args.bits, seed=1,
                                          selection=args.selection, block_offset=first_fc1)
        loop_per_block = (time.perf_counter() - start) / args.loop_blocks
        mrc = open_mrc(dst)

        rec = mrc.record("fc1.weight")
        stored = decode_indices(mrc.payload("fc1.weight"), rec.params["blocks"], rec.params["bits"], rec.params["index_coding"])
        same = int((torch.from_numpy(stored[: args.loop_blocks]) == loop_idx).sum())

        decode_times = []
        for _ in range(args.decode_repeats):
            start = time.perf_counter()
            out = open_mrc(dst).tensors()
            decode_times.append(time.perf_counter() - start)
        # Baseline in the same run: the torch implementation of the decoder (the CUDA path) on
        # the CPU, for every REC tensor of the file (same bits; checked).
        torch_times = []
        for _ in range(args.decode_repeats):
            start = time.perf_counter()
            reader = open_mrc(dst)
            by_torch = {}
            for rec in reader.records:
                if rec.codec != "rec":
                    by_torch[rec.name] = reader.tensor(rec.name)
                    continue
                p = rec.params
                idx = decode_indices(reader.payload(rec.name), p["blocks"], p["bits"], p["index_coding"])
                by_torch[rec.name] = decode_weights_torch(
                    BlockLayout(rec.numel, p["blocks"], p["layout_seed"]), torch.from_numpy(idx),
                    seed=p["seed"], prior_mean=p["prior_mean"], prior_std=p["prior_std"]).reshape(rec.shape)
            torch_times.append(time.perf_counter() - start)
        torch_same = all(torch.equal(by_torch[n].view(torch.int32), out[n].view(torch.int32)) for n in out)
        fc1_times = []
        reader = open_mrc(dst)
        for _ in range(args.decode_repeats):
            start = time.perf_counter()
            reader.tensor("fc1.weight")
            fc1_times.append(time.perf_counter() - start)
        file_bytes = dst.stat().st_size
    loop_total = loop_per_block * blocks
    result = {
        "machine": f"{torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()}, torch {torch.__version__}",
        "weights": weights, "blocks": blocks, "bits_per_block": args.bits, "selection": args.selection,
        "kl_bits_per_block": args.bits - args.kl_gap,
        "file_bytes": file_bytes,
        "index_bits_fixed": summary["index_bits_fixed"],
        "index_bits_stored": summary["index_bits_stored"],
        "encode_seconds": round(encode_s, 2),
        "loop_seconds_per_block": round(loop_per_block, 3),
        "loop_seconds_all_blocks_extrapolated": round(loop_total, 1),
        "speedup_vs_loop": round(loop_total / encode_s, 1),
        "loop_agrees_with_batch": f"{same}/{args.loop_blocks}",
        "decode_seconds_best": round(min(decode_times), 4),
        "decode_seconds_median": round(sorted(decode_times)[len(decode_times) // 2], 4),
        "decode_weights_per_second_best": round(weights / min(decode_times)),
        "decode_weights_per_second_median": round(weights / sorted(decode_times)[len(decode_times) // 2]),
        "decode_torch_path_weights_per_second_best": round(weights / min(torch_times)),
        "decode_speedup_vs_torch_path": round(min(torch_times) / min(decode_times), 2),
        "decode_torch_path_same_bits": torch_same,
        "decode_fc1_weights_per_second_best": round(400_000 / min(fc1_times)),
        "decode_fc1_weights_per_second_median": round(400_000 / sorted(fc1_times)[len(fc1_times) // 2]),
    }
    for k, v in result.items():
        print(f"{k:40s} {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
