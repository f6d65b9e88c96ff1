"""``--allocation hessian`` against ``auto``/``norm``/``equal`` at equal file size.

    OMP_NUM_THREADS=1 flock runs/heavy.lock .venv/bin/python benchmarks/allocation_hessian.py \
        [--only lenet5,mlp-digits,gpt2] [--calib-windows 128]

Every file is a real ``.mrc`` written by ``mlcompress.encode`` with ``Quant(target_ratio=R,
allocation=A)`` (nearest rounding, one step per tensor), the four allocations of one model and
ratio in the same run, so the baseline (``auto``, the default) sits beside every figure.

* Classifiers (two LeNet-5s on Fashion-MNIST at 10/20/30x, two mlp-digits at 5/8/10x, the
  models of ``benchmarks/quant_sweep.py``): ``hessian`` draws its Fisher diagonal from the
  task's 1,000 calibration images (training set); accuracy drop on the test set with the
  standard error of the paired difference, and the mean KL to the fp32 model, both from one
  ``mlcompress.diverge`` pass (``quant_sweep.fidelity``).
* The two local GPT-2s (``benchmarks/lm_quant.py``) at 16, 10.67 and 8x (2, 3, 4 bits per
  parameter): ``hessian`` uses the task ``lm`` on the held-out text after its first 24,000
  characters (the model's training text is not stored), ``--calib-windows`` of its training
  windows; the KL is ``mlcompress diverge REF FILE --data gpt2-local-val-24k.txt --score all``
  (every position of the first 24,000 characters, which the calibration text does not hold).
  ``auto`` is ``equal`` on a GPT-2 (it has LayerNorms), so its files are ``equal``'s.

A fifth row, ``(b)``, is the other candidate sensitivity (:func:`layer_moments`: layer-input
second moments, the diagonal of GPTQ's ``XᵀX``, times the output-gradient moments), put through
the same step rule and search (``mlcompress.quant.rate.search_step``) so the two estimates
are compared at equal size; its per-tensor step ratio to the Fisher's is kept in the rows.

Group-wise parts (``--only lenet5-channels,gpt2-groups``): the same models with ``--per-channel``
(the LeNet-5s at 10/20/30x) and ``--group-size G`` (the GPT-2s at 2/3/4 bits per parameter,
``--group-sizes``, default 64 and 128), four rows per model, ratio and grouping, in the same run:

* ``auto``: ``--allocation auto`` with the same groups (RMS-scaled group steps, no data);
* ``hessian-rms``: tensor steps from the Fisher, group steps scaled by group RMS / tensor RMS
  (``--allocation hessian`` before group steps came from the Fisher);
* ``hessian``: ``--allocation hessian`` as it is now (``mlcompress.encode``): group steps from
  the groups' own Fisher means, never coarser than the RMS scaling, on quarter octaves
  (``rate.group_step_factors``);
* ``fisher-groups``: the uncapped rule, ``Δ_g ∝ mean(F_g)^-1/2`` for every group
  (``rate.fisher_group_factors``, on quarter octaves too), the candidate measured beside it;
* ``rms-grid``: the RMS scaling on quarter octaves (no Fisher in the groups): how much of a
  difference is the cheaper step-code table alone.

The rows other than ``auto`` and ``hessian`` share one Fisher estimate per model (the
library's: same calibration inputs, same seeded labels) and go through the library's search
(``rate.search_step``).

Tables go to stdout (markdown), progress to stderr, the rows to
``runs/allocation-hessian/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import mlcompress
from mlcompress.assembly import base_metadata
from mlcompress.checkpoint import load_checkpoint
from mlcompress.quant.plan import quantizable_names, write_plan
from mlcompress.codecs.quant.step import group_sizes, rms_factors
from mlcompress.codecs.quant.uniform import GroupLayout
from mlcompress.quant.rate import fisher_group_factors, quarter_octaves, search_step
from mlcompress.quant.sensitivity import fisher_diagonal, group_sensitivity, sampled_log_likelihoods, tensor_sensitivity
from mlcompress.tasks import get_task, load_task_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_quant import diverge_kl, mean_kl  # noqa: E402
from quant_sweep import fidelity  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "runs" / "bench-models"
WORK = ROOT / "runs" / "allocation-hessian"
ALLOCATIONS = ("auto", "norm", "equal", "hessian")
#: The other candidate estimate, measured beside the library's (not a library option).
MOMENTS = "moments"
ROWS = ALLOCATIONS + (MOMENTS,)
CLASSIFIERS = {"lenet5": (10, 20, 30), "mlp-digits": (5, 8, 10)}
GPT2_RATIOS = (16, 32 / 3, 8)
GPT2_MODELS = ("gpt2-local", "gpt2-local-seed1")
LABELS = {"hessian": "hessian (Fisher, a)", MOMENTS: "(b) input x output-gradient moments"}
#: Characters at the start of the held-out text that are scored and therefore not calibrated on.
SCORED_CHARS = 24_000


def header(argv: list[str]) -> str:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python "
            f"benchmarks/allocation_hessian.py {' '.join(argv)}` at {commit}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {cpu}, {os.cpu_count()} cores (shared), "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s).")


def layer_moments(model: nn.Module, inputs: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Candidate (b), each tensor's mean of ``E[Σ_t g_kt²] E[x_j²]``: the second moments of a
    layer's inputs (the diagonal of GPTQ's ``XᵀX``, per feature) times those of the
    log-likelihood's gradient at its outputs (the same drawn labels as the Fisher), i.e. the
    Fisher diagonal with the input and output-gradient factors taken as independent (K-FAC's
    diagonal) and cross-position terms dropped. Linear, Conv2d (patch elements as features,
    padding ignored) and GPT-2's Conv1D; other tensors (embeddings, the tied head) keep the
    Fisher's value."""
    layers = {f"{prefix}.weight": m for prefix, m in model.named_modules()
              if f"{prefix}.weight" in names and type(m).__name__ in ("Linear", "Conv2d", "Conv1D")}
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: captured.__setitem__(n, (args[0].detach(), out)))
             for n, m in layers.items()]
    x2 = dict.fromkeys(layers, 0.0)
    g2 = dict.fromkeys(layers, 0.0)
    examples = distributions = 0
    model.eval()
    try:
        for log_likelihood, count in sampled_log_likelihoods(model, inputs):
            order = list(layers)
            grads = torch.autograd.grad(log_likelihood, [captured[n][1] for n in order])
            for n, g in zip(order, grads):
                channels = g.shape[1] if isinstance(layers[n], nn.Conv2d) else g.shape[-1]
                g2[n] += float(g.double().square().sum()) / channels  # Σ over positions, mean over k
                x2[n] += float(captured[n][0].double().square().mean())  # mean over positions and j
            examples += 1
            distributions += count
    finally:
        for h in hooks:
            h.remove()
    rest = [n for n in names if n not in layers]
    out = tensor_sensitivity(fisher_diagonal(model, inputs, rest)) if rest else {}
    out.update({n: (g2[n] / distributions) * (x2[n] / examples) for n in layers})
    return out


