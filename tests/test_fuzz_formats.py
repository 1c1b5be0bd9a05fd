"""Property-based round trips of every format: block-CSR, 2:4 (with and without Wᵀ), and the
layers' state dicts (SparseLinear, SemiSparseLinear, LowRankLinear)."""
import pytest
import torch
from hypothesis import given, strategies as st

import sparsekern as sk
from fuzz_strategies import (as_pair, block_sizes, bool_tensor, dtypes, fuzz_settings, random_input, randn, seeds,
                             special_tensor)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes gain nothing from threads


def expand_blocks(block_mask, block_size):
    br, bc = block_size
    return block_mask.repeat_interleave(br, 0).repeat_interleave(bc, 1)


# -- block-CSR ---------------------------------------------------------------

@st.composite
def block_sparse_cases(draw):
    """(dense, block_size as given, block mask): dense is zero outside the mask, and some
    entries inside stored blocks are zero too (a block is stored if any entry is nonzero)."""
    block_size = draw(block_sizes)
    br, bc = as_pair(block_size)
    grid = (draw(st.integers(0, 4)), draw(st.integers(0, 4)))
    mask = bool_tensor(draw, grid)
    dtype, seed = draw(dtypes), draw(seeds)
    dense = randn((grid[0] * br, grid[1] * bc), seed, dtype)
    holes = randn(dense.shape, seed + 1).abs() < draw(st.sampled_from([0.0, 0.5, 3.0]))
    dense = dense.masked_fill(holes | ~expand_blocks(mask, (br, bc)), 0)
    return dense, block_size, mask


