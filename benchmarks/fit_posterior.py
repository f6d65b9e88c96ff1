"""Figures for fit-posterior: Mean-KL vs Mean-Var at 20 bits per block (default LeNet-5 / Fashion-MNIST).

For each parameterization it trains a posterior from the same start model, with identical settings
and the same initial distribution, then records

* the training cross-entropy curve (task loss of sampled weights) and each block's KL;
* test error at the posterior mean, of plain posterior samples, and after encode -> decode (REC
  with importance sampling, several encoder seeds: one REC sample varies by a few points);
* time per training step and the .mrc size.

The two runs are independent processes (``--params mean-kl`` / ``--params mean-var``), so on a
2-core machine they run side by side with one thread each; ``--report`` then compares them:
"steps to target CE" is the first step at which the 100-step running mean of the training CE
reaches the higher of the two runs' final values, and, for an equal-rate comparison, the first
step at which that holds *and* every block's KL is within 5% of its budget (Mean-KL always is).
Runs checkpoint every 500 steps into ``--work`` and continue from there when restarted.

    python benchmarks/fit_posterior.py --work runs --init lenet5.pt --steps 10000 --params mean-kl &
    python benchmarks/fit_posterior.py --work runs --init lenet5.pt --steps 10000 --params mean-var
    python benchmarks/fit_posterior.py --work runs --report
    python benchmarks/fit_posterior.py --report runs-a/mean-kl.json runs-b/mean-var.json
    python benchmarks/fit_posterior.py --work runs --init lenet5.pt --time-steps 50 --threads 2

Short runs: ``--task mlp-digits --bits-per-weight 1 --min-rec-numel 256 --steps 3000 --train-epochs 40``.
See docs/results.md ("fit-posterior") for what was measured and on which machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mlcompress.api import decode_file
from mlcompress.posterior.fit import FitConfig, FitStatus, fit_posterior, save_fit
from mlcompress.options import Rec as RecOptions
from mlcompress.rec.compress import encode_rec
from mlcompress.tasks import evaluate_model, get_task, load_task_model, train_task_model
from mlcompress.posterior.evaluation import evaluate_file

WINDOW = 100  # steps in the running mean of the training cross-entropy
BUDGET_SLACK = 1.05  # "within budget": every block's KL at most 5% above it


def running_mean(values: list[float], window: int = WINDOW) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def first_step(curve: list[float], target: float, ok: list[bool] | None = None) -> int | None:
    """First step (1-based) with a full window whose running mean is <= target (and ok[i])."""
    for i, v in enumerate(curve):
        if i + 1 >= WINDOW and v <= target and (ok is None or ok[i]):
            return i + 1
    return None


def start_model(args, task) -> tuple[dict, float]:
    if args.init is not None:
        from mlcompress.checkpoint import load_checkpoint

        return load_checkpoint(args.init), 0.0
    trained = train_task_model(task, epochs=args.train_epochs, seed=0, device=args.device)
    return trained.model.state_dict(), trained.seconds


def fit_config(args, param: str, steps: int, checkpoint_every: int) -> FitConfig:
    """The fit settings from the command line (the same for every run being compared)."""
    return FitConfig(parameterization=param, bits_per_block=args.bits_per_block, kl_margin=args.kl_margin,
                     bits_per_weight=args.bits_per_weight, steps=steps, lr=args.lr,
                     eval_every=0, checkpoint_every=checkpoint_every, min_rec_numel=args.min_rec_numel)


def run_one(args, task, init, param: str) -> dict:
    work: Path = args.work
    config = fit_config(args, param, args.steps, checkpoint_every=500)
    checkpoint = work / f"{param}.ckpt"
    started = time.perf_counter()
    first_step_here: list[int] = []

    def progress(s: FitStatus) -> None:
        if not first_step_here:
            first_step_here.append(s.step)
        if s.step % args.log_every == 0 or s.step == s.steps:
            print(f"{param} step {s.step}/{s.steps}: CE(100) {s.loss_avg:.4f}, KL/block "
                  f"{s.kl_bits_min:.2f}..{s.kl_bits_max:.2f} bits, {s.seconds / max(s.step, 1) * 1000:.0f} ms/step "
                  f"(this process {time.perf_counter() - started:.0f} s)", flush=True)

    fit = fit_posterior(task, init, config, device=args.device, checkpoint=checkpoint,
                        resume=checkpoint.exists(), progress=progress)
    timed_steps = fit.steps - first_step_here[0] + 1 if first_step_here else 0  # this process's steps
    posterior = save_fit(fit, task, work / f"{param}.safetensors", force=True)
    kl_bits = fit.model.kl_per_block().detach() / 0.6931471805599453
    at_mean = evaluate_file(task, posterior, device=args.device)
    sampled = evaluate_file(task, posterior, samples=args.samples, device=args.device)
    decoded, encode_seconds, mrc_bytes = [], [], None
    for seed in range(args.encode_seeds):
        mrc = work / f"{param}.seed{seed}.mrc"
        t0 = time.perf_counter()
        encoded = encode_rec(posterior, mrc, options=RecOptions(device=args.device, seed=seed), force=True)
        encode_seconds.append(time.perf_counter() - t0)
        mrc_bytes = encoded["file_bytes"]
        out = work / f"{param}.seed{seed}.decoded.safetensors"
        decode_file(mrc, out, device="cpu", force=True)
        decoded.append(1 - evaluate_file(task, out, device=args.device)["accuracy"])
    return {
        "param": param,
        "lr": config.lr,
        "steps": fit.steps,
        "seconds_per_step": fit.seconds / max(timed_steps, 1),
        "threads": torch.get_num_threads(),
        "loss": [h["loss"] for h in fit.history],
        "kl_bits_max_per_step": [h.get("kl_bits_max", float("nan")) for h in fit.history],
        "budget_bits": args.bits_per_block - args.kl_margin,
        "kl_margin": args.kl_margin,
        "blocks": fit.layout.num_blocks,
        "kl_bits_min": float(kl_bits.min()),
        "kl_bits_max": float(kl_bits.max()),
        "test_error_mean": 1 - at_mean["accuracy"],
        "test_error_samples": 1 - sampled["accuracy"],
        "test_error_samples_std": sampled.get("accuracy_std", 0.0),
        "test_error_decoded": decoded,
        "mrc_bytes": mrc_bytes,
        "encode_seconds": encode_seconds,
    }


def time_steps(args, task, init) -> None:
    """ms per training step of each parameterization, measured in this one process."""
    for param in args.params.split(","):
        times = []
        for steps in (5, 5 + args.time_steps):  # the difference excludes set-up and warm-up
            config = fit_config(args, param, steps, checkpoint_every=0)
            times.append(fit_posterior(task, init, config, device=args.device).seconds)
        print(f"{param}: {1000 * (times[1] - times[0]) / args.time_steps:.0f} ms/step "
              f"({torch.get_num_threads()} threads, {args.device}, batch {task.batch_size})", flush=True)


def report(paths: list[Path]) -> None:
    """Compare finished runs: result files, or directories holding mean-kl.json / mean-var.json."""
    files = []
    for path in paths:
        files += [path / f"{p}.json" for p in ("mean-kl", "mean-var") if (path / f"{p}.json").exists()] if path.is_dir() else [path]
    if not files:
        raise SystemExit(f"no results in {', '.join(map(str, paths))}")
    results = {}
    for path in files:
        r = json.loads(path.read_text())
        margin = f", KL margin {r['kl_margin']:g} bits" if r.get("kl_margin") else ""
        results[f"{r['param']}, lr {r.get('lr', path.parent.name)}{margin}"] = r
    base = json.loads((files[0].parent / "base.json").read_text())
    curves = {p: running_mean(r["loss"]) for p, r in results.items()}
    # Per step: is every block within 5% of its budget (the equal-rate condition)?
    within = {p: [k <= r["budget_bits"] * BUDGET_SLACK for k in r["kl_bits_max_per_step"]] for p, r in results.items()}
    target = max(c[-1] for c in curves.values())
    print(f"uncompressed: test error {100 * base['test_error']:.2f}%, fp32 {base['fp32_bytes']:,} bytes")
    print(f"common training cross-entropy target (higher final {WINDOW}-step mean): {target:.4f}")
    print("| parameterization | steps | steps to target CE | same, every block within 5% of budget | "
          "ms/step | KL/block at end (bits) | test error: mean / samples / after encode->decode | .mrc bytes |")
    print("|---|---:|---:|---:|---:|---|---|---:|")
    print(f"| uncompressed | - | - | - | - | - | {100 * base['test_error']:.2f}% | {base['fp32_bytes']:,} |")
    for param, r in results.items():
        dec = r["test_error_decoded"]
        dec_text = f"{100 * statistics.mean(dec):.2f}% (seeds: {', '.join(f'{100 * d:.1f}' for d in dec)})"
        print(f"| {param} | {r['steps']} | {first_step(curves[param], target)} | "
              f"{first_step(curves[param], target, within[param])} | {1000 * r['seconds_per_step']:.0f} | "
              f"{r['kl_bits_min']:.2f}-{r['kl_bits_max']:.2f} | {100 * r['test_error_mean']:.2f}% / "
              f"{100 * r['test_error_samples']:.2f}% / {dec_text} | {r['mrc_bytes']:,} |")
    thresholds = [t for t in (2.0, 1.5, 1.0, 0.8, 0.7, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1)
                  if t < min(c[WINDOW - 1] for c in curves.values()) and any(min(c) <= t for c in curves.values())][:8]
    print("\nsteps to a training CE (100-step mean) at or below t, with every block within 5% of its budget:")
    print("| run | " + " | ".join(f"t = {t}" for t in thresholds) + " |")
    print("|---|" + "---:|" * len(thresholds))
    for label, r in results.items():
        print(f"| {label} | " + " | ".join(str(first_step(curves[label], t, within[label]) or "-") for t in thresholds) + " |")
    print("\ntraining CE (100-step running mean) every 1000 steps:")
    for param, c in curves.items():
        print(f"  {param}: " + ", ".join(f"{c[i]:.3f}" for i in range(999, len(c), 1000)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="lenet5")
    parser.add_argument("--work", type=Path, default=Path("fit-runs"), help="directory for checkpoints and results")
    parser.add_argument("--params", default="mean-kl,mean-var")
    parser.add_argument("--report", nargs="*", type=Path, metavar="RUN",
                        help="only compare finished runs (result .json files or run directories; default --work)")
    parser.add_argument("--time-steps", type=int, default=0,
                        help="only time this many training steps of each parameterization (after 5 warm-up steps)")
    parser.add_argument("--min-rec-numel", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--lr", type=float, default=None,
                        help="Adam learning rate for every run (default: fit-posterior's per parameterization)")
    parser.add_argument("--bits-per-block", type=int, default=20)
    parser.add_argument("--bits-per-weight", type=float, default=0.03)
    parser.add_argument("--kl-margin", type=float, default=0.0, help="train blocks to this many bits below --bits-per-block")
    parser.add_argument("--train-epochs", type=int, default=3)
    parser.add_argument("--init", type=Path, help="trained model of the task (default: train one)")
    parser.add_argument("--samples", type=int, default=5, help="posterior samples to evaluate")
    parser.add_argument("--encode-seeds", type=int, default=3, help="REC encodes (seeds 0..N-1) to evaluate")
    parser.add_argument("--log-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.report is not None:
        report(args.report or [args.work])
        return
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    task = get_task(args.task)
    init, train_seconds = start_model(args, task)
    base = evaluate_model(task, load_task_model(task, init), device=args.device)
    fp32_bytes = 4 * sum(t.numel() for t in init.values())
    (args.work / "base.json").write_text(json.dumps({"test_error": 1 - base.metric, "fp32_bytes": fp32_bytes}))
    print(f"uncompressed {task.name}: test error {100 * (1 - base.metric):.2f}%; fp32 {fp32_bytes:,} bytes", flush=True)
    if args.time_steps:
        time_steps(args, task, init)
        return
    for param in args.params.split(","):
        result = run_one(args, task, init, param)
        (args.work / f"{param}.json").write_text(json.dumps(result))
        dec = result["test_error_decoded"]
        print(f"{param}: done, {result['seconds_per_step'] * 1000:.0f} ms/step, test error at mean "
              f"{100 * result['test_error_mean']:.2f}%, decoded {[round(100 * d, 2) for d in dec]}", flush=True)
    if len(args.params.split(",")) > 1:
        report([args.work])


if __name__ == "__main__":
    main()
