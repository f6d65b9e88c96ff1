"""Container version 2: compact headers (REC groups), hashing, and reading version-1 files."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import mlcompress
from mlcompress.codecs.rec.decoder import decode_weights
from mlcompress.codecs.rec.hashing import Tying
from mlcompress.codecs.rec.layout import BlockLayout
from mlcompress.container import open_mrc
from mlcompress.inspection import summarize
from mlcompress.posterior.file import Posterior, PosteriorTensor, load_posterior, save_posterior
from mlcompress.rec.compress import encode_rec

DATA = Path(__file__).parent / "data"

# ------------------------------------------------------------------ version-1 files


@pytest.mark.parametrize("name", ["v1_rec.mrc", "v1_lossless.mrc", "v1_quant.mrc"])
def test_version_1_files_decode_bit_exactly(name):
    # Written by mlcompress at 169c7c5 (format version 1); their decoded tensors' SHA-256 were
    # recorded then.
    expected = json.loads((DATA / "v1_expected.json").read_text())[name]
    f = open_mrc(DATA / name)
    assert f.version == 1
    got = f.tensors()
    assert sorted(got) == sorted(expected)
    for key, t in got.items():
        assert list(t.shape) == expected[key]["shape"] and str(t.dtype) == expected[key]["dtype"]
        assert hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest() == expected[key]["sha256"], key


# ------------------------------------------------------------------ the hashing trick, from the spec
# An independent rebuild of docs/format.md "Integer hash", "Block layout" and "Hashing trick" in
# plain Python integers: no mlcompress code.
M = 0xFFFFFFFF


def fmix(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & M
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & M
    return x ^ (x >> 16)


def key(seed: int, stream: int) -> int:
    return fmix(fmix(fmix((seed & M) ^ 0x9E3779B9) ^ (seed >> 32)) ^ ((stream * 0x632BE5AB) & M))


def hash3(k: int, a: int, b: int) -> int:
    return fmix(fmix((k + a * 0x9E3779B9) & M) ^ fmix(((k ^ 0x5BD1E995) + b * 0x7F4A7C15) & M))


def feistel_perm(numel: int, seed: int, stream: int) -> list[int]:
    m = ((numel - 1).bit_length() + 1) // 2
    r = 1 << m
    a = -(-numel // r)
    k = key(seed, stream)
    t = [[hash3(k, i, v) % (a if i % 2 == 0 else r) for v in range(r if i % 2 == 0 else a)] for i in range(4)]

    def f(x: int) -> int:
        left, right = x >> m, x % r
        left = (left + t[0][right]) % a
        right = (right + t[1][left]) % r
        left = (left + t[2][right]) % a
        right = (right + t[3][left]) % r
        return left * r + right

    out = []
    for p in range(numel):
        y = f(p)
        while y >= numel:
            y = f(y)
        out.append(y)
    return out


def spec_tying(numel: int, free: int, seed: int) -> tuple[list[int], list[int]]:
    perm = feistel_perm(numel, seed, 4)
    index = [perm[f] % free for f in range(numel)]
    sign = [-1 if hash3(key(seed, 5), 0, f) >> 31 else 1 for f in range(numel)]
    return index, sign


@pytest.mark.parametrize("numel, free, seed", [(10, 3, 7), (1000, 20, 2**64 - 1), (4097, 4097, 5), (777, 1, 0)])
def test_tying_matches_the_spec(numel, free, seed):
    index, sign = spec_tying(numel, free, seed)
    got_index, got_sign = Tying(numel, free, seed).index_and_sign()
    assert got_index.tolist() == index and got_sign.tolist() == sign
    # every free variable carries floor or ceil(numel / free) weights
    counts = np.bincount(index, minlength=free)
    assert counts.min() == numel // free and counts.max() == -(-numel // free)


def test_tying_test_vector():
    # docs/format.md "Hashing trick" quotes these values.
    index, sign = Tying(10, 3, 7).index_and_sign()
    assert index.tolist() == TYING_INDEX and sign.tolist() == TYING_SIGN


TYING_INDEX = [1, 0, 0, 1, 0, 0, 2, 1, 2, 2]
TYING_SIGN = [1.0, 1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0, -1.0]


def test_tying_backends_agree():
    t = Tying(70_001, 1_234, 99)
    values = np.random.default_rng(0).standard_normal(1_234).astype(np.float32)
    a = t.expand(values, xp=np)
    b = t.expand(torch.from_numpy(values)).numpy()
    assert a.tobytes() == b.tobytes()
    index, sign = t.index_and_sign()
    assert np.array_equal(a, values[index.numpy()] * sign.numpy())


# ------------------------------------------------------------------ LeNet-5-shaped posterior files
LENET5 = {"conv1.weight": (20, 1, 5, 5), "conv1.bias": (20,), "conv2.weight": (50, 20, 5, 5), "conv2.bias": (50,),
          "fc1.weight": (500, 800), "fc1.bias": (500,), "fc2.weight": (10, 500), "fc2.bias": (10,)}
HASH = {"conv2.weight": 2, "fc1.weight": 50}


def lenet5_posterior(bits_per_free: float = 1.0, bits: int = 12, seed: int = 0) -> Posterior:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in LENET5.items():
        numel = math.prod(shape)
        free = numel // HASH.get(name, 1)
        rho = 0.05 + 0.1 * torch.rand((), generator=g).item()
        mean = torch.randn(free, generator=g) * rho * 0.5
        std = torch.full((free,), rho * 0.6)
        tensors[name] = PosteriorTensor(mean=mean if name in HASH else mean.reshape(shape),
                                        std=std if name in HASH else std.reshape(shape), prior_mean=0.0,
                                        prior_std=rho, num_blocks=max(1, round(free * bits_per_free / bits)),
                                        shape=shape if name in HASH else None)
    return Posterior(tensors=tensors, bits_per_block=bits, layout_seed=seed, parameterization="mean-kl")


@pytest.fixture(scope="module")
def lenet5_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("lenet5")
    post = lenet5_posterior()
    src = save_posterior(post, d / "post.safetensors")
    report = encode_rec(src, d / "post.mrc")
    return d / "post.mrc", src, report


def test_lenet5_rec_header_is_at_most_200_bytes(lenet5_file):
    path, _, _ = lenet5_file
    doc = summarize(path)
    assert doc["format_version"] == 2
    # preamble + compressed JSON + padding: everything that is not an index
    assert doc["totals"]["overhead_bytes"] <= 200, doc["totals"]
    assert all(t["codec"] == "rec" for t in doc["tensors"])  # every tensor REC-coded


def test_hashed_tensors_decode_as_their_free_variables_expanded(lenet5_file):
    path, src, _ = lenet5_file
    post = load_posterior(src)
    f = open_mrc(path)
    for name, pt in post.tensors.items():
        rec = f.record(name)
        p = rec.params
        free = p.get("free", rec.numel)
        assert (free != rec.numel) == (name in HASH)
        got = f.tensor(name).reshape(-1)
        # the free variables, decoded without tying, then tied by the spec's own map
        values = mlcompress.codecs.get("rec").decode(f.payload(name), _untied(rec), "cpu").reshape(-1).numpy()
        index, sign = spec_tying(rec.numel, free, p["layout_seed"]) if rec.numel <= 20_000 else \
            [t.numpy() for t in Tying(rec.numel, free, p["layout_seed"]).index_and_sign()]
        want = values[np.asarray(index)] * np.asarray(sign, dtype=np.float32) if name in HASH else values
        assert got.numpy().tobytes() == want.astype(np.float32).tobytes(), name


def _untied(rec):
    from mlcompress.format.records import TensorRecord

    params = {k: v for k, v in rec.params.items() if k != "free"}
    free = rec.params.get("free", rec.numel)
    return TensorRecord(rec.name, (free,), rec.dtype, "rec", params, rec.offset, rec.length, rec.crc32)


def test_hashing_shrinks_the_file_by_the_hash_factor(tmp_path):
    # Same bits per coded variable: the hashed layers' payloads shrink by their factor.
    plain = lenet5_posterior()
    for name in HASH:
        pt = plain.tensors[name]
        numel = math.prod(pt.shape)
        pt.mean = torch.zeros(numel).reshape(pt.shape)
        pt.std = torch.full((numel,), float(pt.std[0])).reshape(pt.shape)
        pt.num_blocks, pt.shape = pt.num_blocks * HASH[name], None
    hashed_path = tmp_path / "h.mrc"
    encode_rec("h", hashed_path, posterior=lenet5_posterior())
    encode_rec("p", tmp_path / "p.mrc", posterior=plain)
    rows_h = {r["name"]: r for r in summarize(hashed_path)["tensors"]}
    rows_p = {r["name"]: r for r in summarize(tmp_path / "p.mrc")["tensors"]}
    for name, factor in HASH.items():
        ratio = rows_p[name]["stored_bytes"] / rows_h[name]["stored_bytes"]
        assert abs(ratio - factor) / factor < 0.01, (name, ratio)


def test_short_floats_round_trip_as_float32():
    from mlcompress.codecs.rec import compact_prior, short_float32

    for x in [0.1, 1e-7, 0.0123456789, 12345.678, 3.4028234663852886e38]:
        s = short_float32(x)
        assert struct.pack("<f", s) == struct.pack("<f", x)
        c = compact_prior(x)
        assert x > 1e38 or len(repr(short_float32(c))) <= 7


def test_the_spec_quotes_the_preset_dictionary_exactly():
    import zlib

    from mlcompress.format.header import PRESET_DICTIONARY

    text = (Path(__file__).parent.parent / "docs" / "format.md").read_text()
    quoted = [line.strip() for line in text.splitlines() if line.strip().startswith('"alias_of":')]
    assert quoted and quoted[0].encode() == PRESET_DICTIONARY
    assert len(PRESET_DICTIONARY) == 474 and zlib.crc32(PRESET_DICTIONARY) == 0x04F25BF1
