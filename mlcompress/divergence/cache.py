"""Reference caches: run the reference once, compare many compressed variants against the file.

llama.cpp's base file (``--save-all-logits``, read and written by :mod:`.kld_file`) stores every
vocabulary entry's log-probability as a 16-bit code over a 16-nat window below the top, 2 bytes
per entry per scored position (64 kB for a 32k vocabulary). This cache stores per scored
position only the reference's top-k log-probabilities with their token ids, plus one tail bucket
holding the log of the remaining probability mass, and the exact log-probability of the
observed token: 8k + 8 bytes (k = 64: 520 bytes).

Against a cache, the compared model's distribution is coarsened to the same k + 1 outcomes (its
own probabilities of the k tokens and the rest of its mass) and the divergences are taken between
the two coarsened distributions. Merging outcomes can only lose information, so every reported
divergence (KL, reverse KL, JS, TV) is a *lower bound* on the full-vocabulary value; how close it
is depends on how much the models disagree inside the tail (measured in docs/diverge.md and
benchmarks/diverge_lm.py). Same-top, delta-p and perplexities are exact: the reference's top-1
is in the cache, the compared model's argmax comes from its full logits, and the observed
token's reference log-probability is stored as is.

The file is safetensors (no pickle: safe to share) with the window token ids, so the compared
model sees exactly the reference's inputs, and metadata recording the reference model's weight
fingerprint, the tokenizer fingerprint and the windowing settings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mlcompress.atomic import atomic_output
from mlcompress.divergence.data import Window
from mlcompress.divergence.lm import (
    BatchLogits,
    LmComparison,
    PhaseTimer,
    SequenceLikelihood,
    add_likelihoods,
    check_ids,
    compared_batches,
    scored_index,
)
from mlcompress.divergence.measures import (
    TokenMeasures,
    log_normaliser,
    row_blocks,
    token_measures,
)
from mlcompress.divergence.models import LanguageModel
from mlcompress.errors import InputError

FORMAT = "mlcompress-ref-logits"
VERSION = "1"
DEFAULT_TOP_K = 64
# Logit given to the top-k tokens when summing the tail: exp(MASKED - max) is exactly 0 in float32,
# and unlike -inf it keeps a chunk made only of masked tokens from turning the sum into NaN.
MASKED = -1.0e30


class RefCacheWriter:
    """Collects the reference's top-k log-probs window by window (hook for compare_lms)."""

    def __init__(self, top_k: int = DEFAULT_TOP_K) -> None:
        if top_k < 1:
            raise InputError(f"--top-k must be at least 1 (got {top_k})")
        self.top_k = top_k
        self.ids: list[torch.Tensor] = []
        self.first: list[int] = []
        self.doc: list[int] = []
        self.topk_ids: list[torch.Tensor] = []
        self.topk_logp: list[torch.Tensor] = []
        self.tail_logp: list[torch.Tensor] = []
        self.target_logp: list[torch.Tensor] = []
        self.vocab: int | None = None

    def add_batch(self, b: BatchLogits) -> None:
        """Keep the top-k buckets of the scored rows of one batch (hook for compare_lms)."""
        batch, ref_flat, rows, measures = b.windows, b.ref, b.rows, b.measures
        vocab = ref_flat.shape[-1]
        self.vocab = vocab
        k = min(self.top_k, vocab - 1)  # keep a non-empty tail so every bucket has mass > 0
        rows = rows.to(ref_flat.device)
        starts = row_blocks(rows.numel(), vocab)
        for r0 in starts:
            block = ref_flat.index_select(0, rows[r0 : r0 + starts.step])
            ids, logp, tail = top_k_buckets(block, k)
            self.topk_ids.append(ids.to(torch.int32).cpu())
            self.topk_logp.append(logp.float().cpu())
            self.tail_logp.append(tail.float().cpu())
        for w in batch:
            self.ids.append(w.ids.to(torch.int32))
            self.first.append(w.first)
            self.doc.append(w.doc)
        self.target_logp.append(measures.ref_logp.float().cpu())

    def save(self, path: str | Path, metadata: dict[str, Any], *, force: bool = False) -> Path:
        """Write the cache atomically (nothing is left behind if anything fails)."""
        if not self.ids:
            raise InputError("nothing was scored, so there is no reference cache to save")
        lengths = torch.tensor([0] + [t.numel() for t in self.ids], dtype=torch.int64)
        tensors = {
            "ids": torch.cat(self.ids),
            "window_offsets": lengths.cumsum(0),
            "window_first": torch.tensor(self.first, dtype=torch.int32),
            "window_doc": torch.tensor(self.doc, dtype=torch.int32),
            "topk_ids": torch.cat(self.topk_ids).contiguous(),
            "topk_logp": torch.cat(self.topk_logp).contiguous(),
            "tail_logp": torch.cat(self.tail_logp),
            "target_logp": torch.cat(self.target_logp),
        }
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "vocab": str(self.vocab),
            "top_k": str(tensors["topk_ids"].shape[1]),
            "tokens_sha256": tokens_digest(tensors["ids"], tensors["window_offsets"]),
        }
        meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
        with atomic_output(path, force=force) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return Path(path)