def moments_file(model_path: Path, task, calibration: torch.Tensor, out: Path, ratio: float) -> tuple[dict, dict]:
    """A file of ``ratio`` with tensor steps from :func:`layer_moments` (the hessian rule,
    step ∝ sensitivity**-0.5, through the library's search), its size report, and the two
    estimates' step ratios per tensor (moments over Fisher)."""
    tensors = load_checkpoint(model_path)
    names = quantizable_names(tensors)
    model = load_task_model(task, tensors, "cpu")
    moments = layer_moments(model, calibration, names)
    fisher = tensor_sensitivity(fisher_diagonal(model, calibration, names))
    metadata = base_metadata(model_path, {"method": "step", "allocation": MOMENTS, "target_ratio": ratio})
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / "trial.mrc"
        _, plan, _ = search_step(tensors, ratio, lambda p: write_plan(scratch, tensors, p, metadata, force=True),
                                 allocation="hessian", sensitivity=moments)
    size = write_plan(out, tensors, plan, metadata, force=True)
    step_ratio = {n: (fisher[n] / moments[n]) ** 0.5 for n in names if moments[n] > 0 and fisher[n] > 0}
    return {"ratio": size.fp32_ratio, "file_bytes": size.file_bytes,
            "file_bits_per_param": size.file_bits_per_param, "allocation": MOMENTS}, step_ratio


