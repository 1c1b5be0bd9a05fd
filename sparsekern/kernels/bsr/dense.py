"""The ``dense`` backend of the block-sparse products: the dense masked GEMM through torch.

What a user without sparse kernels would run: W densified (zeros outside the stored
blocks), then torch's GEMM in the input dtype (MKL / oneDNN on CPU, cuBLAS on GPU);
the weight gradient is the dense dyᵀ x read out on the stored blocks. It is the
composite the floor rule (:mod:`..floor`) falls back to where the compiled kernels
would be slower, and the baseline the benchmarks compare them with. The dense weight,
the dense weight gradient and the outputs come from the compiled kernels' output
cache when that is loaded (a fresh 64 MB dense weight per call is otherwise mostly
page faults: 14 ms of the 16 ms densify at 4096 x 4096 fp32).
"""
import torch

from ...formats.bsr import values_to_dense
from ..output_cache import empty_output
from ..registry import register_kernel


def _dense_weight(values, layout):
    return values_to_dense(values, layout, out=empty_output("bsr", layout.shape, values))


def bsr_forward(x, values, layout, bias=None):
    weight = _dense_weight(values, layout)
    out = empty_output("bsr", (x.shape[0], layout.shape[0]), x)
    return torch.mm(x, weight.T, out=out) if bias is None else torch.addmm(bias, x, weight.T, out=out)


def bsr_grad_input(dy, values, layout):
    return torch.mm(dy, _dense_weight(values, layout), out=empty_output("bsr", (dy.shape[0], layout.shape[1]), dy))


def bsr_grad_weight(dy, x, layout, bias_grad=False):
    return _stored_blocks_grad(dy, x, layout), dy.sum(0) if bias_grad else None


def _stored_blocks_grad(dy, x, layout):
    (rb, cb), (br, bc) = layout.grid, layout.block_size
    full = torch.mm(dy.T, x, out=empty_output("bsr", layout.shape, x)).view(rb, br, cb, bc).transpose(1, 2)
    out = empty_output("bsr", (layout.nnz_blocks, br, bc), x)
    if layout.nnz_blocks == rb * cb:  # every block, in row-major order: one transposing copy
        return out.view(rb, cb, br, bc).copy_(full).view_as(out)
    return torch.ops.aten.index.Tensor_out(full, [layout.row_indices, layout.col_indices], out=out)


register_kernel("bsr_forward", "dense", bsr_forward)
register_kernel("bsr_grad_input", "dense", bsr_grad_input)
register_kernel("bsr_grad_weight", "dense", bsr_grad_weight)
