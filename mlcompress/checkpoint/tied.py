"""Tied (shared) tensors: names that are the very same tensor, stored once and restored as one.

Models tie weights (an embedding reused as the output projection, say), and their state dicts
then hold two names for one storage. Writing both copies would double the bytes and, worse,
untie them after a round trip: an update to one would no longer reach the other. Formats that
cannot express sharing (safetensors refuses it) store the tensor under its first name and record
``{alias: canonical}`` next to it.
"""

from __future__ import annotations

from typing import Mapping

import torch

from mlcompress.container import shared_storage_aliases
from mlcompress.errors import CheckpointError


def tied_groups(tensors: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Groups (two names or more, canonical name first) that are exact aliases of one tensor.

    Exact means the same storage, offset, shape, strides, dtype and device, as the container
    defines it (:func:`mlcompress.container.shared_storage_aliases`): views that merely overlap
    are not aliases, and empty tensors are never grouped.
    """
    groups: dict[str, list[str]] = {}
    for alias, canonical in shared_storage_aliases(tensors).items():
        groups.setdefault(canonical, [canonical]).append(alias)
    return list(groups.values())


def restore_aliases(
    tensors: dict[str, torch.Tensor], aliases: Mapping[str, str], source: object
) -> dict[str, torch.Tensor]:
    """Add each alias to ``tensors`` as the same tensor object as its canonical name.

    An alias table that names a missing tensor, or an alias that is also stored, means the file
    was damaged or hand-edited; guessing would hand back a silently wrong model.
    """
    for alias, canonical in aliases.items():
        if canonical not in tensors or alias in tensors:
            raise CheckpointError(
                f"{source}: damaged alias table ({alias!r} -> {canonical!r})",
                hint="the file was altered after it was written; re-create it",
            )
        tensors[alias] = tensors[canonical]
    return tensors