GROUP_ROWS = ("auto", "hessian-rms", "hessian", "fisher-groups", "rms-grid")
#: The rows written through ``search_step`` here (the others through ``mlcompress.encode``).
SEARCHED = ("hessian-rms", "fisher-groups", "rms-grid")
GROUP_LABELS = {"hessian-rms": "hessian, RMS-scaled groups (before)", "hessian": "**hessian** (groups: Fisher, capped)",
                "fisher-groups": "hessian, groups: Fisher only", "rms-grid": "hessian, RMS groups on quarter octaves"}


def grouped_file(model_path: Path, task, calibration: torch.Tensor, out: Path, ratio: float, layout: dict,
                 rows: tuple[str, ...]) -> dict[str, dict]:
    """The ``hessian-rms`` and ``fisher-groups`` files of one model, ratio and grouping (one
    Fisher estimate), written under ``out``'s stem; their size reports by row."""
    tensors = load_checkpoint(model_path)
    names = quantizable_names(tensors)
    model = load_task_model(task, tensors, "cpu")
    fisher = fisher_diagonal(model, calibration, names)
    sensitivity = tensor_sensitivity(fisher)
    means = group_sensitivity(fisher, **layout)
    layouts = {n: GroupLayout.for_shape(tuple(tensors[n].shape), **layout) for n in means}
    reports = {}
    for row in rows:
        factors = None
        if row == "fisher-groups":
            factors = {n: quarter_octaves(fisher_group_factors(m, group_sizes(layouts[n]))) for n, m in means.items()}
        elif row == "rms-grid":
            factors = {n: quarter_octaves(rms_factors(tensors[n], layouts[n])) for n in means}
        metadata = base_metadata(model_path, {"method": "step", "allocation": row, "target_ratio": ratio, **layout})
        with tempfile.TemporaryDirectory() as tmp:
            scratch = Path(tmp) / "trial.mrc"
            _, plan, _ = search_step(tensors, ratio, lambda p: write_plan(scratch, tensors, p, metadata, force=True),
                                     allocation="hessian", sensitivity=sensitivity, group_factors=factors, **layout)
        path = out.with_name(f"{out.stem}-{row}.mrc")
        size = write_plan(path, tensors, plan, metadata, force=True)
        reports[row] = {"path": path, "ratio": size.fp32_ratio, "file_bytes": size.file_bytes,
                        "file_bits_per_param": size.file_bits_per_param, "allocation": row}
    return reports


def classifier_group_rows(task: str, seed: int) -> list[dict]:
    """``--per-channel`` on one classifier: the four :data:`GROUP_ROWS` at each ratio."""
    model = CACHE / f"{task}-seed{seed}.pt"
    base = mlcompress.evaluate(task, model, device="cpu")["accuracy"]
    task_obj = get_task(task)
    layout = {"per_channel": True, "group_size": None}
    rows = []
    for ratio in CLASSIFIERS[task]:
        stem = WORK / f"{task}-seed{seed}-{ratio:g}-channels"
        t0 = time.perf_counter()
        reports = grouped_file(model, task_obj, task_obj.calibration(1000), stem, ratio, layout,
                               SEARCHED)
        for allocation in ("auto", "hessian"):
            out = stem.with_name(f"{stem.name}-{allocation}.mrc")
            report = mlcompress.encode(model, out, force=True, method=mlcompress.Quant(
                target_ratio=float(ratio), allocation=allocation, task=task, device="cpu", per_channel=True)).to_json()
            reports[allocation] = dict(report, path=out)
        seconds = time.perf_counter() - t0
        for allocation in GROUP_ROWS:
            report = reports[allocation]
            f = fidelity(task, model, report["path"])
            rows.append({"model": model.stem, "grouping": "per-channel", "target": ratio, "allocation": allocation,
                         "ran": report["allocation"], "ratio": report["ratio"], "file_bytes": report["file_bytes"],
                         "base": base, "drop": 100 * (base - f["accuracy"]), "drop_se": f["drop_se"], "kl": f["kl"],
                         "seconds": seconds})
            r = rows[-1]
            print(f"  {model.stem} {ratio:g}x per-channel {allocation}: {r['ratio']:.2f}x drop {r['drop']:+.2f} "
                  f"({r['drop_se']:.2f}) KL {r['kl']:.5f}", file=sys.stderr, flush=True)
    return rows


