"""``LowRankFactors``: what ``LowRankLinear`` and ``LowRankConv2d`` share, the factors of W = U S Vᵀ.

W is a (rows, cols) matrix: (out, in) for the linear layer, (out, in·kh·kw) for the conv.
Here live the Parameters U (rows, r), S (r, r), V (cols, r) and bias (rows,), their
initialisation, rank changes (``set_factors``, checkpoints of another rank), the
truncated-SVD conversion from a dense weight and the autocast casts; each layer keeps its
geometry, its product and its way back to a dense module.
"""
import math

import torch
from torch import nn

from ..formats.lowrank import truncation_rank
from .autocast import autocast_dtype, cast, outside_autocast

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class LowRankFactors(nn.Module):
    """Base of the low-rank layers. A subclass sets ``_MATRIX_NAME``, its matrix in messages with
    {rows} and {cols}, and calls ``_init_factors`` once its own arguments are checked."""

    def _init_factors(self, rows, cols, rank, bias, device, dtype):
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= min(rows, cols):
            raise ValueError(f"rank must be an int in [1, {min(rows, cols)}] for "
                             f"{self._MATRIX_NAME.format(rows=rows, cols=cols)}, got {rank!r}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in _DTYPES:
            raise TypeError(f"{type(self).__name__} supports dtypes {_DTYPES}, got {dtype}")
        factory = dict(device=device, dtype=dtype)
        self.U = nn.Parameter(torch.empty(rows, rank, **factory))
        self.S = nn.Parameter(torch.empty(rank, rank, **factory))
        self.V = nn.Parameter(torch.empty(cols, rank, **factory))
        self.bias = nn.Parameter(torch.empty(rows, **factory)) if bias else None
        # Set by sparsekern.DLRT: U and V then receive the K/L gradients dW V and dWᵀ U.
        self.kl_grads = False
        self.reset_parameters()

    def reset_parameters(self):
        """Random orthonormal U, V and S = σ I, with σ chosen so each output (channel) has the
        dense layer's initial variance (row norm² of W = 1/3); bias as the dense layer."""
        r = self.rank
        with torch.no_grad():
            for factor in (self.U, self.V):
                factor.copy_(torch.linalg.qr(torch.randn(factor.shape, dtype=torch.float64)).Q)
            self.S.copy_(torch.eye(r) * math.sqrt(self.U.shape[0] / (3.0 * r)))
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.V.shape[0])
                self.bias.uniform_(-bound, bound)

    @classmethod
    def _from_dense_matrix(cls, matrix, bias, rank, tol, *args, **kwargs):
        """``cls(*args, **kwargs)`` holding the truncated SVD of the dense (rows, cols) ``matrix``
        and a copy of ``bias``, in their device and dtype (see the layers' ``from_dense``)."""
        if rank is not None and tol is not None:
            raise ValueError("give either rank or tol, not both")
        matrix = matrix.detach()
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        if tol is not None:
            rank = max(1, truncation_rank(s, tol))
        rank = s.numel() if rank is None else rank
        layer = cls(*args, rank=rank, bias=bias is not None, device=matrix.device, dtype=matrix.dtype, **kwargs)
        with torch.no_grad():
            layer.set_factors(u[:, :rank], torch.diag(s[:rank]), vh[:rank].T)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @property
    def rank(self):
        return self.S.shape[0]

    def set_factors(self, U, S, V):
        """Install new factors. Same rank: written in place (Parameters keep their identity).
        New rank: replaced by new Parameters of the new shape. Gradients are cleared either way."""
        r, rows, cols = S.shape[0], self.U.shape[0], self.V.shape[0]
        if (tuple(U.shape), tuple(S.shape), tuple(V.shape)) != ((rows, r), (r, r), (cols, r)):
            raise ValueError(f"factors of shapes {tuple(U.shape)}, {tuple(S.shape)}, {tuple(V.shape)} do not fit "
                             f"{self._MATRIX_NAME.format(rows=rows, cols=cols)}")
        for name, value in (("U", U), ("S", S), ("V", V)):
            param = getattr(self, name)
            # Row-major once here rather than a copy in every forward (the fused linear op needs it;
            # LAPACK's QR factors come back column-major).
            value = value.detach().to(param.dtype).contiguous()
            if param.shape == value.shape:
                param.data = value
                param.grad = None
                torch.autograd.graph.increment_version(param)  # a pending backward must not use the old factors
            else:
                setattr(self, name, nn.Parameter(value.clone(), requires_grad=param.requires_grad))

    def _apply_factors(self, product, x):
        """``product(x, U, S, V, bias)``; inside an autocast region all five cast to its dtype
        and the product run with autocast off (the layers' ops are custom ops autocast does not reach)."""
        dtype = autocast_dtype(x, self.S.dtype)
        if dtype is None:
            return product(x, self.U, self.S, self.V, self.bias)
        with outside_autocast(x):
            return product(*(cast(t, dtype) for t in (x, self.U, self.S, self.V, self.bias)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Adopt the checkpoint's rank first (it may differ after DLRT truncations).
        saved = state_dict.get(prefix + "S")
        if saved is not None and saved.dim() == 2 and saved.shape != self.S.shape:
            r = saved.shape[0]
            like = dict(device=self.S.device, dtype=self.S.dtype)
            self.set_factors(torch.zeros(self.U.shape[0], r, **like), torch.zeros(r, r, **like),
                             torch.zeros(self.V.shape[0], r, **like))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _factors_repr(self):
        """The rank, bias and the stored fraction of the dense parameters, the end of ``extra_repr``."""
        rows, cols = self.U.shape[0], self.V.shape[0]
        stored = self.rank * (rows + cols + self.rank)
        return f"rank={self.rank}, bias={self.bias is not None}, params={stored / (rows * cols):.4f} of dense"
