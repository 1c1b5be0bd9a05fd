"""``low_rank_linear``: Y = X (U S Vᵀ)ᵀ + b and its autograd, in one fused pass.

The forward keeps a = X V and b = a Sᵀ; the backward computes G = dY U and
H = G S once and derives every gradient from them (see
``sparsekern/kernels/lowrank``). No (out, in) matrix is ever formed.
"""
from typing import Optional

import torch
from torch import Tensor

from .checks import saved_tensors
from .dispatch import kernel, traced_backend
from .eager import eager_op
from .first_order import first_order
from .forward_mode import tangent
from .outputs import token_matrix, with_leading_dims
from .transforms import refuse_forward_mode

# The forward op also returns a = x V and b = a Sᵀ for the backward.


@eager_op("sparsekern::low_rank_linear", per_row=True)
def _forward(x: Tensor, U: Tensor, S: Tensor, V: Tensor, bias: Optional[Tensor], kl_grads: bool,
             backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor]:
    return kernel("lowrank_forward", x, backend)(x, U, S, V, bias)


@eager_op("sparsekern::low_rank_linear_backward")
def _backward_op(dy: Tensor, x: Tensor, a: Tensor, b: Tensor, U: Tensor, S: Tensor, V: Tensor, kl_grads: bool,
                 needs: list[bool], backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dU, dS, dV, dbias); an output not in ``needs`` is an empty tensor (custom ops cannot return None)."""
    grads = kernel("lowrank_backward", dy, backend)(dy, x, a, b, U, S, V, kl_grads, tuple(needs))
    return tuple(dy.new_empty(0) if g is None else g for g in grads)


@_forward.register_fake
def _(x, U, S, V, bias, kl_grads, backend):
    m, r = x.shape[0], S.shape[0]
    return x.new_empty(m, U.shape[0]), x.new_empty(m, r), x.new_empty(m, r)


@_backward_op.register_fake
def _(dy, x, a, b, U, S, V, kl_grads, needs, backend):
    shapes = (x.shape, U.shape, S.shape, V.shape, dy.shape[1:])
    return tuple(dy.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    x, U, S, V, bias, kl_grads, backend = inputs
    _, a, b = output
    ctx.save_for_backward(x, a, b, U, S, V)
    ctx.kl_grads, ctx.backend, ctx.has_bias = kl_grads, backend, bias is not None
    ctx.set_materialize_grads(False)  # a and b are internal outputs: no zero gradients for them


def _kernel_backward(ctx, dy, _da, _db):
    x, a, b, U, S, V = saved_tensors(ctx, "low_rank_linear")
    if dy is None:
        return (None,) * 7
    needs = [bool(n) for n in ctx.needs_input_grad[:4]] + [ctx.has_bias and bool(ctx.needs_input_grad[4])]
    grads = [None] * 5
    if any(needs):
        computed = _backward_op(dy.contiguous(), x, a, b, U, S, V, ctx.kl_grads, needs, ctx.backend)
        grads = [g if need else None for g, need in zip(computed, needs)]
    return (*grads, None, None)


# DLRT's K- and L-gradients are not the gradient of any function of (U, S, V): nothing to differentiate.
_kl_backward = first_order("sparsekern::low_rank_linear in DLRT mode (kl_grads=True)")(_kernel_backward)


def _differentiable_backward(ctx, dy):
    """The same gradients in torch's differentiable products, a and b recomputed with their graph
    (the forward op's copies have none): what a second backward needs."""
    x, _, _, U, S, V = saved_tensors(ctx, "low_rank_linear")
    needs_x, needs_U, needs_S, needs_V, needs_bias = ctx.needs_input_grad[:5]
    a = x @ V
    G = dy @ U
    H = G @ S
    return (H @ V.T if needs_x else None, dy.T @ (a @ S.T) if needs_U else None, G.T @ a if needs_S else None,
            x.T @ H if needs_V else None, dy.sum(0) if ctx.has_bias and needs_bias else None, None, None)


def _backward(ctx, dy, da, db):
    """The fused kernels' backward; under create_graph=True (a second backward may follow) the
    same gradients in differentiable products (the K/L-gradients of DLRT mode refuse)."""
    if not torch.is_grad_enabled() or dy is None:
        return _kernel_backward(ctx, dy, da, db)
    if ctx.kl_grads:
        return _kl_backward(ctx, dy, da, db)
    return _differentiable_backward(ctx, dy)


def _jvp(args, tangents):
    """Tangents of (y, a, b) with a = x V, b = a Sᵀ, y = b Uᵀ + bias, in torch's products; DLRT mode
    refuses (its K/L-gradients are no derivative, and a Hessian would mix the two)."""
    x, U, S, V, bias, kl_grads, _ = args
    if kl_grads:
        refuse_forward_mode("sparsekern::low_rank_linear in DLRT mode (kl_grads=True)", active=True)
    d_x, d_U, d_S, d_V, d_bias = tangents[:5]
    a = x @ V
    b = a @ S.T
    d_a = tangent([None if d_x is None else d_x @ V, None if d_V is None else x @ d_V], lambda: torch.zeros_like(a))
    d_b = tangent([d_a @ S.T, None if d_S is None else a @ d_S.T], lambda: torch.zeros_like(b))
    d_y = tangent([d_b @ U.T, None if d_U is None else b @ d_U.T, None if d_bias is None else d_bias.expand(
        x.shape[0], U.shape[0])], lambda: x.new_zeros(x.shape[0], U.shape[0]))
    return d_y, d_a, d_b


_forward.register_autograd(_backward, _setup_context, differentiable=True, jvp=_jvp)


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
    x2d = token_matrix(x, V.shape[0])
    bias = None if bias is None else bias.contiguous()
    y, _, _ = _forward(x2d, U.contiguous(), S.contiguous(), V.contiguous(), bias, bool(kl_grads), traced_backend())
    return with_leading_dims(y, lead, U.shape[0])
