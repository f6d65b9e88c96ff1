"""MIRACLE end to end on LeNet-5 / Fashion-MNIST: one command, resumable.

    python examples/miracle_lenet5.py                 # everything, into runs/miracle/
    python examples/miracle_lenet5.py --work DIR --threads 2

Stages (each skipped when its output exists, fits resumed from their checkpoints, so an
interrupted run continues where it stopped):

1. the start model: ``mlcompress train --task lenet5 --epochs 3 --seed 0``;
2. the hashed network: MIRACLE's public LeNet-5 ties fc1 50:1 and conv2 2:1 (431,080 weights ->
   26,580 free variables); it is trained tied, without KL, from the start model
   (:func:`mlcompress.posterior.pretrain.pretrain_tied`); two more tie twice (fc1 100:1, conv2
   4:1) and four times as strongly (fc1 200:1, conv2 8:1, fc2 2:1) for the smallest file;
3. posteriors (``fit-posterior --hash ... --target-size S --kl-margin 1``): Mean-KL at about 1.5,
   3 and 6 kB, Mean-Var at 3 kB, and Mean-KL at 1.5 kB on each strongly tied network;
4. progressive coding with retraining (``encode --task lenet5 --retrain-steps N``) of each;
5. baselines on the same start model: lossless, 4-bit data-free quantization, L² at 80x;
6. the table (docs/results.md, between the ``miracle-lenet5`` markers), the rate-error plot
   (docs/miracle_lenet5.png), and the .mrc files (docs/results/).

Wall times go to ``WORK/times.json`` and the table. The step counts are set so the whole run
fits in about an hour of a 2-core CPU (docs/results.md has the measured time).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

import mlcompress
from mlcompress.checkpoint import load_checkpoint, save_checkpoint
from mlcompress.codecs.rec.hashing import Tying
from mlcompress.options import L2, Lossless, Quant, Rec
from mlcompress.posterior.budget import resolve_hash
from mlcompress.posterior.pretrain import pretrain_tied
from mlcompress.tasks import evaluate_model, get_task, load_task_model

ROOT = Path(__file__).resolve().parent.parent
HASHES = {
    "miracle": {"fc1.weight": 50.0, "conv2.weight": 2.0},  # MIRACLE's public LeNet-5 code
    "strong": {"fc1.weight": 100.0, "conv2.weight": 4.0},  # for the smallest file: ~0.9 bits per variable
    # four times MIRACLE's tying, fc2 tied too: ~1.2 bits per variable at 1.5 kB
    "x4": {"fc1.weight": 200.0, "conv2.weight": 8.0, "fc2.weight": 2.0},
}
PRETRAIN_STEPS = 6000
FIT_STEPS = 8000
RETRAIN_STEPS = 200  # per group; groups halve the blocks left (about 12 groups)
KL_MARGIN = 1.0
# The candidate choice: greedy (the highest-weight candidate). MIRACLE's paper samples by
# importance; its public code notes greedy works better, and here it does: the 3 kB Mean-KL
# posterior decodes to 81.5% (is) / 85.3% (greedy) one-shot and 86.4% / 87.1% progressively, in
# files of the same size (docs/results.md).
SELECTION = "greedy"
SIZES = {"1.5kB": 1500, "3kB": 3000, "6kB": 6000}
RUNS = [("mean-kl", "1.5kB", "miracle"), ("mean-kl", "3kB", "miracle"), ("mean-kl", "6kB", "miracle"),
        ("mean-var", "3kB", "miracle"), ("mean-kl", "1.5kB", "strong"),
        ("mean-kl", "1.5kB", "x4")]
BEGIN, END = "<!-- miracle-lenet5:begin -->", "<!-- miracle-lenet5:end -->"


def log(work: Path, message: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {message}"
    print(line, flush=True)
    with open(work / "log.txt", "a") as f:
        f.write(line + "\n")


class Timer:
    def __init__(self, work: Path) -> None:
        self.path = work / "times.json"
        self.times = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, key: str, fn) -> None:
        start = time.perf_counter()
        fn()
        self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - start
        self.path.write_text(json.dumps(self.times, indent=1))


def accuracy(task_name: str, path: Path) -> float:
    return mlcompress.evaluate(task_name, path, device="cpu")["accuracy"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "miracle")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fit-steps", type=int, default=FIT_STEPS)
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS)
    parser.add_argument("--retrain-steps", type=int, default=RETRAIN_STEPS)
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/ (table, plot, files)")
    parser.add_argument("--skip-l2", action="store_true", help="leave out the L² baseline (a quick check)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the start model, pre-training and fits")
    parser.add_argument("--runs", nargs="*", default=None, help="only these runs (e.g. mean-kl-3kB)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    timer = Timer(work)
    task = get_task("lenet5")

    start = work / "start.pt"
    if not start.exists():
        log(work, f"training the start model (3 epochs, seed {args.seed})")
        timer.run("train", lambda: mlcompress.train("lenet5", start, epochs=3, seed=args.seed, device="cpu"))

    tied_models = {}
    wanted = {key for param, size, key in RUNS
              if not args.runs or f"{param}-{size}" + ("" if key == "miracle" else f"-{key}hash") in args.runs}
    for key, hashing in HASHES.items():
        if key not in wanted:
            continue
        tied = tied_models[key] = work / ("tied.safetensors" if key == "miracle" else f"tied-{key}.safetensors")
        if tied.exists():
            continue
        log(work, f"tied pre-training, {args.pretrain_steps} steps, hashing {hashing}")
        state = load_checkpoint(start)

        def pretrain(hashing=hashing, tied=tied) -> None:
            free = resolve_hash(hashing, {n: t.numel() for n, t in state.items() if t.is_floating_point()})
            # the fit's layout seed is its --seed, and the tying is keyed on the layout seed
            tying = {n: Tying(state[n].numel(), f, args.seed) for n, f in free.items()}
            out = pretrain_tied(task, state, tying, steps=args.pretrain_steps, seed=args.seed, device="cpu",
                                progress=lambda u: log(work, f"  pretrain step {u.done}, loss {u.info['loss']:.4f}")
                                if u.done % 1000 == 0 else None)
            save_checkpoint(out, tied)

        timer.run(f"pretrain {key}", pretrain)
    log(work, f"start model accuracy {accuracy('lenet5', start):.4f}, tied "
        + ", ".join(f"{k} {accuracy('lenet5', p):.4f}" for k, p in tied_models.items()))

    rows = []
    for param, size, key in RUNS:
        name = f"{param}-{size}" + ("" if key == "miracle" else f"-{key}hash")
        if args.runs and name not in args.runs:
            continue
        tied, hashing = tied_models[key], HASHES[key]
        post = work / f"{name}.safetensors"
        mrc = work / f"{name}.mrc"
        if not post.exists():
            ckpt = post.with_name(post.name + ".ckpt")
            log(work, f"fit {name}: {args.fit_steps} steps" + (" (resumed)" if ckpt.exists() else ""))

            def fit(post=post, ckpt=ckpt, param=param, size=size, tied=tied, hashing=hashing) -> None:
                mlcompress.fit_posterior(
                    "lenet5", None if ckpt.exists() else tied, post, resume=ckpt.exists(), checkpoint=ckpt,
                    device="cpu", parameterization=param, steps=args.fit_steps, hash=hashing, kl_margin=KL_MARGIN,
                    seed=args.seed,
                    target_size=SIZES[size], eval_every=1000, checkpoint_every=500,
                    progress=lambda u: log(work, f"  {name} step {u.done}: loss {u.info['status'].loss_avg:.4f}"
                                           + (f", test {u.info['status'].test.metric:.4f}" if u.info['status'].test else ""))
                    if u.phase == "fit" and u.done % 1000 == 0 else None)

            timer.run(f"fit {name}", fit)
        if not mrc.exists():
            log(work, f"progressive encode {name}: {args.retrain_steps} retraining steps per group")

            def encode(post=post, mrc=mrc) -> None:
                mlcompress.encode(post, mrc, method=Rec(task="lenet5", retrain_steps=args.retrain_steps, device="cpu",
                                                        selection=SELECTION),
                                  progress=lambda u: log(work, f"  coded {u.done}/{u.total}, test {u.info['metric']:.4f}")
                                  if u.phase == "REC progressive" else None)

            timer.run(f"encode {name}", encode)
        report = mlcompress.inspect(mrc)
        label = f"REC {param}, progressive ({size}" + ("" if key == "miracle" else f", hashing {hashing}") + ")"
        rows.append({"method": label, "file": mrc, "bytes": report.file_bytes,
                     "ratio": report.fp32_ratio, "accuracy": accuracy("lenet5", mrc),
                     "mean_accuracy": mlcompress.evaluate("lenet5", post, device="cpu")["accuracy"]})
        log(work, f"{name}: {report.file_bytes} bytes, {report.fp32_ratio:.0f}x, accuracy {rows[-1]['accuracy']:.4f}")

    baselines = [("lossless", Lossless()), ("data-free 4-bit", Quant(bits=4)),
                 ("L² target 80x", L2(task="lenet5", target_ratio=80)),
                 ("L² target 300x", L2(task="lenet5", target_ratio=300))]
    if args.skip_l2:
        baselines = baselines[:2]
    for label, method in baselines:
        slug = "".join(c if c.isalnum() else "-" for c in label.lower().replace("²", "2")).strip("-")
        out = work / f"baseline-{slug}.mrc"
        if not out.exists():
            log(work, f"baseline {label}")
            timer.run(f"baseline {label}", lambda out=out, method=method: mlcompress.encode(start, out, method=method))
        report = mlcompress.inspect(out)
        rows.append({"method": label, "file": out, "bytes": report.file_bytes, "ratio": report.fp32_ratio,
                     "accuracy": accuracy("lenet5", out)})
    base_acc = accuracy("lenet5", start)
    rows.insert(0, {"method": "uncompressed (fp32)", "file": start, "bytes": 1_724_320, "ratio": 1.0, "accuracy": base_acc})
    (work / "rows.json").write_text(json.dumps([{**r, "file": str(r["file"])} for r in rows], indent=1))
    convergence = equal_rate(work)
    (work / "convergence.md").write_text(convergence)
    print(convergence)
    if not args.no_docs:
        write_docs(rows, base_acc, timer.times, args, convergence)
    log(work, "done")
    return 0


def equal_rate(work: Path) -> str:
    """Steps each 3 kB fit needed to reach training cross-entropies at equal rate (every block
    within 5% of its KL budget), from the fits' checkpoint histories: the seed's convergence
    claim, re-measured with hashing."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from fit_posterior import BUDGET_SLACK, first_step, running_mean

    budget = 16 - KL_MARGIN
    curves, within = {}, {}
    for param in ("mean-kl", "mean-var"):
        ckpt = work / f"{param}-3kB.safetensors.ckpt"
        if not ckpt.exists():
            return ""
        history = torch.load(ckpt, map_location="cpu", weights_only=True)["history"]
        curves[param] = running_mean([h["loss"] for h in history])
        within[param] = [h["kl_bits_max"] <= budget * BUDGET_SLACK for h in history]
    levels = [round(x, 2) for x in (1.0, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3)
              if any(min(c) <= x for c in curves.values())]
    lines = ["| 3 kB fit | " + " | ".join(f"CE {x}" for x in levels) + " |", "|---|" + "---:|" * len(levels)]
    for param in curves:
        lines.append(f"| {param} | " + " | ".join(str(first_step(curves[param], x, within[param]) or "-")
                                                  for x in levels) + " |")
    return "\n".join(lines) + "\n"


