"""Data-free quantization of a small GPT-2 trained here: bytes against mean next-token KL.

    .venv/bin/python benchmarks/lm_quant.py [--write-docs]

The model (GPT-2 architecture, trained on the machine's own text: /usr/share/common-licenses and
the text files under /usr/share/doc, the first 6 M characters, BPE vocabulary of 4,096, cached in
``runs/bench-models/gpt2-local/``) is quantized by every method into a real ``.mrc`` file, and the
KL comes from ``mlcompress diverge REF FILE --data VAL --score all --json`` on held-out text (every
position of every window). Bytes are whole files; bits per weight are file bits over all
parameters. The quantized tensors are every 2-D weight (attention/MLP Conv1D weights, the tied
wte/lm_head once, wpe); LayerNorms and biases are stored losslessly.

Peers, in the same run when they are importable (they are not mlcompress dependencies; install
them in a separate virtualenv with mlcompress installed editable, and run this script with that
interpreter): HQQ (``hqq.core.quantize.Quantizer``, its proximal optimiser on, zero rounding at 4
bits as its ``BaseQuantizeConfig`` does, groups along the input features) and optimum-quanto
(``MaxOptimizer`` + ``quantize_weight``, its defaults for int2/int4 weights). They quantize the
same tensors; their dequantized weights are written into a model directory that ``diverge``
scores exactly like our files. Their bytes are the packed levels as each library stores them plus
the scales and zero-points at float16 (2 bytes each), with every other tensor at fp32; nothing
for a container or config, so the peers' byte counts are if anything small.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import mlcompress
from mlcompress.codecs.quant.rdo import HIGH_RATE_LAMBDA
from mlcompress.errors import UsageError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from curves import interpolate  # noqa: E402
from results_doc import record_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "runs" / "bench-models"


CORPUS_CHARS = 6_000_000


def corpus(limit: int = CORPUS_CHARS) -> str:
    """The machine's own English text, in a fixed order, up to ``limit`` characters."""
    files = sorted(Path("/usr/share/common-licenses").glob("*"))
    files += sorted(p for p in Path("/usr/share/doc").rglob("*") if p.is_file() and p.stat().st_size > 2000)
    parts = []
    for p in files:
        try:
            raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError, gzip.BadGzipFile, EOFError):
            continue
        parts.append(text)
        if sum(map(len, parts)) >= limit:
            break
    return "\n\n".join(parts)[:limit]


