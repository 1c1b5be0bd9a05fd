"""Reference low-rank products in plain torch: the oracle and the fallback.

Each output is computed from its own formula in the accumulation dtype, without
reusing intermediates between gradients, so it checks the fused backends
independently. It still never forms the (N, K) dense weight.
"""
import torch

from ..registry import register_kernel


def _acc(t):
    return None if t is None else t.to(torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype)


def lowrank_forward(x, U, S, V, bias):
    dtype = x.dtype
    x, U, S, V, bias = map(_acc, (x, U, S, V, bias))
    a = x @ V
    b = a @ S.T
    y = b @ U.T
    if bias is not None:
        y = y + bias
    return y.to(dtype), a.to(dtype), b.to(dtype)


def lowrank_backward(dy, x, a, b, U, S, V, kl_grads, needs):
    dtype = dy.dtype
    dy, x, U, S, V = map(_acc, (dy, x, U, S, V))
    need_dx, need_du, need_ds, need_dv, need_db = needs
    out = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    dx = (dy @ U) @ S @ V.T if need_dx else None
    ds = (dy @ U).T @ (x @ V) if need_ds else None
    if kl_grads:
        du = dy.T @ (x @ V) if need_du else None                 # dK = dW V
        dv = x.T @ (dy @ U) if need_dv else None                 # dL = dWᵀ U
    else:
        du = dy.T @ (x @ V @ S.T) if need_du else None           # dW V Sᵀ
        dv = x.T @ (dy @ U @ S) if need_dv else None             # dWᵀ U S
    db = dy.sum(0) if need_db else None
    return out(dx), out(du), out(ds), out(dv), out(db)


register_kernel("lowrank_forward", "reference", lowrank_forward)
register_kernel("lowrank_backward", "reference", lowrank_backward)
