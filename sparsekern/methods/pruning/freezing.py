"""Freezing: replace dense layers by ``PartiallyTrainableLinear`` / ``PartiallyTrainableConv2d``
layers that train a block subset (see :mod:`sparsekern.nn.partially_trainable_linear`)."""
import math

import torch
from torch import nn

from ...formats.bsr import _as_block_size
from ...nn.partially_trainable_conv2d import PartiallyTrainableConv2d
from ...nn.partially_trainable_linear import PartiallyTrainableLinear
from .masks import block_grid, block_scores, topk_mask
from .sparsify import dense_by_default, replace_module, sparsifiable_layers


def freeze(model, *, density, block_size=32, scores=None, dense_layers=(), generator=None):
    """Replace each nn.Linear / nn.Conv2d by a PartiallyTrainableLinear / PartiallyTrainableConv2d
    training a ``density`` fraction of its blocks (a convolution's block: output x input channels
    with all their taps).

    The trainable blocks are chosen at random, or as the top blocks of ``scores``
    (a dict weight name -> element scores, e.g. from ``snip_scores``). Layers in
    ``dense_layers`` (module names or indices, as in ``sparsify``) stay fully trainable; so do,
    with a warning, tied layers and the convolutions channel blocks do not fit (a stem conv).
    A convolution needs a square ``block_size``. Returns the model.
    """
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 <= density <= 1:
        raise ValueError(f"density must be a number in [0, 1], got {density!r}")
    block_size = _as_block_size(block_size)
    dense_layers = dense_by_default(model, block_size, dense_layers, "freeze")
    for name, layer in sparsifiable_layers(model):
        if name in dense_layers:
            continue
        if scores is not None:
            grid = block_scores(scores[f"{name}.weight"], block_size)
        else:
            grid = torch.rand(block_grid(layer.weight.shape, block_size), generator=generator)
        mask = topk_mask(grid, int(round(density * math.prod(grid.shape)))).to(layer.weight.device)
        if isinstance(layer, nn.Conv2d):
            new = PartiallyTrainableConv2d(layer, mask, block_size=block_size[0])
        else:
            new = PartiallyTrainableLinear.from_dense(layer, mask, block_size=block_size)
        replace_module(model, name, new)
    return model
