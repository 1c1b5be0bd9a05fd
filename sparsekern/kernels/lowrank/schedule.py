"""The low-rank schedule shared by the ``cpu`` and ``dense`` backends.

What it adds over autograd through three matmuls: G = dy U and H = G S are
computed once and shared by dx, dS and dV, a and b are reused from the forward,
the r x r products run on the token side (M r² flops instead of N r²), and
transposes are never copied. A backend supplies the two skinny GEMM shapes that
carry the work:

``matmul(a, b, transpose_b, bias=None)``: a @ b (b: (K, N)) or a @ bᵀ (b: (N, K)),
    + bias; b is the narrow factor.
``transposed_matmul(a, b, column_sums)``: (aᵀ b, a's column sums or None), the
    reduction over tokens.
and may supply ``mm``, the r-wide products' GEMM (default ``torch.mm``).
"""
import torch


def forward(matmul, x, U, S, V, bias, mm=torch.mm):
    a = matmul(x, V, False)
    b = mm(a, S.t())
    y = matmul(b, U, True, bias)
    return y, a, b


def backward(matmul, transposed_matmul, dy, x, a, b, U, S, V, kl_grads, needs, mm=torch.mm):
    need_dx, need_du, need_ds, need_dv, need_db = needs
    g = matmul(dy, U, False) if (need_dx or need_ds or need_dv) else None
    h = mm(g, S) if (need_dx or (need_dv and not kl_grads)) else None
    dx = matmul(h, V, True) if need_dx else None
    ds = mm(g.t(), a) if need_ds else None
    du, db = transposed_matmul(dy, a if kl_grads else b, need_db) if need_du else (None, None)
    if need_db and db is None:
        db = dy.sum(0)
    dv = transposed_matmul(x, g if kl_grads else h, False)[0] if need_dv else None
    return dx, du, ds, dv, db
