"""``LowRankLinear``: a drop-in ``nn.Linear`` whose weight is W = U S Vᵀ.

U (out, r) and V (in, r) have orthonormal columns at initialisation and after
every DLRT step; S (r, r) carries the scale. The rank can change during
training (``sparsekern.DLRT``): the factors are then replaced by new Parameters
of the new shape, and ``load_state_dict`` adopts the rank of a checkpoint.
"""
import math

import torch
from torch import nn

from ..formats.lowrank import truncation_rank
from ..ops.checks import check_layer_input
from ..ops.lowrank_linear import low_rank_linear
from .autocast import autocast_dtype, cast, outside_autocast
from .dense_export import dense_linear

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_features(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class LowRankLinear(nn.Module):
    """y = x (U S Vᵀ)ᵀ + b, trained through a fused kernel that never forms U S Vᵀ.

    Args:
        in_features, out_features: any positive ints.
        rank: r, 1 <= r <= min(in_features, out_features).
        bias: learn an additive bias.
        device, dtype: of the parameters (float32, float64, bfloat16 or float16).
    """

    def __init__(self, in_features, out_features, rank, bias=True, *, device=None, dtype=None):
        super().__init__()
        _check_features("in_features", in_features)
        _check_features("out_features", out_features)
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be an int in [1, {min(in_features, out_features)}] for a "
                             f"{out_features}x{in_features} layer, got {rank!r}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in _DTYPES:
            raise TypeError(f"LowRankLinear supports dtypes {_DTYPES}, got {dtype}")
        self.in_features, self.out_features = in_features, out_features
        factory = dict(device=device, dtype=dtype)
        self.U = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.S = nn.Parameter(torch.empty(rank, rank, **factory))
        self.V = nn.Parameter(torch.empty(in_features, rank, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        # Set by sparsekern.DLRT: U and V then receive the K/L gradients dW V and dWᵀ U.
        self.kl_grads = False
        self.reset_parameters()

    def reset_parameters(self):
        """Random orthonormal U, V and S = σ I, with σ chosen so each output has
        nn.Linear's initial variance (row norm² of W = 1/3); bias as nn.Linear."""
        r = self.rank
        with torch.no_grad():
            for factor in (self.U, self.V):
                q = torch.linalg.qr(torch.randn(factor.shape, dtype=torch.float64)).Q
                factor.copy_(q)
            self.S.copy_(torch.eye(r) * math.sqrt(self.out_features / (3.0 * r)))
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)

    @classmethod
    def from_dense(cls, linear, *, rank=None, tol=None):
        """Convert an ``nn.Linear`` by truncated SVD of its weight.

        ``rank`` keeps that many singular triplets; ``tol`` keeps the fewest whose
        dropped tail is <= tol·‖W‖_F (the DLRT rule); neither keeps all of them,
        which is exact. U and V get the singular vectors, S the diagonal of σ.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        if rank is not None and tol is not None:
            raise ValueError("give either rank or tol, not both")
        weight = linear.weight.detach()
        full = min(weight.shape)
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        if tol is not None:
            rank = max(1, truncation_rank(s, tol))
        rank = full if rank is None else rank
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.U.copy_(u[:, :rank])
            layer.S.copy_(torch.diag(s[:rank]))
            layer.V.copy_(vh[:rank].T)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    @property
    def rank(self):
        return self.S.shape[0]

    def dense_weight(self):
        """The dense (out_features, in_features) weight U S Vᵀ (for inspection; training never forms it)."""
        return self.U @ self.S @ self.V.T

    def to_dense(self):
        """The ``nn.Linear`` this layer stands for (effective weight and bias, same device and dtype),
        e.g. to load a sparse-trained model where a dense checkpoint is expected."""
        return dense_linear(self)

    def set_factors(self, U, S, V):
        """Install new factors. Same rank: written in place (Parameters keep their
        identity). New rank: replaced by new Parameters of the new shape. Gradients
        are cleared either way."""
        r = S.shape[0]
        expected = ((self.out_features, r), (r, r), (self.in_features, r))
        if (tuple(U.shape), tuple(S.shape), tuple(V.shape)) != expected:
            raise ValueError(f"factors of shapes {tuple(U.shape)}, {tuple(S.shape)}, {tuple(V.shape)} do not fit a "
                             f"{self.out_features}x{self.in_features} layer")
        for name, value in (("U", U), ("S", S), ("V", V)):
            param = getattr(self, name)
            # Row-major once here rather than a copy in every forward (the fused op needs it;
            # LAPACK's QR factors come back column-major).
            value = value.detach().to(param.dtype).contiguous()
            if param.shape == value.shape:
                param.data = value
                param.grad = None
                torch.autograd.graph.increment_version(param)  # a pending backward must not use the old factors
            else:
                setattr(self, name, nn.Parameter(value.clone(), requires_grad=param.requires_grad))

    def forward(self, x):
        check_layer_input(x, self.in_features)
        dtype = autocast_dtype(x, self.S.dtype)
        if dtype is None:
            return low_rank_linear(x, self.U, self.S, self.V, self.bias, kl_grads=self.kl_grads)
        with outside_autocast(x):
            U, S, V, bias = (cast(t, dtype) for t in (self.U, self.S, self.V, self.bias))
            return low_rank_linear(cast(x, dtype), U, S, V, bias, kl_grads=self.kl_grads)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Adopt the checkpoint's rank first (it may differ after DLRT truncations).
        saved = state_dict.get(prefix + "S")
        if saved is not None and saved.dim() == 2 and saved.shape != self.S.shape:
            r = saved.shape[0]
            like = dict(device=self.S.device, dtype=self.S.dtype)
            self.set_factors(torch.zeros(self.out_features, r, **like), torch.zeros(r, r, **like),
                             torch.zeros(self.in_features, r, **like))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self):
        full = self.out_features * self.in_features
        stored = self.rank * (self.out_features + self.in_features + self.rank)
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}, params={stored / full:.4f} of dense")
