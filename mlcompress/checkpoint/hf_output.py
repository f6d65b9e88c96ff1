"""Writing a Hugging Face model directory: what ``from_pretrained`` loads, shard by shard.

A decoded directory holds the weights as ``model.safetensors``, or as
``model-00001-of-0000N.safetensors`` shards with ``model.safetensors.index.json`` (``weight_map``
and ``metadata.total_size``, as transformers writes them) when they exceed the shard size; every
shard carries ``{"format": "pt"}`` metadata, which transformers requires. Tied tensors are
stored once (transformers re-ties them from the config, mlcompress from the ``mlcompress.aliases``
metadata of the shard holding the canonical tensor).

Beside the weights go the model's small files. A ``.mrc`` encoded from a model directory keeps
the ones in :data:`STORED_FILES` (a few hundred bytes compressed) in its header metadata under
:data:`FILES_KEY`; the rest (tokenizer files can be megabytes) are copied from the source
directory given as ``like``. Where both have a file, the ``.mrc``'s copy is written: it belongs
to the weights.

The directory is built as a hidden sibling and renamed into place only when complete, so a
failure leaves nothing behind and the destination as it was (docs/checkpoints.md).
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from mlcompress.atomic import _fsync_directory as fsync_directory
from mlcompress.atomic import _fsync_file as fsync_file
from mlcompress.checkpoint.hf import LAYOUTS
from mlcompress.checkpoint.safetensors_file import header_metadata
from mlcompress.checkpoint.safetensors_stream import TensorEntry, check_entries, stream_safetensors
from mlcompress.errors import InputError, UsageError

#: The source directory's files a ``.mrc`` keeps in its header (small JSON transformers needs).
STORED_FILES = ("config.json", "generation_config.json")
#: A file larger than this is not kept in the header (a decode then needs ``like``).
MAX_STORED_FILE_BYTES = 1 << 20
#: The ``.mrc`` metadata key holding them: ``{file name: exact text}``.
FILES_KEY = "files"
#: transformers' own default (``save_pretrained(max_shard_size="50GB")`` in transformers 5).
DEFAULT_MAX_SHARD_SIZE = 50 * 10**9
#: Metadata every weight file gets: transformers refuses safetensors without it.
WEIGHTS_METADATA = {"format": "pt"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: Files of a ``like`` directory that are weights (of any framework), never copied.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".mrc",
                   ".index.json")


def stored_files(directory: Path) -> dict[str, str]:
    """The :data:`STORED_FILES` of a model directory, exactly as their text, for a header.

    A file that is missing, larger than :data:`MAX_STORED_FILE_BYTES` or not UTF-8 is left out;
    decoding then asks for ``like``."""
    out: dict[str, str] = {}
    for name in STORED_FILES:
        path = directory / name
        if path.is_file() and path.stat().st_size <= MAX_STORED_FILE_BYTES:
            try:
                out[name] = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue
    return out


def header_files(metadata: Mapping[str, Any], source: object) -> dict[str, str]:
    """The files a ``.mrc`` header keeps (:data:`FILES_KEY`), checked to be plain file names that
    are not weight files, so a crafted header cannot write outside the output directory."""
    files = metadata.get(FILES_KEY, {})
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise InputError(f"{source}: metadata {FILES_KEY!r} is not an object of file names to text")
    for name in files:
        if not _plain_name(name) or _is_weights(name):
            raise InputError(f"{source}: metadata {FILES_KEY!r} names {name!r}, which is not a model file name")
    return dict(files)


def _plain_name(name: str) -> bool:
    return bool(name) and Path(name).name == name and name not in (".", "..") and "\\" not in name


def _is_weights(name: str) -> bool:
    return name in {layout for layout, _, _ in LAYOUTS} or name.lower().endswith(WEIGHT_SUFFIXES)


def like_files(like: str | os.PathLike) -> list[Path]:
    """The small files of the model directory ``like`` to copy: every top-level regular file
    (symlinks followed, as in the Hugging Face cache) but weights and hidden files. It must
    hold ``config.json``, which is what makes it a model directory."""
    like = Path(like)
    if not like.is_dir():
        raise InputError(f"--like {like}: not a directory", hint="give the Hugging Face model directory the .mrc was encoded from")
    if not (like / "config.json").is_file():
        raise InputError(f"--like {like} has no config.json",
                         hint="give the Hugging Face model directory the .mrc was encoded from")
    return sorted(p for p in like.iterdir() if p.is_file() and not p.name.startswith(".") and not _is_weights(p.name))


def shards(entries: Sequence[TensorEntry], max_shard_size: int) -> list[list[TensorEntry]]:
    """``entries`` split in order into shards of at most ``max_shard_size`` bytes of tensors: a
    shard ends where the next tensor would pass the size; a larger tensor gets a shard alone."""
    out: list[list[TensorEntry]] = []
    size = 0
    for entry in entries:
        if not out or (out[-1] and size + entry.nbytes > max_shard_size):
            out.append([])
            size = 0
        out[-1].append(entry)
        size += entry.nbytes
    return out or [[]]


def shard_names(count: int) -> list[str]:
    """transformers' names: ``model.safetensors`` alone, else ``model-00001-of-00003.safetensors``..."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def check_directory_destination(dst: Path, *, force: bool) -> None:
    """Refuse, before any work, an output directory that cannot or must not be written."""
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        raise InputError(f"{dst} exists and is not a directory", hint="choose another output directory")
    if not dst.parent.is_dir():
        raise InputError(f"cannot write {dst}: directory {dst.parent} does not exist",
                         hint="create it first or choose another output path")
    if not force and dst.is_dir() and any(dst.iterdir()):
        raise InputError(f"{dst} is a non-empty directory", hint="pass --force to replace it")