def write_docs(rows: list[dict], base_acc: float, times: dict, args, convergence: str) -> None:
    results = ROOT / "docs" / "results"
    results.mkdir(exist_ok=True)
    lines = [BEGIN, "", "| method | file bytes | ratio vs fp32 | test error | vs uncompressed | error at the posterior mean |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["method"].startswith("REC"):
            shutil.copyfile(r["file"], results / f"lenet5-{Path(r['file']).name}")
            r["method"] += f" `docs/results/lenet5-{Path(r['file']).name}`"
        mean = f"{100 * (1 - r['mean_accuracy']):.2f}%" if "mean_accuracy" in r else ""
        lines.append(f"| {r['method']} | {r['bytes']:,} | {r['ratio']:.0f}x | {100 * (1 - r['accuracy']):.2f}% | "
                     f"{100 * (base_acc - r['accuracy']):+.2f} | {mean} |")
    total = sum(times.values())
    lines += ["", f"Settings: hashing {HASHES['miracle']} unless noted, {args.pretrain_steps} tied pre-training steps, {args.fit_steps} fit steps, "
              f"KL margin {KL_MARGIN} bit, {args.retrain_steps} retraining steps per group, selection {SELECTION}. Wall time on this machine: "
              f"{total / 60:.1f} min in all (" + ", ".join(f"{k} {v / 60:.1f}" for k, v in times.items()) + " min).",
              "", "Steps to a training cross-entropy (100-step mean of sampled weights) with every block within 5% "
              "of its KL budget (the equal-rate condition):", "", convergence, END]
    doc = ROOT / "docs" / "results.md"
    text = doc.read_text()
    block = "\n".join(lines)
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text += "\n" + block + "\n"
    doc.write_text(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'mlcompress[plot]')", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    series = {"REC Mean-KL (MIRACLE hashing)": ("o-", lambda m: m.startswith("REC mean-kl") and "hashing" not in m),
              "REC Mean-KL (strong hashing)": ("D", lambda m: m.startswith("REC mean-kl") and "hashing" in m),
              "REC Mean-Var": ("s", lambda m: m.startswith("REC mean-var")),
              "L²": ("^-", lambda m: m.startswith("L²")), "data-free 4-bit": ("v", lambda m: m.startswith("data-free")),
              "lossless": ("x", lambda m: m.startswith("lossless"))}
    for label, (marker, chosen) in series.items():
        pts = sorted((r["bytes"], 100 * (1 - r["accuracy"])) for r in rows if chosen(r["method"]))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=label)
    ax.axhline(100 * (1 - base_acc), color="gray", ls="--", label="uncompressed")
    ax.set_xscale("log")
    ax.set_xlabel("file bytes (header included)")
    ax.set_ylabel("test error (%)")
    ax.set_title("LeNet-5 / Fashion-MNIST")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "miracle_lenet5.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
