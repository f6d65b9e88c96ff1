"""``rec`` codec: a tensor stored as one REC candidate index per block (MIRACLE).

Payload: the block indices (:mod:`mlcompress.codecs.rec.payload`, fixed-width or entropy-coded). Params
(all the decoder needs; docs/format.md, "REC codec"):

``bits`` (1..24), ``blocks`` (1..numel), ``seed`` and ``layout_seed`` (0..2^64-1), ``prior_mean``
and ``prior_std`` (float32 values; std > 0), ``selection`` (``is``/``greedy``/``orc``, informational),
``index_coding`` (``fixed``/``entropy``), ``kl_bits_mean``/``kl_bits_max`` (KL per block summary,
informational).

Decoding regenerates only the chosen candidates (:func:`mlcompress.codecs.rec.decoder.decode_weights`):
bit-identical on every run, thread count and device. There is no one-tensor ``encode``: blocks
are chosen jointly over the whole model by :mod:`mlcompress.rec` (shared candidates across
tensors), and this package holds only what decoding needs -- the integer recipe (counter,
layout, sampler), index payloads and the limits (:mod:`~mlcompress.codecs.rec.limits`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from mlcompress.codecs.rec.decoder import decode_weights
from mlcompress.codecs.rec.layout import BlockLayout
from mlcompress.codecs.rec.limits import (MAX_BITS_PER_BLOCK, MAX_BLOCK_WEIGHTS, MAX_REC_NUMEL, MIN_BITS_PER_BLOCK,
                                          INDEX_CODINGS, SELECTIONS)
from mlcompress.codecs.rec.payload import decode_indices, fixed_payload_bytes
from mlcompress.errors import MrcFormatError
from mlcompress.format.dtypes import FLOAT_DTYPES, torch_dtype
from mlcompress.format.records import TensorRecord
from mlcompress.lazy import torch

_PARAMS = ("bits", "blocks", "seed", "layout_seed", "prior_mean", "prior_std", "selection",
           "index_coding", "kl_bits_mean", "kl_bits_max")


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

    def check(self, record: TensorRecord) -> None:
        params, name = record.params, record.name
        if set(params) != set(_PARAMS):
            extra = sorted(set(params) ^ set(_PARAMS))
            raise MrcFormatError(f"rec tensor {name!r}: params must have exactly {', '.join(_PARAMS)} (differs in {extra[0]!r})")
        if record.dtype not in FLOAT_DTYPES:
            raise MrcFormatError(f"rec tensor {name!r}: dtype {record.dtype} is not floating point")
        numel = record.numel
        if not 1 <= numel <= MAX_REC_NUMEL:
            raise MrcFormatError(f"rec tensor {name!r}: {numel} weights; rec holds 1 .. {MAX_REC_NUMEL}")
        bits = _int(params, "bits", MIN_BITS_PER_BLOCK, MAX_BITS_PER_BLOCK, name)
        blocks = _int(params, "blocks", 1, numel, name)
        _int(params, "seed", 0, (1 << 64) - 1, name)
        _int(params, "layout_seed", 0, (1 << 64) - 1, name)
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

    def decode(self, payload: bytes, record: TensorRecord, device: Any = "cpu") -> Any:
        """Regenerate the chosen candidates on ``device``: the same bits on every device."""
        p = record.params
        indices = decode_indices(payload, p["blocks"], p["bits"], p["index_coding"])
        layout = BlockLayout(record.numel, p["blocks"], p["layout_seed"])
        flat = decode_weights(layout, torch.from_numpy(indices), seed=p["seed"], prior_mean=p["prior_mean"],
                              prior_std=p["prior_std"], device=device)
        return flat.to(torch_dtype(record.dtype)).reshape(record.shape)

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


CODEC = RecCodec()
