"""safetensors files, with tied tensors stored once and recorded in the header metadata.

safetensors is the default output format: it cannot run code when loaded, is memory-mappable
and is read by every framework. It refuses tensors that share memory, so aliases are written
once and listed under the metadata key :data:`ALIASES_KEY` as JSON ``{alias: canonical}``;
readers other than mlcompress simply see the canonical tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mlcompress.container import shared_storage_aliases
from mlcompress.checkpoint.safetensors_stream import check_storable
from mlcompress.checkpoint.unreadable import unreadable
from mlcompress.errors import CheckpointError

ALIASES_KEY = "mlcompress.aliases"

def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The stored tensors of one file and its alias table (not yet applied).

    Aliases are returned rather than applied so that a sharded model can resolve an alias whose
    canonical tensor lives in another shard.
    """
    try:
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            metadata = reader.metadata() or {}
            tensors = {name: reader.get_tensor(name) for name in reader.keys()}
    except Exception as exc:  # safetensors reports damage with several exception types
        raise unreadable(path, "safetensors", exc) from exc
    return tensors, parse_aliases(metadata.get(ALIASES_KEY), path)


def write_safetensors(stored: dict[str, torch.Tensor], header: dict[str, str], path: Path) -> None:
    """Write a :func:`safetensors_payload` result to ``path`` (the caller makes it atomic)."""
    save_file(stored, str(path), metadata=header)


def safetensors_payload(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header metadata safetensors will accept, validated before any writing.

    Each stored tensor is made a dense contiguous CPU tensor; one that partly overlaps another
    (two different views of one buffer) is copied, since safetensors cannot express overlap.
    """
    for name, tensor in tensors.items():
        check_storable(name, tensor.dtype)
    aliases = shared_storage_aliases(tensors)
    stored: dict[str, torch.Tensor] = {}
    seen_storage: set[tuple] = set()
    for name, tensor in tensors.items():
        if name in aliases:
            continue
        tensor = tensor.detach()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        if tensor.numel() and storage in seen_storage:
            tensor = tensor.clone()
        seen_storage.add(storage)
        stored[name] = tensor.to("cpu").contiguous()
    return stored, header_metadata(metadata, aliases)


def header_metadata(metadata: Mapping[str, str] | None, aliases: Mapping[str, str]) -> dict[str, str]:
    """The ``__metadata__`` of a file: ``metadata`` (strings only; the alias key is reserved)
    plus the alias table, when there are tied tensors."""
    header = _check_metadata(metadata)
    if aliases:
        header[ALIASES_KEY] = json.dumps(dict(aliases), sort_keys=True)
    return header


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """``metadata`` as a new dict, refused unless it maps strings to strings without the alias key."""
    header = dict(metadata or {})
    for key, value in header.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise CheckpointError(
                f"checkpoint metadata must map strings to strings, got {key!r}: {value!r}"
            )
    if ALIASES_KEY in header:
        raise CheckpointError(f"metadata key {ALIASES_KEY!r} is reserved for tied tensors")
    return header


def parse_aliases(text: str | None, path: Path) -> dict[str, str]:
    if text is None:
        return {}
    try:
        aliases = json.loads(text)
    except ValueError:
        aliases = None
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise CheckpointError(
            f"{path}: metadata {ALIASES_KEY!r} is not a JSON object of names",
            hint="the file was altered after it was written; re-create it",
        )
    return aliases

