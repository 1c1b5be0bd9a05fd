"""CPU backend: the fused schedule as a handful of well-ordered BLAS calls.

Six skinny GEMMs carry all the work (x V, b Uᵀ, dy U, H Vᵀ and the two
token-reductions dyᵀ(.) and xᵀ(.)); at r << N, K they run near the BLAS's peak,
so a hand-written C++ loop does not pay for itself here (see docs/low_rank.md).
What this backend adds over autograd through three matmuls: the bias is fused
into the output GEMM (addmm), G = dy U and H = G S are computed once and shared
by dx, dS and dV, a and b are reused from the forward, the r x r products run
on the token side (M r² flops instead of N r²), and transposes are passed as
strided views so no operand is copied.
"""
import torch

from ..registry import register_kernel

_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _unavailable(device, dtype):
    if device.type != "cpu":
        return f"the cpu backend runs on cpu tensors, got {device.type}"
    if dtype not in _DTYPES:
        return f"the cpu backend supports {_DTYPES}, got {dtype}"
    return None


def lowrank_forward(x, U, S, V, bias):
    a = torch.mm(x, V)
    b = torch.mm(a, S.t())
    y = torch.addmm(bias, b, U.t()) if bias is not None else torch.mm(b, U.t())
    return y, a, b


def lowrank_backward(dy, x, a, b, U, S, V, kl_grads, needs):
    need_dx, need_du, need_ds, need_dv = needs
    g = torch.mm(dy, U) if (need_dx or need_ds or need_dv) else None
    h = torch.mm(g, S) if (need_dx or (need_dv and not kl_grads)) else None
    dx = torch.mm(h, V.t()) if need_dx else None
    ds = torch.mm(g.t(), a) if need_ds else None
    du = torch.mm(dy.t(), a if kl_grads else b) if need_du else None
    dv = torch.mm(x.t(), g if kl_grads else h) if need_dv else None
    return dx, du, ds, dv


register_kernel("lowrank_forward", "cpu", lowrank_forward, _unavailable)
register_kernel("lowrank_backward", "cpu", lowrank_backward, _unavailable)
