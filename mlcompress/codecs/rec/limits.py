"""REC's constants and limits, in one place: what a file may contain and what a run may choose.

Both sides read these: the codec validates a record against them, the encoder
(:mod:`mlcompress.rec`) and ``fit-posterior`` (:mod:`mlcompress.posterior`) refuse options
outside them with the same message.

The default of 16 bits per block serves ``encode`` and ``fit-posterior`` alike: the encoder
scores ``2^bits`` candidates per block, so 16 bits codes a model ~16x faster than MIRACLE's 20,
and at a fixed file size (a fixed total KL) the block size only moves where the bits go, not how
many there are. Pass ``--bits-per-block 20`` to follow the paper exactly (docs/rec.md).
"""

from __future__ import annotations

import math

from mlcompress.errors import InputError, UsageError

MIN_BITS_PER_BLOCK = 1
#: 2^24 candidates per block is ~1 min of encoder work per 1k blocks on a CPU; beyond it nothing
#: finishes, and indices stay below 2^24 so an entropy-coded bucket fits constriction's 24 bits.
MAX_BITS_PER_BLOCK = 24
DEFAULT_BITS_PER_BLOCK = 16
DEFAULT_BITS_PER_WEIGHT = 2.0
#: Cap on weights per block: bounds the encoder's work per candidate and the decoder's per block.
MAX_BLOCK_WEIGHTS = 1 << 16
#: Smallest tensor REC codes by default; biases, norms and tiny tensors are stored losslessly.
DEFAULT_MIN_REC_NUMEL = 1024
#: How a block's index is chosen: MIRACLE's importance sampling, the best candidate, or ordered
#: random coding (indices then skew small and are worth entropy coding).
SELECTIONS = ("is", "greedy", "orc")
#: How indices are stored in a payload.
INDEX_CODINGS = ("fixed", "entropy")
#: What a run may ask for: ``auto`` stores entropy-coded indices for ``orc`` when smaller.
INDEX_CODING_CHOICES = ("auto",) + INDEX_CODINGS
#: Largest tensor one ``rec`` record holds (block ids are int32).
MAX_REC_NUMEL = (1 << 31) - 1


def check_bits_per_block(bits: object) -> int:
    """``bits`` if it is a valid bits-per-block setting, else a usage error naming the range."""
    if not (isinstance(bits, int) and not isinstance(bits, bool) and MIN_BITS_PER_BLOCK <= bits <= MAX_BITS_PER_BLOCK):
        raise UsageError(
            f"--bits-per-block must be an integer in [{MIN_BITS_PER_BLOCK}, {MAX_BITS_PER_BLOCK}], got {bits}",
            hint="each block scores 2^bits candidates; MIRACLE uses 20",
        )
    return bits


def is_rec_candidate(tensor, min_numel: int) -> bool:
    """Worth REC: a floating-point tensor of at least 2 dimensions and ``min_numel`` weights.
    Judged from ``dtype`` and ``shape`` alone, so a streaming source's header entry answers too."""
    return tensor.dtype.is_floating_point and len(tensor.shape) >= 2 and math.prod(tensor.shape) >= min_numel


def blocks_for_budget(numel: int, bits_per_weight: float, bits_per_block: int, name: str, *, floor: bool = False) -> int:
    """Blocks of a tensor at ``bits_per_weight``: ``round(numel * bpw / C)`` (``floor`` for a
    size cap), at least 1; refuses budgets that would put less than one weight in a block or
    more than :data:`MAX_BLOCK_WEIGHTS`."""
    if bits_per_weight > bits_per_block:
        raise InputError(
            f"{bits_per_weight:g} bits per weight exceeds --bits-per-block {bits_per_block}: a block would hold less than one weight",
            hint="lower the budget or raise --bits-per-block",
        )
    exact = numel * bits_per_weight / bits_per_block
    count = max(1, math.floor(exact) if floor else round(exact))
    if -(-numel // count) > MAX_BLOCK_WEIGHTS:
        raise InputError(
            f"{name}: {bits_per_weight:.4g} bits per weight puts {-(-numel // count)} weights in a block, above the limit of {MAX_BLOCK_WEIGHTS}",
            hint="raise the budget or lower --bits-per-block",
        )
    return min(count, numel)
