"""End-to-end demo of mlcompress on a built-in default, using only the command line.

Run with `make demo`. Everything is written under ./demo-out (recreated each run); nothing is
downloaded. Each step prints the command it runs, so the output doubles as a tutorial.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch

OUT = Path("demo-out")
CLI = [sys.executable, "-m", "mlcompress"]


def run(*args: str) -> subprocess.CompletedProcess:
    print(f"\n$ mlcompress {' '.join(args)}", flush=True)
    done = subprocess.run([*CLI, *args], text=True, capture_output=True)
    sys.stdout.write(done.stdout)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"demo step failed with exit code {done.returncode}")
    return done


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    for p in model.parameters():  # make the weights look trained-ish: heavier tails than init
        p.data = p.data * torch.randn_like(p).abs()
    torch.save(model.state_dict(), OUT / "model.pt")

    run("encode", str(OUT / "model.pt"), "--lossless", "-o", str(OUT / "model.lossless.mrc"))
    run("inspect", str(OUT / "model.lossless.mrc"))
    run("decode", str(OUT / "model.lossless.mrc"), "-o", str(OUT / "model.restored.safetensors"))

    from mlcompress.checkpoint import load_checkpoint

    original = load_checkpoint(OUT / "model.pt")
    restored = load_checkpoint(OUT / "model.restored.safetensors")
    same = all(torch.equal(original[k].view(torch.uint8), restored[k].view(torch.uint8)) for k in original)
    print(f"\nlossless round trip bit-exact for all {len(original)} tensors: {same}")
    if not same:
        raise SystemExit("demo failed: decoded weights differ from the original")


if __name__ == "__main__":
    main()
