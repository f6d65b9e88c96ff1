"""Codec benchmarks against the tools people compare them with, measured in one run.

    .venv/bin/python benchmarks/codecs.py lossless                 # print the table
    .venv/bin/python benchmarks/codecs.py lossless --write-docs    # and put it in docs/results.md

Each section is a subcommand: ``lossless`` (below) and ``quant`` (:mod:`quant_sweep`: data-free
quantization, ratio against accuracy, against NNCodec's published figures).

``lossless`` measures, on two LeNet-5 checkpoints (fp32 and their bf16 cast) and on a synthetic
bf16 tensor set of GPT-2-medium shapes (>100M parameters; no real model that size is available
offline, so its weights are normal with a per-tensor standard deviation, labelled as such):

* ``lossless3`` (the default for float tensors) and ``lossless2`` (the previous default, forced
  by hiding the C extension from the writer) in memory (the codec alone, with the ``raw``
  fallback of ``encode_lossless``; decoding as ``tensors()`` does, ``lossless3``'s tensors in one
  batch) and through the API to a file (``encode_lossless`` with
  fsync / ``open_mrc(path).tensors()``, CRC checks included), at one thread and at all cores;
  for ``lossless3`` also the API encode with the two fsyncs not timed (they cost milliseconds
  on the machine measured, whatever the file size);
* the old ``lossless`` codec (constriction ANS), in memory;
* zstd level 3 and zlib level 6 on the concatenated raw bytes (zstd at one thread and all cores);
* ZipNN when it is importable (it is not a dependency; when absent the issue's figures are
  quoted, marked as not from the same run).

Ratio = raw tensor bytes / stored bytes (for the API: the whole ``.mrc`` file). MB/s counts
uncompressed bytes (10^6) both ways. Times are wall clock, best of ``--repeat`` runs (the large
set: ``--repeat-large``), with ``torch.set_num_threads(1)``. Every decode is checked bit-exact.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import sys
import tempfile
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import zstandard

from mlcompress import atomic, codecs
from mlcompress.assembly import smallest_lossless
from mlcompress.checkpoint import load_checkpoint
from mlcompress.codecs import lossless3
from mlcompress.codecs.raw import tensor_to_le_bytes
from mlcompress.container import EncodedTensor, TensorRecord, encode_tensor, open_mrc
from mlcompress.lossless import encode_lossless

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quant_sweep  # noqa: E402  (the quant section lives beside this script)
from results_doc import put_between_markers

ROOT = Path(__file__).resolve().parents[1]
#: ZipNN 0.5.4 on the issue's LeNet-5 (another checkpoint, another machine): ratio, enc, dec MB/s.
ZIPNN_ISSUE = {"fp32": (1.200, 752, 3201), "bf16": (1.501, 780, 1717)}


def best_time(fn: Callable[[], Any], repeat: int, before: Callable[[], None] | None = None) -> tuple[float, Any]:
    """Smallest wall time of ``repeat`` calls (``before`` runs untimed ahead of each) and the last
    result. The minimum is the figure least disturbed by other jobs on a shared machine."""
    best, result = math.inf, None
    for _ in range(repeat):
        if before is not None:
            before()
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def check_same(decoded: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], what: str) -> None:
    for name, t in tensors.items():
        got = decoded[name]
        if got.dtype != t.dtype or tuple(got.shape) != tuple(t.shape) or bits(got) != bits(t):
            raise SystemExit(f"{what}: {name} is not bit-exact")


def synthetic_gpt2_medium(layers: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """GPT-2-medium shapes (d 1024, vocab 50257, context 1024) for ``layers`` blocks, bf16.

    Not a trained model: each weight matrix is N(0, sigma^2) with sigma from GPT-2's
    initialisation (0.02; 0.02 / sqrt(2 * 24) for the residual projections) times a per-tensor
    factor in [0.5, 2] (trained tensors differ in scale), biases N(0, 0.01^2), LayerNorm gains
    N(1, 0.05^2). Exponent statistics are what the codecs exploit, and these are those of
    normal weights of realistic scale; real checkpoints also have structure these lack.
    """
    rng = np.random.default_rng(seed)
    d, vocab, ctx = 1024, 50257, 1024
    shapes: list[tuple[str, tuple[int, ...], str]] = [("wte.weight", (vocab, d), "w"), ("wpe.weight", (ctx, d), "w")]
    for i in range(layers):
        p = f"h.{i}."
        shapes += [(p + "ln_1.weight", (d,), "gain"), (p + "ln_1.bias", (d,), "bias"),
                   (p + "attn.c_attn.weight", (d, 3 * d), "w"), (p + "attn.c_attn.bias", (3 * d,), "bias"),
                   (p + "attn.c_proj.weight", (d, d), "proj"), (p + "attn.c_proj.bias", (d,), "bias"),
                   (p + "ln_2.weight", (d,), "gain"), (p + "ln_2.bias", (d,), "bias"),
                   (p + "mlp.c_fc.weight", (d, 4 * d), "w"), (p + "mlp.c_fc.bias", (4 * d,), "bias"),
                   (p + "mlp.c_proj.weight", (4 * d, d), "proj"), (p + "mlp.c_proj.bias", (d,), "bias")]
    shapes += [("ln_f.weight", (d,), "gain"), ("ln_f.bias", (d,), "bias")]
    out = {}
    for name, shape, kind in shapes:
        x = rng.standard_normal(shape, dtype=np.float32)
        if kind == "gain":
            x = 1 + 0.05 * x
        elif kind == "bias":
            x *= 0.01
        else:
            x *= (0.02 if kind == "w" else 0.02 / math.sqrt(48)) * float(2 ** rng.uniform(-1, 1))
        out[name] = torch.from_numpy(x).bfloat16()
    return out


def measure_set(label: str, tensors: dict[str, torch.Tensor], repeat: int, thread_counts: list[int],
                work: Path) -> list[dict[str, Any]]:
    """Every method's ratio and speeds on one tensor set."""
    raw_parts = [tensor_to_le_bytes(t) for t in tensors.values()]
    raw = b"".join(raw_parts)
    n = len(raw)
    rows: list[dict[str, Any]] = []

    def add(method: str, threads: int | str, stored: int, enc: float, dec: float, note: str = "") -> None:
        rows.append({"data": label, "method": method, "threads": threads, "ratio": n / stored,
                     "enc": n / enc / 1e6, "dec": n / dec / 1e6, "note": note})
        r = rows[-1]
        print(f"  {label:28s} {method:34s} {str(threads):>3s} {r['ratio']:.4f}  enc {r['enc']:7.0f}  dec {r['dec']:7.0f}",
              flush=True)

    path = work / f"{label.replace(' ', '_')}.mrc"
    for codec in ("lossless3", "lossless2"):
        if codec == "lossless3" and not lossless3.NATIVE:
            print(f"  {label}: lossless3 is not built here (no C extension); its rows are left out", flush=True)
            continue
        with previous_default(codec == "lossless2"):
            measure_lossless(codec, label, tensors, repeat, thread_counts, path, add)

    old_repeat = min(repeat, 2)
    enc, entries = best_time(lambda: {k: old_smallest_lossless(k, t) for k, t in tensors.items()}, old_repeat)
    dec, decoded = best_time(lambda: {k: decode_entry(e, 1) for k, e in entries.items()}, old_repeat)
    check_same(decoded, tensors, "old lossless")
    add("old `lossless` (ANS), in memory", 1, sum(len(e.payload) for e in entries.values()), enc, dec)

    for threads in thread_counts:
        compressor = zstandard.ZstdCompressor(level=3, threads=threads if threads > 1 else 0)
        enc, blob = best_time(lambda: compressor.compress(raw), repeat)
        dec, back = best_time(lambda: zstandard.ZstdDecompressor().decompress(blob), repeat)
        assert back == raw, "zstd round trip"
        add("zstd -3, raw bytes", threads, len(blob), enc, dec)

    zlib_repeat = min(repeat, 2)
    enc, blob = best_time(lambda: zlib.compress(raw, 6), zlib_repeat)
    dec, back = best_time(lambda: zlib.decompress(blob), zlib_repeat)
    assert back == raw, "zlib round trip"
    add("zlib -6, raw bytes", 1, len(blob), enc, dec)

    measure_zipnn(tensors, raw, repeat, thread_counts, add)
    return rows


