"""The REC candidate sampler: documented test vectors, batch independence, distribution."""

import math

import numpy as np
import pytest
import torch

from mlcompress.codecs.rec.counter import fmix32, fmix32_int, from_int32, stream_key, to_int32
from mlcompress.codecs.rec.sampler import NORMAL_TABLE_CRC32, candidate_codes, candidate_weights, candidates, normal_table

# These values are quoted in docs/format.md ("REC codec"). Changing them breaks every file.
FMIX = {0: 0x0, 1: 0x514E28B7, 0xDEADBEEF: 0x0DE5C6A9}
KEYS = {(2024, 0): 0x6028AB8D, (2024, 1): 0xD93887E0, (2**64 - 1, 3): 0x4DA6DB80}
K = [0, 1, 2**20 - 1]
CODES = [
    [36441, 10534, 62020, 60890, 58850, 58361],
    [29037, 65173, 22557, 124, 42626, 59500],
    [49701, 44809, 52827, 58297, 50859, 31566],
]
Z_BITS = [
    [0x3E105A6E, 0xBF7DCCC7, 0x3FCE257F, 0x3FBC0FDA, 0x3FA294D2, 0x3F9D5AAA],
    [0xBE129BBD, 0x40229B11, 0xBECD5368, 0xC0393D0A, 0x3EC5E07C, 0x3FA9FAD7],
    [0x3F337C58, 0x3EF4D3EB, 0x3F5D11E9, 0x3F9CB071, 0x3F424996, 0xBD3C4C65],
]
# w = 0.01 + 0.05 * z, float32, multiply then add
W_BITS = [
    [0x3C8BA94B, 0xBD221476, 0x3DB965AD, 0x3DAAEDF6, 0x3D968B89, 0x3D925D03],
    [0x3B3A3698, 0x3E0C5318, 0xBC24AE6A, 0xBE09F364, 0x3CF038B5, 0x3D9C76C0],
    [0x3D388C70, 0x3D0AE420, 0x3D59D0E4, 0x3D91D4D5, 0x3D4463D4, 0x3BFC5C52],
]


def _bits(t: torch.Tensor) -> list[list[int]]:
    return [[v & 0xFFFFFFFF for v in row] for row in t.contiguous().view(torch.int32).tolist()]


def test_hash_vectors():
    for x, h in FMIX.items():
        assert fmix32_int(x) == h
        assert fmix32(torch.tensor([x], dtype=torch.int64)).item() == h
    for (seed, stream), key in KEYS.items():
        assert stream_key(seed, stream) == key


def test_hash_backends_agree():
    # the one finalizer on torch int32 words, numpy uint32 words, torch int64 values and Python ints
    g = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randint(0, 2**32, (100_000,), generator=g, dtype=torch.int64),
        torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF], dtype=torch.int64),
    ])
    assert torch.equal(from_int32(to_int32(x)), x)
    ref = from_int32(fmix32(to_int32(x)))
    assert torch.equal(fmix32(x.clone()), ref)
    assert np.array_equal(fmix32(x.numpy().astype(np.uint32), xp=np), ref.numpy())
    assert [fmix32_int(v) for v in x[-1000:].tolist()] == ref[-1000:].tolist()


def test_candidate_vectors():
    k = torch.tensor(K)
    assert candidate_codes(2024, k, 6).tolist() == CODES
    z = candidates(2024, k, 6)
    assert _bits(z) == Z_BITS
    assert _bits(candidate_weights(z, 0.01, 0.05)) == W_BITS


def test_table_is_pinned_and_symmetric():
    import zlib

    table, _ = normal_table()
    assert zlib.crc32(table.numpy().astype("<f4").tobytes()) == NORMAL_TABLE_CRC32
    assert torch.equal(table, -table.flip(0))
    assert bool((table[1:] > table[:-1]).all())


def test_single_candidate_equals_batch():
    batch = candidates(7, torch.arange(3000), 37)
    for k in (0, 1, 1234, 2999):
        assert torch.equal(candidates(7, torch.tensor([k]), 37)[0], batch[k])
    # a shorter prefix of coordinates is a prefix of the longer one
    assert torch.equal(candidates(7, torch.tensor([5]), 10)[0], batch[5, :10])


def test_seeds_are_independent():
    a = candidates(1, torch.arange(200), 50).flatten()
    b = candidates(2, torch.arange(200), 50).flatten()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.05


def test_candidates_are_standard_normal():
    z = candidates(11, torch.arange(4000), 64).double()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    # KS distance against N(0, 1)
    x, _ = z.flatten().sort()
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    emp = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert (cdf - emp).abs().max().item() < 1.63 / math.sqrt(n) + 2**-16
    # neighbouring coordinates and candidates are uncorrelated
    assert abs((z[:, ::2] * z[:, 1::2]).mean().item()) < 5 / math.sqrt(n / 2)
    assert abs((z[:-1] * z[1:]).mean().item()) < 5 / math.sqrt(n)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_candidates_identical():
    k = torch.randint(0, 2**24, (500,))
    cpu = candidates(99, k, 101)
    cuda = candidates(99, k.cuda(), 101).cpu()
    assert torch.equal(cpu.view(torch.int32), cuda.view(torch.int32))
    assert _bits(candidates(2024, torch.tensor(K).cuda(), 6).cpu()) == Z_BITS
    w_cuda = candidate_weights(candidates(2024, torch.tensor(K).cuda(), 6), 0.01, 0.05).cpu()
    assert _bits(w_cuda) == W_BITS
