import pytest
import torch

import sparsekern as sk
from helpers import random_bsr


@pytest.mark.parametrize("shape,block", [((64, 96), 16), ((48, 80), (16, 8)), ((32, 32), 32), ((6, 10), (3, 5))],
                         ids=["sq16", "rect16x8", "single", "tiny3x5"])
def test_round_trip_is_exact(shape, block):
    dense = torch.randn(shape, dtype=torch.float64)
    br, bc = (block, block) if isinstance(block, int) else block
    dense.view(shape[0] // br, br, shape[1] // bc, bc)[0, :, -1, :] = 0  # one all-zero block
    matrix = sk.BlockSparseMatrix.from_dense(dense, block)
    assert torch.equal(matrix.to_dense(), dense)
    assert matrix.block_size == (br, bc) and matrix.shape == shape
    assert not matrix.block_mask[0, -1]
    assert matrix.density == matrix.block_mask.sum().item() / matrix.block_mask.numel()
    assert matrix.values.is_leaf and matrix.values.shape == (matrix.nnz_blocks, br, bc)


def test_explicit_mask_drops_blocks_and_keeps_zero_blocks():
    dense = torch.randn(32, 32)
    dense[:16, :16] = 0
    mask = torch.tensor([[True, False], [True, True]])
    matrix = sk.BlockSparseMatrix.from_dense(dense, 16, block_mask=mask)
    assert matrix.nnz_blocks == 3
    expected = dense.clone()
    expected[:16, 16:] = 0
    assert torch.equal(matrix.to_dense(), expected)


def test_layout_offsets_and_transpose_metadata():
    mask = torch.tensor([[True, False, True], [False, False, False], [True, True, False]])
    layout = sk.BlockLayout.from_block_mask(mask, (6, 6), 2)
    assert layout.row_offsets.tolist() == [0, 2, 2, 4]
    assert layout.col_indices.tolist() == [0, 2, 0, 1]
    assert layout.row_indices.tolist() == [0, 0, 2, 2]
    assert layout.col_offsets.tolist() == [0, 2, 3, 4]
    # Block column 0 holds blocks 0 (row 0) and 2 (row 2); column 1 block 3; column 2 block 1.
    assert layout.t_block_ids.tolist() == [0, 2, 3, 1]
    assert layout.t_row_indices.tolist() == [0, 2, 2, 0]


def test_empty_matrix():
    matrix = sk.BlockSparseMatrix.from_dense(torch.zeros(8, 12), 4)
    assert matrix.nnz_blocks == 0 and matrix.density == 0.0
    assert torch.equal(matrix.to_dense(), torch.zeros(8, 12))


def test_with_block_mask_keeps_surviving_values_and_zeroes_new_blocks():
    matrix = random_bsr((64, 64), 16, 0.5, seed=3)
    new_mask = ~matrix.block_mask
    new_mask[0, 0] = new_mask[1, 1] = True
    new_mask[matrix.block_mask.nonzero()[0].tolist()] = True  # one survivor at least
    rebuilt = matrix.with_block_mask(new_mask)
    old_dense, new_dense = matrix.to_dense(), rebuilt.to_dense()
    for r in range(4):
        for c in range(4):
            block = new_dense[16 * r:16 * r + 16, 16 * c:16 * c + 16]
            if not new_mask[r, c]:
                assert torch.equal(block, torch.zeros_like(block))
            elif matrix.block_mask[r, c]:
                assert torch.equal(block, old_dense[16 * r:16 * r + 16, 16 * c:16 * c + 16])
            else:
                assert torch.equal(block, torch.zeros_like(block))


def test_positions_of_maps_blocks_between_layouts():
    a = sk.BlockLayout.from_block_mask(torch.tensor([[True, False], [True, True]]), (4, 4), 2)
    b = sk.BlockLayout.from_block_mask(torch.tensor([[True, True], [False, True]]), (4, 4), 2)
    assert a.positions_of(b).tolist() == [0, -1, 2]


def test_indivisible_shape_names_shape_and_block():
    with pytest.raises(ValueError, match=r"\(30, 32\).*\(16, 16\)"):
        sk.BlockSparseMatrix.from_dense(torch.randn(30, 32), 16)


@pytest.mark.parametrize("bad", [0, -1, (16,), (4, 0), 2.5, (True, 4)])
def test_bad_block_size(bad):
    with pytest.raises(ValueError, match="block_size"):
        sk.BlockSparseMatrix.from_dense(torch.randn(16, 16), bad)


def test_bad_block_mask():
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(2, 2\)"):
        sk.BlockSparseMatrix.from_dense(torch.randn(16, 16), 8, block_mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        sk.BlockSparseMatrix.from_dense(torch.randn(16, 16), 8, block_mask=torch.ones(2, 2))


def test_non_2d_dense_rejected():
    with pytest.raises(ValueError, match=r"2-D.*\(2, 16, 16\)"):
        sk.BlockSparseMatrix.from_dense(torch.randn(2, 16, 16), 8)


@pytest.mark.parametrize("density", [1.0, 0.4, 0.0])
def test_values_to_dense_writes_into_a_given_buffer(density):
    from sparsekern.formats.bsr import values_to_dense
    torch.manual_seed(0)
    mask = torch.rand(3, 5) < density
    m = sk.BlockSparseMatrix.from_dense(torch.randn(12, 20), (4, 4), block_mask=mask)
    out = torch.full((12, 20), float("nan"))    # stale contents must not survive
    assert values_to_dense(m.values, m.layout, out=out) is out
    torch.testing.assert_close(out, m.to_dense(), rtol=0, atol=0)