def measure_lossless(codec: str, label: str, tensors: dict[str, torch.Tensor], repeat: int, thread_counts: list[int],
                     path: Path, add: Callable[..., None]) -> None:
    """One lossless codec (what ``smallest_lossless`` picks now) in memory and through the API."""
    for threads in thread_counts:
        enc, entries = best_time(lambda: {k: smallest_lossless(k, t, threads) for k, t in tensors.items()}, repeat)
        dec, decoded = best_time(lambda: decode_entries(entries, threads), repeat)
        check_same(decoded, tensors, f"{codec} in memory")
        add(f"{codec}, in memory", threads, sum(len(e.payload) for e in entries.values()), enc, dec)

    def remove() -> None:
        path.unlink(missing_ok=True)

    decode_times = {}
    for threads in thread_counts:
        enc, _ = best_time(lambda: encode_lossless(f"{label}.pt", path, tensors=tensors, threads=threads), repeat, remove)
        dec, decoded = best_time(lambda: open_mrc(path).tensors(threads=threads), repeat)
        decode_times[threads] = dec
        check_same(decoded, tensors, f"{codec} through the API")
        add(f"{codec}, API to a file", threads, path.stat().st_size, enc, dec)
    if codec == "lossless3":  # the same decode; the encode without waiting for the disk
        with untimed_fsync():
            enc, _ = best_time(lambda: encode_lossless(f"{label}.pt", path, tensors=tensors, threads=1), repeat, remove)
        add(f"{codec}, API to a file, fsync not timed", 1, path.stat().st_size, enc, decode_times[1])
    remove()


