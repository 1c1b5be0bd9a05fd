"""Freezing: replace dense layers by ``PartiallyTrainableLinear`` layers that train a block subset
(see :mod:`sparsekern.nn.partially_trainable_linear`)."""
import math

import torch

from ...formats.bsr import _as_block_size
from ...nn.partially_trainable_linear import PartiallyTrainableLinear
from .masks import block_grid, block_scores, topk_mask
from .sparsify import linear_layers, replace_module


def freeze(model, *, density, block_size=32, scores=None, dense_layers=(), generator=None):
    """Replace each nn.Linear by a PartiallyTrainableLinear training a ``density`` fraction of its blocks.

    The trainable blocks are chosen at random, or as the top blocks of ``scores``
    (a dict weight name -> element scores, e.g. from ``snip_scores``). Layers in
    ``dense_layers`` (module names) stay fully trainable nn.Linear. Returns the model.
    """
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 <= density <= 1:
        raise ValueError(f"density must be a number in [0, 1], got {density!r}")
    block_size = _as_block_size(block_size)
    for name, linear in linear_layers(model):
        if name in dense_layers:
            continue
        if scores is not None:
            grid = block_scores(scores[f"{name}.weight"], block_size)
        else:
            grid = torch.rand(block_grid(linear.weight.shape, block_size), generator=generator)
        mask = topk_mask(grid, int(round(density * math.prod(grid.shape))))
        replace_module(model, name, PartiallyTrainableLinear.from_dense(linear, mask.to(linear.weight.device),
                                                                        block_size=block_size))
    return model
