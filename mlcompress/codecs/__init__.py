"""Codec registry: how one tensor becomes one payload, and back.

A codec is any object with a stable ``name`` (the id written in the ``.mrc`` header) and:

* ``check(record) -> None`` -- validate ``record.params`` against ``record.shape``/``dtype`` and
  ``record.length`` *before* any payload is read or memory allocated; raise
  :class:`~mlcompress.errors.MrcFormatError` on any inconsistency.
* ``decode(payload, record, device) -> torch.Tensor`` -- a tensor of exactly ``record.shape``
  and ``record.dtype``. ``device`` is where the work may run (only REC uses it; the bits never
  depend on it); the result may be on the CPU, the container moves it. The result must own
  its memory: a buffer payload is the reader's scratch memory, reused by its next read.
* ``encode(tensor, options) -> (payload: bytes, params: dict)`` -- for codecs that code one
  tensor on its own; ``params`` must be JSON-able (the payload may also be a memoryview of
  bytes). REC has none: its blocks are chosen jointly over the whole model by
  :mod:`mlcompress.rec`, and decoding must not import encoder code.
* ``parallel = True`` -- optional: the codec splits its work into chunks fixed by its format,
  takes a ``threads`` encode option and a ``threads=`` decode keyword, and writes the same
  bytes for any thread count (``lossless2``, ``lossless3``). The container passes ``threads``
  only to these.
* ``decode_many(items, threads, crc=False) -> (tensors, crcs | None)`` -- optional: decode
  several ``(payload, record)`` at once, every chunk of every tensor sharing the threads, and
  with ``crc`` return each payload's CRC-32 computed in the same pass (``lossless3``). The
  container's ``tensors()`` hands such a codec all its tensors of a read at once.
* ``prepare(threads) -> None`` -- optional: called by ``tensors()`` before it reads the
  payloads, so that a codec can get its threads running meanwhile (``lossless3``).

Codecs depend only on :mod:`mlcompress.format` (and :mod:`mlcompress.workers` for threads);
adding one means a module here and a :func:`register` call, and the container, checkpoint I/O
and CLI never change. Codec names are
explicit strings, never derived from registration order, so a file written today decodes with
any later version. Importing this package imports neither torch nor numpy (see
:mod:`mlcompress.lazy`): ``inspect`` validates a header with it in well under a second.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Protocol

from mlcompress.errors import CodecError, MrcFormatError
from mlcompress.format.records import TensorRecord


class Codec(Protocol):
    name: str

    def check(self, record: TensorRecord) -> None: ...

    def decode(self, payload: bytes, record: TensorRecord, device: Any) -> Any: ...


_REGISTRY: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    """Make ``codec`` available under ``codec.name``; returns it so modules can register inline."""
    if codec.name in _REGISTRY and _REGISTRY[codec.name] is not codec:
        raise ValueError(f"codec {codec.name!r} is already registered")
    _REGISTRY[codec.name] = codec
    return codec


def get(name: str) -> Codec:
    """The codec registered as ``name``; an unknown name is a format error listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise MrcFormatError(f"unknown codec {name!r}", hint=f"this mlcompress knows: {known}; upgrade to read it") from None


def names() -> list[str]:
    """Names of every registered codec, sorted."""
    return sorted(_REGISTRY)


def encoder(name: str) -> Any:
    """The codec ``name`` if it can code a tensor on its own (every codec but ``rec``)."""
    codec = get(name)
    if not hasattr(codec, "encode"):
        raise CodecError(f"codec {name!r} cannot encode a tensor on its own: it codes the whole model at once",
                         hint="use mlcompress.encode(..., method=mlcompress.Rec())")
    return codec


def prepare(names: Iterable[str], threads: int) -> None:
    """Let each codec of ``names`` that has ``prepare`` get ready for a decode on ``threads``
    threads (``lossless3`` wakes its workers): called before the payloads are read."""
    for name in set(names):
        ready = getattr(get(name), "prepare", None)
        if ready is not None:
            ready(threads)


def describe(record: TensorRecord) -> Mapping[str, Any]:
    """The codec's own summary of a record for ``inspect`` (empty when it has none)."""
    codec = get(record.codec)
    return codec.describe(record) if hasattr(codec, "describe") else {}


# The built-in codecs register themselves; they import only mlcompress.format and each other.
from mlcompress.codecs import lossless as _lossless  # noqa: E402
from mlcompress.codecs import lossless2 as _lossless2  # noqa: E402
from mlcompress.codecs import lossless3 as _lossless3_codec  # noqa: E402  (_lossless3 is its C extension)
from mlcompress.codecs import low_precision as _low_precision  # noqa: E402
from mlcompress.codecs import quant as _quant  # noqa: E402
from mlcompress.codecs import raw as _raw  # noqa: E402
from mlcompress.codecs import rec as _rec  # noqa: E402

for _module in (_raw, _lossless, _lossless2, _lossless3_codec, _low_precision, _quant, _rec):
    register(_module.CODEC)
