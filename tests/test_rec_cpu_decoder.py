"""The numpy CPU decoder must give exactly the torch decoder's bits (the torch path is what CUDA runs)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlcompress.rec.cpu_decoder import _Permutation, decode_weights_cpu
from mlcompress.rec.decoder import decode_weights, decode_weights_torch
from mlcompress.rec.layout import BlockLayout


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype == torch.float32 and torch.equal(a.view(torch.int32), b.view(torch.int32))


@st.composite
def _cases(draw):
    numel = draw(st.integers(1, 5000))
    blocks = draw(st.integers(1, numel))
    layout = BlockLayout(numel, blocks, draw(st.integers(0, 2**64 - 1)))
    indices = torch.tensor(draw(st.lists(st.integers(0, 2**24 - 1), min_size=blocks, max_size=blocks)))
    seed = draw(st.integers(0, 2**64 - 1))
    mean = draw(st.floats(-1.0, 1.0, allow_subnormal=False))
    std = draw(st.floats(1e-6, 10.0))
    return layout, indices, seed, mean, std


@settings(max_examples=150, deadline=None)
@given(_cases())
def test_numpy_and_torch_decoders_agree_bit_for_bit(case):
    layout, indices, seed, mean, std = case
    ref = decode_weights_torch(layout, indices, seed=seed, prior_mean=mean, prior_std=std)
    got = decode_weights_cpu(layout, indices, seed=seed, prior_mean=mean, prior_std=std)
    assert _same_bits(ref, got)


@pytest.mark.parametrize("numel, blocks", [(65_537, 3), (200_003, 301), (400_000, 564), (99_999, 99_999)])
def test_agree_on_tensors_spanning_several_slices(numel, blocks):
    layout = BlockLayout(numel, blocks, seed=2**63 + 5)
    indices = torch.randint(0, 2**20, (blocks,), generator=torch.Generator().manual_seed(numel))
    ref = decode_weights_torch(layout, indices, seed=11, prior_mean=-0.003, prior_std=0.07)
    assert _same_bits(ref, decode_weights(layout, indices, seed=11, prior_mean=-0.003, prior_std=0.07))


@pytest.mark.parametrize("numel", [1, 2, 3, 12, 1000, 4097, 70_001])
def test_permutation_matches_layout(numel):
    layout = BlockLayout(numel, 1, seed=numel)
    pos = _Permutation(layout).inverse(np.arange(numel, dtype=np.int32))
    assert torch.equal(torch.from_numpy(pos.astype(np.int64)), layout.position_of())


def test_rejects_wrong_index_count():
    with pytest.raises(ValueError, match="expected 3 indices"):
        decode_weights_cpu(BlockLayout(10, 3, 0), np.zeros(2, dtype=np.int64), seed=0, prior_mean=0.0, prior_std=1.0)
