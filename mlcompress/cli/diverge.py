"""``mlcompress diverge``: how far a compressed model drifts from its reference."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from mlcompress import api
from mlcompress.cli import options
from mlcompress.cli.app import app
from mlcompress.cli.output import Output
from mlcompress.distributed import main_process
from mlcompress.errors import GateFailed, UsageError


@app.command()
def diverge(
    models: Annotated[List[Path], typer.Argument(metavar="REF CMP", help="REF CMP: model directories, TorchScript or weights files (.pt, .safetensors, .mrc). With --ref-logits, CMP alone.")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Evaluation data: .jsonl (text field or input_ids) or a plain text file; for --arch TASK, the task's data directory.")] = None,
    field: Annotated[str, typer.Option("--field", help="JSON field holding the text in --data .jsonl.")] = "text",
    tokenizer: Annotated[Optional[Path], typer.Option("--tokenizer", help="tokenizer.json or a directory holding a tokenizer (default: the model directory's).")] = None,
    ctx: Annotated[Optional[int], typer.Option("--ctx", help="Window (llama-cpp: chunk) length in tokens (default 512, capped at the model's context; with a .kld --ref-logits, the file's).")] = None,
    stride: Annotated[Optional[int], typer.Option("--stride", help="Tokens between window starts (default: --ctx); --score second-half/all only.")] = None,
    score: Annotated[str, typer.Option("--score", help="Which targets are scored. llama-cpp (default): all documents as one token stream (jsonl texts joined by newlines, tokenized once) cut into floor(N/ctx) chunks, tail dropped; targets ctx/2+1 .. ctx-1 of each chunk (for --ctx 16: 9..15), token 0 replaced by BOS when the tokenizer adds one. second-half: each document in windows; targets len/2 .. len-1 of each window (16: 8..15). all: targets 1 .. len-1 of each window (16: 1..15).")] = "llama-cpp",
    no_bos: Annotated[bool, typer.Option("--no-bos", help="--score llama-cpp: never replace token 0 of a chunk by BOS.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows (or sequences) per forward pass.")] = 4,
    mode: Annotated[str, typer.Option("--mode", help="data, sample (sequences drawn from REF) or exact (all sequences, tiny vocabularies).")] = "data",
    samples: Annotated[int, typer.Option("--samples", help="--mode sample: number of sequences.")] = 100,
    length: Annotated[int, typer.Option("--length", help="--mode sample/exact: sequence length L.")] = 32,
    bos: Annotated[Optional[int], typer.Option("--bos", help="--mode sample/exact: begin-of-sequence token id (default: from the model).")] = None,
    save_ref: Annotated[Optional[Path], typer.Option("--save-ref", help="Also save the reference's log-probs to this file: top-k (--format mlcompress) or a llama.cpp .kld base file (--format llama-cpp, the default for a .kld name).", dir_okay=False)] = None,
    ref_logits: Annotated[Optional[Path], typer.Option("--ref-logits", help="Use a reference file instead of running REF: a cache written by --save-ref, or a llama.cpp .kld base file (llama-perplexity --save-all-logits).", dir_okay=False)] = None,
    ref_format: Annotated[Optional[str], typer.Option("--format", help="--save-ref/--ref-logits file format: mlcompress or llama-cpp (default: llama-cpp for .kld files).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="--save-ref: log-probs kept per position (plus one tail bucket).")] = 64,
    fail_above: Annotated[Optional[List[str]], typer.Option("--fail-above", help="NAME=VALUE: exit 3 if the measure exceeds VALUE (repeatable), e.g. kl=0.05.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Draw the per-position KL histogram to this image (needs matplotlib).", dir_okay=False)] = None,
    shared_vocab: Annotated[bool, typer.Option("--shared-vocab", help="Compare models with different vocabulary sizes over their shared prefix.")] = False,
    arch: Annotated[Optional[str], typer.Option("--arch", help="Architecture for weights-only files: a model directory, a TorchScript file, or a task (lenet5, mlp-digits).")] = None,
    compile_: Annotated[bool, typer.Option("--compile", help="Fuse the divergence arithmetic with torch.compile: ~4x faster measures after a one-time compile of ~20 s (needs a C++ compiler on the CPU).")] = False,
    seed: options.Seed = 0,
    device: options.Device = "auto",
    unsafe_pickle: options.UnsafePickle = False,
    force: options.Force = False,
    json: options.Json = False,
    quiet: options.Quiet = False,
    debug: options.Debug = False,
) -> None:
    """Measure the divergence of CMP from REF: KL, JS, flips, perplexity; gate it for CI."""
    # Start-up: the report helpers import torch, which --help and usage errors must not pay for.
    from mlcompress.divergence.report import check_gates, parse_gates, render

    if len(models) == 2:
        ref, cmp = models
    elif len(models) == 1 and ref_logits is not None:
        ref, cmp = None, models[0]
    else:
        raise UsageError(
            f"expected REF and CMP, got {len(models)} model argument(s)",
            hint="mlcompress diverge ref_model cmp_model --data val.jsonl (or CMP --ref-logits F)",
        )
    gates = parse_gates(fail_above or [])
    out = Output(json and main_process(), quiet or not main_process())  # under torchrun, process 0 speaks
    settings = dict(
        data=data, field=field, tokenizer=tokenizer, ctx=ctx, stride=stride, score=score,
        batch_size=batch_size, device=device, mode=mode, samples=samples, length=length, bos=bos,
        seed=seed, save_ref=save_ref, ref_logits=ref_logits, top_k=top_k, ref_format=ref_format, no_bos=no_bos,
        shared_vocab=shared_vocab, arch=arch, unsafe_pickle=unsafe_pickle, force=force,
        compiled=compile_,
    )
    with out.tracker() as progress:
        result = api.diverge(ref, cmp, progress=progress, **settings)
    report = result.report
    if plot is not None and main_process():  # under torchrun the per-token values are process 0's
        if "kl" not in result.per_token:
            raise UsageError("--plot draws per-position KL, which --mode sample/exact do not produce")
        from mlcompress.divergence.plot import plot_kl_histogram

        plot_kl_histogram(result.per_token["kl"], plot, title=f"{report['cmp']} vs {report['ref']}", force=force)
        report["plot"] = str(plot)
    failed: GateFailed | None = None
    try:
        check_gates(report, gates)
    except GateFailed as exc:
        failed = exc  # print the report first: CI logs should show what failed and by how much
    out.result(report, lambda console: render(report, console))
    if failed is not None:
        raise failed
