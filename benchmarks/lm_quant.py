"""Data-free quantization of a small GPT-2 trained here: bytes against mean next-token KL.

    .venv/bin/python benchmarks/lm_quant.py [--write-docs]

The model (GPT-2 architecture, trained on the machine's own text: /usr/share/common-licenses and
the text files under /usr/share/doc, the first 6 M characters, BPE vocabulary of 4,096, cached in
``runs/bench-models/gpt2-local/``) is quantized by every method into a real ``.mrc`` file, and the
KL comes from ``mlcompress diverge REF FILE --data VAL --score all --json`` on held-out text (every
position of every window). Bytes are whole files; bits per weight are file bits over all
parameters. The quantized tensors are every 2-D weight (attention/MLP Conv1D weights, the tied
wte/lm_head once, wpe); LayerNorms and biases are stored losslessly.

Peers: HQQ and optimum-quanto are not installable here (not in the local package index), so no
peer runs in the same job; the issue's HQQ figures come from another model and are not comparable
row by row.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

import mlcompress
from mlcompress.errors import UsageError

sys.path.insert(0, str(Path(__file__).resolve().parent))
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


def diverge_kl(ref: Path, cmp: Path, val: Path) -> dict:
    cmd = [sys.executable, "-m", "mlcompress", "diverge", str(ref), str(cmp), "--data", str(val), "--score", "all",
           "--ctx", "256", "--device", "cpu", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def methods() -> list[tuple[str, object]]:
    Q = mlcompress.Quant
    out = [(f"`--target-ratio {r:g}`", Q(target_ratio=float(r))) for r in (16, 10.67, 8, 6.4)]
    out += [(f"`--target-ratio {r:g} --allocation equal`", Q(target_ratio=float(r), allocation="equal"))
            for r in (16, 10.67, 8, 6.4)]
    out.append(("`--target-ratio 8 --group-size 64`", Q(target_ratio=8.0, group_size=64)))
    out += [(f"`--bits 4 --group-size {g}`", Q(bits=4, group_size=g)) for g in (256, 128, 64, 32)]
    out += [("`--bits 3 --group-size 64`", Q(bits=3, group_size=64)), ("`--bits 4`", Q(bits=4)),
            ("`--float fp8-e4m3`", mlcompress.Float(format="fp8-e4m3"))]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500, help="training steps of the local GPT-2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, val = CACHE / "gpt2-local", CACHE / "gpt2-local-val.txt"
    if not (model / "model.safetensors").exists():
        print("training the local GPT-2", file=sys.stderr, flush=True)
        train_model(model, val, args.steps, seed=0)
    params = mlcompress.encode(model, CACHE / "gpt2-lossless.mrc", method=mlcompress.Lossless(),
                               force=True).to_json()["parameters"]
    rows = []
    for label, method in methods():
        out = CACHE / "gpt2-q.mrc"
        try:
            report = mlcompress.encode(model, out, method=method, force=True).to_json()
        except UsageError as e:
            print(f"  {label}: {e}", file=sys.stderr)
            continue
        d = diverge_kl(model, out, val)
        kl = d["measures"]["kl"]["mean"] if "measures" in d else d["kl"]["mean"]
        rows.append((label, report["file_bytes"], 8 * report["file_bytes"] / params, kl))
        print(f"  {label}: {report['file_bytes']:,} B, {rows[-1][2]:.2f} bits/param, KL {kl:.5f}", file=sys.stderr, flush=True)
    rows.sort(key=lambda r: r[1])
    lines = [f"Model: GPT-2 architecture, 4 layers, d 256, vocabulary 4,096, {params:,} parameters, trained "
             f"{args.steps} steps here; KL over every position of the held-out text (`diverge --score all`).", "",
             "| method | file bytes | bits per parameter | mean KL (nats) |", "|---|---:|---:|---:|"]
    lines += [f"| {m} | {b:,} | {bpp:.2f} | {kl:.5f} |" for m, b, bpp, kl in rows]
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        record_run("lm-quant", "benchmarks/lm_quant.py --write-docs", time.perf_counter() - t0, text,
                   heading="## Data-free quantization of a local GPT-2 (issue 11)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