def train_model(out: Path, val: Path, steps: int, seed: int) -> None:
    import tokenizers
    import transformers

    text = corpus()
    cut = int(len(text) * 0.97)
    train_text, val_text = text[:cut], text[cut:]
    out.mkdir(parents=True, exist_ok=True)
    val.write_text(val_text)
    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator([train_text[i:i + 100000] for i in range(0, len(train_text), 100000)],
                            vocab_size=4096, min_frequency=2, special_tokens=["<|endoftext|>"])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>")
    fast.save_pretrained(out)
    ids = torch.tensor(fast(train_text)["input_ids"], dtype=torch.long)
    torch.manual_seed(seed)
    random.seed(seed)
    config = transformers.GPT2Config(vocab_size=len(fast), n_positions=256, n_embd=256, n_layer=4, n_head=4,
                                     bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    model = transformers.GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    ctx, batch = 128, 16
    start = time.perf_counter()
    for step in range(steps):
        lr = 1e-3 * min(1.0, (step + 1) / 100) * max(0.05, 1 - step / steps)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(ids) - ctx - 1, (batch,))
        x = torch.stack([ids[s:s + ctx] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"  step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    model.save_pretrained(out)


#: Characters of held-out text scored (the first ones of the held-out split): ~7k positions,
#: a mean KL known to a few per cent (its standard error is printed by diverge) in a seventh of
#: the time of the whole split; the methods compared differ by factors, not per cents.
VAL_CHARS = 24_000


def held_out(val: Path) -> Path:
    """The scored part of the held-out text, as its own file beside it."""
    part = val.with_name(f"{val.stem}-{VAL_CHARS // 1000}k.txt")
    text = val.read_text()[:VAL_CHARS]
    if not part.exists() or part.read_text() != text:
        part.write_text(text)
    return part


def diverge_kl(ref: Path, cmp: Path, val: Path) -> dict:
    cmd = [sys.executable, "-m", "mlcompress", "diverge", str(ref), str(cmp), "--data", str(val), "--score", "all",
           "--ctx", "256", "--device", "cpu", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def quantized_names(state: dict[str, torch.Tensor]) -> list[str]:
    """The tensors every method quantizes: the 2-D weights (Conv1D weights, wte, wpe)."""
    return [k for k, v in state.items() if v.dim() == 2 and k.endswith(".weight")]


def is_conv1d(name: str) -> bool:
    """GPT-2's attention and MLP weights are Conv1D, stored (in, out)."""
    return ".attn." in name or ".mlp." in name


def as_linear(name: str, w: torch.Tensor) -> torch.Tensor:
    """The weight as an (out, in) Linear weight, so peers group along the input features
    (the embeddings are already (rows, features)). Square Conv1D weights are transposed too:
    the shape alone cannot tell."""
    return w.t().contiguous() if is_conv1d(name) else w.contiguous()


def hqq_quantize(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, int]:
    from hqq.core.quantize import Quantizer  # an optional peer, never an mlcompress dependency

    w_q, meta = Quantizer.quantize(w, nbits=bits, channel_wise=True, group_size=group, optimize=True,
                                   round_zero=bits == 4, axis=1, bitpack=True, device="cpu")
    meta["scale"], meta["zero"] = meta["scale"].half(), meta["zero"].half()  # as HQQLinear stores them
    meta["compute_dtype"] = torch.float32
    stored = w_q.numel() * w_q.element_size() + 2 * (meta["scale"].numel() + meta["zero"].numel())
    return Quantizer.dequantize(w_q, meta).float().reshape(w.shape), stored


def quanto_quantize(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, int]:
    from optimum.quanto import qint2, qint4  # an optional peer
    from optimum.quanto.tensor.optimizers import MaxOptimizer
    from optimum.quanto.tensor.weights import quantize_weight

    qtype = {2: qint2, 4: qint4}[bits]
    scale, shift = MaxOptimizer()(w, qtype=qtype, axis=0, group_size=group)
    scale, shift = scale.half().float(), shift.half().float()  # counted as float16 below
    q = quantize_weight(w, qtype=qtype, axis=0, scale=scale, shift=shift, group_size=group, optimized=False)
    stored = w.numel() * bits // 8 + 2 * (scale.numel() + shift.numel())
    return q.dequantize().float().reshape(w.shape), stored


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


def mean_kl(report: dict) -> float:
    return report["measures"]["kl"]["mean"] if "measures" in report else report["kl"]["mean"]


def peer_methods() -> list[tuple[str, Any, int, int]]:
    out: list[tuple[str, Any, int, int]] = []
    if importable("hqq"):
        out += [(f"HQQ {b}-bit g{g}", hqq_quantize, b, g) for b, g in ((2, 128), (2, 64), (3, 64), (4, 128), (4, 64), (4, 32))]
    if importable("optimum.quanto"):
        out += [(f"optimum-quanto qint{b} g{g}", quanto_quantize, b, g) for b, g in ((4, 128),)]
    return out


def peer_model(model: Path, out: Path, fn: Any, bits: int, group: int) -> int:
    """Write the peer's dequantized model into ``out``; return its stored bytes."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(model / "model.safetensors"))
    names = set(quantized_names(state))
    stored, new = 0, {}
    for name, w in state.items():
        if name in names:
            linear = as_linear(name, w.float())
            deq, size = fn(linear, bits, group)
            new[name] = (deq.t() if is_conv1d(name) else deq).contiguous()
            stored += size
        else:
            new[name] = w
            stored += w.numel() * 4
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in model.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    save_file(new, str(out / "model.safetensors"), metadata={"format": "pt"})
    return stored


#: Target ratios of the default rows: 2 to 5.3 bits per parameter, the goal's range and past
#: HQQ's 4-bit g32 (5.1 bits), so that every peer point lies between two of our rows.
DEFAULT_RATIOS = (16, 10.67, 8, 6.4, 6)


def methods() -> list[tuple[str, object]]:
    """(label, method); the rows labelled ``--target-ratio R`` alone are the default family the
    comparison with the peers uses."""
    Q = mlcompress.Quant
    out = [(f"`--target-ratio {r:g}`", Q(target_ratio=float(r))) for r in DEFAULT_RATIOS]
    out += [(f"`--target-ratio {r:g} --rdo-lambda 0.1155`", Q(target_ratio=float(r), rdo_lambda=HIGH_RATE_LAMBDA))
            for r in DEFAULT_RATIOS]
    out += [("`--target-ratio 8 --allocation norm`", Q(target_ratio=8.0, allocation="norm")),
            ("`--bits 4 --group-size 128`", Q(bits=4, group_size=128))]
    return out


def family(rows: list[tuple[str, int, float, float]], suffix: str) -> list[tuple[int, float]]:
    """(bytes, KL) of the ``--target-ratio R`` rows with exactly the extra flags ``suffix``."""
    out = []
    for m, b, _, kl in rows:
        if m.startswith("`--target-ratio "):
            flags = m.strip("`").split(" ", 2)[2:]  # what follows "--target-ratio R"
            if (flags[0] if flags else "") == suffix:
                out.append((b, kl))
    return out


def versus_peers(rows: list[tuple[str, int, float, float]]) -> str:
    """Each peer row against our ``--target-ratio`` families' KL at the same bytes (interpolated)."""
    families = {"default": family(rows, ""), "`--rdo-lambda 0.1155`": family(rows, "--rdo-lambda 0.1155")}
    head = " | ".join(f"{name} at the same bytes (ratio to peer)" for name in families)
    lines = [f"| peer | bits per parameter | peer's KL | {head} |", "|---|---:|---:|" + "---:|" * len(families)]
    for m, b, bpp, kl in rows:
        if m.startswith("`"):
            continue
        cells = []
        for points in families.values():
            at = interpolate(b, points, log_y=True)
            cells.append("outside our rows" if at is None else f"{at:.5f} ({at / kl:.2f})")
        lines.append(f"| {m} | {bpp:.2f} | {kl:.5f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500, help="training steps of the local GPT-2")
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed of the local GPT-2 (0: runs/bench-models/gpt2-local, S: gpt2-local-seedS)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-only", action="store_true", help="train (or find) the model and stop")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = CACHE / ("gpt2-local" if args.seed == 0 else f"gpt2-local-seed{args.seed}")
    val = CACHE / "gpt2-local-val.txt"
    if not (model / "model.safetensors").exists():
        print(f"training the local GPT-2 (seed {args.seed})", file=sys.stderr, flush=True)
        train_model(model, val, args.steps, seed=args.seed)
    if args.train_only:
        return 0
    scored = held_out(val)
    params = mlcompress.encode(model, CACHE / f"gpt2-lossless-seed{args.seed}.mrc", method=mlcompress.Lossless(),
                               force=True).to_json()["parameters"]
    rows = []
    for label, method in methods():
        out = CACHE / f"gpt2-q-seed{args.seed}.mrc"
        try:
            report = mlcompress.encode(model, out, method=method, force=True).to_json()
        except UsageError as e:
            print(f"  {label}: {e}", file=sys.stderr)
            continue
        d = diverge_kl(model, out, scored)
        kl = mean_kl(d)
        rows.append((label, report["file_bytes"], 8 * report["file_bytes"] / params, kl))
        print(f"  {label}: {report['file_bytes']:,} B, {rows[-1][2]:.2f} bits/param, KL {kl:.5f}", file=sys.stderr, flush=True)
    for label, fn, bits, group in peer_methods():
        out = CACHE / f"peer-model-seed{args.seed}"
        stored = peer_model(model, out, fn, bits, group)
        kl = mean_kl(diverge_kl(model, out, scored))
        rows.append((label, stored, 8 * stored / params, kl))
        print(f"  {label}: {stored:,} B, {rows[-1][2]:.2f} bits/param, KL {kl:.5f}", file=sys.stderr, flush=True)
    rows.sort(key=lambda r: r[1])
    peers = "HQQ and optimum-quanto in the same run" if peer_methods() else "no peer installed"
    lines = [f"Model: GPT-2 architecture, 4 layers, d 256, vocabulary 4,096, {params:,} parameters, trained "
             f"{args.steps} steps here with seed {args.seed}; {peers}; KL over every position of the held-out text (`diverge --score all`).", "",
             "| method | file bytes | bits per parameter | mean KL (nats) |", "|---|---:|---:|---:|"]
    lines += [f"| {m} | {b:,} | {bpp:.2f} | {kl:.5f} |" for m, b, bpp, kl in rows]
    if any(not m.startswith("`") for m, *_ in rows):
        lines += ["", "Against the peers at equal bytes (the default `--target-ratio` rows, KL interpolated "
                  "log-linearly in bytes):", "", versus_peers(rows)]
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        key = "lm-quant" if args.seed == 0 else f"lm-quant-seed{args.seed}"
        record_run(key, " ".join(["benchmarks/lm_quant.py", *sys.argv[1:]]), time.perf_counter() - t0, text,
                   heading=f"### Local GPT-2, seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
