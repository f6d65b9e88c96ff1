"""llama.cpp's ``.kld`` base files: what ``llama-perplexity --save-all-logits F`` writes and
``llama-perplexity --kl-divergence-base F --kl-divergence`` reads, so that a model compressed here
can be compared with a base computed by llama.cpp, and the other way round.

The layout, as llama.cpp's tools/perplexity/perplexity.cpp writes it (``perplexity()``, the
``log_softmax`` overload taking a ``uint16_t *``, and ``kl_divergence()``), all little-endian
(llama.cpp dumps its in-memory values):

====================  ==========================================================================
``char[8]``           the magic ``_logits_``
``int32`` n_ctx       the chunk length
``int32`` n_vocab
``int32`` n_chunk
``int32[n_chunk*n_ctx]``  the token stream's first n_chunk * n_ctx tokens as tokenized (token 0
                      of a chunk is *not* replaced by BOS here; that happens only in the batch)
records               per chunk, per scored position (logit rows n_ctx/2 ... n_ctx-2, predicting
                      targets n_ctx/2+1 ... n_ctx-1: S = n_ctx - 1 - n_ctx/2 of them), one record
                      of W = 2*ceil(n_vocab/2) + 4 ``uint16``: ``float32`` scale and ``float32``
                      min_log_prob (the first 4 uint16), then n_vocab codes, then one zero uint16
                      when n_vocab is odd
====================  ==========================================================================

Encoding one row of logits ``l`` (float32 arithmetic, as llama.cpp does it):
``top = max l``, ``lo = max(min l, top - 16)``, ``lse = log sum exp(l - top)`` (summed in
double, rounded to float), ``scale = (top - lo) / 65535``, ``min_log_prob = lo - top - lse``,
``code_i = round-half-even((l_i - lo) * (1/scale))`` if ``l_i > lo`` else 0, every code 0 when
``scale`` is 0. So log p_i is ``scale * code_i + min_log_prob`` to within scale/2 (at most
1.2e-4 nats), and every token more than 16 nats below the top decodes to the floor.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
import torch

from mlcompress.errors import InputError

MAGIC = b"_logits_"
HEADER = struct.Struct("<8siii")
#: Width of the log-prob window below the top (nats), and the largest code.
WINDOW = 16.0
MAX_CODE = 65535.0


def record_width(n_vocab: int) -> int:
    """uint16 per scored position: scale and floor (4), the codes, padding to an even count."""
    return 2 * ((n_vocab + 1) // 2) + 4


def scored_per_chunk(n_ctx: int) -> int:
    """Scored positions of one chunk under llama.cpp's rule (255 for 512)."""
    return n_ctx - 1 - n_ctx // 2


