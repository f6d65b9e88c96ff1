"""Peak memory and time of the ``quant`` codec on one large tensor, before and after a change.

Usage::

    .venv/bin/python benchmarks/quant_memory.py [--baseline COMMIT] [--shape 50257 768] [--only bits4-g128] [--write-docs]

Why per tensor: ``quantize`` and ``decode`` stream a model one tensor at a time (issue 13), so
their peak is the codec's own work on the largest tensor (GPT-2's 50257 x 768 token embedding,
154 MB in fp32) on top of a few hundred MB of interpreter and model reader. The goal: at most
about 2 x 4N bytes beyond the input tensor and the output for a tensor of N fp32 elements.

Each case runs in a fresh subprocess per side and direction: the child builds the tensor
(``torch.manual_seed(0)``, normal with std 0.02, filled in place so no temporary copy inflates
the starting point), then measures its peak RSS (``ru_maxrss``) minus its RSS just before the
call, and the call's seconds. *Encode* is ``codecs.encoder("quant").encode(t, options)``;
*decode* is ``QuantCodec.decode`` of that payload in another fresh process (its figure includes
the decoded tensor itself, 4N bytes). "Before" is ``--baseline`` checked out into a git worktree
under ``runs/`` and put first on ``PYTHONPATH``; "after" is the working tree. The run fails
unless both sides write the same payload bytes and decode them to the same bits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from results_doc import record_run

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "quant-memory"
#: The commit before the codec's blockwise passes (the "before" column of docs/results.md).
DEFAULT_BASELINE = "f2ddc67"
MIB = 1 << 20
CASES = {
    "bits4-g128": {"bits": 4, "group_size": 128},
    "bits8": {"bits": 8},
    "bits3-per-channel": {"bits": 3, "per_channel": True},
    "step-lam0": {"scheme": "step", "step": 0.004, "lam": 0.0},
    "step-lam0.12-g128": {"scheme": "step", "step": 0.004, "lam": 0.1155, "group_size": 128},
    "l2": {"scheme": "l2", "edge": 0.01, "step": 0.005},
}

CHILD = r"""
import hashlib, json, resource, sys, time
direction, rows, cols, options, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
import torch
from mlcompress import codecs
from mlcompress.container import TensorRecord

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

if direction == "encode":
    torch.manual_seed(0)
    t = torch.empty(rows, cols).normal_(0.0, 0.02)
    base, start = rss(), time.perf_counter()
    payload, params = codecs.encoder("quant").encode(t, options)
    seconds, extra = time.perf_counter() - start, peak() - base
    open(path, "wb").write(payload)
    open(path + ".json", "w").write(json.dumps(params))
    digest = hashlib.sha256(payload).hexdigest()
else:
    payload = open(path, "rb").read()
    params = json.loads(open(path + ".json").read())
    record = TensorRecord("w", (rows, cols), "float32", "quant", params, 0, len(payload), 0)
    base, start = rss(), time.perf_counter()
    y = codecs.get("quant").decode(payload, record)
    seconds, extra = time.perf_counter() - start, peak() - base
    digest = hashlib.sha256(y.numpy().tobytes()).hexdigest()
print(json.dumps({"extra": extra, "seconds": seconds, "digest": digest, "bytes": len(payload)}))
"""


def baseline(rev: str) -> Path:
    """``rev`` checked out under runs/ (kept between runs), with the working tree's built C extension."""
    tree = ROOT / "runs" / "quant-mem-base"
    commit = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT, check=True, capture_output=True)
    at = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True, check=True).stdout.strip()
    if at != commit:
        raise SystemExit(f"{tree} is at {at[:10]}, not {rev}: remove it (git worktree remove) or pass that --baseline")
    for so in (ROOT / "mlcompress" / "codecs").glob("_lossless3*.so"):
        (tree / "mlcompress" / "codecs" / so.name).write_bytes(so.read_bytes())
    return tree


def child(direction: str, shape: tuple[int, int], options: dict, path: Path, pythonpath: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(pythonpath))
    proc = subprocess.run([sys.executable, "-c", CHILD, direction, str(shape[0]), str(shape[1]), json.dumps(options),
                           str(path)], env=env, capture_output=True, text=True, cwd=pythonpath)
    if proc.returncode:
        raise SystemExit(f"{direction} {options} under {pythonpath} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE)
    parser.add_argument("--shape", nargs=2, type=int, default=[50257, 768])
    parser.add_argument("--only", nargs="*", choices=list(CASES), help="run only these cases")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    shape = (args.shape[0], args.shape[1])
    sides = {"before": baseline(args.baseline), "after": ROOT}
    WORK.mkdir(parents=True, exist_ok=True)
    lines = ["| case (options) | encode: before | encode: after | decode: before | decode: after | payload |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in args.only or list(CASES):
        options = CASES[name]
        got: dict[str, dict] = {}
        for side, tree in sides.items():
            path = WORK / f"{name}-{side}.bin"
            got[side + " encode"] = child("encode", shape, options, path, tree)
            got[side + " decode"] = child("decode", shape, options, path, tree)
        for direction in ("encode", "decode"):
            if got["before " + direction]["digest"] != got["after " + direction]["digest"]:
                raise SystemExit(f"{name}: the {direction}d bytes differ between before and after")
        cell = lambda r: f"{r['extra'] / MIB:,.0f} MiB, {r['seconds']:.1f} s"
        lines.append(f"| {name} (`{json.dumps(options)}`) | {cell(got['before encode'])} | {cell(got['after encode'])} | "
                     f"{cell(got['before decode'])} | {cell(got['after decode'])} | {got['after encode']['bytes'] / MIB:.1f} MiB |")
        print(lines[-1], flush=True)
    table = _note(args.baseline, shape) + "\n\n" + "\n".join(lines)
    print(table)
    if args.write_docs:
        command = f"benchmarks/quant_memory.py --baseline {args.baseline} --shape {shape[0]} {shape[1]}"
        record_run("quant-memory", command, time.perf_counter() - start, table, heading="## Quant codec memory")
    return 0


def _note(rev: str, shape: tuple[int, int]) -> str:
    """What the table's figures are."""
    fp32 = shape[0] * shape[1] * 4 / MIB
    return (f"Before: commit `{rev}`; after: the working tree. Tensor {shape[0]} x {shape[1]} fp32 (4N = {fp32:,.0f} MiB; "
            f"goal: about 2 x 4N = {2 * fp32:,.0f} MiB beyond the input and the output). Each cell: peak RSS above the "
            f"RSS just before the call, and the call's seconds, one thread; decode's figure includes its {fp32:,.0f} MiB "
            f"output. Payloads and decoded tensors are byte-identical before and after (the run checks).")


if __name__ == "__main__":
    sys.exit(main())
