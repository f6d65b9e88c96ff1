"""Data-aware against data-free compression of a local GPT-2 at equal file size (the ``lm`` task).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lm_task.py --seed S [--write-docs]

The models are the two GPT-2s ``benchmarks/lm_quant.py`` trained here (4 layers, d 256,
vocabulary 4,096, tied embeddings; ``runs/bench-models/gpt2-local`` and ``gpt2-local-seed1``).
For each, every method writes a real ``.mrc`` file, and each file is scored with
``mlcompress diverge REF_DIR FILE.mrc --data VAL --score all --ctx 256`` on the held-out text
lm_quant scores (its first 24,000 characters): the mean next-token KL and the perplexity ratio.

Rows, compared at equal file size:

* data-free ``quantize --bits 4 --group-size 128`` (the goal's reference);
* ``quantize --method l2 --task lm`` at each ``--l2-ratios`` target, and data-free
  ``quantize --target-ratio`` at exactly the size of each L² file;
* ``fit-posterior --task lm`` (Mean-KL, ``--target-size`` = the first L² file's bytes) for
  ``--fit-steps`` steps, then REC ``encode`` of the posterior; with ``--data-free-rec``, data-free
  REC (``encode --target-size``) at the same size.

The data-aware methods see training text only: the same corpus lm_quant trained the models on
(``lm_quant.corpus``, text of /usr/share/common-licenses and /usr/share/doc), the
``--train-chars`` characters just before the held-out split (the models' own training text). The
script checks that no 1,000-character piece of the scored text occurs in it. One process, one
thread (``torch.set_num_threads(1)``; diverge runs with ``OMP_NUM_THREADS=1``); step counts are
options and are printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

import mlcompress
from mlcompress.posterior.fit import FitConfig
from mlcompress.quant.calibrate import L2Config
from mlcompress.quant.quantize import quantize_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_quant import CACHE, corpus, held_out  # noqa: E402
from results_doc import record_run  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "runs" / "lm-task"
#: The piece of the scored text that must not occur in the training text (checked every piece).
PIECE = 1000


def training_file(chars: int) -> Path:
    """The ``chars`` characters of the models' training text just before the held-out split,
    as a file; refuses if any piece of the scored held-out text occurs in it."""
    text = corpus()
    cut = int(len(text) * 0.97)  # lm_quant.train_model's split
    scored = held_out(CACHE / "gpt2-local-val.txt").read_text()
    if not text[cut:].startswith(scored):
        raise SystemExit("the corpus no longer splits as when the models were trained (installed docs changed?)")
    train = text[max(0, cut - chars) : cut]
    overlap = [i for i in range(0, len(scored) - PIECE + 1, PIECE) if scored[i : i + PIECE] in train]
    if overlap:
        raise SystemExit(f"{len(overlap)} pieces of the scored text occur in the training text")
    path = OUT / f"train-{chars // 1000}k.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != train:
        path.write_text(train)
    return path


def diverge(ref: Path, cmp: Path, val: Path) -> dict[str, float]:
    """Mean KL (with its standard error) and perplexity ratio from ``mlcompress diverge``."""
    import subprocess

    cmd = [sys.executable, "-m", "mlcompress", "diverge", str(ref), str(cmp), "--data", str(val), "--score", "all",
           "--ctx", "256", "--device", "cpu", "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    report = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout)
    return {"kl": report["kl"]["mean"], "kl_stderr": report["kl"]["stderr"], "ppl_ratio": report["ppl"]["ratio"],
            "ppl_ref": report["ppl"]["ref"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="0: runs/bench-models/gpt2-local, S: gpt2-local-seedS")
    parser.add_argument("--train-chars", type=int, default=200_000, help="training text for the data-aware methods")
    parser.add_argument("--window", type=int, default=128, help="the lm task's window (lm:window=N)")
    parser.add_argument("--calib", type=int, default=256, help="L²'s calibration windows (--calib-samples)")
    parser.add_argument("--l2-ratios", type=float, nargs="+", default=[10.67, 16.0])
    parser.add_argument("--l2-transform-steps", type=int, default=200)
    parser.add_argument("--l2-weight-steps", type=int, default=200)
    parser.add_argument("--l2-rounds", type=int, default=1)
    parser.add_argument("--l2-batch", type=int, default=4)
    parser.add_argument("--l2-weight-lr", type=float, default=1e-4)
    parser.add_argument("--fit-steps", type=int, default=40,
                        help="Mean-KL steps (each ~7 s here: the Lambert W of 4.3M weights); 0: no posterior row")
    parser.add_argument("--fit-batch", type=int, default=4)
    parser.add_argument("--data-free-rec", action="store_true", help="add data-free REC (encode --target-size) at the posterior's size")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model = CACHE / ("gpt2-local" if args.seed == 0 else f"gpt2-local-seed{args.seed}")
    val = held_out(CACHE / "gpt2-local-val.txt")
    train = training_file(args.train_chars)
    out = OUT / f"seed{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    task = f"lm:window={args.window}"
    rows: list[dict[str, Any]] = []

    def row(label: str, path: Path, seconds: float, params: int, note: str = "") -> None:
        d = diverge(model, path, val)
        size = path.stat().st_size
        rows.append({"method": label, "bytes": size, "bpp": 8 * size / params, "seconds": seconds, "note": note, **d})
        print(f"  {label}: {size:,} B, {8 * size / params:.3f} bits/param, KL {d['kl']:.5f} ± {d['kl_stderr']:.5f}, "
              f"PPL ratio {d['ppl_ratio']:.4f} ({seconds:.0f} s)", file=sys.stderr, flush=True)

    def timed(fn):
        start = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - start

    q4 = out / "q4g128.mrc"
    report, s = timed(lambda: mlcompress.encode(model, q4, method=mlcompress.Quant(bits=4, group_size=128),
                                                force=True).to_json())
    params, fp32 = report["parameters"], report["fp32_bytes"]
    row("`quantize --bits 4 --group-size 128`", q4, s, params)

    l2_sizes = []
    for ratio in args.l2_ratios:
        path = out / f"l2-{ratio:g}.mrc"
        config = L2Config(target_ratio=ratio, rounds=args.l2_rounds, transform_steps=args.l2_transform_steps,
                          weight_steps=args.l2_weight_steps, batch_size=args.l2_batch, weight_lr=args.l2_weight_lr,
                          seed=args.seed)
        report, s = timed(lambda: quantize_checkpoint(model, method="l2", task=task, data=train,
                                                      calib_samples=args.calib, l2_config=config, device="cpu",
                                                      output=path, force=True).to_json())
        note = f"test perplexity {report['metric_before']:.2f} → {report['metric_after']:.2f} on the training file's held-out windows"
        row(f"`quantize --method l2 --task {task} --target-ratio {ratio:g}`", path, s, params, note)
        l2_sizes.append(path.stat().st_size)
        matched = out / f"ec-{ratio:g}.mrc"
        _, s = timed(lambda: mlcompress.encode(model, matched, method=mlcompress.Quant(target_ratio=fp32 / l2_sizes[-1]),
                                               force=True))
        row(f"`quantize --target-ratio {fp32 / l2_sizes[-1]:.2f}` (data-free, the L² file's size)", matched, s, params)

    if args.fit_steps > 0:
        target = l2_sizes[0]
        posterior = out / "posterior.safetensors"
        fit = FitConfig(steps=args.fit_steps, batch_size=args.fit_batch, target_size=target, seed=args.seed,
                        eval_every=0, checkpoint_every=0)
        summary, s_fit = timed(lambda: mlcompress.fit_posterior(task, model, posterior, config=fit, data=train,
                                                                checkpoint=out / "posterior.ckpt", device="cpu",
                                                                force=True))
        rec = out / "posterior-rec.mrc"
        _, s_rec = timed(lambda: mlcompress.encode(posterior, rec, device="cpu", force=True))  # REC of the posterior
        row(f"`fit-posterior --task {task} --target-size {target}` + REC", rec, s_fit + s_rec, params,
            f"{args.fit_steps} steps (Mean-KL) in {s_fit:.0f} s, REC encode {s_rec:.0f} s; test perplexity at the "
            f"mean {summary['perplexity']:.2f}")
    if args.data_free_rec:
        target = l2_sizes[0]
        free = out / "rec-data-free.mrc"
        _, s = timed(lambda: mlcompress.encode(model, free, method=mlcompress.Rec(target_size=target, device="cpu"),
                                               force=True))
        row(f"`encode --target-size {target}` (data-free REC)", free, s, params)

    rows.sort(key=lambda r: r["bytes"])
    reference = rows[[r["method"] for r in rows].index("`quantize --bits 4 --group-size 128`")]
    settings = (f"L²: {args.l2_rounds} round(s) of {args.l2_transform_steps} transform + {args.l2_weight_steps} weight "
                f"steps, batch {args.l2_batch} windows, weight lr {args.l2_weight_lr:g}, {args.calib} calibration windows "
                f"of {args.window} tokens"
                + (f"; fit-posterior: {args.fit_steps} Mean-KL steps, batch {args.fit_batch}" if args.fit_steps else
                   "; no posterior row (--fit-steps 0)")
                + f"; training text: the {args.train_chars:,} characters of the models' "
                "training corpus before the held-out split")
    lines = [f"Model: `{model.relative_to(CACHE.parents[1])}` ({params:,} parameters, seed {args.seed}); KL and "
             f"perplexity ratio from `diverge --score all --ctx 256` on the held-out text ({rows[0]['ppl_ref']:.1f} "
             f"reference perplexity). {settings}.", "",
             "| method | file bytes | bits per parameter | mean KL (nats) | KL ÷ 4-bit g128's | PPL ratio | seconds | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['bytes']:,} | {r['bpp']:.2f} | {r['kl']:.5f} ± {r['kl_stderr']:.5f} | "
                     f"{r['kl'] / reference['kl']:.2f} | {r['ppl_ratio']:.4f} | {r['seconds']:.0f} | {r['note']} |")
    text = "\n".join(lines)
    print(text)
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    if args.write_docs:
        key = "lm-task" if args.seed == 0 else f"lm-task-seed{args.seed}"
        record_run(key, " ".join(["benchmarks/lm_task.py", *sys.argv[1:]]), time.perf_counter() - t0, text,
                   heading=f"### Local GPT-2, seed {args.seed} (the lm task)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
