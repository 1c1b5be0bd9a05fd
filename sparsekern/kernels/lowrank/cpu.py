"""CPU backend: the fused schedule, its token-streaming products in C++.

Six skinny GEMMs carry all the work, all on the register-blocked microkernels
of ``sparsekern._C_lowrank`` (csrc/lowrank/), reached as dispatcher ops:
- the four that stream a tokens x features matrix through the narrow factor
  (x V, b Uᵀ + bias, dy U, H Vᵀ): the factor is packed once and the bias seeds
  the accumulators;
- the two token reductions (dyᵀ a, xᵀ G): the strided column strips of dy and x
  are copied block by block into a cache-friendly buffer, and the bias gradient
  Σ_t dy[t] is summed on the way, so dy is read once for dU and db.
At r = 64 they run 6-13% (products) and ~20% (reductions) faster than MKL's
sgemm at these shapes (docs/low_rank.md). The r x r products stay on torch.mm.

What this backend adds over autograd through three matmuls: G = dy U and
H = G S are computed once and shared by dx, dS and dV, a and b are reused from
the forward, the r x r products run on the token side (M r² flops instead of
N r²), and transposes are never copied.
"""
import torch

from ..._extension import cpu_extension_unavailable, load_ops
from ..floor import register_floor, tokens_bucket
from ..registry import register_kernel

_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _register_fakes():
    torch.library.register_fake("sparsekern::lowrank_matmul_cpu", _matmul_fake)
    torch.library.register_fake("sparsekern::lowrank_transposed_matmul_cpu", _transposed_matmul_fake)


def _matmul_fake(a, b, transpose_b, bias=None):
    return a.new_empty(a.shape[0], b.shape[0] if transpose_b else b.shape[1])


def _transposed_matmul_fake(a, b, column_sums=False):
    return a.new_empty(a.shape[1], b.shape[1]), a.new_empty(a.shape[1]) if column_sums else None


def ops():
    """``torch.ops.sparsekern`` with the low-rank ops and their fakes registered, or None."""
    return load_ops("lowrank", _register_fakes)


def _unavailable(device, dtype):
    return cpu_extension_unavailable("lowrank", _DTYPES, device, dtype)


def matmul(a, b, transpose_b, bias=None):
    """a @ b (b: (K, N)) or a @ bᵀ (b: (N, K)), + bias: the token-streaming product, b narrow."""
    return ops().lowrank_matmul_cpu(a, b, transpose_b, bias)


def transposed_matmul(a, b, column_sums=False):
    """(aᵀ b, a's column sums if ``column_sums`` else None): the token reduction, b narrow."""
    return ops().lowrank_transposed_matmul_cpu(a, b, column_sums)


def lowrank_forward(x, U, S, V, bias):
    a = matmul(x, V, False)
    b = torch.mm(a, S.t())
    y = matmul(b, U, True, bias)
    return y, a, b


def lowrank_backward(dy, x, a, b, U, S, V, kl_grads, needs):
    need_dx, need_du, need_ds, need_dv, need_db = needs
    g = matmul(dy, U, False) if (need_dx or need_ds or need_dv) else None
    h = torch.mm(g, S) if (need_dx or (need_dv and not kl_grads)) else None
    dx = matmul(h, V, True) if need_dx else None
    ds = torch.mm(g.t(), a) if need_ds else None
    du, db = transposed_matmul(dy, a if kl_grads else b, need_db) if need_du else (None, None)
    if need_db and db is None:
        db = dy.sum(0)
    dv = transposed_matmul(x, g if kl_grads else h)[0] if need_dv else None
    return dx, du, ds, dv, db


register_kernel("lowrank_forward", "cpu", lowrank_forward, _unavailable)
register_kernel("lowrank_backward", "cpu", lowrank_backward, _unavailable)
register_floor("lowrank_forward", "reference",
               lambda x, U, S, V, bias: (tokens_bucket(x.shape[0]), U.shape, V.shape, bias is not None))
register_floor("lowrank_backward", "reference",
               lambda dy, x, a, b, U, S, V, kl_grads, needs: (tokens_bucket(dy.shape[0]), U.shape, V.shape,
                                                              kl_grads, tuple(needs)))
