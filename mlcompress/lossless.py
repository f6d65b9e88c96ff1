"""The lossless method: every tensor of a checkpoint, bit-exactly, in a ``.mrc``.

Each tensor is stored with the codec :func:`mlcompress.assembly.lossless_codec` picks --
``lossless3`` (a Huffman-coded exponent symbol and raw bits, docs/lossless.md) for float32,
bfloat16 and float16 when its C extension is built, else ``lossless2`` (zstd-coded byte
planes); both are chunked so threads share the work -- unless its bytes as they are would be no
larger (tiny tensors, where the tables cost more than they save), then ``raw``. Tied tensors
are stored once.

The encode streams (:func:`mlcompress.container.write_stream`): safetensors files, Hugging Face
directories and ``.mrc`` files are read one tensor at a time and each payload is spooled to disk
as it is produced, so memory is bounded by the largest tensor (docs/scale.md).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

from mlcompress.assembly import base_metadata, default_output, smallest_lossless
from mlcompress.atomic import check_destination
from mlcompress.checkpoint.source import open_source, source_of
from mlcompress.container import write_stream
from mlcompress.progress import Progress, report
from mlcompress.report import Report
from mlcompress.workers import resolve_threads


def encode_lossless(
    src: str | os.PathLike,
    dst: str | os.PathLike | None = None,
    *,
    force: bool = False,
    unsafe_pickle: bool = False,
    progress: Progress | None = None,
    tensors: Mapping[str, Any] | None = None,
    threads: int | None = None,
) -> Report:
    """Losslessly encode the checkpoint at ``src`` into ``dst`` (default: beside it, ``.mrc``).

    ``tensors`` may be given to skip loading (``src`` is then only recorded as the source name).
    ``threads`` (default: all cores) code each tensor's chunks in parallel; the file's bytes
    never depend on it.
    """
    threads = resolve_threads(threads)
    start = time.perf_counter()
    dst = Path(dst) if dst is not None else default_output(src)
    check_destination(dst, force=force)
    source = open_source(src, unsafe_pickle=unsafe_pickle) if tensors is None else source_of(tensors, src)
    written = write_stream(dst, source, lambda name, t: smallest_lossless(name, t, threads),
                           base_metadata(src, {"method": "lossless"}), force=force,
                           progress=lambda done, total: report(progress, "lossless", done / 1e6, total / 1e6, "MB"))
    codecs = Counter(r.codec for r in written.records if r.alias_of is None)
    return Report.of(written, "lossless", time.perf_counter() - start, {"codecs": dict(sorted(codecs.items()))})
