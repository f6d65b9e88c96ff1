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
uncompressed bytes (10^6) both ways. Times are wall clock, best of ``--repeat`` rounds (the
large set: ``--repeat-large``), with ``torch.set_num_threads(1)``. In a round every method is
called once, one after another, all encodes first and then all decodes (:class:`Race`), so
drift in the machine's speed hits every method alike; the old ANS codec and zlib, too slow to
take part, are timed on their own (at most 2 runs). Every decode is checked bit-exact.
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
from pathlib import Path
from typing import Any, Callable

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


class Race:
    """Timed calls run in interleaved rounds: each round calls every entry once, in order, and
    an entry's figure is its best round. Why not one method after another: on a shared VM the
    speed drifts by tens of percent within a minute, so methods timed at different moments are
    not compared on the same machine; interleaved, every method sees the same drift."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, Callable[[], Any], Callable[[], None] | None]] = []

    def add(self, key: str, fn: Callable[[], Any], before: Callable[[], None] | None = None) -> None:
        self.entries.append((key, fn, before))

    def run(self, repeat: int) -> dict[str, tuple[float, Any]]:
        best = {key: math.inf for key, _, _ in self.entries}
        last: dict[str, Any] = {}
        for _ in range(repeat):
            for key, fn, before in self.entries:
                if before is not None:
                    before()
                start = time.perf_counter()
                last[key] = fn()  # the previous result is freed only now, as a caller holding it would
                best[key] = min(best[key], time.perf_counter() - start)
        return {key: (best[key], last[key]) for key in best}


def measure_set(label: str, tensors: dict[str, torch.Tensor], repeat: int, thread_counts: list[int],
                work: Path) -> list[dict[str, Any]]:
    """Every method's ratio and speeds on one tensor set: the encodes in interleaved rounds
    (:class:`Race`), then the decodes likewise; the old ANS codec and zlib (slow) on their own."""
    raw_parts = [tensor_to_le_bytes(t) for t in tensors.values()]
    raw = b"".join(raw_parts)
    n = len(raw)
    rows: list[dict[str, Any]] = []
    codecs_here = [c for c in ("lossless3", "lossless2") if c != "lossless3" or lossless3.NATIVE]
    if not lossless3.NATIVE:
        print(f"  {label}: lossless3 is not built here (no C extension); its rows are left out", flush=True)

    encodes, decodes = Race(), Race()
    stored: dict[str, Callable[[], int]] = {}
    for codec in codecs_here:
        old = codec == "lossless2"  # the writer without the C extension writes lossless2
        for threads in thread_counts:
            key = f"{codec}, in memory|{threads}"
            encodes.add(key, as_default(old, lambda t=threads: {k: smallest_lossless(k, v, t) for k, v in tensors.items()}))
        for threads in thread_counts:
            path = work / f"{label.replace(' ', '_')}-{codec}-{threads}.mrc"
            key = f"{codec}, API to a file|{threads}"
            encodes.add(key, as_default(old, lambda t=threads, p=path: encode_lossless(f"{label}.pt", p, tensors=tensors,
                                                                                      threads=t)),
                        before=lambda p=path: p.unlink(missing_ok=True))
            stored[key] = lambda p=path: p.stat().st_size
            decodes.add(key, lambda t=threads, p=path: open_mrc(p).tensors(threads=t))
        if codec == "lossless3":  # the same decode; the encode without waiting for the disk
            path = work / f"{label.replace(' ', '_')}-nofsync.mrc"
            encodes.add(f"{codec}, API to a file, fsync not timed|1",
                        without_fsync(lambda p=path: encode_lossless(f"{label}.pt", p, tensors=tensors, threads=1)),
                        before=lambda p=path: p.unlink(missing_ok=True))
    for threads in thread_counts:
        compressor = zstandard.ZstdCompressor(level=3, threads=threads if threads > 1 else 0)
        encodes.add(f"zstd -3, raw bytes|{threads}", lambda c=compressor: c.compress(raw))
    zipnn = zipnn_methods(tensors, raw, thread_counts)
    for key, (compress, before, _) in zipnn.items():
        encodes.add(key, compress, before)

    enc = encodes.run(repeat)
    for codec in codecs_here:  # in-memory decodes need the entries the encodes made
        for threads in thread_counts:
            entries = enc[f"{codec}, in memory|{threads}"][1]
            decodes.add(f"{codec}, in memory|{threads}", lambda e=entries, t=threads: decode_entries(e, t))
            stored[f"{codec}, in memory|{threads}"] = lambda e=entries: sum(len(x.payload) for x in e.values())
    for threads in thread_counts:
        blob = enc[f"zstd -3, raw bytes|{threads}"][1]
        decodes.add(f"zstd -3, raw bytes|{threads}", lambda b=blob: zstandard.ZstdDecompressor().decompress(b))
        stored[f"zstd -3, raw bytes|{threads}"] = lambda b=blob: len(b)
    for key, (_, _, make_decode) in zipnn.items():
        decode, size = make_decode(enc[key][1])
        decodes.add(key, decode)
        stored[key] = lambda s=size: s
    dec = decodes.run(repeat)

    def add(method: str, threads: int | str, size: int, enc_s: float, dec_s: float) -> None:
        rows.append({"data": label, "method": method, "threads": threads, "ratio": n / size,
                     "enc": n / enc_s / 1e6, "dec": n / dec_s / 1e6, "note": ""})
        r = rows[-1]
        print(f"  {label:28s} {method:34s} {str(threads):>3s} {r['ratio']:.4f}  enc {r['enc']:7.0f}  dec {r['dec']:7.0f}",
              flush=True)

    order = [f"{c}, {where}|{t}" for c in codecs_here for where in ("in memory", "API to a file") for t in thread_counts]
    for key in order + [k for k in dec if k not in order]:
        dec_s, decoded = dec[key]
        method, threads = key.split("|")
        check_decoded(key, decoded, tensors, raw)
        add(method, int(threads), stored[key](), enc[key][0], dec_s)
        if key == "lossless3, API to a file|1":
            nofsync = "lossless3, API to a file, fsync not timed|1"
            add(nofsync.split("|")[0], 1, stored[key](), enc[nofsync][0], dec_s)

    old_repeat = min(repeat, 2)
    enc_s, entries = best_time(lambda: {k: old_smallest_lossless(k, t) for k, t in tensors.items()}, old_repeat)
    dec_s, decoded = best_time(lambda: {k: decode_entry(e, 1) for k, e in entries.items()}, old_repeat)
    check_same(decoded, tensors, "old lossless")
    add("old `lossless` (ANS), in memory", 1, sum(len(e.payload) for e in entries.values()), enc_s, dec_s)

    zlib_repeat = min(repeat, 2)
    enc_s, blob = best_time(lambda: zlib.compress(raw, 6), zlib_repeat)
    dec_s, back = best_time(lambda: zlib.decompress(blob), zlib_repeat)
    assert back == raw, "zlib round trip"
    add("zlib -6, raw bytes", 1, len(blob), enc_s, dec_s)
    return rows


def check_decoded(key: str, decoded: Any, tensors: dict[str, torch.Tensor], raw: bytes) -> None:
    """Every decode bit-exact: tensors (ours), raw bytes (zstd, ZipNN's byte mode) or one flat
    tensor (ZipNN's torch mode)."""
    if isinstance(decoded, dict):
        check_same(decoded, tensors, key)
    elif isinstance(decoded, torch.Tensor):
        flat = torch.cat([t.reshape(-1) for t in tensors.values()])
        assert bits(decoded.reshape(-1)) == bits(flat), f"{key} round trip"
    else:
        assert bytes(decoded) == raw, f"{key} round trip"


def as_default(old: bool, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with the writer's default codec as it is, or (``old``) as it was before
    lossless3: the writer does not see lossless3's C extension, so ``smallest_lossless`` and
    ``encode_lossless`` write ``lossless2`` (the reader is unchanged)."""
    if not old:
        return fn

    def run() -> Any:
        saved = lossless3.NATIVE
        lossless3.NATIVE = False
        try:
            return fn()
        finally:
            lossless3.NATIVE = saved

    return run


def without_fsync(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` with the atomic writer's two fsyncs (file, directory) skipped: what the rest of
    the API costs."""

    def run() -> Any:
        saved = atomic._fsync_file, atomic._fsync_directory
        atomic._fsync_file = atomic._fsync_directory = lambda path: None
        try:
            return fn()
        finally:
            atomic._fsync_file, atomic._fsync_directory = saved

    return run


def decode_entries(entries: dict[str, EncodedTensor], threads: int) -> dict[str, torch.Tensor]:
    """Decode in-memory entries as the container's ``tensors()`` would (without the file): the
    entries of a codec that decodes in batches (``lossless3``) in one batch, the others one by
    one."""
    codecs.prepare((e.codec for e in entries.values()), threads)  # as tensors() does before it reads
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


def zipnn_methods(tensors: dict[str, torch.Tensor], raw: bytes, thread_counts: list[int]
                  ) -> dict[str, tuple[Callable[[], Any], Callable[[], None], Callable[[Any], tuple[Callable[[], Any], int]]]]:
    """ZipNN's byte mode on the raw bytes (each thread count) and its torch mode on the flat
    tensor, if ZipNN is installed (it is optional and never imported by mlcompress): per
    method, the compress call, what runs untimed before it, and from a compressed result the
    decompress call and the stored size."""
    try:
        from zipnn import ZipNN  # type: ignore[import-not-found]
    except ImportError:
        return {}
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(next(iter(tensors.values())).dtype)
    if dtype is None:
        return {}
    # ZipNN 0.5.4 regroups the bytes of its input buffer in place (even of a ``bytes`` object):
    # every compress gets a fresh copy, made outside the timed call.
    source: list[Any] = [None]
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    methods = {}
    for threads in thread_counts:
        zpn = ZipNN(input_format="byte", bytearray_dtype=dtype, threads=threads)

        def decoder(blob: Any, z: Any = zpn) -> tuple[Callable[[], Any], int]:
            blob = bytes(blob)
            return (lambda: z.decompress(blob)), len(blob)

        methods[f"ZipNN 0.5.4, byte mode|{threads}"] = (
            lambda z=zpn: z.compress(source[0]), lambda: source.__setitem__(0, bytearray(raw)), decoder)
    ztorch = ZipNN(input_format="torch", threads=1)

    def torch_decoder(blob: Any) -> tuple[Callable[[], Any], int]:
        return (lambda: ztorch.decompress(blob)), len(blob)

    methods["ZipNN 0.5.4, torch mode|1"] = (lambda: bytes(ztorch.compress(source[0])),
                                            lambda: source.__setitem__(0, flat.clone()), torch_decoder)
    return methods


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
        python = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable
        put_between_markers("codecs-lossless", f"Command: `{python} {command}`. Machine: {machine}. "
                   f"Best of {args.repeat} interleaved rounds (large set: {args.repeat_large}; old codec and zlib: "
                   f"at most 2 runs of their own); every round trip bit-exact. {zipnn_note}.\n\n{text}",
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
