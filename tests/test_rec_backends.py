"""The one REC recipe on its two array backends: numpy (CPU decode) and torch (encoder, CUDA).

Both must give the same bits: a file is encoded with torch and decoded with numpy on the CPU and
torch on CUDA. The recipe is written once (mlcompress/codecs/rec/backend.py holds the few ops the
modules spell differently), so these tests compare its two backends, not two copies; the
candidate-by-candidate rebuild at the end checks both against an independent per-block path.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlcompress.codecs.rec.backend import backend
from mlcompress.codecs.rec.counter import STREAM_SELECTION, col_hash, grid_hash, row_hash
from mlcompress.codecs.rec.decoder import decode_flat, decode_weights, decode_weights_torch
from mlcompress.codecs.rec.layout import BlockLayout
from mlcompress.codecs.rec.sampler import candidate_codes, candidate_weights, candidates, normal_table, uniforms

MAX_BLOCK = 1 << 16  # the format's limit on weights per block


def _same_bits(a, b) -> bool:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return a.dtype == b.dtype == torch.float32 and torch.equal(a.view(torch.int32), b.view(torch.int32))


@st.composite
def _cases(draw):
    # mostly small tensors (fixed costs, edge sizes), some spanning many slices of both backends
    numel = draw(st.one_of(st.integers(1, 5000), st.integers(5000, 400_000)))
    blocks = draw(st.integers(-(-numel // MAX_BLOCK), numel))
    layout = BlockLayout(numel, blocks, draw(st.integers(0, 2**64 - 1)))
    # random 24-bit indices (a generator: hypothesis lists of 10^5 values are slow), some pinned
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    indices = rng.integers(0, 2**24, blocks)
    for b, k in draw(st.lists(st.tuples(st.integers(0, blocks - 1), st.sampled_from([0, 1, 2**24 - 1])), max_size=3)):
        indices[b] = k
    indices = torch.from_numpy(indices)
    seed = draw(st.integers(0, 2**64 - 1))
    mean = draw(st.floats(-1.0, 1.0, allow_subnormal=False))
    std = draw(st.floats(1e-6, 10.0))
    return layout, indices, seed, mean, std


@settings(max_examples=120, deadline=None)
@given(_cases())
def test_numpy_and_torch_backends_decode_bit_for_bit(case):
    layout, indices, seed, mean, std = case
    kw = dict(seed=seed, prior_mean=mean, prior_std=std)
    by_numpy = decode_flat(layout, indices.numpy(), xp=np, **kw)
    by_torch = decode_flat(layout, indices, xp=torch, **kw)
    assert isinstance(by_numpy, np.ndarray) and isinstance(by_torch, torch.Tensor)
    assert _same_bits(by_numpy, by_torch)
    # decode_weights on the CPU is the numpy backend, decode_weights_torch the torch one
    assert _same_bits(decode_weights(layout, indices, **kw), by_numpy)
    assert _same_bits(decode_weights_torch(layout, indices, **kw), by_torch)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300_000), st.integers(0, 2**64 - 1), st.data())
def test_permutation_backends_agree(numel, seed, data):
    layout = BlockLayout(numel, 1, seed)
    by_torch = layout.position_of()
    assert np.array_equal(layout.position_of(xp=np), by_torch.numpy())
    assert np.array_equal(layout.flat_index(xp=np), layout.flat_index().numpy())
    pos = data.draw(st.lists(st.integers(0, numel - 1), min_size=1, max_size=50))
    assert np.array_equal(layout.flat_index(np.array(pos), xp=np), layout.flat_index(torch.tensor(pos)).numpy())


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**64 - 1), st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=40), st.integers(1, 301))
def test_candidate_backends_agree(seed, k, dim):
    kt, kn = torch.tensor(k), np.array(k, dtype=np.int64)
    codes = candidate_codes(seed, kt, dim)
    assert codes.dtype == torch.int32 and codes.shape == (len(k), dim)
    assert np.array_equal(candidate_codes(seed, kn, dim, xp=np), codes.numpy())
    z = candidates(seed, kt, dim)
    assert _same_bits(candidates(seed, kn, dim, xp=np), z)
    rho = torch.rand(dim) + 0.01
    assert _same_bits(candidate_weights(z.numpy(), 0.3, rho.numpy(), xp=np), candidate_weights(z, 0.3, rho))
    assert np.array_equal(uniforms(seed, STREAM_SELECTION, kn, kn[:7], xp=np),
                          uniforms(seed, STREAM_SELECTION, kt, kt[:7]).numpy())


def test_hash_words_are_the_backends_own():
    # uint32 in numpy, int32 bit patterns in torch: the same 32 bits
    a = np.array([0, 1, 2**31, 2**32 - 1], dtype=np.int64)
    by_numpy = grid_hash(row_hash(7, a, xp=np), col_hash(7, a, xp=np), xp=np)
    by_torch = grid_hash(row_hash(7, torch.from_numpy(a)), col_hash(7, torch.from_numpy(a)))
    assert by_numpy.dtype == np.uint32 and by_torch.dtype == torch.int32
    assert np.array_equal(by_numpy.view(np.int32), by_torch.numpy())


def test_tables_agree():
    assert np.array_equal(normal_table(xp=np)[0], normal_table()[0].numpy())
    assert np.array_equal(normal_table(xp=np)[1], normal_table()[1].numpy())


@pytest.mark.parametrize("numel, blocks", [(65_537, 3), (200_003, 301), (400_000, 564), (99_999, 99_999), (131_072, 2)])
def test_decode_equals_candidate_by_candidate_rebuild(numel, blocks):
    # the independent path: each block's candidate alone, scattered through the forward layout
    layout = BlockLayout(numel, blocks, seed=2**63 + 5)
    indices = torch.randint(0, 2**20, (blocks,), generator=torch.Generator().manual_seed(numel))
    sizes, starts = layout.block_sizes().tolist(), layout.block_starts().tolist()
    flat = layout.flat_index()
    ref = torch.empty(numel)
    chosen = sorted(set(range(min(blocks, 40))) | set(range(max(0, blocks - 40), blocks)))  # both size runs
    for b in chosen:
        z = candidates(11, indices[b : b + 1], sizes[b])[0]
        ref[flat[starts[b] : starts[b] + sizes[b]]] = candidate_weights(z, -0.003, 0.07)
    checked = torch.cat([flat[starts[b] : starts[b] + sizes[b]] for b in chosen])
    for got in (decode_weights(layout, indices, seed=11, prior_mean=-0.003, prior_std=0.07),
                decode_weights_torch(layout, indices, seed=11, prior_mean=-0.003, prior_std=0.07)):
        assert _same_bits(got[checked], ref[checked])


def test_slicing_does_not_change_bits(monkeypatch):
    # CUDA runs torch on slices of 2^20 values, the CPU on 2^16 (torch) or 2^15 (numpy)
    layout = BlockLayout(300_001, 411, seed=9)
    indices = torch.randint(0, 2**24, (411,), generator=torch.Generator().manual_seed(1))
    kw = dict(seed=3, prior_mean=0.01, prior_std=0.2)
    ref = decode_flat(layout, indices, xp=torch, **kw)
    monkeypatch.setattr(type(backend(torch)), "slice_size", lambda self, device=None: 1 << 20)
    assert _same_bits(decode_flat(layout, indices, xp=torch, **kw), ref)
    monkeypatch.setattr(type(backend(np)), "slice_size", lambda self, device=None: 777)
    assert _same_bits(decode_flat(layout, indices.numpy(), xp=np, **kw), ref)
    assert np.array_equal(layout.position_of(xp=np), layout.position_of().numpy())


def test_rejects_wrong_index_count():
    for xp, idx in ((np, np.zeros(2, dtype=np.int64)), (torch, torch.zeros(2, dtype=torch.int64))):
        with pytest.raises(ValueError, match="expected 3 indices"):
            decode_flat(BlockLayout(10, 3, 0), idx, seed=0, prior_mean=0.0, prior_std=1.0, xp=xp)


def test_rejects_unknown_array_module():
    with pytest.raises(ValueError, match="unsupported array module"):
        candidate_codes(0, [1, 2], 3, xp=math)
