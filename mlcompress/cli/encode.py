"""``mlcompress encode``: checkpoint -> ``.mrc``."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from mlcompress.cli import app, options
from mlcompress.cli.output import Output, human_bytes
from mlcompress.errors import UsageError


@app.command()
def encode(
    model: Annotated[Path, typer.Argument(help="Checkpoint: .pt/.pth/.bin, .safetensors, TorchScript, or a Hugging Face model directory.")],
    output: options.Output = None,
    lossless: Annotated[bool, typer.Option("--lossless", help="Store every tensor bit-exactly (entropy-coded float bit fields).")] = False,
    bits_per_block: Annotated[Optional[int], typer.Option("--bits-per-block", help="REC (MIRACLE): bits per block, 1..24 (default 16; a posterior file sets its own). Each block scores 2^bits candidates.")] = None,
    bits_per_weight: Annotated[Optional[float], typer.Option("--bits-per-weight", help="REC budget in bits per coded weight (default 2.0).")] = None,
    kl_budget: Annotated[Optional[float], typer.Option("--kl-budget", help="REC budget: total KL in bits over all REC tensors.")] = None,
    target_size: Annotated[Optional[str], typer.Option("--target-size", help="REC budget: size of the whole file (bytes, or 1.52kB, 3MB).")] = None,
    selection: Annotated[Optional[str], typer.Option("--selection", help="REC candidate choice: is (importance sampling, MIRACLE), greedy (best candidate), orc (ordered random coding, entropy-coded indices).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="REC seed shared by encoder and decoder (stored in the file).")] = 0,
    min_rec_numel: Annotated[int, typer.Option("--min-rec-numel", help="REC only tensors with >= 2 dimensions and at least this many weights; the rest are stored lossless.")] = 1024,
    device: options.Device = "auto",
    force: options.Force = False,
    unsafe_pickle: options.UnsafePickle = False,
    json: options.Json = False,
    quiet: options.Quiet = False,
    debug: options.Debug = False,
) -> None:
    """Compress a checkpoint into a .mrc container."""
    from mlcompress.encode import encode_lossless
    from mlcompress.posterior.file import is_posterior_file

    out = Output(json, quiet)
    rec_flags = (bits_per_block, bits_per_weight, kl_budget, target_size, selection)
    if not lossless and (any(f is not None for f in rec_flags) or (model.is_file() and is_posterior_file(model))):
        _encode_rec(out, model, output, bits_per_block, bits_per_weight, kl_budget, target_size, selection,
                    seed, min_rec_numel, device, force, unsafe_pickle)
        return
    if not lossless:
        raise UsageError("choose how to encode", hint="pass --lossless")
    with out.progress("encoding", total=None) as advance:
        summary = encode_lossless(model, output, force=force, unsafe_pickle=unsafe_pickle, progress=advance)

    def render(console: Console) -> None:
        console.print(
            f"wrote {summary['output']}: {summary['tensors']} tensors, "
            f"{human_bytes(summary['original_bytes'])} -> {human_bytes(summary['file_bytes'])} "
            f"({summary['ratio']:.3f}x, lossless) in {summary['seconds']:.2f} s"
        )

    out.result(summary, render)


def _encode_rec(out: Output, model: Path, output: Optional[Path], bits_per_block: Optional[int],
                bits_per_weight: Optional[float], kl_budget: Optional[float], target_size: Optional[str],
                selection: Optional[str], seed: int, min_rec_numel: int, device: str, force: bool,
                unsafe_pickle: bool) -> None:
    from mlcompress.rec.compress import RecOptions, encode_rec, parse_size

    opts = RecOptions(
        bits_per_block=bits_per_block, bits_per_weight=bits_per_weight, kl_budget_bits=kl_budget,
        target_size=parse_size(target_size) if target_size is not None else None,
        selection=selection or "is", seed=seed, min_rec_numel=min_rec_numel, device=device,
    )
    with ExitStack() as stack:
        state: dict = {"done": 0.0, "start": time.perf_counter()}

        def progress(done: float, total: int) -> None:
            # The bar opens on the first report, when the number of blocks is known.
            if "advance" not in state:
                state["advance"] = stack.enter_context(out.progress("REC blocks", total=total))
            rate = done / max(time.perf_counter() - state["start"], 1e-9)
            state["advance"](done - state["done"], rate=f"{rate:.1f} blocks/s")
            state["done"] = done

        summary = encode_rec(model, output, options=opts, force=force, unsafe_pickle=unsafe_pickle, progress=progress)

    def render(console: Console) -> None:
        saved = summary["index_bits_fixed"] - summary["index_bits_stored"]
        console.print(
            f"wrote {summary['output']}: {summary['rec_tensors']} REC tensors in {summary['blocks']} blocks of "
            f"{summary['bits_per_block']} bits ({summary['selection']}, KL/block mean {summary['kl_bits_per_block_mean']:.2f} "
            f"max {summary['kl_bits_per_block_max']:.2f} bits), {summary['tensors'] - summary['rec_tensors']} other tensors; "
            f"{human_bytes(summary['original_bytes'])} -> {human_bytes(summary['file_bytes'])} "
            f"({summary['ratio']:.1f}x) in {summary['seconds']:.1f} s on {summary['device']}"
            + (f"; entropy-coded indices saved {saved} bits" if saved > 0 else "")
        )

    out.result(summary, render)