def looks_like_kld(path: str | Path) -> bool:
    """Whether ``path`` starts with the llama.cpp magic (how ``--ref-logits`` tells the formats
    apart without being told)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


@dataclass
class QuantizedRows:
    """Rows of log-probs as llama.cpp stores them: ``scale``/``min_log_prob`` float32 ``[S]``,
    ``codes`` int32 ``[S, V]`` (the uint16 values, widened: torch has few uint16 kernels)."""

    scale: torch.Tensor
    min_log_prob: torch.Tensor
    codes: torch.Tensor

    def log_probs(self) -> torch.Tensor:
        """The decoded log-probs, ``scale * code + min_log_prob`` in float32 (llama.cpp's
        expression: a product rounded to float32, then a sum rounded to float32)."""
        return (self.scale.unsqueeze(-1) * self.codes.float()) + self.min_log_prob.unsqueeze(-1)


def quantize_rows(logits: torch.Tensor) -> QuantizedRows:
    """Encode ``[S, V]`` logits the way llama.cpp's ``--save-all-logits`` does (see the module
    docstring), so a file written here holds the codes llama.cpp would have written for the
    same float32 logits (up to the last bit of the exp sum, which follows the exp library)."""
    x = logits.float()
    top = x.amax(-1)
    lo = torch.maximum(x.amin(-1), top - WINDOW)
    lse = torch.exp(x - top.unsqueeze(-1)).double().sum(-1).log().float()
    min_log_prob = (lo - top) - lse
    scale = (top - lo) / MAX_CODE
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    scaled = inv.unsqueeze(-1) * (x - lo.unsqueeze(-1))
    codes = torch.where(x > lo.unsqueeze(-1), torch.round(scaled), torch.zeros_like(scaled))
    # llama.cpp stores its int in a uint16 (wrapping); the largest code is 65535 by construction.
    return QuantizedRows(scale, min_log_prob, codes.to(torch.int32) & 0xFFFF)


def _pack(rows: QuantizedRows, n_vocab: int) -> bytes:
    """Records of ``rows`` as bytes: two float32 as four uint16, the codes, the zero pad."""
    s = rows.codes.shape[0]
    out = np.zeros((s, record_width(n_vocab)), dtype="<u2")
    floats = np.stack([rows.scale.cpu().numpy(), rows.min_log_prob.cpu().numpy()], 1).astype("<f4")
    out[:, :4] = floats.view("<u2")
    out[:, 4 : 4 + n_vocab] = rows.codes.cpu().numpy().astype("<u2")
    return out.tobytes()


class KldWriter:
    """Streams a ``.kld`` file: the header and tokens first (needs n_vocab, so on the first
    rows), then records in chunk order. The caller owns the file (a temporary file from
    :func:`mlcompress.atomic.atomic_output`, so a failed run leaves nothing behind).
    ``header=False`` writes records only: a later part of the file, which a data-parallel run
    appends to process 0's file (``records`` then counts the whole file's before ``finish``)."""

    def __init__(self, fh: BinaryIO, *, n_ctx: int, tokens: Sequence[int], header: bool = True) -> None:
        if n_ctx < 3 or len(tokens) == 0 or len(tokens) % n_ctx:
            raise InputError(f"a .kld file needs whole chunks of n_ctx >= 3 tokens (got {len(tokens)} for {n_ctx})")
        self.header = header
        self.fh = fh
        self.n_ctx = n_ctx
        self.tokens = np.asarray(tokens, dtype="<i4")
        self.n_chunk = len(tokens) // n_ctx
        self.n_vocab: int | None = None
        self.records = 0

    def add(self, rows: QuantizedRows) -> None:
        """Append the records of consecutive scored positions."""
        vocab = int(rows.codes.shape[-1])
        if self.n_vocab is None:
            self.n_vocab = vocab
            if self.header:
                self.fh.write(HEADER.pack(MAGIC, self.n_ctx, vocab, self.n_chunk))
                self.fh.write(self.tokens.tobytes())
        elif vocab != self.n_vocab:
            raise InputError(f"rows of {vocab} logits after rows of {self.n_vocab}")
        self.fh.write(_pack(rows, vocab))
        self.records += int(rows.codes.shape[0])

    def finish(self) -> None:
        """Check that every chunk got all its records (a short file would be read as damaged)."""
        expected = self.n_chunk * scored_per_chunk(self.n_ctx)
        if self.records != expected:
            raise InputError(f".kld file: wrote {self.records} scored positions, expected {expected}")
        self.fh.flush()


@dataclass
class KldFile:
    """A validated ``.kld`` file; records are read chunk by chunk (files reach many GiB)."""

    path: Path
    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray  # int32 [n_chunk, n_ctx]

    @property
    def scored(self) -> int:
        return scored_per_chunk(self.n_ctx)

    @property
    def records_offset(self) -> int:
        return HEADER.size + 4 * self.n_chunk * self.n_ctx

    def chunk(self, index: int) -> QuantizedRows:
        """The records of chunk ``index`` (its S scored positions)."""
        width = record_width(self.n_vocab)
        count = self.scored * width
        raw = np.fromfile(self.path, dtype="<u2", count=count, offset=self.records_offset + 2 * count * index)
        raw = raw.reshape(self.scored, width)
        floats = np.ascontiguousarray(raw[:, :4]).view("<f4").astype(np.float32)
        return QuantizedRows(
            torch.from_numpy(floats[:, 0].copy()),
            torch.from_numpy(floats[:, 1].copy()),
            torch.from_numpy(raw[:, 4 : 4 + self.n_vocab].astype(np.int32)),
        )


def read_kld(path: str | Path) -> KldFile:
    """Open and check a ``.kld`` file: magic, a sane header and exactly the size it implies."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"llama.cpp base file {path} does not exist")
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(HEADER.size)
        if head[: len(MAGIC)] != MAGIC:
            raise InputError(
                f"{path} is not a llama.cpp .kld file (it does not start with {MAGIC.decode()})",
                hint="write one with llama-perplexity --save-all-logits or diverge --save-ref F --format llama-cpp",
            )
        if len(head) < HEADER.size:
            raise InputError(f"{path}: truncated .kld header ({size} bytes)")
        _, n_ctx, n_vocab, n_chunk = HEADER.unpack(head)
        if n_ctx < 3 or n_vocab < 1 or n_chunk < 1:
            raise InputError(f"{path}: bad .kld header (n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk})")
        expected = HEADER.size + 4 * n_chunk * n_ctx + 2 * n_chunk * scored_per_chunk(n_ctx) * record_width(n_vocab)
        if size != expected:
            raise InputError(
                f"{path}: damaged .kld file: {size} bytes, but n_ctx {n_ctx}, n_vocab {n_vocab} and "
                f"n_chunk {n_chunk} make {expected}"
            )
        tokens = np.frombuffer(fh.read(4 * n_chunk * n_ctx), dtype="<i4").astype(np.int32)
    if tokens.size and int(tokens.min()) < 0:
        raise InputError(f"{path}: negative token id {int(tokens.min())} in the .kld file")
    return KldFile(path, n_ctx, n_vocab, n_chunk, tokens.reshape(n_chunk, n_ctx))
