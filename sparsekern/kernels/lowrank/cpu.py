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
sgemm at these shapes (docs/lowrank.md); where they lose (larger ranks on a CPU
whose MKL runs AVX-512), the floor rule runs the same schedule on torch's GEMMs
(the ``dense`` backend). The r x r products stay on torch.mm (in fp32 for fp16
operands, which the C++ products widen too: where the CPU lacks AVX512-FP16,
torch's fp16 GEMMs run 6-120x slower than its fp32 ones). The schedule itself
is in :mod:`.schedule`.
"""
import functools

import torch

from ..._extension import cpu_extension_unavailable, load_ops
from ..floor import register_floor, tokens_bucket
from ..registry import register_kernel
from . import schedule

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


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


def _small_mm(a, b):
    """The r-wide products: torch.mm, computed in fp32 for fp16 operands (rounded once)."""
    if a.dtype == torch.float16:
        return torch.mm(a.float(), b.float()).to(torch.float16)
    return torch.mm(a, b)


lowrank_forward = functools.partial(schedule.forward, matmul, mm=_small_mm)
lowrank_backward = functools.partial(schedule.backward, matmul, transposed_matmul, mm=_small_mm)

register_kernel("lowrank_forward", "cpu", lowrank_forward, _unavailable)
register_kernel("lowrank_backward", "cpu", lowrank_backward, _unavailable)
register_floor("lowrank_forward", "dense",
               lambda x, U, S, V, bias: (tokens_bucket(x.shape[0]), U.shape, V.shape, bias is not None))
register_floor("lowrank_backward", "dense",
               lambda dy, x, a, b, U, S, V, kl_grads, needs: (tokens_bucket(dy.shape[0]), U.shape, V.shape,
                                                              kl_grads, tuple(needs)))
