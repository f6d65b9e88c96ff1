"""Options shared by every command, defined once so their names and help never drift apart."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Json = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout (logs go to stderr).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors (and the result with --json).")]
Debug = Annotated[bool, typer.Option("--debug", help="Show a traceback on errors (also MLCOMPRESS_DEBUG=1).")]
Force = Annotated[bool, typer.Option("--force", "-f", help="Overwrite the output file if it exists.")]
Output = Annotated[Optional[Path], typer.Option("--output", "-o", help="Output file.", dir_okay=False)]
Device = Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu or cuda.")]
Threads = Annotated[Optional[int], typer.Option("--threads", help="Threads for lossless (lossless3, lossless2) coding, default: all cores. The bytes written never depend on it.", show_default=False)]
UnsafePickle = Annotated[
    bool,
    typer.Option(
        "--unsafe-pickle",
        help="Allow loading checkpoints that contain pickled Python objects. This can run arbitrary "
        "code: only for files you trust.",
    ),
]
TaskName = Annotated[str, typer.Option("--task", help="Built-in task (lenet5, lm, mlp-digits; lm takes options, e.g. lm:window=128, lm:model=DIR) or a plug-in package.module:factory.")]
DataDir = Annotated[Optional[Path], typer.Option("--data", help="The task's data (lenet5: a directory of MNIST-format IDX files, default /usr/share/datasets/fashion-mnist; lm: a .txt file, or .jsonl with a \"text\" field per line).")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed; runs with the same seed are identical on the CPU.")]
OptionalTask = Annotated[
    Optional[str],
    typer.Option("--task", help="Built-in task (lenet5, lm, mlp-digits; lm takes options, e.g. lm:window=128) or plug-in package.module:factory. It is "
                 "needed by quantize --method l2 and prune --finetune-steps; otherwise used to report "
                 "accuracy before and after."),
]
