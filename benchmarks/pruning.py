"""Robustness curves: test accuracy of posteriors pruned by random, magnitude and KL ranking.

For every posterior file, criterion (global scope, ranked on the posterior as docs/pruning.md
says) and fraction pruned, the accuracy of

(a) the posterior mean with the pruned weights at the prior mean, and
(b) ``--samples`` weight samples from the posterior (each a model REC could decode: per variable
    ``mean + std * noise``, expanded through any hashing), the pruned weights at the prior mean,
    averaged.

The samples use the same noise for every criterion and fraction (one seeded generator restarted
per curve), so curves differ by the pruning alone.

    .venv/bin/python benchmarks/pruning.py --task mlp-digits \\
        --posterior kl=/tmp/x/kl.safetensors --posterior var=/tmp/x/var.safetensors \\
        [--fractions 0,0.1,0.5] [--samples 3] [--seed 0] [--plot curves.png] [--json curves.json]

Prints one markdown table per evaluation (rows: posterior x criterion; columns: fractions).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from mlcompress.posterior.file import Posterior, load_posterior
from mlcompress.posterior.meankl import NATS_PER_BIT
from mlcompress.prune import CRITERIA, posterior_masks, pruned_weights, variable_kl
from mlcompress.tasks import Task, evaluate_model, get_task, load_task_model

FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.95)
EVALUATIONS = {"mean": "(a) posterior mean, pruned weights at the prior mean",
               "samples": "(b) posterior samples, pruned weights at the prior mean"}


def accuracy(task: Task, state: dict[str, torch.Tensor], device: str) -> float:
    return evaluate_model(task, load_task_model(task, state, device), device=device).metric


def sample_values(posterior: Posterior, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One posterior draw per coded variable: what a REC decoder could return."""
    return {n: pt.mean + pt.std * torch.randn(pt.mean.shape, generator=generator) for n, pt in posterior.tensors.items()}


def kl_bits_left(posterior: Posterior, masks: dict[str, torch.Tensor]) -> float:
    """KL (bits) of the variables left unpruned: what the pruned posterior still costs."""
    total = 0.0
    for name, pt in posterior.tensors.items():
        kl = variable_kl(pt)
        total += float(kl[~masks[name]].sum() if name in masks else kl.sum())
    return total / NATS_PER_BIT


def curve(task: Task, posterior: Posterior, criterion: str, fractions: list[float], samples: int, seed: int,
          device: str) -> dict[str, list[float]]:
    """Accuracy at the mean and averaged over samples, and the KL left, at every fraction."""
    out: dict[str, list[float]] = {"mean": [], "samples": [], "kl_bits_left": []}
    for fraction in fractions:
        masks = posterior_masks(posterior, fraction, criterion=criterion, scope="global", seed=seed)
        out["mean"].append(accuracy(task, pruned_weights(posterior, masks), device))
        generator = torch.Generator().manual_seed(seed)
        draws = [accuracy(task, pruned_weights(posterior, masks, sample_values(posterior, generator)), device)
                 for _ in range(samples)]
        out["samples"].append(sum(draws) / len(draws) if draws else float("nan"))
        out["kl_bits_left"].append(kl_bits_left(posterior, masks))
    return out


def table(results: dict[str, dict[str, dict[str, list[float]]]], fractions: list[float], key: str, title: str,
          fmt: str = ".4f") -> str:
    head = "| posterior | criterion | " + " | ".join(f"{f:.0%}" for f in fractions) + " |"
    lines = [f"### {title}", "", head, "|---|---|" + "---:|" * len(fractions)]
    for name, by_criterion in results.items():
        for criterion, numbers in by_criterion.items():
            lines.append(f"| {name} | {criterion} | " + " | ".join(f"{v:{fmt}}" for v in numbers[key]) + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, dict[str, list[float]]]], fractions: list[float], path: Path,
         metric: str) -> None:
    """One panel per evaluation, a line per posterior x criterion (matplotlib: an optional extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(EVALUATIONS), figsize=(6 * len(EVALUATIONS), 4.5), sharey=True)
    for ax, (key, title) in zip(axes, EVALUATIONS.items()):
        for name, by_criterion in results.items():
            for criterion, numbers in by_criterion.items():
                ax.plot(fractions, numbers[key], marker="o", label=f"{name} / {criterion}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("fraction of coded weight variables pruned")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"test {metric}")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_posteriors(specs: list[str]) -> dict[str, Path]:
    named = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"error: --posterior wants NAME=PATH, got {spec!r}")
        named[name] = Path(path)
    return named


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--posterior", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--task", required=True)
    ap.add_argument("--data", default=None)
    ap.add_argument("--fractions", default=",".join(f"{f:g}" for f in FRACTIONS))
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot", type=Path, default=None, metavar="PATH.png")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fractions = [float(f) for f in args.fractions.split(",")]
    task = get_task(args.task, args.data)
    posteriors = {name: load_posterior(path) for name, path in parse_posteriors(args.posterior).items()}
    results: dict[str, dict[str, Any]] = {}
    for name, posterior in posteriors.items():
        results[name] = {c: curve(task, posterior, c, fractions, args.samples, args.seed, args.device)
                         for c in CRITERIA}
        print(f"{name}: {posterior.parameterization}, KL {results[name]['kl']['kl_bits_left'][0]:.0f} bits "
              f"unpruned", flush=True)
    print()
    for key, title in EVALUATIONS.items():
        title += f" ({args.samples} samples)" if key == "samples" else ""
        print(table(results, fractions, key, f"test {task.metric_name}, {title}") + "\n", flush=True)
    print(table(results, fractions, "kl_bits_left", "KL (bits) left in the unpruned variables", ".0f"), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"task": args.task, "metric": task.metric_name, "fractions": fractions,
                                         "samples": args.samples, "seed": args.seed, "results": results}, indent=1))
    if args.plot is not None:
        plot(results, fractions, args.plot, task.metric_name)


if __name__ == "__main__":
    main()
