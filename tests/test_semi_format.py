"""2:4 compressed format: exact round trip, transposed copy, nbytes, bad input."""
import pytest
import torch

import sparsekern as sk
from sparsekern.formats.semi import decompress, pack_indices, transpose_permutation, unpack_columns


def _pruned(shape, dtype=torch.float32, transposable=False, seed=0):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return w * sk.prune_2to4(w, transposable=transposable)


def test_pack_unpack():
    positions = torch.tensor([[0, 3, 1, 2, 2, 3]])
    packed = pack_indices(positions)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0 | 3 << 2 | 1 << 4 | 2 << 6, 2 | 3 << 2]]
    assert unpack_columns(packed, 12).tolist() == [[0, 3, 5, 6, 10, 11]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 4), (5, 12), (12, 40), (0, 8)], ids=str)
def test_round_trip_exact(shape, dtype):
    dense = _pruned(shape, dtype)
    m = sk.SemiStructuredMatrix.from_dense(dense)
    assert m.values.shape == (shape[0], shape[1] // 2) and m.values.dtype == dtype
    assert torch.equal(m.to_dense(), dense)
    assert torch.equal(m.mask & dense.ne(0), dense.ne(0))


def test_fewer_than_two_nonzeros_and_all_zero():
    dense = torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    m = sk.SemiStructuredMatrix.from_dense(dense)
    assert torch.equal(m.to_dense(), dense) and int(m.mask.sum()) == 4


@pytest.mark.parametrize("shape", [(4, 4), (12, 20), (32, 8)], ids=str)
def test_transpose_copy(shape):
    dense = _pruned(shape, transposable=True)
    m = sk.SemiStructuredMatrix.from_dense(dense, with_transpose=True)
    assert torch.equal(m.to_dense(), dense)
    assert torch.equal(decompress(m.values_t, m.indices_t, shape[0]), dense.T)
    perm = transpose_permutation(m.indices, m.indices_t, shape)
    assert torch.equal(m.values.reshape(-1)[perm], m.values_t)
    assert torch.equal(m.transpose_map().long(), perm) and m.transpose_map() is m.transpose_map()
    with pytest.raises(ValueError, match="no transpose"):
        sk.SemiStructuredMatrix.from_dense(dense).transpose_map()


@pytest.mark.parametrize("dtype,limit", [(torch.float32, 0.57), (torch.bfloat16, 0.6), (torch.float16, 0.6)], ids=str)
def test_nbytes(dtype, limit):
    dense = _pruned((64, 128), dtype)
    m = sk.SemiStructuredMatrix.from_dense(dense)
    dense_bytes = dense.numel() * dense.element_size()
    assert m.nbytes == m.values.numel() * m.values.element_size() + m.indices.numel()
    assert m.nbytes <= limit * dense_bytes
    with_t = sk.SemiStructuredMatrix.from_dense(_pruned((64, 128), dtype, transposable=True), with_transpose=True)
    assert with_t.nbytes == 2 * m.nbytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.bool], ids=str)
def test_decompress_cpu_fast_path_matches_scatter(dtype):
    """Without autograd, CPU decompress runs in C++ (when built); it must equal the scatter."""
    w = torch.randn(12, 40, generator=torch.Generator().manual_seed(3))
    m = sk.SemiStructuredMatrix.from_dense(w * sk.prune_2to4(w, transposable=True))
    values = torch.ones(m.values.shape, dtype=torch.bool) if dtype is torch.bool else m.values.to(dtype)
    want = values.new_zeros(12, 40).scatter(1, unpack_columns(m.indices, 40), values)
    got = decompress(values, m.indices, 40)
    assert got.dtype == dtype and torch.equal(got, want)


def test_values_gradient_lands_on_kept():
    m = sk.SemiStructuredMatrix.from_dense(_pruned((4, 8)))
    m.values.requires_grad_(True)
    (m.to_dense() * torch.arange(32.0).view(4, 8)).sum().backward()
    assert torch.equal(m.values.grad, torch.arange(32.0).view(4, 8).reshape(-1)[
        unpack_columns(m.indices, 8) + 8 * torch.arange(4).view(4, 1)])


def test_not_2to4_raises():
    with pytest.raises(ValueError, match=r"\(2, 8\) is not 2:4"):
        sk.SemiStructuredMatrix.from_dense(torch.ones(2, 8))
    row_only = torch.tensor([[1.0, 1, 0, 0]] * 4)   # 2:4 along rows, 4 per column in column 0
    sk.SemiStructuredMatrix.from_dense(row_only)
    with pytest.raises(ValueError, match="transposable"):
        sk.SemiStructuredMatrix.from_dense(row_only, with_transpose=True)


@pytest.mark.parametrize("bad", [torch.zeros(4, 6), torch.zeros(8), torch.zeros(6, 8)], ids=["cols", "1d", "rows_t"])
def test_bad_shapes(bad):
    with pytest.raises(ValueError, match="shape"):
        sk.SemiStructuredMatrix.from_dense(bad, with_transpose=True)


def test_bad_mask():
    dense = _pruned((4, 8))
    with pytest.raises(ValueError, match="exactly 2"):
        sk.SemiStructuredMatrix.from_dense(dense, mask=torch.ones(4, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        sk.SemiStructuredMatrix.from_dense(dense, mask=torch.ones(4, 4, dtype=torch.bool))
