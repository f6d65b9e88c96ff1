"""Speed-up of the sharded commands from 1 to N processes under torchrun (docs/scale.md).

For each command it builds a workload on the fly, runs ``torchrun --nproc-per-node P -m
mlcompress COMMAND ... --json`` for every P in ``--procs`` (the launcher is the same for P = 1, so
its start-up cost is in every row), and prints, per P: the whole command's wall time, the time
of the sharded work as the command reports it (encode: ``seconds``; diverge: forward passes and
measures of the slowest process; fit-posterior: the training loop), the speed-up of that work
over P = 1, and for REC the blocks per second in all and per process. The CPU time of all
processes shows whether the work was split rather than repeated: it stays about level from
P = 1 to P = N (plus one start-up per process) even where other jobs leave no core free and
the wall-clock speed-up is nil. Every P = N output is
checked against P = 1 (same .mrc bytes, same diverge report up to timing).

    .venv/bin/python benchmarks/distributed.py                      # all three, 1 and 2 processes
    .venv/bin/python benchmarks/distributed.py --only rec --procs 1,2,4 --device cuda

Each process gets one thread (OMP_NUM_THREADS=1, torchrun's default), so P processes use P
cores; on a machine shared with other jobs the figures move by tens of percent between runs.
The REC rate per process is what the 7B projection in docs/scale.md scales up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(procs: int, argv: list[str]) -> tuple[dict, float, float]:
    """The command's JSON result, its wall time and the CPU time of all its processes
    (launcher and start-up included in both)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-addr",
           "127.0.0.1", "--master-port", str(_port()), "-m", "mlcompress", *argv, "--json"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{run.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(run.stdout), wall, cpu


def rec_workload(root: Path, weights: int) -> list[str]:
    """A checkpoint of two equal matrices (He-like scale), REC at 12 bits per block and
    2 bits per weight: blocks of 6 weights, far more block groups than processes."""
    g = torch.Generator().manual_seed(0)
    cols = 512
    rows = max(1, weights // (2 * cols))
    path = root / "model.safetensors"
    save_file({f"layer{i}.weight": torch.randn(rows, cols, generator=g) * (2 / cols) ** 0.5 for i in range(2)},
              str(path))
    return [str(path), "--bits-per-block", "12", "--bits-per-weight", "2", "-f"]


def diverge_workload(root: Path, tokens: int) -> list[str]:
    """A random GPT-2 (vocabulary 4096, width 128, 4 layers, context 128) against a noisy copy,
    on ``tokens`` random token ids, llama.cpp's chunking (the default)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=4096, n_positions=128, n_embd=128, n_layer=4, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(root / "ref")
    noisy = {k: v + 0.02 * v.std() * torch.randn_like(v) if v.dim() > 1 else v.clone()
             for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file({k: v.contiguous() for k, v in noisy.items()}, str(root / "cmp.safetensors"))
    g = torch.Generator().manual_seed(1)
    with open(root / "data.jsonl", "w") as fh:
        for _ in range(max(1, tokens // 512)):
            fh.write(json.dumps({"input_ids": torch.randint(1, 4096, (512,), generator=g).tolist()}) + "\n")
    return [str(root / "ref"), str(root / "cmp.safetensors"), "--arch", str(root / "ref"), "--data",
            str(root / "data.jsonl"), "--ctx", "128", "--batch-size", "4"]


def fit_workload(root: Path, steps: int, param: str, batch: int) -> list[str]:
    """fit-posterior on LeNet-5 / Fashion-MNIST from a briefly trained model. Mean-KL at the
    task's batch of 128 spends about half of each step in the posterior map, which every
    process computes whole; Mean-Var at 512 spends nearly all of it on the examples."""
    init = root / "lenet5.pt"
    if not init.exists():
        subprocess.run([sys.executable, "-m", "mlcompress", "train", "--task", "lenet5", "--steps", "100", "-o",
                        str(init), "--quiet"], check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return ["fit-posterior", "--task", "lenet5", "--init", str(init), "--param", param, "--steps", str(steps),
            "--batch-size", str(batch), "--eval-every", "0", "--checkpoint-every", "0", "-f"]


def work_seconds(section: str, result: dict) -> float:
    if section == "diverge":
        return result["timing"]["forward_s"] + result["timing"]["measures_s"]
    return result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("rec", "diverge", "fit"), action="append",
                        help="sections to run (repeatable; default all)")
    parser.add_argument("--procs", default="1,2", help="process counts, comma-separated (default 1,2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per process)")
    parser.add_argument("--rec-weights", type=int, default=1_572_864, help="REC workload size in weights")
    parser.add_argument("--tokens", type=int, default=32_768, help="diverge workload size in tokens")
    parser.add_argument("--fit-steps", type=int, default=60, help="fit-posterior steps")
    args = parser.parse_args()
    procs = [int(p) for p in args.procs.split(",")]
    chosen = args.only or ["rec", "diverge", "fit"]
    sections = [name for s in chosen for name in (("fit", "fit-var") if s == "fit" else (s,))]
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, device {args.device}, "
          f"load average {os.getloadavg()[0]:.1f} at start; one thread per process")
    with tempfile.TemporaryDirectory(prefix="mlcompress-dist-") as tmp:
        root = Path(tmp)
        for section in sections:
            if section == "rec":
                base = ["encode", *rec_workload(root, args.rec_weights), "--device", args.device]
            elif section == "diverge":
                base = ["diverge", *diverge_workload(root, args.tokens), "--device", args.device]
            elif section == "fit":
                base = [*fit_workload(root, args.fit_steps, "mean-kl", 128), "--device", args.device]
            else:
                base = [*fit_workload(root, args.fit_steps, "mean-var", 512), "--device", args.device]
            print(f"\n{section}: mlcompress {' '.join(Path(a).name if a.startswith(tmp) else a for a in base)}")
            print(f"{'procs':>5} {'wall s':>8} {'CPU s':>8} {'work s':>8} {'speed-up':>8}"
                  + ("  blocks/s (per process)" if section == "rec" else ""))
            first: tuple[float, object] | None = None
            for p in procs:
                argv = list(base)
                out = root / f"p{p}.mrc"
                if section == "rec":
                    argv[1:1] = ["-o", str(out)]
                elif section.startswith("fit"):
                    argv += ["-o", str(root / f"p{p}.safetensors")]
                result, wall, cpu = torchrun(p, argv)
                work = work_seconds(section, result)
                same = _same(section, result, out, first[1] if first else None)
                if first is None:
                    first = (work, out.read_bytes() if section == "rec" else _comparable(section, result))
                line = f"{p:>5} {wall:>8.1f} {cpu:>8.1f} {work:>8.2f} {first[0] / work:>7.2f}x"
                if section == "rec":
                    rate = result["blocks"] / work
                    line += f"  {rate:,.0f} ({rate / p:,.0f})  {result['blocks']:,} blocks"
                print(line + ("" if same else "  OUTPUT DIFFERS FROM 1 PROCESS"))


def _comparable(section: str, result: dict) -> object:
    if section == "diverge":
        return {k: v for k, v in result.items() if k != "timing"}
    return None


def _same(section: str, result: dict, out: Path, reference: object) -> bool:
    if reference is None:
        return True
    if section == "rec":
        return out.read_bytes() == reference
    if section == "diverge":
        return _comparable(section, result) == reference
    return True  # fit-posterior: equal up to rounding only (docs/scale.md)


if __name__ == "__main__":
    main()
