"""The ``dense`` backend of the block-sparse products: the dense masked GEMM through torch.

What a user without sparse kernels would run: W densified (zeros outside the stored
blocks), then torch's GEMM in the input dtype (MKL / oneDNN on CPU, cuBLAS on GPU);
the weight gradient is the dense dyᵀ x read out on the stored blocks. It is the
composite the floor rule (:mod:`..floor`) falls back to where the compiled kernels
would be slower, and the baseline the benchmarks compare them with.
"""
from ...formats.bsr import values_to_dense
from ..registry import register_kernel


def bsr_forward(x, values, layout, bias=None):
    weight = values_to_dense(values, layout)
    return x @ weight.T if bias is None else (x @ weight.T).add_(bias)


def bsr_grad_input(dy, values, layout):
    return dy @ values_to_dense(values, layout)


def bsr_grad_weight(dy, x, layout):
    (rb, cb), (br, bc) = layout.grid, layout.block_size
    full = (dy.T @ x).view(rb, br, cb, bc).transpose(1, 2)
    return full[layout.row_indices, layout.col_indices]


register_kernel("bsr_forward", "dense", bsr_forward)
register_kernel("bsr_grad_input", "dense", bsr_grad_input)
register_kernel("bsr_grad_weight", "dense", bsr_grad_weight)
