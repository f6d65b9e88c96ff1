"""A checkpoint read one tensor at a time: what streaming encoders work from.

:func:`~mlcompress.checkpoint.load_checkpoint` returns every tensor at once, which costs the
whole model in memory (several times over once a method has made its copies). A
:class:`TensorSource` instead knows every tensor's name, shape and dtype from the file's header
alone, knows which names are ties of one tensor, and reads a tensor's bytes only when asked and
only into a buffer the caller then owns. Peak memory is then a few tensors, not the model.

What streams:

* safetensors files and Hugging Face directories of safetensors shards: the header is parsed
  here (8-byte little-endian length, a JSON object of ``{name: {dtype, shape, data_offsets}}``)
  and each tensor is read with ``readinto`` straight into its own buffer. No memory map: pages
  of a mapped file count towards the process's resident memory for as long as it stays mapped.
* ``.mrc`` containers: one tensor decoded at a time.

PyTorch pickles and TorchScript archives can only be read whole (their layout lives in the
pickle); for them the source holds the loaded state dict, which docs/scale.md states as the
limit ("convert to safetensors to stream").

The order of names is the order :func:`load_checkpoint` gives, so a streaming encoder writes
exactly the file the in-memory one wrote.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from mlcompress.checkpoint import checkpoint_format
from mlcompress.checkpoint.hf import find_weights, load_hf_directory, read_weight_map, shard_paths
from mlcompress.checkpoint.pickled import load_torch_file, load_torchscript
from mlcompress.checkpoint.safetensors_file import ALIASES_KEY, parse_aliases
from mlcompress.checkpoint.safetensors_stream import DTYPE_CODES, TensorEntry
from mlcompress.container import open_mrc, shared_storage_aliases
from mlcompress.errors import CheckpointError
from mlcompress.format.dtypes import torch_dtype

#: safetensors' dtype names (its format specification) and the torch dtypes they hold.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}


#: What the header says of one stored tensor: its name, shape and dtype.
TensorInfo = TensorEntry


class TensorSource(ABC):
    """Names, shapes and ties of a checkpoint's tensors, with each tensor read on demand.

    ``names`` is every name in order (aliases included); ``aliases`` maps a tied name to the
    stored name it shares its tensor with. :meth:`get` reads a stored tensor afresh on each call
    (the caller owns it; nothing is cached), and :meth:`load_all` gives what
    :func:`load_checkpoint` would, for code that needs the whole model.
    """

    def __init__(self, path: Path, infos: list[TensorInfo], aliases: Mapping[str, str], names: list[str]) -> None:
        self.path = path
        self._infos = {i.name: i for i in infos}
        self.aliases = dict(aliases)
        self.names = names

    @property
    def stored(self) -> list[str]:
        """The names that hold their own bytes (every name but the aliases), in order."""
        return [n for n in self.names if n not in self.aliases]

    def info(self, name: str) -> TensorInfo:
        """Shape and dtype of ``name`` (an alias answers for its stored tensor)."""
        return self._infos[self.aliases.get(name, name)]

    @abstractmethod
    def get(self, name: str) -> torch.Tensor:
        """A fresh copy of the stored tensor ``name`` (or of an alias's stored tensor), which the
        caller owns: each format reads it its own way."""

    def load_all(self) -> dict[str, torch.Tensor]:
        """Every tensor, ties restored as one object, as :func:`load_checkpoint` returns them."""
        stored = {name: self.get(name) for name in self.stored}
        return {name: stored[self.aliases.get(name, name)] for name in self.names}

    def infos(self) -> dict[str, TensorInfo]:
        """Every name's header entry (an alias's is its stored tensor's), in order: what code
        that decides from dtypes and shapes alone takes instead of the tensors."""
        return {name: self.info(name) for name in self.names}

    def view(self) -> "LazyTensors":
        """The source as a read-only mapping that reads a tensor each time it is looked up, for
        code written against a dict of tensors that looks at one tensor at a time. Ties are not
        visible through it (each lookup is a fresh tensor): use :attr:`aliases`."""
        return LazyTensors(self)


class LazyTensors(Mapping[str, torch.Tensor]):
    """See :meth:`TensorSource.view`."""

    def __init__(self, source: TensorSource) -> None:
        self._source = source

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._source.names:
            raise KeyError(name)
        return self._source.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._source.names)

    def __len__(self) -> int:
        return len(self._source.names)


class _Loaded(TensorSource):
    """A source over tensors already in memory (a pickle, TorchScript, or a caller's dict)."""

    def __init__(self, path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
        aliases = shared_storage_aliases(tensors)
        infos = [TensorInfo(n, tuple(t.shape), t.dtype) for n, t in tensors.items() if n not in aliases]
        super().__init__(path, infos, aliases, list(tensors))
        self._tensors = dict(tensors)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[self.aliases.get(name, name)]

    def load_all(self) -> dict[str, torch.Tensor]:
        return dict(self._tensors)


@dataclass(frozen=True)
class _Span:
    file: Path
    start: int  # absolute offset of the tensor's bytes in ``file``
    length: int


class _Safetensors(TensorSource):
    """safetensors files (one, or a directory's shards), read by name with ``readinto``."""

    def __init__(self, path: Path, files: list[Path]) -> None:
        infos: list[TensorInfo] = []
        names: list[str] = []
        aliases: dict[str, str] = {}
        self._spans: dict[str, _Span] = {}
        for file in files:
            header, data_start, metadata = _read_header(file)
            for name in sorted(header):
                info, span = _entry(file, name, header[name], data_start)
                if name in self._spans:
                    raise CheckpointError(f"{path}: tensor {name!r} appears in more than one shard")
                infos.append(info)
                names.append(name)
                self._spans[name] = span
            aliases.update(parse_aliases(metadata.get(ALIASES_KEY), file))
        for alias, canonical in aliases.items():
            if canonical not in self._spans or alias in self._spans:
                raise CheckpointError(f"{path}: damaged alias table ({alias!r} -> {canonical!r})",
                                      hint="the file was altered after it was written; re-create it")
            names.append(alias)
        super().__init__(path, infos, aliases, names)

    def get(self, name: str) -> torch.Tensor:
        name = self.aliases.get(name, name)
        info, span = self._infos[name], self._spans[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        if span.length:
            buffer = memoryview(out.view(-1).view(torch.uint8).numpy())
            with open(span.file, "rb", buffering=0) as f:
                f.seek(span.start)
                got = 0
                while got < span.length:
                    n = f.readinto(buffer[got:])
                    if not n:
                        raise CheckpointError(f"{span.file} is truncated inside tensor {name!r}")
                    got += n
        return out


def _read_header(file: Path) -> tuple[dict[str, Any], int, dict[str, str]]:
    """A safetensors file's tensor entries, where its data starts, and its string metadata."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if length < 2 or length > size - 8:
                raise ValueError("header length is out of range")
            header = json.loads(f.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is not a readable safetensors file ({exc})",
                              hint="re-create or re-download it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{file}: safetensors __metadata__ is not an object")
    data_start = 8 + length
    for name, entry in header.items():
        end = entry.get("data_offsets", [0, 0])[1] if isinstance(entry, dict) else None
        if not isinstance(end, int) or data_start + end > size:
            raise CheckpointError(f"{file} is truncated or damaged (tensor {name!r} runs past its end)",
                                  hint="re-create or re-download it")
    return header, data_start, metadata


def _entry(file: Path, name: str, entry: Any, data_start: int) -> tuple[TensorInfo, _Span]:
    try:
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        shape = tuple(int(s) for s in entry["shape"])
        begin, end = (int(v) for v in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{file}: tensor {name!r} has a malformed or unsupported header entry",
                              hint="mlcompress reads the dtypes safetensors defines") from None
    info = TensorInfo(name, shape, dtype)
    if end - begin != info.nbytes or begin < 0 or any(s < 0 for s in shape):
        raise CheckpointError(f"{file}: tensor {name!r} has {end - begin} bytes for shape {list(shape)} "
                              f"{entry['dtype']}", hint="the file is damaged; re-create it")
    return info, _Span(file, data_start + begin, end - begin)


class _Mrc(TensorSource):
    """A ``.mrc`` container, one tensor decoded per :meth:`get`."""

    def __init__(self, path: Path) -> None:
        self._mrc = open_mrc(path)
        records = self._mrc.records
        infos = [TensorInfo(r.name, r.shape, torch_dtype(r.dtype)) for r in records if r.alias_of is None]
        aliases = {r.name: r.alias_of for r in records if r.alias_of is not None}
        super().__init__(path, infos, aliases, [r.name for r in records])

    def get(self, name: str) -> torch.Tensor:
        return self._mrc.tensor(self.aliases.get(name, name))


def open_source(path: str | os.PathLike, *, unsafe_pickle: bool = False) -> TensorSource:
    """The checkpoint at ``path`` as a :class:`TensorSource` (any format
    :func:`~mlcompress.checkpoint.load_checkpoint` reads; streaming where the format allows)."""
    source = Path(path)
    kind = checkpoint_format(source)
    if kind == "safetensors":
        out: TensorSource = _Safetensors(source, [source])
    elif kind == "mrc":
        out = _Mrc(source)
    elif kind == "hf-dir":
        weights, fmt, is_index = find_weights(source)
        if fmt != "safetensors":
            return _Loaded(source, load_hf_directory(source, unsafe_pickle=unsafe_pickle))
        files = shard_paths(weights, read_weight_map(weights)) if is_index else [weights]
        out = _Safetensors(source, files)
    elif kind == "torchscript":
        return _Loaded(source, load_torchscript(source))
    else:
        return _Loaded(source, load_torch_file(source, unsafe_pickle=unsafe_pickle))
    if not out.names:
        raise CheckpointError(f"{source} holds no tensors")
    return out


def source_of(tensors: Mapping[str, torch.Tensor], name: str | os.PathLike = "<tensors>") -> TensorSource:
    """A caller's dict of tensors as a :class:`TensorSource` (ties found by shared storage)."""
    return _Loaded(Path(name), tensors)
