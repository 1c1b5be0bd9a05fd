"""``low_rank_linear``: Y = X (U S Vᵀ)ᵀ + b and its autograd, in one fused pass.

The forward keeps a = X V and b = a Sᵀ; the backward computes G = dY U and
H = G S once and derives every gradient from them (see
``sparsekern/kernels/lowrank``). No (out, in) matrix is ever formed.
"""
import torch

from ..kernels import forced_backend, select_kernel


def _kernel(product, like, backend):
    return select_kernel(product, like.device, like.dtype, backend)[1]


class _LowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, U, S, V, bias, kl_grads, backend):
        y, a, b = _kernel("lowrank_forward", x, backend)(x, U, S, V, bias)
        needs_b = ctx.needs_input_grad[1] and not kl_grads
        ctx.save_for_backward(x, a, b if needs_b else None, U, S, V)
        ctx.kl_grads, ctx.backend, ctx.has_bias = kl_grads, backend, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, a, b, U, S, V = ctx.saved_tensors
        dy = dy.contiguous()
        needs = tuple(ctx.needs_input_grad[:4])
        dx, du, ds, dv = (None,) * 4
        if any(needs):
            dx, du, ds, dv = _kernel("lowrank_backward", dy, ctx.backend)(
                dy, x, a, b, U, S, V, ctx.kl_grads, needs)
        db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
        return dx, du, ds, dv, db, None, None


def _check_inputs(x, U, S, V, bias):
    for name, t in (("x", x), ("U", U), ("S", S), ("V", V)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if U.dim() != 2 or S.dim() != 2 or V.dim() != 2:
        raise ValueError(f"U, S, V must be 2-D, got shapes {tuple(U.shape)}, {tuple(S.shape)}, {tuple(V.shape)}")
    (n, r), k = U.shape, V.shape[0]
    if tuple(S.shape) != (r, r) or V.shape[1] != r:
        raise ValueError(f"U {tuple(U.shape)}, S {tuple(S.shape)}, V {tuple(V.shape)} do not form U S Vᵀ: "
                         f"expected U (out, r), S (r, r), V (in, r) with one r")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)} but V of shape {tuple(V.shape)} needs a last dim of {k}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"low_rank_linear needs floating tensors, got x of dtype {x.dtype}")
    for name, t in (("U", U), ("S", S), ("V", V), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n},) for U of shape {tuple(U.shape)}")


def low_rank_linear(x, U, S, V, bias=None, *, kl_grads=False):
    """Y = x @ (U @ S @ V.T).T + bias without forming U S Vᵀ.

    x: (..., in_features); U: (out_features, r); S: (r, r); V: (in_features, r);
    bias: (out_features,) or None. Returns (..., out_features). Differentiable
    in every tensor argument.

    ``kl_grads=True`` is the DLRT mode: U and V then receive the K- and
    L-gradients dW V and dWᵀ U (dW = dYᵀ x, the dense weight gradient, never
    formed) instead of dU = dW V Sᵀ and dV = dWᵀ U S; S and x get their usual
    gradients. The integrator needs exactly these, and they are as cheap.
    """
    _check_inputs(x, U, S, V, bias)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, V.shape[0]).contiguous()
    y = _LowRankLinear.apply(x2d, U.contiguous(), S.contiguous(), V.contiguous(), bias,
                             bool(kl_grads), forced_backend())
    return y.view(*lead, U.shape[0])
