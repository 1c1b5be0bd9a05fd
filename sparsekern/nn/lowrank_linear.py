"""``LowRankLinear``: a drop-in ``nn.Linear`` whose weight is W = U S Vᵀ.

U (out, r) and V (in, r) have orthonormal columns at initialisation and after
every DLRT step; S (r, r) carries the scale. The rank can change during
training (``sparsekern.DLRT``): the factors are then replaced by new Parameters
of the new shape, and ``load_state_dict`` adopts the rank of a checkpoint.
The factor mechanics are ``LowRankFactors``' (``lowrank_factors.py``).
"""
from torch import nn

from ..ops.checks import check_layer_input
from ..ops.lowrank_linear import low_rank_linear
from .dense_export import dense_linear
from .lowrank_factors import LowRankFactors
from .parameter import carry_requires_grad


def _check_features(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class LowRankLinear(LowRankFactors):
    """y = x (U S Vᵀ)ᵀ + b, trained through a fused kernel that never forms U S Vᵀ.

    Args:
        in_features, out_features: any positive ints.
        rank: r, 1 <= r <= min(in_features, out_features).
        bias: learn an additive bias.
        device, dtype: of the parameters (float32, float64, bfloat16 or float16).
    """

    _MATRIX_NAME = "a {rows}x{cols} layer"

    def __init__(self, in_features, out_features, rank, bias=True, *, device=None, dtype=None):
        super().__init__()
        _check_features("in_features", in_features)
        _check_features("out_features", out_features)
        self.in_features, self.out_features = in_features, out_features
        self._init_factors(out_features, in_features, rank, bias, device, dtype)

    @classmethod
    def from_dense(cls, linear, *, rank=None, tol=None):
        """Convert an ``nn.Linear`` by truncated SVD of its weight.

        ``rank`` keeps that many singular triplets; ``tol`` keeps the fewest whose
        dropped tail is <= tol·‖W‖_F (the DLRT rule); neither keeps all of them,
        which is exact. U and V get the singular vectors, S the diagonal of σ.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        layer = cls._from_dense_matrix(linear.weight, linear.bias, rank, tol, linear.in_features, linear.out_features)
        return carry_requires_grad(linear, layer)

    def dense_weight(self):
        """The dense (out_features, in_features) weight U S Vᵀ (for inspection; training never forms it)."""
        return self.U @ self.S @ self.V.T

    def to_dense(self):
        """The ``nn.Linear`` this layer stands for (effective weight and bias, same device and dtype),
        e.g. to load a sparse-trained model where a dense checkpoint is expected."""
        return dense_linear(self)

    def forward(self, x):
        check_layer_input(x, self.in_features)
        return self._apply_factors(self._linear, x)

    def _linear(self, x, U, S, V, bias):
        return low_rank_linear(x, U, S, V, bias, kl_grads=self.kl_grads)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._factors_repr()}"
