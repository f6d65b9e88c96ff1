"""Figures for fit-posterior: Mean-KL vs Mean-Var at 20 bits per block (default LeNet-5 / Fashion-MNIST).

Prints (and writes as JSON with --json-out) for each parameterization:

* iterations to reach a common training cross-entropy (the higher of the two runs' final
  100-step running means, so both reach it), the seed's convergence comparison;
* test error of the posterior mean, and after encode -> decode (one REC sample, importance
  sampling, seed 0), beside the uncompressed model; the .mrc size;
* time per training step.

    python benchmarks/fit_posterior.py --steps 300 --lr 3e-3 --bits-per-weight 0.03 --train-epochs 1
    python benchmarks/fit_posterior.py --task mlp-digits --bits-per-weight 1 --min-rec-numel 256 \
        --steps 3000 --lr 3e-3 --train-epochs 40

The CPU of the machine this ran on was shared; see docs/results.md ("fit-posterior").
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from mlcompress.decode import decode_file
from mlcompress.posterior.fit import FitConfig, fit_posterior, save_fit
from mlcompress.rec.compress import RecOptions, encode_rec
from mlcompress.tasks import evaluate_model, get_task, load_task_model, train_task_model
from mlcompress.tasks.evaluation import evaluate_file

WINDOW = 100  # steps in the running mean of the training cross-entropy


def running_mean(values: list[float], window: int = WINDOW) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def first_step_below(curve: list[float], target: float) -> int | None:
    for i, v in enumerate(curve):
        if i + 1 >= WINDOW and v <= target:
            return i + 1
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="lenet5")
    parser.add_argument("--min-rec-numel", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--bits-per-block", type=int, default=20)
    parser.add_argument("--bits-per-weight", type=float, default=0.03)
    parser.add_argument("--train-epochs", type=int, default=1)
    parser.add_argument("--init", type=Path, help="trained LeNet-5 state dict (default: train one)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    task = get_task(args.task)
    work = Path(tempfile.mkdtemp(prefix="fit-bench-"))
    if args.init is not None:
        from mlcompress.checkpoint import load_checkpoint

        init = load_checkpoint(args.init)
        train_seconds = 0.0
    else:
        trained = train_task_model(task, epochs=args.train_epochs, seed=0, device=args.device)
        init, train_seconds = trained.model.state_dict(), trained.seconds
    base = evaluate_model(task, load_task_model(task, init), device=args.device)
    fp32_bytes = 4 * sum(t.numel() for t in init.values())
    print(f"uncompressed {task.name}: test error {100 * (1 - base.metric):.2f}% "
          f"({args.train_epochs} epochs in {train_seconds:.0f} s); fp32 size {fp32_bytes:,} bytes")

    results = {}
    for param in ("mean-kl", "mean-var"):
        config = FitConfig(parameterization=param, bits_per_block=args.bits_per_block,
                           bits_per_weight=args.bits_per_weight, steps=args.steps, lr=args.lr,
                           eval_every=0, checkpoint_every=0, min_rec_numel=args.min_rec_numel)
        fit = fit_posterior(task, init, config, device=args.device)
        posterior = save_fit(fit, task, work / f"{param}.safetensors")
        kl_bits = fit.model.kl_per_block().detach() / 0.6931471805599453
        at_mean = evaluate_file(task, posterior, device=args.device)
        start = time.perf_counter()
        encoded = encode_rec(posterior, work / f"{param}.mrc", options=RecOptions(device=args.device))
        encode_seconds = time.perf_counter() - start
        decode_file(work / f"{param}.mrc", work / f"{param}.decoded.safetensors", device="cpu")
        decoded = evaluate_file(task, work / f"{param}.decoded.safetensors", device=args.device)
        results[param] = {
            "steps": fit.steps,
            "seconds_per_step": fit.seconds / fit.steps,
            "train_ce": running_mean([h["loss"] for h in fit.history]),
            "blocks": fit.layout.num_blocks,
            "kl_bits_min": float(kl_bits.min()),
            "kl_bits_max": float(kl_bits.max()),
            "test_error_mean": 1 - at_mean["accuracy"],
            "test_error_decoded": 1 - decoded["accuracy"],
            "mrc_bytes": encoded["file_bytes"],
            "encode_seconds": encode_seconds,
        }
        r = results[param]
        print(f"{param}: {r['seconds_per_step'] * 1000:.0f} ms/step, final train CE {r['train_ce'][-1]:.4f}, "
              f"KL/block {r['kl_bits_min']:.2f}..{r['kl_bits_max']:.2f} bits, test error at mean "
              f"{100 * r['test_error_mean']:.2f}%, after encode/decode {100 * r['test_error_decoded']:.2f}% "
              f"({r['mrc_bytes']:,} bytes, encode {encode_seconds:.0f} s)", flush=True)

    target = max(results[p]["train_ce"][-1] for p in results)
    print(f"\ncommon training cross-entropy target (higher final {WINDOW}-step mean): {target:.4f}")
    print("| parameterization | steps to target CE | ms/step | KL/block (bits) | test error mean | test error decoded | .mrc bytes |")
    print("|---|---:|---:|---|---:|---:|---:|")
    print(f"| uncompressed | - | - | - | {100 * (1 - base.metric):.2f}% | - | {fp32_bytes:,} |")
    for param, r in results.items():
        r["steps_to_target"] = first_step_below(r["train_ce"], target)
        print(f"| {param} | {r['steps_to_target']} | {1000 * r['seconds_per_step']:.0f} | "
              f"{r['kl_bits_min']:.2f}-{r['kl_bits_max']:.2f} | {100 * r['test_error_mean']:.2f}% | "
              f"{100 * r['test_error_decoded']:.2f}% | {r['mrc_bytes']:,} |")
    if args.json_out:
        summary = {"base_test_error": 1 - base.metric, "target_ce": target, "args": {k: str(v) for k, v in vars(args).items()},
                   "results": {p: {k: v for k, v in r.items() if k != "train_ce"} | {"train_ce_every_100": r["train_ce"][99::100]}
                               for p, r in results.items()}}
        args.json_out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
