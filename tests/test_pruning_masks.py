import pytest
import torch

from sparsekern.methods import (block_scores, expand_block_mask, global_magnitude_mask, global_topk_masks,
                                layerwise_topk_masks, nm_mask, topk_mask)
from sparsekern.methods.pruning.masks import block_grid


def test_block_scores_norm_and_sum_with_padding():
    s = torch.arange(15, dtype=torch.float64).view(3, 5)
    norms = block_scores(s, 2)
    assert norms.shape == (2, 3)
    assert norms[0, 0] == pytest.approx(torch.tensor([0.0, 1, 5, 6]).norm().item())
    assert norms[1, 2] == pytest.approx(14.0 * 2)  # edge block: one real element of four, scaled by sqrt(4/1)
    assert block_scores(s, 2, reduce="sum")[1, 1] == pytest.approx((12 + 13) * 2)
    assert block_scores(s, (3, 5), reduce="sum").item() == s.sum().item()
    with pytest.raises(ValueError, match="reduce"):
        block_scores(s, 2, reduce="max")


def test_conv_blocks_are_channel_blocks_with_all_their_taps():
    # The blocks SparseConv2d stores: br output channels x bc input channels x every tap.
    s = torch.randn(40, 20, 3, 3)
    grid = block_scores(s, 16)
    assert grid.shape == (3, 2) and block_grid(s.shape, 16) == (3, 2)
    assert torch.allclose(grid[0, 0], s[:16, :16].norm())
    edge = s[32:, 16:].norm() * (16 * 16 / (8 * 4)) ** 0.5  # edge blocks scaled to a whole block's worth
    assert torch.allclose(grid[2, 1], edge)
    mask = torch.tensor([[True, False], [False, True], [True, True]])
    full = expand_block_mask(mask, 16, s.shape)
    assert full.shape == s.shape
    assert full[:16, :16].all() and not full[:16, 16:].any() and full[16:32, 16:].all() and full[32:].all()


def test_expand_block_mask_roundtrip():
    mask = torch.tensor([[True, False, True], [False, True, False]])
    full = expand_block_mask(mask, 2, (3, 5))
    assert full.shape == (3, 5)
    assert full[0, :2].all() and not full[0, 2:4].any() and full[2, 2:4].all()


def test_topk_mask_counts_and_fraction():
    s = torch.tensor([[0.1, 0.9], [0.5, 0.3]])
    assert topk_mask(s, 2).tolist() == [[False, True], [True, False]]
    assert int(topk_mask(torch.rand(10, 10), 0.25).sum()) == 25
    assert not topk_mask(s, 0).any() and topk_mask(s, 1.0).all()


def test_global_magnitude_mask_counts():
    a = torch.tensor([1.0, -5.0, 3.0])
    b = torch.tensor([[-2.0, 4.0], [0.5, 6.0]])
    masks = global_magnitude_mask([a, b], 3)  # prunes 0.5, 1, 2
    assert masks[0].tolist() == [False, True, True]
    assert masks[1].tolist() == [[False, True], [False, True]]
    masks = global_magnitude_mask([a, b], 0.5)  # 7 entries: round(3.5) = 4 pruned
    assert sum(int(m.sum()) for m in masks) == 3
    assert [m.shape for m in masks] == [a.shape, b.shape]
    with pytest.raises(ValueError, match="amount"):
        global_magnitude_mask([a], 4)
    with pytest.raises(TypeError, match="amount"):
        global_magnitude_mask([a], "half")


def test_global_vs_layerwise():
    small, large = torch.full((4,), 1.0), torch.full((4,), 2.0)
    g = global_topk_masks([small, large], 4)
    assert not g[0].any() and g[1].all()
    lw = layerwise_topk_masks([small, large], [0.5, 0.5])
    assert int(lw[0].sum()) == 2 and int(lw[1].sum()) == 2
    with pytest.raises(ValueError, match="densities"):
        layerwise_topk_masks([small], [0.5, 0.5])


def test_nm_mask_two_four():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 9.0, 8.0, 7.0]])
    assert nm_mask(s).tolist() == [[True, False, True, False, False, True, True, False]]
    m = nm_mask(torch.rand(6, 16))
    assert (m.view(6, 4, 4).sum(-1) == 2).all()
    with pytest.raises(ValueError, match="divisible"):
        nm_mask(torch.rand(3, 6))
