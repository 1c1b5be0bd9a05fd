"""``dense`` backend of the 2:4 products: the dense masked GEMM through torch, in the input dtype.

What a user without 2:4 kernels runs: W decompressed (zeros at the pruned positions),
then torch's GEMM in the input dtype (MKL fp32, oneDNN AMX bf16 on CPU; cuBLAS on GPU);
the weight gradient is the dense dyᵀ x read out at the kept positions. The floor rule
(:mod:`..floor`) falls back to it where the compiled kernels would lose (bf16 on an AMX
CPU, whose tiles cannot run on compressed operands, is expected to be such a case), and it
is the registry's choice for dtypes the kernels lack (fp64 on CPU). Large outputs come from
the compiled kernels' output cache when that is loaded.
"""
import torch

from ..output_cache import empty_output
from ..registry import available_backends, register_kernel, select_kernel
from .reference import semi_prune_compress


def _helper(product, like):
    # The compiled helper where it can run, whatever backend is forced for the products.
    backend = "cpu" if "cpu" in available_backends(product, like.device, like.dtype) else "reference"
    return select_kernel(product, like.device, like.dtype, backend)[1]


def _dense_weight(values, indices):
    return _helper("semi_decompress_sum", values)([values], [indices], 2 * values.shape[1])


def semi_forward(x, values, indices, bias=None):
    weight = _dense_weight(values, indices)
    out = empty_output("semi", (x.shape[0], weight.shape[0]), x)
    return torch.mm(x, weight.T, out=out) if bias is None else torch.addmm(bias, x, weight.T, out=out)


def semi_grad_input(dy, values, indices, indices_t=None, transpose_map=None):
    weight = _dense_weight(values, indices)  # W as stored: Wᵀ's own metadata is not needed
    return torch.mm(dy, weight, out=empty_output("semi", (dy.shape[0], weight.shape[1]), dy))


def semi_grad_weight(dy, x, indices):
    full = torch.mm(dy.T, x, out=empty_output("semi", (dy.shape[1], x.shape[1]), x))
    return _helper("semi_gather_kept", full)(full, indices)


register_kernel("semi_forward", "dense", semi_forward)
register_kernel("semi_grad_input", "dense", semi_grad_input)
register_kernel("semi_grad_weight", "dense", semi_grad_weight)
# The prune has no GEMM to hand to torch: the composite prunes as the reference does.
register_kernel("semi_prune_compress", "dense", semi_prune_compress)
