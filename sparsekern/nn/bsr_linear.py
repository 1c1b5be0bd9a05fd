"""``SparseLinear``: a drop-in ``nn.Linear`` whose weight is block-sparse.

The weight is stored as a block-CSR ``values`` parameter (nnz, br, bc) plus a
``block_mask`` buffer over the block grid. Feature counts that are not
multiples of the block size are padded up internally: edge blocks carry zero
rows/columns that stay zero under training (their gradients are exactly zero).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.bsr import BlockSparseMatrix, _as_block_size, values_to_dense
from ..ops.bsr_linear import bsr_linear
from ..ops.checks import check_layer_input
from .autocast import autocast_dtype, cast, outside_autocast
from .block_structure import DTYPES as _DTYPES
from .block_structure import BlockStructured, check_from_dense, top_block_mask, warn_if_crippled
from .dense_export import dense_linear
from .parameter import carry_requires_grad


def _check_features(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class SparseLinear(BlockStructured):
    """y = x Wᵀ + b with W block-sparse; forward, dX and dW touch stored blocks only.

    Args:
        in_features, out_features: any positive ints (padded up to whole blocks).
        bias: learn an additive bias.
        block_size: int or (rows, cols) of a block.
        density: fraction of blocks stored, chosen uniformly at random.
        device, dtype: of the parameters (float32, float64, bfloat16 or float16).
    """

    def __init__(self, in_features, out_features, bias=True, *, block_size=32, density=1.0,
                 device=None, dtype=None):
        super().__init__()
        _check_features("in_features", in_features)
        _check_features("out_features", out_features)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in _DTYPES:
            raise TypeError(f"SparseLinear supports dtypes {_DTYPES}, got {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.block_size = _as_block_size(block_size)
        br, bc = self.block_size
        self.padded_shape = (math.ceil(out_features / br) * br, math.ceil(in_features / bc) * bc)
        self._init_blocks(density, device, dtype)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        # Optional BlockSparseMatrix over the padded weight whose values receive dYᵀX on its
        # blocks at the next backward (see bsr_linear): how DST methods get gradient scores.
        self.grad_probe = None
        self.reset_parameters()
        if density > 0:
            warn_if_crippled(self.block_mask, f"SparseLinear({in_features}, {out_features}, "
                                              f"block_size={self.block_size}, density={density})")

    def _block_structure(self):
        return (self.out_features, self.in_features), self.padded_shape, self.block_size, ()

    def _default_bound(self):
        return 1.0 / math.sqrt(self.in_features)

    @classmethod
    def from_dense(cls, linear, *, block_size=32, density=None, block_mask=None):
        """Convert an ``nn.Linear``. Keeps ``block_mask`` if given, else the blocks of largest
        Frobenius norm at ``density``, else every block holding a nonzero (exact)."""
        check_from_dense(linear, nn.Linear, density, block_mask)
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    block_size=block_size, density=0.0, device=weight.device, dtype=weight.dtype)
        padded = F.pad(weight, (0, layer.padded_shape[1] - weight.shape[1], 0, layer.padded_shape[0] - weight.shape[0]))
        dense = BlockSparseMatrix.from_dense(padded, layer.block_size, block_mask=block_mask)
        if density is not None:
            mask = top_block_mask(_block_norms(padded, layer.block_size), density)
            dense = BlockSparseMatrix.from_dense(padded, layer.block_size, block_mask=mask)
        layer._adopt(dense.layout, dense.values)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return carry_requires_grad(linear, layer)

    def sparse_weight(self):
        """The padded weight as a BlockSparseMatrix sharing the ``values`` parameter."""
        return BlockSparseMatrix(self.values, self.layout())

    def dense_weight(self):
        """The dense (out_features, in_features) weight this layer represents."""
        return values_to_dense(self.values, self.layout())[:self.out_features, :self.in_features]

    def to_dense(self):
        """The ``nn.Linear`` this layer stands for (effective weight and bias, same device and dtype),
        e.g. to load a sparse-trained model where a dense checkpoint is expected."""
        return dense_linear(self)

    def forward(self, x):
        check_layer_input(x, self.in_features)
        weight, bias, probe = self.sparse_weight(), self.bias, self.grad_probe
        dtype = autocast_dtype(x, self.values.dtype)
        if dtype is not None:
            x, bias = cast(x, dtype), cast(bias, dtype)
            weight = BlockSparseMatrix(cast(weight.values, dtype), weight.layout)
            probe = None if probe is None else BlockSparseMatrix(cast(probe.values, dtype), probe.layout)
            with outside_autocast(x):
                return self._product(x, weight, bias, probe)
        return self._product(x, weight, bias, probe)

    def _product(self, x, weight, bias, probe):
        pad_in = self.padded_shape[1] - self.in_features
        if pad_in:
            x = F.pad(x, (0, pad_in))
        if self.padded_shape[0] == self.out_features:
            return bsr_linear(x, weight, bias, grad_probe=probe)
        y = bsr_linear(x, weight, grad_probe=probe)[..., :self.out_features]
        return y.contiguous() if bias is None else y + bias  # contiguous, as nn.Linear's

    _shape_metadata, _shape_description = "features", "SparseLinear of (out, in)"

    def _shape_key(self):
        return self.out_features, self.in_features

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block_size={self.block_size}, "
                f"density={self.density:.4f} ({self.nnz_blocks} blocks)")


def _block_norms(dense, block_size):
    (rows, cols), (br, bc) = dense.shape, block_size
    return dense.float().reshape(rows // br, br, cols // bc, bc).pow(2).sum((1, 3)).sqrt()
