"""``mlcompress inspect``: what a ``.mrc`` holds and what each tensor costs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mlcompress import api
from mlcompress.cli import options
from mlcompress.cli.app import app
from mlcompress.cli.output import Output, human_bytes
from mlcompress.inspection import inspection_document


def _details(row: dict) -> str:
    details = row.get("details") or {}
    if "alias_of" in row:
        return f"same as {row['alias_of']}"
    if row.get("codec") == "rec":  # the figures people compare, in one short line
        text = (f"{details['blocks']} x {details['bits_per_block']} bits, "
                f"{details['weights_per_block']:.4g} vars/block, {details['selection']}")
        if details.get("hash_factor", 1) != 1:
            text += f", hashed {details['hash_factor']:.3g}:1 ({details['free_variables']:,} vars)"
        if details.get("index_coding") == "entropy":
            text += ", entropy-coded"
        return text
    if row.get("codec") == "quant":
        return _quant_details(details)
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in details.items())


def _quant_details(details: dict) -> str:
    """A quantized tensor's grid in words: what --bits, --symmetric, --per-channel,
    --group-size, --step or L² chose for it."""
    scheme = details.get("scheme")
    shared = {"group": f"groups of {details.get('group_size')}", "per-tensor": "per tensor",
              "per-channel": "per channel"}.get(details.get("grid", ""), "")
    if scheme == "uniform":
        kind = "symmetric" if details.get("symmetric") else "asymmetric"
        scales = f"{details['groups']:,} {details.get('scales', 'float32')} scales" if details.get("groups", 1) > 1 else ""
        parts = [f"{details.get('bits')}-bit uniform, {kind}", shared, scales]
    elif scheme == "step":
        steps = f"{details['groups']:,} steps" if details.get("groups", 1) > 1 else ""
        parts = ["entropy-constrained step", shared, steps]
    elif scheme == "l2":
        parts = [f"L² dead zone, step {details['step']:.4g}" if "step" in details else "L² dead zone",
                 f"edge {details['edge']:.4g}" if "edge" in details else ""]
    else:
        parts = [f"{k}={v}" for k, v in details.items()]
    return ", ".join(p for p in parts if p)


@app.command()
def inspect(
    container: Annotated[Path, typer.Argument(help="A .mrc file.")],
    json: options.Json = False,
    quiet: options.Quiet = False,
    debug: options.Debug = False,
) -> None:
    """Show every tensor of a .mrc file: codec, shape, sizes, bits per weight, and the totals."""
    out = Output(json, quiet)
    report = api.inspect(container)
    summary = inspection_document(report)

    def render(console: Console) -> None:
        # Piped, the console is wide enough for every row (cli/output.py); on a narrow terminal
        # a long name folds onto more lines rather than losing its end.
        table = Table(title=str(container), show_footer=True)
        totals = summary["totals"]
        table.add_column("tensor", footer=f"{totals['tensors']} tensors", overflow="fold")
        table.add_column("codec", footer="+ header")
        table.add_column("shape")
        table.add_column("dtype")
        table.add_column("original", justify="right", footer=human_bytes(totals["original_bytes"]))
        table.add_column("stored", justify="right", footer=f"{human_bytes(totals['file_bytes'])} file")
        table.add_column("bits/w", justify="right", footer=f"{totals['bits_per_weight']:.3f}")
        table.add_column("details")
        for row in summary["tensors"]:
            table.add_row(
                row["name"], row["codec"], "x".join(map(str, row["shape"])) or "scalar", row["dtype"],
                human_bytes(row["original_bytes"]), human_bytes(row["stored_bytes"]),
                f"{row['bits_per_weight']:.3f}", _details(row),
            )
        console.print(table)
        console.print(
            f"{totals['parameters']:,} parameters; {human_bytes(totals['original_bytes'])} -> "
            f"{human_bytes(totals['file_bytes'])} (ratio {totals['ratio']:.2f}x; "
            f"header and padding {human_bytes(totals['overhead_bytes'])}); producer "
            f"{summary['metadata'].get('producer', '?')}"
        )

    out.result(summary, render)
