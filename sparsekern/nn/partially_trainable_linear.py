"""``PartiallyTrainableLinear``: the forward pass uses the full dense weight, only a block subset trains.

``PartiallyTrainableLinear`` holds the frozen dense weight as a *buffer* (no
gradient, no optimizer state) and the trainable part as a zero-initialised
``SparseLinear`` of block deltas:

    y = x W_frozenᵀ + x Δᵀ + b,   Δ block-sparse on the trainable set T.

Backward then computes dX (dense, through W_frozen, plus the sparse Δ part) and
the weight gradient only as the sampled product dYᵀX on T: frozen weights cost
no dW compute and no optimizer memory. Compared with dense training it saves the
dense dW product (one of the three GEMMs of a training step), so it is at best
~1.5x faster per step; its point is the optimizer memory and the dW work.
"""
import torch.nn.functional as F
from torch import nn

from .bsr_linear import SparseLinear
from .dense_export import dense_linear
from .parameter import carry_requires_grad
from .partially_trainable import PartiallyTrainable


class PartiallyTrainableLinear(PartiallyTrainable):
    """A linear layer with a frozen dense weight and trainable block deltas on ``block_mask``.

    Args:
        weight: (out_features, in_features) frozen weight (copied into a buffer).
        bias: (out_features,) or None; trainable when given.
        block_mask: bool (RB, CB) grid of the trainable blocks (padded like SparseLinear).
        block_size: int or (rows, cols).
    """

    def __init__(self, weight, bias, block_mask, *, block_size=32):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"weight must be (out_features, in_features), got shape {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        self.in_features, self.out_features = in_features, out_features
        self._init_parts(weight, bias, SparseLinear(in_features, out_features, bias=False, block_size=block_size,
                                                    density=0.0, device=weight.device, dtype=weight.dtype),
                         block_mask)

    @classmethod
    def from_dense(cls, linear, block_mask, *, block_size=32):
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        return carry_requires_grad(linear, cls(linear.weight, linear.bias, block_mask, block_size=block_size))

    def to_dense(self):
        """The ``nn.Linear`` this layer stands for (effective weight and bias, same device and dtype),
        e.g. to load a sparse-trained model where a dense checkpoint is expected."""
        return dense_linear(self)

    def forward(self, x):
        return F.linear(x, self.frozen_weight, self.bias) + self.delta(x)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, trainable={self.trainable_fraction:.4f}")