@contextmanager
def previous_default(active: bool) -> Iterator[None]:
    """While ``active``, the writer does not see lossless3's C extension, so ``smallest_lossless``
    and ``encode_lossless`` write ``lossless2`` as before it (the reader is unchanged)."""
    saved = lossless3.NATIVE
    lossless3.NATIVE = saved and not active
    try:
        yield
    finally:
        lossless3.NATIVE = saved


@contextmanager
def untimed_fsync() -> Iterator[None]:
    """The atomic writer's two fsyncs (file, directory) skipped: what the rest of the API costs."""
    saved = atomic._fsync_file, atomic._fsync_directory
    atomic._fsync_file = atomic._fsync_directory = lambda path: None
    try:
        yield
    finally:
        atomic._fsync_file, atomic._fsync_directory = saved


def decode_entries(entries: dict[str, EncodedTensor], threads: int) -> dict[str, torch.Tensor]:
    """Decode in-memory entries as the container's ``tensors()`` would (without the file): the
    entries of a codec that decodes in batches (``lossless3``) in one batch, the others one by
    one."""
    batched = {k: e for k, e in entries.items() if hasattr(codecs.get(e.codec), "decode_many")}
    out = {k: decode_entry(e, threads) for k, e in entries.items() if k not in batched}
    by_codec: dict[str, list[str]] = {}
    for k, e in batched.items():
        by_codec.setdefault(e.codec, []).append(k)
    for name, keys in by_codec.items():
        tensors, _ = codecs.get(name).decode_many([(batched[k].payload, record_of(batched[k])) for k in keys], threads)
        out.update(zip(keys, tensors))
    return {k: out[k] for k in entries}


def record_of(entry: EncodedTensor) -> TensorRecord:
    return TensorRecord(entry.name, tuple(entry.shape), entry.dtype, entry.codec, entry.params, 0, len(entry.payload), 0)


def decode_entry(entry: EncodedTensor, threads: int) -> torch.Tensor:
    """Decode an in-memory entry with its codec, as the container would (without the file)."""
    rec = record_of(entry)
    codec = codecs.get(entry.codec)
    if getattr(codec, "parallel", False):
        return codec.decode(entry.payload, rec, threads=threads)
    return codec.decode(entry.payload, rec)


def old_smallest_lossless(name: str, tensor: torch.Tensor) -> EncodedTensor:
    """What ``smallest_lossless`` did before ``lossless2``: the old codec, or raw when not smaller."""
    coded = encode_tensor(name, tensor, "lossless", {})
    return coded if len(coded.payload) < tensor.numel() * tensor.element_size() else encode_tensor(name, tensor, "raw", {})


def measure_zipnn(tensors: dict[str, torch.Tensor], raw: bytes, repeat: int, thread_counts: list[int],
                  add: Callable[..., None]) -> None:
    """ZipNN's byte mode on the raw bytes, if it is installed (it is optional and never imported
    by mlcompress). This path has not run on the machine the table in docs/results.md comes
    from, where ZipNN is not installed."""
    try:
        from zipnn import ZipNN  # type: ignore[import-not-found]
    except ImportError:
        return
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(next(iter(tensors.values())).dtype)
    if dtype is None:
        return
    # ZipNN 0.5.4 regroups the bytes of its input buffer in place (even of a ``bytes`` object):
    # every compress gets a fresh copy, made outside the timed call.
    source: list[bytearray] = []

    def fresh() -> None:
        source[:] = [bytearray(raw)]

    for threads in thread_counts:
        zpn = ZipNN(input_format="byte", bytearray_dtype=dtype, threads=threads)
        enc, blob = best_time(lambda: zpn.compress(source[0]), repeat, fresh)
        blob = bytes(blob)
        dec, back = best_time(lambda: zpn.decompress(blob), repeat)
        assert bytes(back) == raw, "ZipNN round trip"
        add("ZipNN 0.5.4, byte mode", threads, len(blob), enc, dec)
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    held: list[torch.Tensor] = []

    def fresh_tensor() -> None:
        held[:] = [flat.clone()]

    zpn = ZipNN(input_format="torch", threads=1)
    enc, blob = best_time(lambda: bytes(zpn.compress(held[0])), repeat, fresh_tensor)
    dec, back = best_time(lambda: zpn.decompress(blob), repeat)
    assert bits(back.reshape(-1)) == bits(flat), "ZipNN torch-mode round trip"
    add("ZipNN 0.5.4, torch mode", 1, len(blob), enc, dec)