def tokens_digest(ids: torch.Tensor, offsets: torch.Tensor) -> str:
    """A hash of exactly which tokens, in which windows, were scored."""
    h = hashlib.sha256()
    h.update(ids.to(torch.int32).numpy().tobytes())
    h.update(offsets.to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def top_k_buckets(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k token ids and log-probs of ``rows`` ([S, V] logits), and the tail's log-mass.

    The tail is computed as a logsumexp over the other logits rather than as log(1 - sum p),
    which would be zero (log -inf) in float32 whenever the tail mass is below ~1e-7."""
    mx, lsum = log_normaliser(rows)
    vals, ids = rows.float().topk(k, dim=-1)
    logp = (vals - mx.unsqueeze(-1)) - lsum.unsqueeze(-1)
    masked = rows.float().scatter(-1, ids, MASKED)
    tmx, tlsum = log_normaliser(masked)
    tail = (tmx - mx) + (tlsum - lsum)
    return ids, logp, tail


@dataclass
class RefCache:
    """A loaded reference cache (see the module docstring for the fields)."""

    path: Path
    metadata: dict[str, str]
    ids: torch.Tensor
    offsets: torch.Tensor
    first: torch.Tensor
    doc: torch.Tensor
    topk_ids: torch.Tensor
    topk_logp: torch.Tensor
    tail_logp: torch.Tensor
    target_logp: torch.Tensor

    @property
    def vocab(self) -> int:
        return int(self.metadata["vocab"])

    def windows(self) -> list[Window]:
        out = []
        for w in range(self.first.numel()):
            a, b = int(self.offsets[w]), int(self.offsets[w + 1])
            out.append(Window(int(self.doc[w]), self.ids[a:b].long(), int(self.first[w])))
        return out


def load_ref_cache(path: str | Path) -> RefCache:
    """Read and validate a cache written by :class:`RefCacheWriter`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"reference cache {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:
        raise InputError(f"{path} is not a reference cache ({str(exc).splitlines()[0]})") from None
    if meta.get("format") != FORMAT:
        raise InputError(f"{path} is not an mlcompress reference cache", hint="write one with --save-ref")
    if meta.get("version") != VERSION:
        raise InputError(f"{path}: reference cache version {meta.get('version')} is not supported")
    needed = ("ids", "window_offsets", "window_first", "window_doc", "topk_ids", "topk_logp", "tail_logp", "target_logp")
    missing = [n for n in needed if n not in tensors]
    if missing:
        raise InputError(f"{path}: damaged reference cache (no {missing[0]})")
    cache = RefCache(
        path, meta, tensors["ids"], tensors["window_offsets"], tensors["window_first"],
        tensors["window_doc"], tensors["topk_ids"], tensors["topk_logp"], tensors["tail_logp"],
        tensors["target_logp"],
    )
    scored = int(sum(int(cache.offsets[w + 1] - cache.offsets[w]) - int(cache.first[w]) for w in range(cache.first.numel())))
    if (
        cache.offsets.numel() != cache.first.numel() + 1
        or int(cache.offsets[-1]) != cache.ids.numel()
        or cache.topk_ids.shape != cache.topk_logp.shape
        or cache.topk_ids.shape[0] != scored
        or cache.tail_logp.numel() != scored
        or cache.target_logp.numel() != scored
        or tokens_digest(cache.ids, cache.offsets) != meta.get("tokens_sha256")
    ):
        raise InputError(f"{path}: damaged reference cache (inconsistent sizes or token hash)")
    return cache


def coarse_measures(
    topk_ids: torch.Tensor,
    topk_logp: torch.Tensor,
    tail_logp: torch.Tensor,
    ref_target_logp: torch.Tensor,
    cmp_rows: torch.Tensor,
    targets: torch.Tensor,
) -> TokenMeasures:
    """Divergences between the cached reference buckets and the compared model coarsened alike
    (``cmp_rows``: the compared model's logits for the same positions, one row each)."""
    dev = cmp_rows.device
    topk_ids, topk_logp = topk_ids.to(dev).long(), topk_logp.to(dev)
    mx, lsum = log_normaliser(cmp_rows)
    q_top = (cmp_rows.float().gather(-1, topk_ids) - mx.unsqueeze(-1)) - lsum.unsqueeze(-1)
    masked = cmp_rows.float().scatter(-1, topk_ids, MASKED)
    tmx, tlsum = log_normaliser(masked)
    q_tail = (tmx - mx) + (tlsum - lsum)
    p_buckets = torch.cat([topk_logp, tail_logp.to(dev).unsqueeze(-1)], 1)
    q_buckets = torch.cat([q_top, q_tail.unsqueeze(-1)], 1)
    m = token_measures(p_buckets, q_buckets)
    # Exact same-top from the full logits: the reference's top-1 is a maximum of the compared row.
    m.same_top = cmp_rows.float().gather(-1, topk_ids[:, :1]).squeeze(-1) >= mx
    m.ref_logp = ref_target_logp.to(dev)
    t = targets.to(dev).long().unsqueeze(-1)
    m.cmp_logp = ((cmp_rows.float().gather(-1, t) - mx.unsqueeze(-1)) - lsum.unsqueeze(-1)).squeeze(-1)
    return m


def compare_with_cache(
    cache: RefCache,
    cmp: LanguageModel,
    *,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
    share: range | None = None,
) -> LmComparison:
    """Compare ``cmp`` against a reference cache on the cache's own windows, or on the windows
    numbered ``share`` (a data-parallel process's)."""
    check_ids(cache.ids, cmp.vocab_size, "compared", str(cache.path))
    parts: list[TokenMeasures] = []
    lls: dict[int, SequenceLikelihood] = {}
    windows = cache.windows()
    share = range(len(windows)) if share is None else share
    # scored positions consumed from the cache so far (a share starts after the others' rows)
    done = sum(w.n_scored for w in windows[: share.start])
    timer = PhaseTimer(cmp.device)
    n_windows = 0
    mine = windows[share.start : share.stop]
    for batch, logits in compared_batches(cmp, mine, batch_size, timer, cache.vocab, "the reference cache"):
        flat = logits.reshape(-1, logits.shape[-1])
        rows, targets = scored_index(batch, logits.shape[1])
        rows = rows.to(flat.device)
        starts = row_blocks(rows.numel(), flat.shape[-1])
        for r0 in starts:
            sl = slice(done + r0, done + min(r0 + starts.step, rows.numel()))
            block = flat.index_select(0, rows[r0 : r0 + starts.step])
            parts.append(
                coarse_measures(
                    cache.topk_ids[sl], cache.topk_logp[sl], cache.tail_logp[sl],
                    cache.target_logp[sl], block, targets[r0 : r0 + starts.step],
                ).to("cpu")
            )
        batch_m = TokenMeasures.cat(parts[len(parts) - len(starts):])
        add_likelihoods(lls, batch, batch_m)
        done += rows.numel()
        n_windows += len(batch)
        timer.measures_done()
        if progress is not None:
            progress(int(rows.numel()))
    comp = LmComparison(
        measures=TokenMeasures.cat(parts),
        sequences=[lls[k] for k in sorted(lls)],
        windows=n_windows,
        vocab_ref=cache.vocab,
        vocab_cmp=cache.vocab,
        vocab_compared=cache.vocab,
        timer=timer,
    )
    comp.notes.append(
        f"reference from cache {cache.path.name} (top-{cache.topk_ids.shape[1]} + tail): KL, "
        "JS and TV are lower bounds on the full-vocabulary values; same-top, delta-p and PPL "
        "are exact"
    )
    return comp