@fuzz_settings(120)
@given(block_sparse_cases())
def test_block_sparse_round_trip_is_exact(case):
    dense, block_size, _ = case
    matrix = sk.BlockSparseMatrix.from_dense(dense, block_size)
    br, bc = as_pair(block_size)
    assert matrix.block_size == (br, bc) and matrix.shape == tuple(dense.shape)
    assert matrix.values.dtype == dense.dtype and matrix.values.shape == (matrix.nnz_blocks, br, bc)
    stored = dense.reshape(dense.shape[0] // br, br, dense.shape[1] // bc, bc).ne(0).any(3).any(1)
    assert torch.equal(matrix.block_mask, stored)  # exactly the blocks holding a nonzero
    assert torch.equal(matrix.to_dense(), dense)


@fuzz_settings(120)
@given(block_sparse_cases(), seeds)
def test_block_sparse_with_explicit_mask_keeps_masked_blocks_only(case, seed):
    dense, block_size, mask = case
    full = randn(dense.shape, seed, dense.dtype)  # nonzero outside the mask too: must be dropped
    matrix = sk.BlockSparseMatrix.from_dense(full, block_size, block_mask=mask)
    assert torch.equal(matrix.block_mask, mask)
    assert matrix.nnz_blocks == int(mask.sum())
    expected = full.masked_fill(~expand_blocks(mask, as_pair(block_size)), 0)
    assert torch.equal(matrix.to_dense(), expected)


@fuzz_settings(120)
@given(block_sparse_cases(), st.data())
def test_layout_indices_and_positions_agree_with_the_block_mask(case, data):
    dense, block_size, mask = case
    layout = sk.BlockSparseMatrix.from_dense(dense, block_size, block_mask=mask).layout
    rows, cols = mask.nonzero(as_tuple=True)
    assert torch.equal(layout.row_indices, rows) and torch.equal(layout.col_indices, cols)
    assert torch.equal(layout.row_offsets.diff(), mask.sum(1)) and int(layout.row_offsets[0]) == 0
    assert torch.equal(layout.col_offsets.diff(), mask.sum(0)) and int(layout.col_offsets[0]) == 0
    # Transpose metadata: every block once, grouped by block column, block rows ascending inside.
    assert torch.equal(layout.t_block_ids.sort().values, torch.arange(layout.nnz_blocks))
    assert torch.equal(layout.col_indices[layout.t_block_ids], cols.sort(stable=True).values)
    assert torch.equal(layout.t_row_indices, rows[layout.t_block_ids])
    assert torch.equal(layout.positions_of(layout), torch.arange(layout.nnz_blocks))

    other_mask = bool_tensor(data.draw, tuple(mask.shape))
    other = sk.BlockLayout.from_block_mask(other_mask, layout.shape, layout.block_size)
    positions = layout.positions_of(other)
    assert positions.shape == (other.nnz_blocks,)
    found = positions >= 0
    assert torch.equal(found, mask[other.row_indices, other.col_indices])
    assert torch.equal(layout.row_indices[positions[found]], other.row_indices[found])
    assert torch.equal(layout.col_indices[positions[found]], other.col_indices[found])


@fuzz_settings(80)
@given(block_sparse_cases(), st.data())
def test_with_block_mask_keeps_survivors_and_zeroes_new_blocks(case, data):
    dense, block_size, mask = case
    matrix = sk.BlockSparseMatrix.from_dense(dense, block_size, block_mask=mask)
    new_mask = bool_tensor(data.draw, tuple(mask.shape))
    moved = matrix.with_block_mask(new_mask)
    assert torch.equal(moved.block_mask, new_mask)
    keep = expand_blocks(mask & new_mask, as_pair(block_size))
    assert torch.equal(moved.to_dense(), dense.masked_fill(~keep, 0))


# -- 2:4 -----------------------------------------------------------------------

@st.composite
def semi_cases(draw, allow_special=False):
    """(weight, transposable) of a shape 2:4 can tile; weights with many ties (a few
    distinct magnitudes), NaN / inf too if ``allow_special``."""
    transposable = draw(st.booleans())
    rows = 4 * draw(st.integers(1, 3)) if transposable else draw(st.integers(1, 9))
    cols = 4 * draw(st.integers(1, 4))
    dtype = draw(dtypes)
    if allow_special:
        weight = special_tensor(draw, (rows, cols), dtype)
    elif draw(st.booleans()):
        weight = torch.randint(-2, 3, (rows, cols), generator=torch.Generator().manual_seed(draw(seeds))).to(dtype)
    else:
        weight = randn((rows, cols), draw(seeds), dtype)
    return weight, transposable


def assert_exactly_2to4(mask, transposable):
    rows, cols = mask.shape
    assert mask.dtype == torch.bool
    assert bool((mask.view(rows, cols // 4, 4).sum(-1) == 2).all())
    if transposable:
        assert bool((mask.T.reshape(cols, rows // 4, 4).sum(-1) == 2).all())


@fuzz_settings(150)
@given(semi_cases(allow_special=True))
def test_prune_2to4_keeps_exactly_two_per_group_and_the_largest(case):
    weight, transposable = case
    mask = sk.prune_2to4(weight, transposable=transposable)
    assert mask.shape == weight.shape
    assert_exactly_2to4(mask, transposable)
    if not transposable:  # row-wise is optimal per group; NaN ranks below every number
        rank = weight.double().abs().nan_to_num(nan=-1.0).view(weight.shape[0], -1, 4)
        groups = mask.view_as(rank)
        kept_min = rank.masked_fill(~groups, float("inf")).min(-1).values
        dropped_max = rank.masked_fill(groups, float("-inf")).max(-1).values
        assert bool((kept_min >= dropped_max).all())


@fuzz_settings(150)
@given(semi_cases())
def test_semi_structured_round_trip_is_exact(case):
    weight, transposable = case
    mask = sk.prune_2to4(weight, transposable=transposable)
    pruned = weight.masked_fill(~mask, 0)
    for given_mask in (None, mask):
        matrix = sk.SemiStructuredMatrix.from_dense(pruned, mask=given_mask, with_transpose=transposable)
        assert matrix.shape == tuple(weight.shape) and matrix.dtype == weight.dtype
        assert matrix.has_transpose == transposable
        assert torch.equal(matrix.to_dense(), pruned)
        kept = matrix.mask
        assert_exactly_2to4(kept, transposable)
        assert bool(kept[pruned != 0].all())
        if given_mask is not None:
            assert torch.equal(kept, mask)
        if transposable:
            t = sk.SemiStructuredMatrix(matrix.values_t, matrix.indices_t, (weight.shape[1], weight.shape[0]))
            assert torch.equal(t.to_dense(), pruned.T)
            assert torch.equal(matrix.values.reshape(-1)[matrix.transpose_map().long()], matrix.values_t)


# -- layers' state dicts ---------------------------------------------------------

def assert_same_outputs(layer, fresh, x):
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))


@fuzz_settings(60)
@given(in_features=st.integers(1, 10), out_features=st.integers(1, 10), bias=st.booleans(), block_size=block_sizes,
       density=st.sampled_from([0.0, 0.3, 0.5, 1.0]), fresh_density=st.sampled_from([None, 0.0, 1.0]),
       dtype=dtypes, seed=seeds, warm=st.booleans())
def test_sparse_linear_state_dict_round_trip(in_features, out_features, bias, block_size, density, fresh_density,
                                            dtype, seed, warm):
    """A fresh layer of the same config (its own random mask; or another density, whose block
    count then differs) takes the checkpoint's structure and values."""
    torch.manual_seed(seed)
    config = dict(bias=bias, block_size=block_size, dtype=dtype)
    layer = sk.SparseLinear(in_features, out_features, density=density, **config)
    fresh = sk.SparseLinear(in_features, out_features, density=density if fresh_density is None else fresh_density,
                            **config)
    x = randn((3, in_features), seed, dtype)
    if warm:  # a forward before loading must not leave anything stale behind
        fresh(x)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.block_mask, layer.block_mask)
    assert torch.equal(fresh.values, layer.values)
    assert fresh.nnz_blocks == layer.nnz_blocks
    assert torch.equal(fresh.dense_weight(), layer.dense_weight())
    assert_same_outputs(layer, fresh, x)


@fuzz_settings(60)
@given(in_groups=st.integers(1, 3), out_features=st.integers(1, 9), bias=st.booleans(), transposable=st.booleans(),
       mode=st.sampled_from(["static", "dynamic"]), dtype=dtypes, seed=seeds, warm=st.booleans())
def test_semi_sparse_linear_state_dict_round_trip(in_groups, out_features, bias, transposable, mode, dtype, seed, warm):
    in_features = 4 * in_groups
    if transposable:  # both dims must tile 4x4
        out_features = 4 * -(-out_features // 4)
    torch.manual_seed(seed)
    config = dict(bias=bias, transposable=transposable, mode=mode, dtype=dtype)
    layer = sk.SemiSparseLinear(in_features, out_features, **config)
    fresh = sk.SemiSparseLinear(in_features, out_features, **config)
    x = randn((2, 3, in_features), seed, dtype)
    if warm:  # caches the fresh layer's compressed weight: loading must invalidate it
        fresh(x)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.mask, layer.mask)
    assert torch.equal(fresh.dense_weight(), layer.dense_weight())
    assert_same_outputs(layer, fresh, x)


@fuzz_settings(60)
@given(in_features=st.integers(1, 8), out_features=st.integers(1, 8), bias=st.booleans(), dtype=dtypes, seed=seeds,
       data=st.data())
def test_low_rank_linear_state_dict_round_trip(in_features, out_features, bias, dtype, seed, data):
    """A fresh layer of the same config, or of another rank, takes the checkpoint's factors and rank."""
    rank = data.draw(st.integers(1, min(in_features, out_features)))
    fresh_rank = data.draw(st.sampled_from([rank, 1, min(in_features, out_features)]))
    torch.manual_seed(seed)
    layer = sk.LowRankLinear(in_features, out_features, rank, bias, dtype=dtype)
    fresh = sk.LowRankLinear(in_features, out_features, fresh_rank, bias, dtype=dtype)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.rank == rank
    for name in ("U", "S", "V"):
        assert torch.equal(getattr(fresh, name), getattr(layer, name))
    assert_same_outputs(layer, fresh, random_input((2,), in_features, dtype, seed, "contiguous"))
