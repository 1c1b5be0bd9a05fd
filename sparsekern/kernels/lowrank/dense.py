"""``dense`` backend of the low-rank products: the shared schedule on torch's GEMMs.

The composite a user without our kernels runs (the factors multiplied by MKL /
oneDNN / cuBLAS in the input dtype), with G and H shared as in the ``cpu``
backend, so it is never slower than autograd through three matmuls. The floor
rule (:mod:`..floor`) falls back to it where the compiled kernels would lose; its
outputs come from the compiled kernels' output cache when that is loaded.
"""
import functools

import torch

from ..output_cache import empty_output
from ..registry import register_kernel
from . import schedule


def _matmul(a, b, transpose_b, bias=None):
    b = b.t() if transpose_b else b
    out = empty_output("lowrank", (a.shape[0], b.shape[1]), a)
    return torch.mm(a, b, out=out) if bias is None else torch.addmm(bias, a, b, out=out)


def _transposed_matmul(a, b, column_sums):
    return torch.mm(a.t(), b, out=empty_output("lowrank", (a.shape[1], b.shape[1]), a)), \
        a.sum(0) if column_sums else None


lowrank_forward = functools.partial(schedule.forward, _matmul)
lowrank_backward = functools.partial(schedule.backward, _matmul, _transposed_matmul)

register_kernel("lowrank_forward", "dense", lowrank_forward)
register_kernel("lowrank_backward", "dense", lowrank_backward)
