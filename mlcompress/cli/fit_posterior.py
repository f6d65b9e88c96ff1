"""``mlcompress fit-posterior``: train a REC posterior under a per-block KL budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from mlcompress import api
from mlcompress.cli import options, select
from mlcompress.cli.app import app
from mlcompress.codecs.rec.limits import DEFAULT_BITS_PER_BLOCK, MAX_BITS_PER_BLOCK
from mlcompress.cli.output import Output
from mlcompress.distributed import main_process
from mlcompress.errors import UsageError


def _status_table(update) -> Table | None:
    """The live figures of a fit, below its bar on a terminal (the bar has the steps and rate)."""
    status = update.info.get("status") if update.phase == "fit" else None
    if status is None:
        return None
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("task loss", f"{status.loss_avg:.4f} (last 100 steps)")
    table.add_row(
        "KL per block",
        f"min {status.kl_bits_min:.3f}  mean {status.kl_bits_mean:.3f}  max {status.kl_bits_max:.3f} bits"
        f"  (budget {status.budget_bits} bits, {status.blocks:,} blocks)",
    )
    if status.beta_mean is not None:
        table.add_row("beta (mean)", f"{status.beta_mean:.4g}")
    if status.test is not None:
        table.add_row(f"test {status.test.metric_name}", f"{status.test.metric:.4f} at the posterior mean")
    return table


@app.command("fit-posterior")
def fit_posterior_command(
    task: options.TaskName,
    init: Annotated[Optional[Path], typer.Option("--init", help="Trained model of the task to start from (.pt, .safetensors, .mrc).")] = None,
    output: options.Output = None,
    data: options.DataDir = None,
    param: Annotated[str, typer.Option("--param", help="Posterior parameterization: mean-kl (budget holds by construction) or mean-var (beta annealing).")] = "mean-kl",
    bits_per_block: Annotated[int, typer.Option("--bits-per-block", help=f"KL budget of one REC block in bits, 1..{MAX_BITS_PER_BLOCK} (2^bits candidates when encoding).")] = DEFAULT_BITS_PER_BLOCK,
    kl_margin: Annotated[float, typer.Option("--kl-margin", help="Train each block to this many bits less KL than --bits-per-block, so REC has 2^margin times more candidates than exp(KL) (see docs/posterior.md).")] = 0.0,
    bits_per_weight: Annotated[float, typer.Option("--bits-per-weight", help="Budget per coded weight; sets the number of blocks.")] = 1.0,
    steps: Annotated[int, typer.Option("--steps", help="Optimiser steps in total (a resumed run continues up to this).")] = 2000,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Adam learning rate (default: 3e-2 for mean-kl, 3e-3 for mean-var; see docs/posterior.md).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Batch size (default: the task's).")] = None,
    min_rec_numel: Annotated[int, typer.Option("--min-rec-numel", help="Give a posterior only to parameters with at least this many values (default 1: every parameter, biases included).")] = 1,
    hash: Annotated[Optional[str], typer.Option("--hash", help="Hashing trick: tie weights to fewer free variables, name=factor,... (e.g. fc1.weight=50,conv2.weight=2) or auto (docs/posterior.md).")] = None,
    pretrain_steps: Annotated[int, typer.Option("--pretrain-steps", help="Train the hashed (tied) network this many steps without KL before fitting the posterior.")] = 0,
    target_size: Annotated[Optional[str], typer.Option("--target-size", help="Size of the REC file, header included (e.g. 3kB): sets the number of blocks instead of --bits-per-weight.")] = None,
    local_reparam: Annotated[bool, typer.Option("--local-reparam/--no-local-reparam", help="Local reparameterization for Linear layers.")] = True,
    beta_init: Annotated[float, typer.Option("--beta-init", help="mean-var: initial KL weight of every block.")] = 1.0,
    beta_step: Annotated[Optional[float], typer.Option("--beta-step", help="mean-var: constant annealing step (MIRACLE: 5e-5); default: auto, shrinking over the run.")] = None,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Evaluate on the test set every N steps (0: only at the end).")] = 500,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="Resumable checkpoint file (default: OUTPUT.ckpt).", dir_okay=False)] = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Save the checkpoint every N steps (0: never).")] = 500,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint.")] = False,
    include: select.Include = None,
    exclude: select.Exclude = None,
    seed: options.Seed = 0,
    device: options.Device = "auto",
    force: options.Force = False,
    json: options.Json = False,
    quiet: options.Quiet = False,
    debug: options.Debug = False,
) -> None:
    """Train a Gaussian posterior for REC (MIRACLE) and write a posterior file for `encode`."""
    # Start-up: FitConfig lives with the trainer, which imports torch; usage errors come first.
    from mlcompress.posterior.fit import FitConfig

    if output is None:
        raise UsageError("say where to write the posterior", hint="pass -o posterior.safetensors")
    from mlcompress.options import parse_size
    from mlcompress.posterior.budget import parse_hash

    out = Output(json and main_process(), quiet or not main_process())  # under torchrun, process 0 speaks
    config = FitConfig(
        parameterization=param, bits_per_block=bits_per_block, kl_margin=kl_margin, bits_per_weight=bits_per_weight,
        steps=steps, lr=lr, batch_size=batch_size, seed=seed, local_reparam=local_reparam,
        beta_init=beta_init, beta_step=beta_step, eval_every=eval_every,
        checkpoint_every=checkpoint_every, min_rec_numel=min_rec_numel, hash=parse_hash(hash),
        pretrain_steps=pretrain_steps, target_size=parse_size(target_size) if target_size is not None else None,
        include=tuple(include or ()), exclude=tuple(exclude or ()),
    )

    def milestone(update) -> None:
        """Off a terminal, each evaluation's figures as a line: the bar-less view of the table."""
        status = update.info.get("status") if update.phase == "fit" else None
        if status is not None and eval_every and status.step % eval_every == 0 and status.test is not None:
            out.log(
                f"step {status.step}/{status.steps}: task loss {status.loss_avg:.4f}, KL/block "
                f"{status.kl_bits_min:.2f}..{status.kl_bits_max:.2f} bits (budget {status.budget_bits}), "
                f"test {status.test.metric_name} {status.test.metric:.4f}"
            )

    with out.tracker(detail=_status_table) as progress:

        def receive(update) -> None:
            progress(update)
            if not (out.interactive or json):
                milestone(update)

        summary = api.fit_posterior(task, init, output, config=config, data=data, checkpoint=checkpoint,
                                    resume=resume, device=device, force=force, progress=receive)

    def render(console: Console) -> None:
        name = summary["metric_name"]
        console.print(
            f"wrote {summary['output']}: {summary['parameterization']} posterior for {summary['task']}, "
            f"{summary['coded_weights']:,} coded weights in {summary['blocks']:,} blocks of {summary['bits_per_block']} bits "
            f"(KL/block mean {summary['kl_bits_mean']:.3f}, max {summary['kl_bits_max']:.3f} bits); "
            f"{summary['steps']} steps in {summary['seconds']:.1f} s; test {name} {summary[name]:.4f} at the mean"
        )
        console.print(f"next: mlcompress encode {summary['output']} -o model.mrc")

    out.result(summary, render)
