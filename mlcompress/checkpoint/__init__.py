"""Checkpoint I/O: any common model file in, named tensors out; and named tensors back to disk.

Everything in mlcompress works on ``dict[str, torch.Tensor]``. :func:`load_checkpoint` produces
one from PyTorch state-dict files, safetensors, TorchScript archives, Hugging Face model
directories and ``.mrc`` containers; :func:`save_checkpoint` writes one as safetensors or a
``.pt`` state dict, and :func:`save_decoded` decodes a ``.mrc`` into safetensors or a Hugging Face
model directory one tensor at a time (:mod:`~mlcompress.checkpoint.safetensors_stream`). Formats are recognised by their first bytes, not by their names, since
extensions such as ``.bin`` and ``.pt`` are used for several formats; the extension only breaks
ties when the content matches no known signature (then the reader for that extension reports
what is wrong with the file).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import torch

from mlcompress.atomic import atomic_output, check_destination
from mlcompress.checkpoint.hf import find_weights, load_hf_directory
from mlcompress.checkpoint.hf_output import (
    DEFAULT_MAX_SHARD_SIZE,
    WEIGHTS_METADATA,
    check_directory_destination,
    header_files,
    like_files,
    write_directory,
)
from mlcompress.checkpoint.mrc_tensors import decoded_dict, decoded_tensors, plan_decode
from mlcompress.checkpoint.pickled import ZIP_MAGIC, load_torch_file, load_torchscript
from mlcompress.checkpoint.safetensors_file import (
    ALIASES_KEY,
    header_metadata,
    read_safetensors,
    safetensors_payload,
    write_safetensors,
)
from mlcompress.checkpoint.safetensors_stream import check_entries, stream_safetensors
from mlcompress.checkpoint.tied import restore_aliases, tied_groups
from mlcompress.container import MrcFile, open_mrc, shared_storage_aliases
from mlcompress.format.header import MAGIC as MRC_MAGIC
from mlcompress.errors import CheckpointError, InputError, UsageError
from mlcompress.progress import Progress, report

__all__ = [
    "ALIASES_KEY",
    "CheckpointFormat",
    "checkpoint_format",
    "load_checkpoint",
    "save_checkpoint",
    "save_decoded",
    "tied_groups",
]

CheckpointFormat = Literal["safetensors", "torch", "torchscript", "hf-dir", "mrc"]

_PICKLE_PROTO = b"\x80"  # legacy torch.save files start with a protocol-2 pickle
_BY_SUFFIX: dict[str, CheckpointFormat] = {
    ".safetensors": "safetensors",
    ".pt": "torch",
    ".pth": "torch",
    ".bin": "torch",
    ".ckpt": "torch",
    ".mrc": "mrc",
}
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def load_checkpoint(path: str | Path, *, unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint at ``path``, by name, on the CPU.

    Non-tensor entries (step counters, optimizer state, hyper-parameters) are dropped; tied
    tensors come back as one shared tensor. ``unsafe_pickle`` allows full unpickling of PyTorch
    files that the restricted unpickler refuses (see :mod:`mlcompress.checkpoint.pickled`);
    it never affects other formats, none of which can run code.
    """
    source = Path(path)
    kind = checkpoint_format(source)
    if kind == "hf-dir":
        return load_hf_directory(source, unsafe_pickle=unsafe_pickle)
    if kind == "safetensors":
        tensors, aliases = read_safetensors(source)
        if not tensors:
            raise CheckpointError(f"{source} holds no tensors")
        return restore_aliases(tensors, aliases, source)
    if kind == "torchscript":
        return load_torchscript(source)
    if kind == "mrc":
        return dict(open_mrc(source).tensors())
    return load_torch_file(source, unsafe_pickle=unsafe_pickle)


