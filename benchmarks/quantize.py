"""Ratio against test accuracy: data-free quantization, L² and magnitude pruning + quantization.

Models: LeNet-5 on Fashion-MNIST (task ``lenet5``) and the digits MLP (``mlp-digits``).
Ratio = fp32 bytes (4 x parameters) / ``.mrc`` file bytes (header, tables, lossless biases all
included). Every accuracy is measured on exactly the weights the file decodes to.

    .venv/bin/python benchmarks/quantize.py [--lenet5 PATH] [--targets 10 20 40] [--threads 2]

``--lenet5 PATH`` reuses a trained checkpoint (else one is trained, 3 epochs, seed 0, and saved
there). Prints one markdown table per model plus the L² optimisation time (wall and CPU).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

from mlcompress.prune import apply_masks, finetune_masked, prune_masks
from mlcompress.quant.calibrate import L2Config, l2_compress
from mlcompress.quant.plan import uniform_plan, write_plan
from mlcompress.quant.quantize import dequantize_uniform
from mlcompress.tasks import evaluate_model, get_task, load_task_model, train_task_model


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def accuracy(task, tensors) -> float:
    return evaluate_model(task, load_task_model(task, tensors), device="cpu").metric


def prune_rows(task, tensors, finetune_steps: int) -> list[tuple]:
    """Magnitude pruning (global) then data-free quantization, optionally fine-tuned in between."""
    rows = []
    for sparsity, bits in ((0.9, 4), (0.9, 3), (0.95, 3)):
        masks = prune_masks(tensors, sparsity)
        pruned = apply_masks(tensors, masks)
        if finetune_steps:
            pruned = apply_masks(finetune_masked(task, pruned, masks, finetune_steps, seed=0), masks)
        plan = uniform_plan(pruned, bits)
        size = write_plan(None, pruned, plan, {})
        how = f"fine-tuned {finetune_steps} steps" if finetune_steps else "no fine-tuning"
        rows.append((f"magnitude prune {sparsity:.0%} + {bits}-bit ({how})", size.fp32_ratio,
                     accuracy(task, dequantize_uniform(pruned, plan)), ""))
    return rows


def rows_for(task, tensors, targets, calib_samples: int) -> list[tuple]:
    rows = [("fp32 (uncompressed)", 1.0, accuracy(task, tensors), "")]
    for per_channel in (False, True):
        for bits in (8, 4, 3, 2):
            plan = uniform_plan(tensors, bits, per_channel=per_channel)
            size = write_plan(None, tensors, plan, {})
            label = f"data-free {bits}-bit" + (" per-channel" if per_channel else "")
            rows.append((label, size.fp32_ratio, accuracy(task, dequantize_uniform(tensors, plan)),
                         f"{size.bits_per_quantized_weight:.2f} bit/w stored"))
    rows += prune_rows(task, tensors, finetune_steps=0)
    rows += prune_rows(task, tensors, finetune_steps=300)
    model = load_task_model(task, tensors)
    calib = task.calibration(calib_samples)
    for target in targets:
        wall, cpu = time.perf_counter(), cpu_seconds()
        result = l2_compress(model, calib, L2Config(target_ratio=target))
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        size = write_plan(None, result.tensors, result.plan, {})
        rows.append((f"L² target {target:g}x", size.fp32_ratio, accuracy(task, result.dequantized),
                     f"sparsity {result.sparsity:.1%}, {wall:.0f} s wall / {cpu:.0f} s CPU"))
        print(f"  L² {target:g}x done: ratio {size.fp32_ratio:.1f}", flush=True)
    return rows


def table(name: str, rows: list[tuple]) -> str:
    base = rows[0][2]
    lines = [f"### {name}", "", "| method | ratio | test accuracy | drop (points) | notes |", "|---|---:|---:|---:|---|"]
    for label, ratio, acc, notes in rows:
        lines.append(f"| {label} | {ratio:.1f}x | {acc:.4f} | {100 * (base - acc):+.2f} | {notes} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lenet5", type=Path, default=Path("lenet5.pt"))
    ap.add_argument("--targets", type=float, nargs="+", default=[10, 20, 40])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-lenet5", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    digits = get_task("mlp-digits")
    d_model = train_task_model(digits, seed=0, device="cpu").model
    d_tensors = {k: v.detach().cpu() for k, v in d_model.state_dict().items()}
    # mlp-digits has 4,810 parameters: header and biases alone cap its file ratio near 14x
    print(table("mlp-digits (4,810 parameters; 1,000 calibration inputs)", rows_for(digits, d_tensors, [5, 8, 10], 1000)), flush=True)
    if args.skip_lenet5:
        return
    lenet = get_task("lenet5")
    if args.lenet5.exists():
        tensors = {k: v.float() for k, v in torch.load(args.lenet5, weights_only=True).items()}
    else:
        model = train_task_model(lenet, epochs=3, seed=0, device="cpu").model
        tensors = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save(tensors, args.lenet5)
    print(table("LeNet-5 / Fashion-MNIST (431,080 parameters; 1,000 calibration inputs)",
                rows_for(lenet, tensors, args.targets, 1000)), flush=True)


if __name__ == "__main__":
    main()
