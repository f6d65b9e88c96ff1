"""docs/format.md is enough to read ``lossless2`` files: a reader written from §1-§4.1 and §4.6 alone.

The ``spec_*`` functions below read a whole ``.mrc`` file -- preamble, raw-DEFLATE header with
the preset dictionary (taken from the text of docs/format.md itself), records, CRCs, ``raw``
and ``lossless2`` payloads -- with the Python standard library, numpy and zstandard only, never
mlcompress. The tests write files with mlcompress and require bit-identical tensors from both
readers, and check the page's test vectors. If the spec and the code drift apart, they fail.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

from mlcompress import codecs  # only the tests use mlcompress; the spec_* reader never does
from mlcompress.container import open_mrc, write_mrc
from mlcompress.lossless import encode_lossless

DOC = Path(__file__).resolve().parents[1] / "docs" / "format.md"
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
            "int8": 1, "uint8": 1, "bool": 1}
FLOATS = {"float64", "float32", "float16", "bfloat16"}
PLANES = {  # §4.6, the plane table
    "float64": [(7, 1), (6, 1), (0, 6)], "float32": [(3, 1), (2, 1), (0, 2)],
    "float16": [(1, 1), (0, 1)], "bfloat16": [(1, 1), (0, 1)],
    "int64": [(k, 1) for k in range(7, -1, -1)], "int32": [(k, 1) for k in range(3, -1, -1)],
    "int16": [(1, 1), (0, 1)], "int8": [(0, 1)], "uint8": [(0, 1)], "bool": [(0, 1)],
}


class SpecError(ValueError):
    """The independent reader rejects a file or payload."""


def preset_dictionary() -> bytes:
    """§1's dictionary, copied out of docs/format.md (the code block after its description)."""
    text = DOC.read_text()
    block = re.search(r"The dictionary is the following bytes.*?```\n\s*(.*?)\n\s*```", text, re.S)
    data = block.group(1).strip().encode("ascii")
    if zlib.crc32(data) != 0x04F25BF1:
        raise SpecError("the dictionary in the doc does not match its stated CRC")
    return data


def spec_lossless2(payload: bytes, n: int, dtype: str, params: dict) -> np.ndarray:
    """§4.6: the tensor's elements as an (n, itemsize) array of little-endian bytes."""
    if set(params) != {"chunk"} or type(params["chunk"]) is not int or not 1 <= params["chunk"] <= 2**28:
        raise SpecError("bad params")
    chunk, size, planes = params["chunk"], ITEMSIZE[dtype], PLANES[dtype]
    count = math.ceil(n / chunk)
    table = 4 * count * len(planes)
    if len(payload) < table:
        raise SpecError("payload shorter than its length table")
    lengths = struct.unpack_from(f"<{count * len(planes)}I", payload)
    if table + sum(lengths) != len(payload):
        raise SpecError("lengths do not add up")
    out = np.zeros((n, size), dtype=np.uint8)
    pos, i = table, 0
    for k in range(count):
        m = min(chunk, n - k * chunk)
        for first, width in planes:
            length, raw = lengths[i], m * width
            stored = payload[pos:pos + length]
            pos, i = pos + length, i + 1
            if length > raw:
                raise SpecError("plane longer than raw")
            if length < raw:
                if stored[:4] != b"\x28\xb5\x2f\xfd" or zstandard.frame_content_size(stored) != raw:
                    raise SpecError("not a zstd frame of the plane's size")
                stored = zstandard.ZstdDecompressor().decompress(stored, allow_extra_data=False)
            out[k * chunk:k * chunk + m, first:first + width] = np.frombuffer(stored, np.uint8).reshape(m, width)
    if dtype in FLOATS and n:  # undo the rotation of the top 16 bits
        h = out[:, size - 1].astype(np.uint32) << 8 | out[:, size - 2]
        h = (h >> 1) | ((h & 1) << 15)
        out[:, size - 1], out[:, size - 2] = (h >> 8).astype(np.uint8), (h & 0xFF).astype(np.uint8)
    if dtype == "bool" and n and out.max() > 1:
        raise SpecError("bool byte other than 0 or 1")
    return out