def checkpoint_format(path: str | Path) -> CheckpointFormat:
    """Which reader ``path`` needs, judged by content first and the extension second."""
    source = Path(path)
    if source.is_dir():
        find_weights(source)  # raises if the directory holds no model weights
        return "hf-dir"
    if not source.exists():
        raise CheckpointError(f"{source}: no such file or directory")
    try:
        size = source.stat().st_size
        with source.open("rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise CheckpointError(f"cannot read {source}: {exc.strerror or exc}") from exc
    if size == 0:
        raise CheckpointError(f"{source} is empty")
    detected = _format_from_content(source, head, size)
    if detected is not None:
        return detected
    by_suffix = _BY_SUFFIX.get(source.suffix.lower())
    if by_suffix is None:
        raise CheckpointError(
            f"{source}: unknown checkpoint format",
            hint="expected a PyTorch state dict, safetensors, TorchScript, .mrc or a "
            "Hugging Face model directory",
        )
    return by_suffix


def _format_from_content(source: Path, head: bytes, size: int) -> CheckpointFormat | None:
    if head.startswith(MRC_MAGIC):
        return "mrc"
    if head.startswith(ZIP_MAGIC):
        return "torchscript" if _is_torchscript_zip(source) else "torch"
    if _is_safetensors_head(head, size):
        return "safetensors"
    if head.startswith(_PICKLE_PROTO):
        return "torch"
    return None


def _is_safetensors_head(head: bytes, size: int) -> bool:
    # safetensors: u64 little-endian header length, then a JSON object filling that many bytes.
    if len(head) < 9:
        return False
    header_length = int.from_bytes(head[:8], "little")
    return 2 <= header_length <= size - 8 and head[8:9] == b"{"


def _is_torchscript_zip(source: Path) -> bool:
    # torch.jit.save archives carry the model's code; torch.save archives only data.pkl + data/.
    try:
        with zipfile.ZipFile(source) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):  # ValueError: garbled entry names
        return False  # let torch.load report the damage
    return any("/code/" in name or name.endswith("/constants.pkl") for name in names)