def gpt2_group_rows(name: str, calib_windows: int, group_sizes_: list[int]) -> list[dict]:
    """``--group-size G`` on one GPT-2: the four :data:`GROUP_ROWS` at each rate and ``G``."""
    model = CACHE / name
    calib = _gpt2_calibration_text()
    task = get_task("lm", calib, model)
    windows = min(calib_windows, len(task.train_inputs))
    scored = CACHE / "gpt2-local-val-24k.txt"
    rows = []
    for group in group_sizes_:
        layout = {"per_channel": False, "group_size": group}
        for ratio in GPT2_RATIOS:
            stem = WORK / f"{name}-{ratio:.4g}-g{group}"
            t0 = time.perf_counter()
            reports = grouped_file(model, task, task.calibration(windows), stem, ratio, layout,
                                   SEARCHED)
            for allocation in ("auto", "hessian"):
                out = stem.with_name(f"{stem.name}-{allocation}.mrc")
                extra = {"task": "lm", "data": str(calib), "calib_samples": windows} if allocation == "hessian" else {}
                report = mlcompress.encode(model, out, force=True, method=mlcompress.Quant(
                    target_ratio=float(ratio), allocation=allocation, device="cpu", group_size=group, **extra)).to_json()
                reports[allocation] = dict(report, path=out)
            seconds = time.perf_counter() - t0
            for allocation in GROUP_ROWS:
                report = reports[allocation]
                d = diverge_kl(model, report["path"], scored)
                rows.append({"model": name, "grouping": f"group {group}", "target": ratio, "allocation": allocation,
                             "ran": report["allocation"], "ratio": report["ratio"], "file_bytes": report["file_bytes"],
                             "bits_per_param": report["file_bits_per_param"], "kl": mean_kl(d), "kl_se": _kl_se(d),
                             "calib_windows": windows, "seconds": seconds})
                r = rows[-1]
                print(f"  {name} {ratio:.4g}x group {group} {allocation}: {r['ratio']:.2f}x KL {r['kl']:.5f}",
                      file=sys.stderr, flush=True)
    return rows


