"""Shared conv test operands (awkward geometries, random block-sparse weights on them), and
the check that each geometry describes the convolution F.conv2d computes."""
import pytest
import torch
import torch.nn.functional as F

from helpers import random_block_mask
from sparsekern.formats.bsr import BlockLayout
from sparsekern.kernels.conv import ConvGeometry, dense_conv_weight, gather_blocks

# name: (in, out, groups, kernel, stride, padding (t, b, l, r), dilation, block, batch, (H, W), density)
CASES = {
    "3x3-uneven-channels": (10, 13, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4, 2, (5, 6), 0.6),
    "stride2": (10, 13, 1, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 4, 2, (7, 6), 0.6),
    "dilation2": (10, 13, 1, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 4, 2, (7, 9), 0.6),
    "same-even-kernel": (7, 9, 1, (2, 4), (1, 1), (0, 1, 1, 2), (1, 1), 4, 2, (6, 8), 0.6),
    "groups2-stride1x2": (12, 16, 2, (3, 3), (1, 2), (1, 1, 0, 1), (1, 1), 4, 3, (7, 9), 0.6),
    "1x1": (12, 16, 1, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 8, 3, (7, 9), 0.5),
    "1x1-pad-beyond-kernel": (6, 6, 1, (1, 1), (2, 2), (2, 2, 1, 1), (1, 1), 4, 2, (4, 5), 1.0),
    "5x5-stride2x1": (7, 9, 1, (5, 5), (2, 1), (2, 2, 2, 2), (1, 1), 4, 1, (11, 8), 0.6),
    "stride3-dilation2": (6, 8, 1, (3, 3), (3, 3), (2, 1, 2, 0), (2, 2), 4, 2, (11, 10), 0.6),
    "stride-beyond-kernel": (5, 6, 1, (2, 2), (3, 2), (0, 0, 1, 0), (1, 1), 4, 2, (8, 7), 0.6),  # rows no tap reaches
    "image-under-stride": (4, 4, 1, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 4, 2, (1, 3), 1.0),
    "valid-non-square": (8, 8, 1, (3, 3), (1, 1), (0, 0, 0, 0), (1, 1), 4, 2, (5, 12), 1.0),
    "batch0": (10, 13, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4, 0, (5, 6), 0.6),
    "empty-block-rows": (16, 24, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4, 2, (6, 5), "empty-rows"),
    "density0": (8, 8, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4, 2, (5, 5), 0.0),
    "wide-blocks": (40, 36, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 16, 2, (9, 9), 0.5),
    # padded rows spanning several of a thread's row chunks (forward, each dX phase); 3 images: a thread starts mid-image
    "tall-image-row-chunks": (20, 36, 1, (3, 3), (2, 1), (1, 1, 1, 1), (1, 1), 16, 3, (45, 36), 0.6),
    # blocks of 32 channels and more: the 32-column strips of the AVX-512 path (narrower blocks run 16-column ones)
    "wide-strips": (64, 70, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 32, 2, (5, 6), 0.6),
    "wide-strips-partial": (60, 90, 1, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 48, 2, (7, 5), 0.6),
    # output rows of more than 12 pixels on wide strips: several 12-row tiles, a partial last block row
    "wide-strips-long-rows": (64, 40, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 32, 2, (4, 27), 0.6),
    # rows of 8+ output pixels: dW reads X in place (full block columns), packs the partial last column
    "long-rows-in-place": (40, 24, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 16, 2, (9, 20), 0.7),
    "long-rows-stride2-dilation2": (32, 32, 1, (3, 3), (2, 2), (2, 2, 2, 2), (2, 2), 16, 2, (8, 34), 0.7),
    "long-rows-groups2": (64, 32, 2, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 16, 2, (6, 18), 0.7),
}


def conv_case(name, dtype=torch.float64, seed=0, cases=CASES):
    """(x, values, layout, geometry, bias) for cases[name] (entries as in CASES); values are zero
    on padding channels."""
    c, o, g, k, s, p, d, bs, n, hw, density = cases[name]
    geometry = ConvGeometry(c, o, g, k, s, p, d, bs)
    gen = torch.Generator().manual_seed(seed)
    if density == "empty-rows":
        mask = random_block_mask(geometry.grid, 0.8, gen, empty_rows=(1, 4), empty_cols=(2,))
    else:
        mask = random_block_mask(geometry.grid, density, gen)
    layout = BlockLayout.from_block_mask(mask, geometry.padded_shape, (bs, bs))
    values = torch.randn(layout.nnz_blocks, bs, bs, *k, generator=gen, dtype=torch.float64)
    values = gather_blocks(dense_conv_weight(values, layout, geometry), layout, geometry).contiguous().to(dtype)
    x = torch.randn(n, c, *hw, generator=gen, dtype=torch.float64).to(dtype)
    bias = torch.randn(o, generator=gen, dtype=torch.float64).to(dtype)
    return x, values, layout, geometry, bias


def output_gradient(x, geometry, seed=1):
    n, _, h, w = x.shape
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, geometry.out_channels, *geometry.output_size(h, w), generator=gen,
                       dtype=torch.float64).to(x.dtype)


@pytest.mark.parametrize("name", list(CASES))
def test_case_geometry_matches_f_conv2d(name):
    x, values, layout, geometry, bias = conv_case(name)
    t, b, l, r = geometry.padding
    y = F.conv2d(F.pad(x, (l, r, t, b)), dense_conv_weight(values, layout, geometry), bias, geometry.stride, 0,
                 geometry.dilation, geometry.groups)
    assert tuple(y.shape[2:]) == geometry.output_size(*x.shape[2:])
    assert values.shape[0] == layout.nnz_blocks == int(layout.block_mask.sum())