#: Suffixes :func:`save_checkpoint` writes (safetensors, or a torch state dict).
OUTPUT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def save_checkpoint(
    tensors: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    force: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` atomically to ``path``; the suffix picks the format.

    ``.pt``, ``.pth`` and ``.bin`` get a plain ``torch.save`` state dict (which keeps tied
    tensors shared by itself, and has no place for ``metadata``, which is therefore not
    stored); any other suffix gets safetensors, with ``metadata`` in its header and tied
    tensors stored once. Everything is validated before the file is created, and an existing
    file is replaced only with ``force``.
    """
    dest = Path(path)
    if dest.suffix.lower() == ".mrc":
        raise CheckpointError(
            f"{dest}: .mrc files are written by encoding",
            hint="use mlcompress encode, or choose a .safetensors or .pt output",
        )
    _check_tensors(tensors)
    check_destination(dest, force=force)
    if dest.suffix.lower() in _TORCH_SUFFIXES:
        payload = _torch_payload(tensors)
        with atomic_output(dest, force=force) as tmp:
            torch.save(payload, tmp)
    else:
        stored, header = safetensors_payload(tensors, metadata)
        with atomic_output(dest, force=force) as tmp:
            write_safetensors(stored, header, tmp)
    return dest


def _check_tensors(tensors: Mapping[str, torch.Tensor]) -> None:
    if not tensors:
        raise CheckpointError("no tensors to save")
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.device.type == "meta" or tensor.layout != torch.strided:
            raise CheckpointError(
                f"tensor {name!r} has no dense data to save ({tensor.device.type}, {tensor.layout})"
            )


def _torch_payload(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU tensors, aliases kept as one object so ``torch.save`` stores them once.

    CPU tensors are passed as they are (views included, which torch.save preserves); a
    device tensor is copied to the CPU once per tied group, not once per name.
    """
    aliases = shared_storage_aliases(tensors)
    payload: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name in aliases:
            payload[name] = payload[aliases[name]]
        else:
            payload[name] = tensor.detach().to("cpu")
    return payload


@dataclass(frozen=True)
class Decoded:
    """What :func:`save_decoded` wrote: the output path and the files under it (one for a file)."""

    path: Path
    files: list[Path]

    @property
    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def save_decoded(mrc: MrcFile, dst: str | Path, *, directory: bool = False, keep_dtype: bool = False,
                 device: Any = "cpu", threads: int | None = None, like: str | Path | None = None,
                 max_shard_size: int | None = None, force: bool = False,
                 progress: Progress | None = None) -> Decoded:
    """Decode ``mrc`` into ``dst``, one tensor at a time where the format allows.

    * ``directory``: a Hugging Face model directory (:mod:`mlcompress.checkpoint.hf_output`),
      sharded at ``max_shard_size`` bytes, with the small files the ``.mrc`` keeps and those of
      ``like`` (a model directory); without a stored ``config.json``, ``like`` is required.
    * a ``.safetensors`` (or other non-``.pt``) file: streamed, its header written first from
      the ``.mrc`` header and each tensor's bytes as soon as it is decoded, so memory stays
      about one tensor whatever the model's size; ``{"format": "pt"}`` metadata for transformers.
    * ``.pt``/``.pth``/``.bin``: a ``torch.save`` pickle, which serializes one object, so the
      whole model is decoded in memory first (this format cannot stream).

    Everything that can be checked (destination, ``like``, names, dtypes) is checked before
    anything is decoded; the output appears complete or not at all. ``progress`` receives
    ``"decode"`` updates, in tensors.
    """
    dst = Path(dst)
    if directory:
        check_directory_destination(dst, force=force)
        copied = like_files(like) if like is not None else []
        files = header_files(mrc.metadata, mrc.path)
        if "config.json" not in files and like is None:
            raise UsageError(f"{mrc.path.name} keeps no config.json (it was not encoded from a Hugging Face model "
                             "directory), which from_pretrained needs",
                             hint="pass --like DIR (like=DIR), the model directory it came from")
    elif like is not None or max_shard_size is not None:
        raise UsageError("--like and --max-shard-size are for a model directory output",
                         hint="end -o with / to write a Hugging Face model directory")
    elif dst.suffix.lower() not in OUTPUT_SUFFIXES:
        raise InputError(f"cannot write {dst.name}: unknown output format",
                         hint="use .safetensors or .pt, or end -o with / for a Hugging Face model directory")
    plan = plan_decode(mrc, keep_dtype=keep_dtype)
    torch_file = not directory and dst.suffix.lower() in _TORCH_SUFFIXES
    if not torch_file:
        check_entries(plan.entries)  # safetensors can hold them: refused before a file exists
    total = len(plan.entries)
    done = 0

    def written(name: str) -> None:
        nonlocal done
        done += 1
        report(progress, "decode", done, total, "tensors")

    report(progress, "decode", 0, total, "tensors")
    tensors = decoded_tensors(mrc, plan, device=device, threads=threads)
    if directory:
        shard_size = DEFAULT_MAX_SHARD_SIZE if max_shard_size is None else max_shard_size
        write_directory(dst, plan.entries, tensors, aliases=plan.aliases, files=files, like=copied,
                        max_shard_size=shard_size, force=force, written=written)
        return Decoded(dst, sorted(p for p in dst.iterdir() if p.is_file()))
    if torch_file:
        check_destination(dst, force=force)

        def on_cpu() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in tensors:
                yield name, tensor.cpu()
                written(name)

        save_checkpoint(decoded_dict(plan, on_cpu()), dst, force=force)
        return Decoded(dst, [dst])
    with atomic_output(dst, force=force) as tmp:
        with stream_safetensors(tmp, plan.entries, header_metadata(WEIGHTS_METADATA, plan.aliases)) as stream:
            stream.write_from(tensors, written)
    return Decoded(dst, [dst])