def group_table(rows: list[dict], targets: list[float], column: Callable[[float], str],
                cell: Callable[[dict], str]) -> str:
    """:func:`table` for the group-wise rows: a row per model, grouping and rule."""
    lines = ["| model | groups | rule | " + " | ".join(column(t) for t in targets) + " |",
             "|---|---|---|" + "---|" * len(targets)]
    for model, grouping in dict.fromkeys((r["model"], r["grouping"]) for r in rows):
        for allocation in GROUP_ROWS:
            picked = [r for r in rows if r["model"] == model and r["grouping"] == grouping and r["allocation"] == allocation]
            cells = [cell(next(r for r in picked if r["target"] == t)) for t in targets]
            ran = picked[0]["ran"]
            label = f"auto (= {ran})" if allocation == "auto" else GROUP_LABELS[allocation]
            lines.append(f"| {model} | {grouping} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gpt2_calibration_text() -> Path:
    """The held-out text after its scored first :data:`SCORED_CHARS` (what ``hessian`` calibrates on)."""
    val = CACHE / "gpt2-local-val.txt"
    scored = CACHE / "gpt2-local-val-24k.txt"
    if not scored.exists():
        scored.write_text(val.read_text()[:SCORED_CHARS])
    if scored.read_text() != val.read_text()[:SCORED_CHARS]:
        raise SystemExit(f"{scored} is not the first {SCORED_CHARS:,} characters of {val}")
    WORK.mkdir(parents=True, exist_ok=True)
    calib = WORK / "gpt2-calib.txt"
    calib.write_text(val.read_text()[SCORED_CHARS:])
    return calib


def classifier_rows(task: str, seed: int) -> list[dict]:
    model = CACHE / f"{task}-seed{seed}.pt"
    base = mlcompress.evaluate(task, model, device="cpu")["accuracy"]
    rows = []
    task_obj = get_task(task)
    for ratio in CLASSIFIERS[task]:
        for allocation in ROWS:
            out = WORK / f"{task}-seed{seed}-{ratio:g}-{allocation}.mrc"
            t0 = time.perf_counter()
            extra = {}
            if allocation == MOMENTS:
                report, extra["step_ratio"] = moments_file(model, task_obj, task_obj.calibration(1000), out, ratio)
            else:
                report = mlcompress.encode(model, out, force=True, method=mlcompress.Quant(
                    target_ratio=float(ratio), allocation=allocation, task=task, device="cpu")).to_json()
            seconds = time.perf_counter() - t0
            f = fidelity(task, model, out)
            rows.append({"model": model.stem, "target": ratio, "allocation": allocation, "ran": report["allocation"],
                         "ratio": report["ratio"], "file_bytes": report["file_bytes"], "base": base,
                         "drop": 100 * (base - f["accuracy"]), "drop_se": f["drop_se"], "kl": f["kl"],
                         "seconds": seconds, **extra})
            r = rows[-1]
            print(f"  {model.stem} {ratio:g}x {allocation}: {r['ratio']:.2f}x drop {r['drop']:+.2f} "
                  f"({r['drop_se']:.2f}) KL {r['kl']:.5f} [{seconds:.0f} s]", file=sys.stderr, flush=True)
    return rows


def gpt2_rows(name: str, calib_windows: int) -> list[dict]:
    model = CACHE / name
    scored = CACHE / "gpt2-local-val-24k.txt"
    calib = _gpt2_calibration_text()
    task = get_task("lm", calib, model)
    windows = min(calib_windows, len(task.train_inputs))
    rows, equal = [], {}
    for ratio in GPT2_RATIOS:
        for allocation in ROWS:
            out = WORK / f"{name}-{ratio:.4g}-{allocation}.mrc"
            t0 = time.perf_counter()
            extra = {}
            if allocation == MOMENTS:
                report, extra["step_ratio"] = moments_file(model, task, task.calibration(windows), out, ratio)
            else:
                method = mlcompress.Quant(target_ratio=float(ratio), allocation=allocation, device="cpu",
                                          **({"task": "lm", "data": str(calib), "calib_samples": windows}
                                             if allocation == "hessian" else {}))
                report = mlcompress.encode(model, out, force=True, method=method).to_json()
            seconds = time.perf_counter() - t0
            if report["allocation"] == "equal" and ratio in equal:  # auto ran equal: the same file
                kl, se = equal[ratio]
            else:
                d = diverge_kl(model, out, scored)
                kl, se = mean_kl(d), _kl_se(d)
                if report["allocation"] == "equal":
                    equal[ratio] = (kl, se)
            rows.append({"model": name, "target": ratio, "allocation": allocation, "ran": report["allocation"],
                         "ratio": report["ratio"], "file_bytes": report["file_bytes"],
                         "bits_per_param": report["file_bits_per_param"], "kl": kl, "kl_se": se,
                         "calib_windows": windows if allocation in ("hessian", MOMENTS) else None,
                         "seconds": seconds, **extra})
            print(f"  {name} {ratio:.4g}x {allocation}: {report['ratio']:.2f}x KL {kl:.5f} [{seconds:.0f} s]",
                  file=sys.stderr, flush=True)
    return rows


def _kl_se(report: dict) -> float:
    """diverge's standard error of the mean KL (positions counted as independent)."""
    return (report["measures"]["kl"] if "measures" in report else report["kl"])["stderr"]


def table(rows: list[dict], targets: list[float], column: Callable[[float], str], cell: Callable[[dict], str]) -> str:
    """A markdown table: a row per model and allocation, a column per target ratio."""
    lines = ["| model | allocation | " + " | ".join(column(t) for t in targets) + " |",
             "|---|---|" + "---|" * len(targets)]
    for model in dict.fromkeys(r["model"] for r in rows):
        ran = next(r["ran"] for r in rows if r["model"] == model and r["allocation"] == "auto")
        for allocation in ROWS:
            cells = [cell(next(r for r in rows if r["model"] == model and r["allocation"] == allocation
                               and r["target"] == t)) for t in targets]
            label = LABELS.get(allocation, allocation) if allocation != "auto" else f"auto (= {ran})"
            lines.append(f"| {model} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def classifier_table(rows: list[dict]) -> str:
    return table(rows, sorted({r["target"] for r in rows}), lambda t: f"{t:g}x: drop (se), KL",
                 lambda r: f"{r['drop']:+.2f} ({r['drop_se']:.2f}), {r['kl']:.4f}")


def gpt2_table(rows: list[dict]) -> str:
    return table(rows, sorted({r["target"] for r in rows}, reverse=True),
                 lambda t: f"{32 / t:.0f} bits/param ({t:.4g}x): KL",
                 lambda r: f"{r['kl']:.4f} ± {r['kl_se']:.4f} ({r['ratio']:.2f}x)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="lenet5,mlp-digits,gpt2",
                        help="comma-separated: lenet5, mlp-digits, gpt2, lenet5-channels, gpt2-groups")
    parser.add_argument("--calib-windows", type=int, default=128, help="GPT-2: calibration windows for hessian")
    parser.add_argument("--group-sizes", default="64,128", help="gpt2-groups: comma-separated --group-size values")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    WORK.mkdir(parents=True, exist_ok=True)
    print(header(argv), flush=True)
    results: dict[str, list[dict]] = {}
    for part in args.only.split(","):
        if part in CLASSIFIERS:
            results[part] = [row for seed in (0, 1) for row in classifier_rows(part, seed)]
            print(f"\n{part}, same run (drop in accuracy points, paired se; mean KL to fp32 on the test set):\n",
                  flush=True)
            print(classifier_table(results[part]), flush=True)
        elif part == "gpt2":
            results[part] = [row for name in GPT2_MODELS for row in gpt2_rows(name, args.calib_windows)]
            print(f"\nGPT-2s, same run (mean KL to fp32 over every position of gpt2-local-val-24k.txt; ratio "
                  f"reached):\n", flush=True)
            print(gpt2_table(results[part]), flush=True)
        elif part == "lenet5-channels":
            results[part] = [row for seed in (0, 1) for row in classifier_group_rows("lenet5", seed)]
            print("\nLeNet-5s with --per-channel, same run (drop in accuracy points, paired se; mean KL to fp32 on "
                  "the test set):\n", flush=True)
            print(group_table(results[part], list(CLASSIFIERS["lenet5"]), lambda t: f"{t:g}x: drop (se), KL",
                              lambda r: f"{r['drop']:+.2f} ({r['drop_se']:.2f}), {r['kl']:.5f}"), flush=True)
        elif part == "gpt2-groups":
            sizes = [int(g) for g in args.group_sizes.split(",")]
            results[part] = [row for name in GPT2_MODELS for row in gpt2_group_rows(name, args.calib_windows, sizes)]
            print("\nGPT-2s with --group-size, same run (mean KL to fp32 over every position of "
                  "gpt2-local-val-24k.txt; ratio reached):\n", flush=True)
            print(group_table(results[part], sorted(GPT2_RATIOS, reverse=True),
                              lambda t: f"{32 / t:.0f} bits/param ({t:.4g}x): KL",
                              lambda r: f"{r['kl']:.5f} ± {r['kl_se']:.5f} ({r['ratio']:.2f}x)"), flush=True)
        else:
            parser.error(f"unknown part {part!r}")
        (WORK / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
