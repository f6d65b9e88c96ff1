"""``mlcompress encode``: checkpoint -> ``.mrc``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from mlcompress import api
from mlcompress.cli import options, select
from mlcompress.cli.app import app
from mlcompress.cli.output import Output, human_bytes
from mlcompress.codecs.rec.limits import DEFAULT_BITS_PER_BLOCK, DEFAULT_MIN_REC_NUMEL, MAX_BITS_PER_BLOCK
from mlcompress.distributed import main_process, refuse_if_launched
from mlcompress.errors import UsageError
from mlcompress.selection import selection_of

#: Said when no flag chooses a method: both families, and what each one is for.
CHOOSE_A_METHOD = ("--lossless for a bit-exact file, about 1.2x smaller; or REC for a far smaller, lossy one: "
                   "--bits-per-block C, at 2 bits per weight unless --bits-per-weight B; --target-size 40kB to size "
                   "the whole file, or --kl-budget BITS; a fit-posterior file needs no flag")


def _posterior_file(path: Path) -> bool:
    """Whether ``path`` is fit-posterior's output, the one input that needs no method flag."""
    from mlcompress.posterior.file import is_posterior_file  # reads safetensors: only when no flag was given

    return path.is_file() and is_posterior_file(path)


@app.command()
def encode(
    model: Annotated[Path, typer.Argument(help="Checkpoint: .pt/.pth/.bin, .safetensors, TorchScript, or a Hugging Face model directory.")],
    output: options.Output = None,
    lossless: Annotated[bool, typer.Option("--lossless", help="Store every tensor bit-exactly (zstd-coded byte planes of each value).")] = False,
    bits_per_block: Annotated[Optional[int], typer.Option("--bits-per-block", help=f"REC (MIRACLE): bits per block, 1..{MAX_BITS_PER_BLOCK} (default {DEFAULT_BITS_PER_BLOCK}; a posterior file sets its own). Each block scores 2^bits candidates.")] = None,
    bits_per_weight: Annotated[Optional[float], typer.Option("--bits-per-weight", help="REC budget in bits per coded weight (default 2.0).")] = None,
    kl_budget: Annotated[Optional[float], typer.Option("--kl-budget", help="REC budget: total KL in bits over all REC tensors.")] = None,
    target_size: Annotated[Optional[str], typer.Option("--target-size", help="REC budget: size of the whole file (bytes, or 1.52kB, 3MB).")] = None,
    selection: Annotated[Optional[str], typer.Option("--selection", help="REC candidate choice: is (importance sampling, MIRACLE), greedy (best candidate), orc (ordered random coding, entropy-coded indices).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="REC seed shared by encoder and decoder (stored in the file).")] = 0,
    min_rec_numel: Annotated[int, typer.Option("--min-rec-numel", help="REC only tensors with >= 2 dimensions and at least this many weights; the rest are stored lossless.")] = DEFAULT_MIN_REC_NUMEL,
    task: options.OptionalTask = None,
    data: options.DataDir = None,
    retrain_steps: Annotated[int, typer.Option("--retrain-steps", help="Progressive REC (needs --task and a posterior file): retrain the blocks not yet coded this many steps after each group.")] = 0,
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="Progressive REC: blocks coded per group (default: half of the blocks not yet coded, each time).")] = None,
    include: select.Include = None,
    exclude: select.Exclude = None,
    device: options.Device = "auto",
    threads: options.Threads = None,
    force: options.Force = False,
    unsafe_pickle: options.UnsafePickle = False,
    json: options.Json = False,
    quiet: options.Quiet = False,
    debug: options.Debug = False,
) -> None:
    """Compress a checkpoint into a .mrc container."""
    out = Output(json and main_process(), quiet or not main_process())  # under torchrun, process 0 speaks
    rec_flags = {"--bits-per-block": bits_per_block, "--bits-per-weight": bits_per_weight, "--kl-budget": kl_budget,
                 "--target-size": target_size, "--selection": selection}
    given = [flag for flag, value in rec_flags.items() if value is not None]
    if lossless and given:
        raise UsageError(f"--lossless and {given[0]} choose different methods", hint="pass one of them")
    method: api.Method | None = None
    if lossless:
        refuse_if_launched("encode --lossless")
        method = api.Lossless()
    elif given:
        method = api.Rec(bits_per_block=bits_per_block, bits_per_weight=bits_per_weight, kl_budget_bits=kl_budget,
                         target_size=api.parse_size(target_size) if target_size is not None else None,
                         selection=selection or "is", seed=seed, min_rec_numel=min_rec_numel, device=device,
                         select=selection_of(include, exclude))
    elif seed != 0 or min_rec_numel != DEFAULT_MIN_REC_NUMEL or task is not None or retrain_steps or group_size:
        # REC-only settings choose REC too; a posterior file needs no flag at all.
        method = api.Rec(seed=seed, min_rec_numel=min_rec_numel, device=device, select=selection_of(include, exclude))
    if (include or exclude) and not isinstance(method, api.Rec):
        raise UsageError("--include/--exclude choose the tensors REC codes",
                         hint="pass a REC budget flag (--bits-per-weight, ...); --lossless keeps every tensor exactly")
    if method is None and model.exists() and not _posterior_file(model):
        raise UsageError("choose how to encode", hint=CHOOSE_A_METHOD)
    if (task is not None or retrain_steps or group_size is not None) and lossless:
        raise UsageError("--task/--retrain-steps/--group-size are for progressive REC, not --lossless")
    if isinstance(method, api.Rec) and (task is not None or retrain_steps or group_size is not None):
        method = dataclasses.replace(method, task=task, data=str(data) if data is not None else None,
                                     retrain_steps=retrain_steps, group_size=group_size)
        method.validate()
    with out.tracker() as progress:
        def receive(update) -> None:
            progress(update)
            if update.phase == "REC progressive" and not out.interactive and not json:
                out.log(f"REC progressive: {update.done}/{update.total} blocks coded, train loss "
                        f"{update.info['loss']:.4f}, test {update.info['metric_name']} {update.info['metric']:.4f}")

        report = api.encode(model, output, method=method, force=force, unsafe_pickle=unsafe_pickle, progress=receive,
                            device=device, threads=threads)
    summary = report.to_json()

    def render(console: Console) -> None:
        head = f"wrote {summary['output']}: "
        sizes = f"{human_bytes(summary['original_bytes'])} -> {human_bytes(summary['file_bytes'])}"
        if report.method == "lossless":
            console.print(f"{head}{summary['tensors']} tensors, {sizes} ({summary['ratio']:.3f}x, lossless) "
                          f"in {summary['seconds']:.2f} s")
            return
        saved = summary["index_bits_fixed"] - summary["index_bits_stored"]
        console.print(
            f"{head}{summary['rec_tensors']} REC tensors in {summary['blocks']} blocks of "
            f"{summary['bits_per_block']} bits ({summary['selection']}, KL/block mean {summary['kl_bits_per_block_mean']:.2f} "
            f"max {summary['kl_bits_per_block_max']:.2f} bits), {summary['tensors'] - summary['rec_tensors']} other tensors; "
            f"{sizes} ({summary['ratio']:.1f}x) in {summary['seconds']:.1f} s on {summary['device']}"
            + (f"; entropy-coded indices saved {saved} bits" if saved > 0 else "")
        )

    out.result(summary, render)