@contextmanager
def atomic_directory(dst: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a new hidden directory beside ``dst``; on normal exit rename it to ``dst``.

    A missing or empty ``dst`` is replaced by one rename. A non-empty one only with ``force``,
    by two (the old one moved aside, then deleted): a reader never sees a partial directory,
    only, for an instant, none. On an exception the new directory is deleted.
    """
    check_directory_destination(dst, force=force)
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.part")
    os.mkdir(tmp)
    try:
        yield tmp
        for path in tmp.iterdir():
            fsync_file(path)
        fsync_directory(tmp)
        _publish(tmp, dst, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_directory(dst.parent)


def _publish(tmp: Path, dst: Path, force: bool) -> None:
    try:
        os.rename(tmp, dst)  # atomic onto a missing or empty directory
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if not force:  # it was filled meanwhile
        raise InputError(f"{dst} is a non-empty directory", hint="pass --force to replace it")
    old = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.old")
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_directory(dst: Path, entries: Sequence[TensorEntry], tensors: Iterator[tuple[str, torch.Tensor]], *,
                    aliases: Mapping[str, str], files: Mapping[str, str], like: Sequence[Path],
                    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, force: bool = False,
                    written: Callable[[str], None] | None = None) -> list[str]:
    """Write a model directory at ``dst`` atomically: the ``entries`` in shards of at most
    ``max_shard_size`` bytes, filled from ``tensors`` (one shard open at a time), the ``like``
    files copied and ``files`` (name -> text) written over them. ``aliases`` (tied name ->
    stored entry) go into the metadata of the shard holding the entry. Returns the weight files'
    names. ``written(name)`` is called after each tensor."""
    check_entries(entries)
    if max_shard_size < 1:
        raise UsageError(f"the shard size must be at least 1 byte, got {max_shard_size}")
    groups = shards(entries, max_shard_size)
    names = shard_names(len(groups))
    with atomic_directory(dst, force=force) as tmp:
        for group, name in zip(groups, names):
            held = {e.name for e in group}
            metadata = header_metadata(WEIGHTS_METADATA, {a: c for a, c in aliases.items() if c in held})
            with stream_safetensors(tmp / name, group, metadata) as stream:
                stream.write_from(tensors, written)
        if len(groups) > 1:
            index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
                     "weight_map": {e.name: name for group, name in zip(groups, names) for e in group}}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for path in like:
            shutil.copyfile(path, tmp / path.name)
        for name, text in files.items():
            (tmp / name).write_bytes(text.encode("utf-8"))
    return names
