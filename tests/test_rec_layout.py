import pytest
import torch

from mlcompress.codecs.rec.layout import BlockLayout


@pytest.mark.parametrize("numel, blocks", [(1, 1), (2, 2), (7, 3), (1000, 1), (12345, 17), (40000, 608)])
def test_layout_is_a_partition(numel, blocks):
    lay = BlockLayout(numel, blocks, seed=99)
    flat = lay.flat_index()
    assert torch.equal(torch.sort(flat).values, torch.arange(numel))
    sizes = lay.block_sizes()
    assert sizes.sum().item() == numel and sizes.max() - sizes.min() <= 1
    mat = lay.block_index_matrix()
    assert mat.shape == (blocks, lay.max_block_size)
    assert torch.equal((mat >= 0).sum(1), sizes)
    assert torch.equal(mat[mat >= 0].sort().values, torch.arange(numel))


@pytest.mark.parametrize("numel", [1, 2, 3, 5, 64, 1000, 4097, 99_999])
def test_position_of_inverts_flat_index(numel):
    lay = BlockLayout(numel, 1, seed=3)
    flat = lay.flat_index()
    pos = lay.position_of()
    assert torch.equal(flat[pos], torch.arange(numel))
    assert torch.equal(pos[flat], torch.arange(numel))


def test_layout_reproducible_and_seeded():
    a = BlockLayout(5000, 10, seed=1).flat_index()
    assert torch.equal(a, BlockLayout(5000, 10, seed=1).flat_index())
    assert not torch.equal(a, BlockLayout(5000, 10, seed=2).flat_index())
    # a subset of positions maps exactly as inside the whole
    pos = torch.tensor([4999, 0, 1234, 77])
    assert torch.equal(BlockLayout(5000, 10, seed=1).flat_index(pos), a[pos])


def test_layout_test_vector():
    # docs/format.md "REC codec" quotes these values; changing them breaks every file.
    assert BlockLayout(10, 3, seed=7).flat_index().tolist() == LAYOUT_VECTOR


def test_layout_looks_random():
    # each block should sample the whole tensor: block means of the index ~ numel/2
    lay = BlockLayout(100_000, 100, seed=5)
    mat = lay.block_index_matrix().double()
    means = mat.mean(1)
    # std of the mean of 1000 uniform indices in [0, 1e5) is ~913
    assert (means - 50_000).abs().max().item() < 5 * 913
    # neighbours in a block are not neighbours in the tensor
    assert (mat[:, 1:] - mat[:, :-1]).abs().float().median().item() > 10_000


def test_bad_layouts():
    with pytest.raises(ValueError):
        BlockLayout(0, 1, 0)
    with pytest.raises(ValueError):
        BlockLayout(5, 6, 0)
    with pytest.raises(ValueError):
        BlockLayout(5, 1, -1)


LAYOUT_VECTOR = [9, 7, 2, 8, 0, 1, 6, 3, 4, 5]
