"""Codec registry: how one tensor becomes one payload, and back.

A codec is any object with a stable ``name`` (the id written in the ``.mrc`` header) and three
methods:

* ``encode(tensor, options) -> (payload: bytes, params: dict)`` -- ``params`` must be JSON-able;
  the container stores it in the tensor's record and hands it back on decode.
* ``check(record) -> None`` -- validate ``record.params`` against ``record.shape``/``dtype`` and
  ``record.length`` *before* any payload is read or memory allocated; raise
  :class:`~mlcompress.errors.MrcFormatError` on any inconsistency.
* ``decode(payload, record) -> torch.Tensor`` -- a CPU tensor of exactly ``record.shape`` and
  ``record.dtype``.

Adding a method means adding one module here and calling :func:`register`; the container, the
checkpoint I/O and the CLI never change. Codec names are explicit strings, never derived from
registration order, so a file written today decodes with any later version.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Protocol

import torch

from mlcompress.errors import MrcFormatError

if TYPE_CHECKING:  # pragma: no cover
    from mlcompress.container import TensorRecord


class Codec(Protocol):
    name: str

    def encode(self, tensor: torch.Tensor, options: Mapping[str, Any]) -> tuple[bytes, dict]: ...

    def check(self, record: "TensorRecord") -> None: ...

    def decode(self, payload: bytes, record: "TensorRecord") -> torch.Tensor: ...


_REGISTRY: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    """Make ``codec`` available under ``codec.name``; returns it so modules can register inline."""
    if codec.name in _REGISTRY and _REGISTRY[codec.name] is not codec:
        raise ValueError(f"codec {codec.name!r} is already registered")
    _REGISTRY[codec.name] = codec
    return codec


def get(name: str) -> Codec:
    """The codec registered as ``name``; an unknown name is a format error listing the known ones."""
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise MrcFormatError(
            f"unknown codec {name!r}", hint=f"this mlcompress knows: {known}; upgrade to read it"
        ) from None


def names() -> list[str]:
    """Names of every registered codec, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    # Imported lazily so that importing the registry does not import every codec's dependencies.
    import importlib

    for module in _BUILTIN:
        importlib.import_module(f"mlcompress.codecs.{module}")


# Modules under mlcompress/codecs/ that register a codec when imported.
_BUILTIN: tuple[str, ...] = ("raw", "lossless", "quant", "rec")
