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
import struct
from typing import Any, Mapping

from mlcompress.codecs.rec.decoder import decode_weights
from mlcompress.codecs.rec.hashing import Tying
from mlcompress.codecs.rec.layout import BlockLayout
from mlcompress.codecs.rec.limits import (MAX_BITS_PER_BLOCK, MAX_BLOCK_WEIGHTS, MAX_REC_NUMEL, MIN_BITS_PER_BLOCK,
                                          INDEX_CODINGS, SELECTIONS)
from mlcompress.codecs.rec.payload import decode_indices, fixed_payload_bytes
from mlcompress.errors import MrcFormatError
from mlcompress.format.dtypes import FLOAT_DTYPES, torch_dtype
from mlcompress.format.records import TensorRecord
from mlcompress.lazy import torch

_PARAMS = ("bits", "blocks", "seed", "layout_seed", "prior_mean", "prior_std", "selection", "index_coding")
#: Keys a record may carry besides those: the KL summary (informational; version-1 writers
#: always wrote it) and ``free``, the hashing trick's number of free variables.
_OPTIONAL = ("kl_bits_mean", "kl_bits_max", "free")


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
        missing = sorted(set(_PARAMS) - set(params))
        unknown = sorted(set(params) - set(_PARAMS) - set(_OPTIONAL))
        if missing or unknown:
            what = f"lacks {missing[0]!r}" if missing else f"has unknown key {unknown[0]!r}"
            raise MrcFormatError(f"rec tensor {name!r}: params {what} (need {', '.join(_PARAMS)})")
        if record.dtype not in FLOAT_DTYPES:
            raise MrcFormatError(f"rec tensor {name!r}: dtype {record.dtype} is not floating point")
        numel = record.numel
        if not 1 <= numel <= MAX_REC_NUMEL:
            raise MrcFormatError(f"rec tensor {name!r}: {numel} weights; rec holds 1 .. {MAX_REC_NUMEL}")
        bits = _int(params, "bits", MIN_BITS_PER_BLOCK, MAX_BITS_PER_BLOCK, name)
        coded = _int(params, "free", 1, numel, name) if "free" in params else numel
        blocks = _int(params, "blocks", 1, coded, name)
        _int(params, "seed", 0, (1 << 64) - 1, name)
        _int(params, "layout_seed", 0, (1 << 64) - 1, name)
        if -(-coded // blocks) > MAX_BLOCK_WEIGHTS:
            raise MrcFormatError(f"rec tensor {name!r}: blocks of {-(-coded // blocks)} weights exceed the limit {MAX_BLOCK_WEIGHTS}")
        _float(params, "prior_mean", name)
        if not _float(params, "prior_std", name) > 0:
            raise MrcFormatError(f"rec tensor {name!r}: prior_std must be > 0")
        for key in ("kl_bits_mean", "kl_bits_max"):
            if key in params:
                _float(params, key, name)
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
        tying = Tying(record.numel, p["free"], p["layout_seed"]) if "free" in p else None
        layout = BlockLayout(tying.free if tying else record.numel, p["blocks"], p["layout_seed"])
        flat = decode_weights(layout, torch.from_numpy(indices), seed=p["seed"], prior_mean=p["prior_mean"],
                              prior_std=p["prior_std"], device=device, tying=tying)
        return flat.to(torch_dtype(record.dtype)).reshape(record.shape)

    def describe(self, record: TensorRecord) -> dict[str, Any]:
        p = record.params
        coded = p.get("free", record.numel)
        out = {
            "blocks": p["blocks"],
            "bits_per_block": p["bits"],
            "free_variables": coded,
            "hash_factor": record.numel / coded,
            "weights_per_block": coded / p["blocks"],
            "bits_per_weight": 8.0 * record.length / record.numel,
            "selection": p["selection"],
            "index_coding": p["index_coding"],
            "index_bits_fixed": p["blocks"] * p["bits"],
        }
        out.update({k: p[k] for k in ("kl_bits_mean", "kl_bits_max") if k in p})
        return out


    # -- version-2 groups: every fixed-width REC tensor of a file in one record ---------------
    def group_key(self, record: TensorRecord) -> tuple | None:
        """What tensors must share to be stored in one group (None: this one stays alone)."""
        p = record.params
        if p.get("index_coding") != "fixed" or not set(_PARAMS) <= set(p) or set(p) - set(_PARAMS) - {"free"}:
            # An entropy-coded payload's length is not implied by its params, and a record
            # that is not well formed (or carries the informational KL summary) stays as it is.
            return None
        return (p["bits"], p["seed"], p["layout_seed"], p["selection"])

    def group_params(self, record: TensorRecord) -> dict[str, Any]:
        p = record.params
        out = {"bits": p["bits"], "seed": p["seed"], "layout_seed": p["layout_seed"]}
        if p["selection"] != "is":
            out["selection"] = p["selection"]
        return out

    def group_entry(self, record: TensorRecord) -> list[Any]:
        """``[name, shape, blocks, prior_std]`` plus an object of the non-default ``dtype``
        (float32), ``prior_mean`` (0) and ``free`` (no hashing)."""
        p = record.params
        entry: list[Any] = [record.name, list(record.shape), p["blocks"], short_float32(p["prior_std"])]
        extra: dict[str, Any] = {}
        if record.dtype != "float32":
            extra["dtype"] = record.dtype
        if p["prior_mean"] != 0:
            extra["prior_mean"] = short_float32(p["prior_mean"])
        if "free" in p:
            extra["free"] = p["free"]
        if extra:
            entry.append(extra)
        return entry

    def group_members(self, params: Mapping[str, Any], entries: list[Any]) -> list[TensorRecord]:
        """The member records of a group (raises :class:`MrcFormatError` on a malformed entry)."""
        if not set(params) <= {"bits", "seed", "layout_seed", "selection"}:
            raise MrcFormatError(f"rec group: unknown params {sorted(set(params) - {'bits', 'seed', 'layout_seed', 'selection'})}")
        members = []
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) in (4, 5) and isinstance(entry[0], str)
                    and isinstance(entry[1], list) and (len(entry) == 4 or isinstance(entry[4], dict))):
                raise MrcFormatError(f"rec group: malformed entry {str(entry)[:60]}")
            name, shape, blocks, prior_std = entry[:4]
            extra = entry[4] if len(entry) == 5 else {}
            if not set(extra) <= {"dtype", "prior_mean", "free"}:
                raise MrcFormatError(f"rec group: entry {name!r} has unknown keys {sorted(set(extra) - {'dtype', 'prior_mean', 'free'})}")
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise MrcFormatError(f"rec group: entry {name!r} has an invalid shape")
            full = {"bits": params.get("bits"), "blocks": blocks, "seed": params.get("seed"),
                    "layout_seed": params.get("layout_seed"), "prior_mean": extra.get("prior_mean", 0.0),
                    "prior_std": prior_std, "selection": params.get("selection", "is"), "index_coding": "fixed"}
            if "free" in extra:
                full["free"] = extra["free"]
            for key in ("bits", "blocks"):
                if not (isinstance(full[key], int) and not isinstance(full[key], bool) and full[key] >= 1):
                    raise MrcFormatError(f"rec group: entry {name!r} has an invalid {key}")
            record = TensorRecord(name, tuple(shape), extra.get("dtype", "float32"), "rec", full,
                                  length=fixed_payload_bytes(full["blocks"], full["bits"]), crc32=None)
            members.append(record)
        return members


def short_float32(value: float) -> float:
    """The float with the shortest decimal form that rounds to the same float32 as ``value``
    (JSON carries it as that decimal; a reader rounds the number it parses to float32)."""
    target = struct.pack("<f", value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        try:
            if struct.pack("<f", candidate) == target:
                return candidate
        except OverflowError:  # rounded up past the largest float32
            continue
    return value


#: Significant decimal digits the encoder keeps of a prior std: 4 change the KL of a 16-weight
#: block by < 0.01 nats and keep each std to 6-7 characters of the header.
PRIOR_DIGITS = 4


def compact_prior(value: float) -> float:
    """``value`` rounded to :data:`PRIOR_DIGITS` significant digits, as a float32 value: what the
    encoder codes against, so the header can carry it in a few characters."""
    try:
        return float(struct.unpack("<f", struct.pack("<f", float(f"{value:.{PRIOR_DIGITS}g}")))[0])
    except OverflowError:  # within 0.05% of the largest float32: keep it as it is
        return float(struct.unpack("<f", struct.pack("<f", value))[0])


CODEC = RecCodec()
