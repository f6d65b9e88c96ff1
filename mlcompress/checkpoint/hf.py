"""Hugging Face model directories: the weights only, read without importing transformers.

A model saved with ``save_pretrained`` is a directory holding ``config.json`` and its weights in
one of four layouts, tried in this order (safetensors first because it cannot run code):
``model.safetensors.index.json`` + shards, ``model.safetensors``,
``pytorch_model.bin.index.json`` + shards, ``pytorch_model.bin``. An index file is JSON with a
``weight_map`` from tensor name to shard file name. ``config.json`` itself is not needed to read
the weights and is not required.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mlcompress.checkpoint.pickled import load_torch_file
from mlcompress.checkpoint.safetensors_file import read_safetensors
from mlcompress.checkpoint.tied import restore_aliases
from mlcompress.errors import CheckpointError

# (file name, format of the weight files, whether the file is an index of shards)
LAYOUTS = (
    ("model.safetensors.index.json", "safetensors", True),
    ("model.safetensors", "safetensors", False),
    ("pytorch_model.bin.index.json", "torch", True),
    ("pytorch_model.bin", "torch", False),
)


def find_weights(directory: Path) -> tuple[Path, str, bool]:
    """The weight file of the first layout present in ``directory``, and its kind.

    A directory with none of them is not a model directory; saying which files were expected
    tells the user whether they pointed at the wrong folder or an incomplete download.
    """
    for name, kind, is_index in LAYOUTS:
        candidate = directory / name
        if candidate.is_file():
            return candidate, kind, is_index
    expected = ", ".join(name for name, _, _ in LAYOUTS)
    raise CheckpointError(
        f"{directory} is a directory but not a Hugging Face model directory",
        hint=f"expected one of: {expected}",
    )


def load_hf_directory(directory: Path, *, unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face model directory, shards merged, names as stored."""
    weights, kind, is_index = find_weights(directory)
    if is_index:
        weight_map = read_weight_map(weights)
        shards = shard_paths(weights, weight_map)
    else:
        weight_map, shards = {}, [weights]

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for shard in shards:
        if kind == "safetensors":
            shard_tensors, shard_aliases = read_safetensors(shard)
            aliases.update(shard_aliases)
        else:
            shard_tensors = load_torch_file(shard, unsafe_pickle=unsafe_pickle, strip_prefixes=False)
        for name, tensor in shard_tensors.items():
            if name in tensors:
                raise CheckpointError(f"{directory}: tensor {name!r} appears in more than one shard")
            tensors[name] = tensor
    tensors = restore_aliases(tensors, aliases, directory)
    for name, shard_name in weight_map.items():
        if name not in tensors:
            raise CheckpointError(
                f"{weights.name} lists tensor {name!r} in {shard_name}, which lacks it",
                hint="the model directory is incomplete or mixed from different saves",
            )
    return tensors


def read_weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (ValueError, AttributeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{index} is not a valid index file: {exc}") from exc
    if not isinstance(weight_map, dict) or not weight_map or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f"{index} has no valid weight_map", hint="expected {tensor name: shard file name}"
        )
    return weight_map


def shard_paths(index: Path, weight_map: dict[str, str]) -> list[Path]:
    """The distinct shard files, in first-mention order, each checked to exist in the directory.

    Shard names come from a file the user downloaded; one that points outside the model
    directory (``../x`` or an absolute path) is refused rather than followed.
    """
    directory = index.parent
    shards: list[Path] = []
    for shard_name in dict.fromkeys(weight_map.values()):
        shard = directory / shard_name
        if Path(shard_name).name != shard_name or shard_name in ("", ".", ".."):
            raise CheckpointError(f"{index.name} names shard {shard_name!r} outside {directory}")
        if not shard.is_file():
            raise CheckpointError(
                f"{index.name} references shard {shard_name}, which is missing from {directory}",
                hint="download or copy the complete model directory",
            )
        shards.append(shard)
    return shards
