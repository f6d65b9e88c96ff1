"""PyTorch's own files: ``torch.save`` state dicts (zip or legacy pickle) and TorchScript archives.

Safety policy. A ``torch.save`` file is a pickle, and unpickling can run any code the file's
author chose. Files are therefore read with ``weights_only=True``, PyTorch's restricted
unpickler that only rebuilds tensors, containers and primitive values. Anything it refuses (a
whole pickled ``nn.Module``, a custom class in the training state) is reported with the opt-in
flag ``--unsafe-pickle``; only when the user passes it is the file fully unpickled.

Training checkpoints wrap the weights (``{"state_dict": ..., "optimizer": ..., "epoch": 3}``);
:func:`state_dict_tensors` finds the weights and keeps only tensors.
"""

from __future__ import annotations

import logging
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from mlcompress.checkpoint.unreadable import unreadable
from mlcompress.errors import CheckpointError

log = logging.getLogger(__name__)

ZIP_MAGIC = b"PK\x03\x04"  # torch.save (since 1.6) and torch.jit.save write zip archives

# Keys under which training scripts nest the weights, most specific first.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
_MAX_DEPTH = 16


def load_torch_file(
    path: Path, *, unsafe_pickle: bool = False, strip_prefixes: bool = True
) -> dict[str, torch.Tensor]:
    """The tensors of a ``torch.save`` file, unwrapped and flattened (see module docstring).

    ``strip_prefixes`` is off for Hugging Face shards, whose names are canonical as stored.
    """
    obj = _torch_load(path, unsafe_pickle=unsafe_pickle)
    return state_dict_tensors(obj, source=path, strip_prefixes=strip_prefixes)


