"""Low-rank linear products for W = U S Vᵀ (U: (N, r), S: (r, r), V: (K, r)).

Every backend implements the same two products; nothing of shape (N, K) is formed.

``lowrank_forward(x, U, S, V, bias) -> (y, a, b)``
    x (M, K): a = x V (M, r), b = a Sᵀ (M, r), y = b Uᵀ + bias (M, N).
    a and b are returned so the backward reuses them instead of recomputing.
``lowrank_backward(dy, x, a, b, U, S, V, kl_grads, needs) -> (dx, dU, dS, dV)``
    dy (M, N). With G = dy U and H = G S (two skinny products, computed once):
    dx = H Vᵀ, dS = Gᵀ a, and either the factor gradients
    dU = dyᵀ b = dW V Sᵀ and dV = xᵀ H = dWᵀ U S (``kl_grads=False``), or the
    K/L gradients dK = dyᵀ a = dW V and dL = xᵀ G = dWᵀ U that the DLRT
    integrator needs (``kl_grads=True``), where dW = dyᵀ x is never formed.
    ``needs`` = (dx, dU, dS, dV) booleans; unneeded outputs are None and cost nothing.
    ``b`` may be None when ``kl_grads`` is True (it is not read).

Inputs arrive 2-D, contiguous, on one device, of one floating dtype (checked by
the op layer); bias is (N,) or None. Half types accumulate in fp32. M may be 0.
"""
from . import cpu, dense, reference, triton_lowrank  # noqa: F401  (register the backends)