def spec_read_file(path: Path, readers: dict | None = None) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """§1-§3 for version-2 files with raw and lossless2 tensors: name -> (dtype, shape, LE bytes).
    ``readers`` adds payload readers of other codecs, ``codec -> f(payload, n, dtype, params)``
    giving the (n, itemsize) little-endian bytes (tests/test_lossless3.py adds §4.7's)."""
    data = path.read_bytes()
    magic, version, header_crc, header_len = struct.unpack_from("<8sIIQ", data)
    if magic != b"\x89MRC\r\n\x1a\n" or version != 2:
        raise SpecError("not a version-2 .mrc file")
    stored = data[24:24 + header_len]
    if zlib.crc32(stored) != header_crc:
        raise SpecError("header CRC")
    inflater = zlib.decompressobj(-15, zdict=preset_dictionary())
    header = json.loads(inflater.decompress(stored))
    if header["file_size"] != len(data):
        raise SpecError("file size")
    out = {}
    for rec in header["tensors"]:
        if "alias_of" in rec:
            out[rec["name"]] = out[rec["alias_of"]]
            continue
        dtype, shape = rec.get("dtype", "float32"), tuple(rec["shape"])
        payload = data[rec["offset"]:rec["offset"] + rec["length"]]
        if zlib.crc32(payload) != rec["crc32"]:
            raise SpecError("payload CRC")
        n = math.prod(shape)
        if rec["codec"] == "raw":
            le = np.frombuffer(payload, np.uint8).reshape(n, ITEMSIZE[dtype])
        elif rec["codec"] == "lossless2":
            le = spec_lossless2(payload, n, dtype, rec.get("params", {}))
        elif rec["codec"] in (readers or {}):
            le = readers[rec["codec"]](payload, n, dtype, rec.get("params", {}))
        else:
            raise SpecError(f"codec {rec['codec']} is not read here")
        out[rec["name"]] = (dtype, shape, le.tobytes())
    return out


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    w = torch.randn(400, 700, generator=g) * 0.05
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, 3.4e38] * 100)
    return {
        "fp32": w, "bf16": w.bfloat16(), "fp16": w.half(), "fp64": w[:50].double(),
        "specials": specials, "specials_bf16": specials.bfloat16(),
        "int64": torch.arange(5000, dtype=torch.int64) - 2500, "int32": torch.randint(-9, 9, (3000,), generator=g).int(),
        "int16": torch.randint(-300, 300, (3000,), generator=g).short(), "int8": torch.randint(-5, 5, (3000,), generator=g).char(),
        "uint8": torch.randint(0, 255, (3000,), generator=g).byte(), "bool": torch.rand(3000, generator=g) < 0.2,
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "tied": w,
    }


def _check_same(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    mine = spec_read_file(path)
    theirs = open_mrc(path).tensors()
    for name, t in tensors.items():
        dtype, shape, le = mine[name]
        assert dtype == str(t.dtype).removeprefix("torch.") and shape == tuple(t.shape), name
        expected = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        decoded = theirs[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        assert le == expected == decoded, name


def test_lossless_files_decode_from_the_spec(tmp_path):
    # encode --lossless now writes lossless3 for float32/bfloat16/float16 (tests/test_lossless3.py
    # reads those files from the spec); here every dtype goes through lossless2, as older files do.
    tensors = _tensors()
    path = tmp_path / "m.mrc"
    write_mrc(path, tensors, lambda name, t: ("lossless2", {}) if t.numel() > 8 else ("raw", {}), {})
    codecs_used = {r.name: r.codec for r in open_mrc(path).records}
    assert {codecs_used[k] for k in ("fp32", "bf16", "fp16", "fp64", "int64", "bool")} == {"lossless2"}
    _check_same(path, tensors)
    encode_lossless("m.pt", tmp_path / "l.mrc", tensors={k: t for k, t in tensors.items() if not t.is_floating_point()})
    _check_same(tmp_path / "l.mrc", {k: t for k, t in tensors.items() if not t.is_floating_point()})


@pytest.mark.parametrize("chunk", [1, 7, 1000, 262144])
def test_every_chunk_size_decodes_from_the_spec(tmp_path, chunk):
    # Tiny chunks on the first 500 elements only: a chunk costs tens of microseconds.
    tensors = {k: v.reshape(-1)[:500].clone() if chunk < 100 and v.numel() > 500 else v
               for k, v in _tensors().items() if k != "tied"}
    path = tmp_path / "c.mrc"
    write_mrc(path, tensors, lambda name, t: ("lossless2", {"chunk": chunk}), {})
    _check_same(path, tensors)


def test_the_doc_vectors():
    payload = bytes.fromhex("02000000 02000000 01000000 01000000 7f80 0001 7e 00".replace(" ", ""))
    le = spec_lossless2(payload, 3, "bfloat16", {"chunk": 2})
    assert le.view("<u2").reshape(-1).tolist() == [0x3F80, 0xC000, 0x3F00]
    codec = codecs.get("lossless2")
    assert bytes(codec.encode(torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16), {"chunk": 2})[0]) == payload
    t = torch.full((64,), 1.0, dtype=torch.bfloat16)
    t[5] = -1.0
    payload = bytes.fromhex(
        "11000000 16000000"
        "28b52ffd 2040 4500 0010 7f7f 0100 9300 16"
        "28b52ffd 2040 6d00 0038 0000 0000 0001 0001 003e 8111".replace(" ", ""))
    assert spec_lossless2(payload, 64, "bfloat16", {"chunk": 64}).tobytes() == t.view(torch.uint8).numpy().tobytes()
    # The frames are what this libzstd writes; another version may write other valid frames.
    if zstandard.ZSTD_VERSION == (1, 5, 7):
        assert bytes(codec.encode(t, {"chunk": 64})[0]) == payload


def test_the_spec_reader_rejects_what_the_spec_rejects():
    t = torch.full((64,), 1.0, dtype=torch.bfloat16)
    good = bytes(codecs.get("lossless2").encode(t, {"chunk": 64})[0])
    with pytest.raises(SpecError):
        spec_lossless2(good + b"\0", 64, "bfloat16", {"chunk": 64})
    with pytest.raises(SpecError):
        spec_lossless2(good, 64, "bfloat16", {"chunk": 0})
    with pytest.raises(SpecError):
        spec_lossless2(np.array([3], "<u4").tobytes() + b"\2\0\1", 3, "bool", {"chunk": 3})