def load_torchscript(path: Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive (its ``state_dict``).

    Why this is safe without ``--unsafe-pickle``: a TorchScript archive holds TorchScript code,
    which ``torch.jit.load`` compiles for PyTorch's own interpreter; it cannot import Python
    modules or call arbitrary Python functions, only the operators registered with PyTorch. Its
    pickled parts (constants, attributes) are read by a restricted unpickler that rebuilds
    tensors and primitive values only. The model's code is never run here: only its stored
    tensors are read.
    """
    verify_zip(path, "TorchScript archive")
    try:
        with warnings.catch_warnings():
            # Reading a user's TorchScript file is deliberate; the deprecation notice is not
            # something the user of mlcompress can act on.
            warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated")
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch.jit reports damage with RuntimeError and others
        raise unreadable(path, "TorchScript archive", exc) from exc
    tensors = {name: tensor.detach() for name, tensor in module.state_dict().items()}
    if not tensors:
        raise CheckpointError(f"{path}: the TorchScript module has no parameters or buffers")
    return tensors


def verify_zip(path: Path, kind: str) -> None:
    """Check every member of a zip archive against its CRC32 before PyTorch parses it.

    PyTorch does not check these checksums: a damaged ``torch.save`` archive can load with wrong
    values, and a damaged TorchScript archive can abort the whole process from C++. Reading the
    archive once more (about 0.3 s per 200 MB here) buys a clean error instead.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except Exception as exc:  # BadZipFile, EOFError, zlib.error, ValueError on garbled names
        raise unreadable(path, kind, exc) from exc
    if damaged is not None:
        raise CheckpointError(
            f"cannot read {path} as {kind}: checksum mismatch in {damaged}",
            hint="the file is damaged; copy or download it again",
        )


def _torch_load(path: Path, *, unsafe_pickle: bool) -> Any:
    with path.open("rb") as handle:
        if handle.read(len(ZIP_MAGIC)) == ZIP_MAGIC:
            verify_zip(path, "PyTorch checkpoint")
    try:
        # An open file, not the path: torch.load would otherwise pick a reader by the suffix.
        with path.open("rb") as handle:
            return torch.load(handle, map_location="cpu", weights_only=not unsafe_pickle)
    except pickle.UnpicklingError as exc:
        if not unsafe_pickle and "weights only load failed" in str(exc).lower():
            raise CheckpointError(
                f"{path} holds pickled Python objects (such as a whole nn.Module), and loading "
                "them could run arbitrary code; pass --unsafe-pickle only if you trust its source"
            ) from exc
        raise unreadable(path, "PyTorch checkpoint", exc) from exc
    except Exception as exc:  # damaged zips and pickles surface as many exception types
        raise unreadable(path, "PyTorch checkpoint", exc) from exc


def state_dict_tensors(
    obj: Any, *, source: object, strip_prefixes: bool = True
) -> dict[str, torch.Tensor]:
    """The named tensors in a loaded checkpoint object, with everything else dropped.

    Steps: unwrap ``{"state_dict"| "model_state_dict" | "model" | "module": weights}`` (only
    when the outer mapping holds no tensor of its own, so a model with a submodule named
    ``model`` is never mistaken for a wrapper); take ``state_dict()`` of ``nn.Module`` objects
    (reachable only with ``--unsafe-pickle``); flatten nested mappings with dots; drop
    non-tensor entries and optimizer states; finally strip a ``module.`` prefix that every name
    carries (DataParallel/DDP), and a ``model.`` prefix that every name carries only when the
    file is a PyTorch Lightning checkpoint (where it is the LightningModule attribute).
    """
    obj, lightning = _unwrap(obj)
    mapping = _as_mapping(obj)
    if mapping is None:
        raise CheckpointError(
            f"{source} holds a {type(obj).__name__}, not a state dict",
            hint="save a mapping of names to tensors, e.g. model.state_dict()",
        )
    tensors: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    _flatten(mapping, "", tensors, dropped, source, depth=0)
    if not tensors:
        raise CheckpointError(
            f"{source} holds no tensors", hint="expected a state dict mapping names to tensors"
        )
    if dropped:
        log.info("%s: ignored %d non-tensor entries: %s", source, len(dropped), ", ".join(dropped[:8]))
    if strip_prefixes:
        tensors = _strip_prefix(tensors, "module.")
        if lightning:
            tensors = _strip_prefix(tensors, "model.")
    return tensors


def _unwrap(obj: Any) -> tuple[Any, bool]:
    lightning = False
    for _ in range(_MAX_DEPTH):
        mapping = _as_mapping(obj)
        if mapping is None or any(isinstance(v, torch.Tensor) for v in mapping.values()):
            break
        for key in WRAPPER_KEYS:
            inner = _as_mapping(mapping.get(key))
            if inner is not None and _holds_tensor(inner, depth=0):
                lightning = lightning or (
                    key == "state_dict" and "pytorch-lightning_version" in mapping
                )
                obj = inner
                break
        else:
            break
    return obj, lightning


def _as_mapping(obj: Any) -> Mapping | None:
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        return obj
    return None


def _holds_tensor(mapping: Mapping, depth: int) -> bool:
    if depth > _MAX_DEPTH:
        return False
    for value in mapping.values():
        if isinstance(value, torch.Tensor):
            return True
        inner = _as_mapping(value)
        if inner is not None and _holds_tensor(inner, depth + 1):
            return True
    return False


def _is_optimizer_state(mapping: Mapping) -> bool:
    # torch.optim.Optimizer.state_dict() is {"state": {...}, "param_groups": [...]}.
    return "param_groups" in mapping and "state" in mapping


def _flatten(
    mapping: Mapping,
    prefix: str,
    out: dict[str, torch.Tensor],
    dropped: list[str],
    source: object,
    depth: int,
) -> None:
    if depth > _MAX_DEPTH:
        raise CheckpointError(f"{source}: state dict nested more than {_MAX_DEPTH} levels deep")
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            if name in out:
                raise CheckpointError(f"{source}: two entries flatten to the same name {name!r}")
            out[name] = value.detach()
            continue
        inner = _as_mapping(value)
        if inner is not None and not _is_optimizer_state(inner):
            _flatten(inner, f"{name}.", out, dropped, source, depth + 1)
        else:
            dropped.append(name)


def _strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if all(name.startswith(prefix) and len(name) > len(prefix) for name in tensors):
        return {name[len(prefix):]: tensor for name, tensor in tensors.items()}
    return tensors
