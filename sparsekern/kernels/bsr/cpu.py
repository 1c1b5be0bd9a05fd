"""``cpu`` backend of the block-sparse products: C++ kernels of ``sparsekern._C_bsr``.

AVX2/FMA register-blocked microkernels (portable loops where the CPU lacks
them) over packed operands, threads through ATen's pool (``torch.set_num_threads``).
float32/float64 run natively; bfloat16/float16 are packed to float32, computed
and accumulated in float32, and rounded once on output. Sources: csrc/bsr/.
"""
import torch

from ..._extension import cpu_extension_unavailable, load_extension
from ..registry import register_kernel

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _ext():
    return load_extension("bsr")


def unavailable(device, dtype):
    return cpu_extension_unavailable("bsr", _DTYPES, device, dtype)


def bsr_forward(x, values, layout, bias=None):
    return _ext().forward(x, values, layout.row_offsets, layout.col_indices, layout.shape[0], bias)


def bsr_grad_input(dy, values, layout):
    return _ext().grad_input(dy, values, layout.col_offsets, layout.t_block_ids, layout.t_row_indices,
                             layout.shape[1])


def bsr_grad_weight(dy, x, layout):
    return _ext().grad_weight(dy, x, layout.row_indices, layout.col_indices, *layout.block_size)


register_kernel("bsr_forward", "cpu", bsr_forward, unavailable)
register_kernel("bsr_grad_input", "cpu", bsr_grad_input, unavailable)
register_kernel("bsr_grad_weight", "cpu", bsr_grad_weight, unavailable)
