"""``rec`` codec: a tensor stored as one REC candidate index per block (MIRACLE).

Payload: the block indices (:mod:`mlcompress.rec.payload`, fixed-width or entropy-coded). Params
(all the decoder needs; docs/format.md, "REC codec"):

``bits`` (1..24), ``blocks`` (1..numel), ``seed`` and ``layout_seed`` (0..2^64-1), ``prior_mean``
and ``prior_std`` (float32 values; std > 0), ``selection`` (``is``/``greedy``/``orc``, informational),
``index_coding`` (``fixed``/``entropy``), ``kl_bits_mean``/``kl_bits_max`` (KL per block summary,
informational).

Decoding regenerates only the chosen candidates (:func:`mlcompress.rec.decoder.decode_weights`):
bit-identical on every run, thread count and device. ``encode`` here codes one tensor alone with
a data-free posterior; a whole model is better encoded jointly by
:func:`mlcompress.rec.compress.encode_rec` (shared candidates across tensors).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator, Mapping

import torch

from mlcompress.codecs import register
from mlcompress.container import TensorRecord, torch_dtype
from mlcompress.errors import MrcFormatError
from mlcompress.posterior.file import MAX_BITS_PER_BLOCK, MIN_BITS_PER_BLOCK
from mlcompress.rec.encoder import SELECTIONS
from mlcompress.rec.payload import INDEX_CODINGS, decode_indices, fixed_payload_bytes

_PARAMS = ("bits", "blocks", "seed", "layout_seed", "prior_mean", "prior_std", "selection",
           "index_coding", "kl_bits_mean", "kl_bits_max")
_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
_DECODE_DEVICE: ContextVar[str] = ContextVar("rec_decode_device", default="cpu")


@contextmanager
def decode_device(device: str | torch.device) -> Iterator[torch.device]:
    """Decode ``rec`` tensors on ``device`` (``auto``/``cpu``/``cuda``) inside the block.

    The container calls ``decode(payload, record)`` without a device, so the choice travels in a
    context variable; the weights are bit-identical on every device, only the speed differs.
    """
    from mlcompress.device import resolve_device

    resolved = resolve_device(device)
    token = _DECODE_DEVICE.set(str(resolved))
    try:
        yield resolved
    finally:
        _DECODE_DEVICE.reset(token)


def _int(params: Mapping[str, Any], key: str, lo: int, hi: int, name: str) -> int:
    value = params[key]
    if not (isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi):
        raise MrcFormatError(f"rec tensor {name!r}: {key} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _float(params: Mapping[str, Any], key: str, name: str) -> float:
    value = params[key]
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        raise MrcFormatError(f"rec tensor {name!r}: {key} must be a finite number, got {value!r}")
    return float(value)


class RecCodec:
    name = "rec"

    def encode(self, tensor: torch.Tensor, options: Mapping[str, Any]) -> tuple[bytes, dict]:
        """Code one tensor alone (data-free posterior). Options: ``bits`` (16), ``bits_per_weight``
        (2.0), ``seed`` (0), ``selection`` (``is``), ``index_coding`` (``auto``), ``device`` (cpu)."""
        from mlcompress.container import dtype_name
        from mlcompress.posterior.datafree import datafree_posterior
        from mlcompress.rec.compress import (DEFAULT_BITS_PER_BLOCK, DEFAULT_BITS_PER_WEIGHT, RecItem,
                                             blocks_for_budget, encode_items)
        from mlcompress.rec.layout import BlockLayout

        bits = int(options.get("bits", DEFAULT_BITS_PER_BLOCK))
        bpw = float(options.get("bits_per_weight", DEFAULT_BITS_PER_WEIGHT))
        seed = int(options.get("seed", 0))
        count = blocks_for_budget(tensor.numel(), bpw, bits, "tensor")
        layout = BlockLayout(tensor.numel(), count, int(options.get("layout_seed", seed)))
        mean, std, rho, kl = datafree_posterior(tensor, layout, bits)
        item = RecItem("tensor", tuple(tensor.shape), dtype_name(tensor.dtype), mean.reshape(-1), std.reshape(-1),
                       0.0, rho, layout, kl)
        [(payload, params)] = encode_items(
            [item], bits=bits, seed=seed, selection=options.get("selection", "is"),
            index_coding=options.get("index_coding", "auto"), device=options.get("device", "cpu"),
        )
        return payload, params

    def check(self, record: TensorRecord) -> None:
        params, name = record.params, record.name
        if set(params) != set(_PARAMS):
            extra = sorted(set(params) ^ set(_PARAMS))
            raise MrcFormatError(f"rec tensor {name!r}: params must have exactly {', '.join(_PARAMS)} (differs in {extra[0]!r})")
        if record.dtype not in _FLOAT_DTYPES:
            raise MrcFormatError(f"rec tensor {name!r}: dtype {record.dtype} is not floating point")
        numel = record.numel
        if not 1 <= numel < 1 << 31:
            raise MrcFormatError(f"rec tensor {name!r}: {numel} weights; rec holds 1 .. 2^31-1")
        bits = _int(params, "bits", MIN_BITS_PER_BLOCK, MAX_BITS_PER_BLOCK, name)
        blocks = _int(params, "blocks", 1, numel, name)
        _int(params, "seed", 0, (1 << 64) - 1, name)
        _int(params, "layout_seed", 0, (1 << 64) - 1, name)
        from mlcompress.rec.compress import MAX_BLOCK_WEIGHTS

        if -(-numel // blocks) > MAX_BLOCK_WEIGHTS:
            raise MrcFormatError(f"rec tensor {name!r}: blocks of {-(-numel // blocks)} weights exceed the limit {MAX_BLOCK_WEIGHTS}")
        _float(params, "prior_mean", name)
        if not _float(params, "prior_std", name) > 0:
            raise MrcFormatError(f"rec tensor {name!r}: prior_std must be > 0")
        _float(params, "kl_bits_mean", name)
        _float(params, "kl_bits_max", name)
        if params["selection"] not in SELECTIONS:
            raise MrcFormatError(f"rec tensor {name!r}: unknown selection {params['selection']!r}")
        coding = params["index_coding"]
        if coding not in INDEX_CODINGS:
            raise MrcFormatError(f"rec tensor {name!r}: unknown index_coding {coding!r}")
        if coding == "fixed" and record.length != fixed_payload_bytes(blocks, bits):
            raise MrcFormatError(
                f"rec tensor {name!r}: payload has {record.length} bytes, {blocks} indices of {bits} bits need {fixed_payload_bytes(blocks, bits)}"
            )
        if coding == "entropy" and not 4 * (bits + 2) <= record.length <= 4 * (bits + 2) + 8 * blocks * (bits + 1):
            raise MrcFormatError(f"rec tensor {name!r}: entropy-coded payload of {record.length} bytes is too long for {blocks} indices")

    def decode(self, payload: bytes, record: TensorRecord, device: torch.device | str | None = None) -> torch.Tensor:
        from mlcompress.rec.decoder import decode_weights
        from mlcompress.rec.layout import BlockLayout

        p = record.params
        device = device if device is not None else _DECODE_DEVICE.get()
        indices = decode_indices(payload, p["blocks"], p["bits"], p["index_coding"])
        layout = BlockLayout(record.numel, p["blocks"], p["layout_seed"])
        flat = decode_weights(layout, torch.from_numpy(indices), seed=p["seed"], prior_mean=p["prior_mean"],
                              prior_std=p["prior_std"], device=device)
        return flat.to(torch_dtype(record.dtype)).reshape(record.shape).cpu()

    def describe(self, record: TensorRecord) -> dict[str, Any]:
        p = record.params
        return {
            "blocks": p["blocks"],
            "bits_per_block": p["bits"],
            "kl_bits_mean": p["kl_bits_mean"],
            "kl_bits_max": p["kl_bits_max"],
            "weights_per_block": record.numel / p["blocks"],
            "bits_per_weight": 8.0 * record.length / record.numel,
            "selection": p["selection"],
            "index_coding": p["index_coding"],
            "index_bits_fixed": p["blocks"] * p["bits"],
        }


register(RecCodec())