def zipnn_issue_rows() -> list[dict[str, Any]]:
    return [{"data": f"issue's LeNet-5 {kind}", "method": "ZipNN 0.5.4, byte mode (issue 11, not same run)",
             "threads": 1, "ratio": r, "enc": e, "dec": d, "note": "not same run"}
            for kind, (r, e, d) in ZIPNN_ISSUE.items()]


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| data | method | threads | ratio | encode MB/s | decode MB/s |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['data']} | {r['method']} | {r['threads']} | {r['ratio']:.4f} | {r['enc']:,.0f} | {r['dec']:,.0f} |")
    return "\n".join(lines)


def lossless(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    thread_counts = sorted({1, os.cpu_count() or 1})
    sets: list[tuple[str, dict[str, torch.Tensor], int]] = []
    for path in args.lenet:
        if not path.exists():
            raise SystemExit(f"{path} does not exist: train it with "
                             f"`.venv/bin/mlcompress train --task lenet5 --epochs 1 --seed S -o {path}`")
        fp32 = {k: v.float().contiguous() for k, v in load_checkpoint(path).items()}
        sets.append((f"LeNet-5 {path.stem} fp32", fp32, args.repeat))
        sets.append((f"LeNet-5 {path.stem} bf16", {k: v.bfloat16() for k, v in fp32.items()}, args.repeat))
    if args.layers:
        big = synthetic_gpt2_medium(args.layers)
        count = sum(t.numel() for t in big.values())
        sets.append((f"synthetic GPT-2-medium-shaped, {count / 1e6:.0f}M bf16", big, args.repeat_large))
    print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
          f"zstandard {zstandard.__version__} (libzstd {'.'.join(map(str, zstandard.ZSTD_VERSION))}), "
          f"{platform.machine()}, {os.cpu_count()} cores; threads {thread_counts}", flush=True)
    if importlib.util.find_spec("zipnn") is not None:
        zipnn_note = "ZipNN measured in the same run"
    else:
        zipnn_note = "ZipNN is not installed here: its rows are the issue's figures (another LeNet-5, another machine), not the same run"
    print(zipnn_note, flush=True)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mlcompress-bench-") as tmp:
        for label, tensors, repeat in sets:
            rows += measure_set(label, tensors, repeat, thread_counts, Path(tmp))
    if "ZipNN" not in " ".join(r["method"] for r in rows):
        rows += zipnn_issue_rows()
    text = table(rows)
    print()
    print(text)
    print(f"\n{time.perf_counter() - start:.0f} s")
    if args.write_docs:
        command = " ".join(["benchmarks/codecs.py", *sys.argv[1:]])
        machine = (f"{platform.machine()}, {os.cpu_count()} cores, no GPU; python {platform.python_version()}, "
                   f"torch {torch.__version__}, numpy {np.__version__}, zstandard {zstandard.__version__} "
                   f"(libzstd {'.'.join(map(str, zstandard.ZSTD_VERSION))})")
        put_between_markers("codecs-lossless", f"Command: `.venv/bin/python {command}`. Machine: {machine}. "
                   f"Best of {args.repeat} (large set: {args.repeat_large}; old codec and zlib: at most 2) "
                   f"wall-clock runs; every round trip bit-exact. {zipnn_note}.\n\n{text}",
                            heading="## Lossless codecs v3 and v2 against zstd, zlib and ZipNN (issue 11)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sections = parser.add_subparsers(dest="section", required=True)
    p = sections.add_parser("lossless", help="lossless3 and lossless2 against the old codec, zstd, zlib (and ZipNN if installed)")
    p.add_argument("--lenet", type=Path, nargs="*",
                   default=[ROOT / "runs" / "lenet5-s0.pt", ROOT / "runs" / "lenet5-s1.pt"],
                   help="LeNet-5 checkpoints (default: runs/lenet5-s0.pt and runs/lenet5-s1.pt)")
    p.add_argument("--layers", type=int, default=6,
                   help="transformer blocks of the synthetic GPT-2-medium set (6: 128M parameters; 0: skip it)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per figure; the best is kept")
    p.add_argument("--repeat-large", type=int, default=2, help="timed runs per figure on the synthetic set")
    p.add_argument("--write-docs", action="store_true", help="put the table into docs/results.md")
    p.set_defaults(run=lossless)
    q = sections.add_parser("quant", help="data-free quantization sweep against NNCodec's figures (benchmarks/quant_sweep.py)")
    quant_sweep.add_arguments(q)
    q.set_defaults(run=lambda a: quant_sweep.main_quant(a, "benchmarks/codecs.py " + " ".join(sys.argv[1:])))
    args = parser.parse_args()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
