"""How a fit spends its bits: which tensors are hashed, and block counts from a file size.

* **Hashing** (``fit-posterior --hash``): ``name=factor`` ties a tensor's ``numel`` weights to
  ``F = max(1, round(numel / factor))`` free variables (:class:`mlcompress.codecs.rec.hashing.Tying`).
  ``auto`` applies :func:`auto_hash`'s rule to every coded tensor.
* **Target size** (``fit-posterior --target-size``): the number of blocks is what fits the file
  the user asked for, header included. The header is measured with the container's own layout
  (:func:`mlcompress.container.file_size` on stand-in records with the widest values a fit can
  produce), so the file never exceeds the target; blocks are then shared in proportion to the
  tensors' coded variables, at least one each.
"""

from __future__ import annotations

import math
from typing import Mapping

from mlcompress.container import EncodedTensor, file_size
from mlcompress.errors import InputError, UsageError
from mlcompress.format.header import ALIGN

__all__ = ["AUTO_HASH_FREE", "AUTO_HASH_MAX_FACTOR", "auto_hash", "parse_hash", "resolve_hash", "target_blocks"]

#: ``--hash auto``: a tensor keeps at most this many free variables...
AUTO_HASH_FREE = 10_000
#: ...but is never tied more than this many to one (large layers keep numel / 64).
AUTO_HASH_MAX_FACTOR = 64


def auto_hash(numel: int) -> int:
    """Free variables ``--hash auto`` gives a tensor of ``numel`` weights:
    ``min(numel, max(10,000, ceil(numel / 64)))``.

    The rule caps every tensor at about MIRACLE's LeNet-5 choice (fc1 400,000 -> 8,000, conv2
    25,000 -> 12,500 free variables; here 10,000 each, 40:1 and 2.5:1) and never ties more than
    64 weights to one variable, so very large layers keep ``numel / 64``. Small tensors are untouched.
    """
    return min(numel, max(AUTO_HASH_FREE, -(-numel // AUTO_HASH_MAX_FACTOR)))


def parse_hash(text: str | None) -> dict[str, float] | str | None:
    """``--hash`` text: ``auto``, or ``name=factor,name=factor`` (factors >= 1)."""
    if text is None or text == "":
        return None
    if text.strip() == "auto":
        return "auto"
    out: dict[str, float] = {}
    for item in text.split(","):
        name, sep, factor = item.strip().partition("=")
        try:
            value = float(factor)
        except ValueError:
            value = float("nan")
        if not sep or not name or not math.isfinite(value):
            raise UsageError(f"cannot read --hash item {item.strip()!r}", hint="use name=factor,... (e.g. fc1.weight=50) or auto")
        if value < 1:
            raise UsageError(f"--hash {name}={factor}: the factor must be at least 1 (weights per free variable)")
        out[name] = value
    return out


def resolve_hash(spec: Mapping[str, float] | str | None, numels: Mapping[str, int]) -> dict[str, int]:
    """Free variables of every hashed tensor (only those with fewer free variables than weights)."""
    if spec is None:
        return {}
    if spec == "auto":
        chosen = {name: auto_hash(n) for name, n in numels.items()}
    else:
        unknown = [name for name in spec if name not in numels]
        if unknown:
            raise InputError(f"--hash names {unknown[0]!r}, which is not a coded tensor",
                             hint=f"coded tensors: {', '.join(list(numels)[:8])}{' ...' if len(numels) > 8 else ''}")
        for name, factor in spec.items():
            if not factor >= 1:
                raise UsageError(f"--hash {name}={factor}: the factor must be at least 1")
        chosen = {name: max(1, round(numels[name] / factor)) for name, factor in spec.items()}
    return {name: free for name, free in chosen.items() if free < numels[name]}


def target_blocks(shapes: Mapping[str, tuple[int, ...]], sizes: Mapping[str, int], free: Mapping[str, int],
                  bits: int, target: int) -> dict[str, int]:
    """Blocks per coded tensor so that the REC file is at most ``target`` bytes.

    ``shapes``: the tensors' shapes; ``sizes``: their coded variables (free variables if hashed);
    ``free``: the hashed ones' free variables. Raises a one-line :class:`InputError` when the
    target cannot hold even one block per tensor.
    """
    stand_ins = []
    for name, shape in shapes.items():
        params = {"bits": bits, "blocks": sizes[name], "seed": 0, "layout_seed": (1 << 64) - 1,
                  "prior_mean": 0.0, "prior_std": 1.234e-30, "selection": "is", "index_coding": "fixed"}
        if name in free:
            params["free"] = free[name]
        stand_ins.append(EncodedTensor(name, tuple(shape), "float32", "rec", params, b""))
    metadata = {"producer": "mlcompress 0.0.0", "options": {"method": "rec"}}
    # header + its padding to the payload alignment; each payload rounds up to whole bytes
    overhead = file_size(stand_ins, metadata) + ALIGN - 1 + len(shapes)
    room_bits = (target - overhead) * 8
    total = room_bits // bits
    if total < len(shapes):
        need = overhead + math.ceil(len(shapes) * bits / 8)
        raise InputError(
            f"--target-size {target} bytes is too small: one {bits}-bit block per tensor ({len(shapes)} tensors) "
            f"and the header need at least {need} bytes", hint="raise --target-size or code fewer tensors",
        )
    weight = sum(sizes.values())
    blocks = {name: max(1, min(sizes[name], math.floor(total * sizes[name] / weight))) for name in shapes}
    while sum(blocks.values()) > total:  # the floors of one block may overshoot: trim the largest
        largest = max(blocks, key=lambda n: blocks[n])
        blocks[largest] -= 1
    return blocks
