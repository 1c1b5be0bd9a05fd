"""GPU 2:4 forward through torch's semi-structured sparse backends (cuSPARSELt / CUTLASS).

``semi_forward`` decompresses W (one scatter), hands it to
``torch.sparse.to_sparse_semi_structured`` (torch's own compression and
metadata layout) and multiplies with the sparse tensor cores. Where those
cannot run (GPU older than sm80, float32/float64, shapes the kernels do not
tile) it computes the same product densely: correct, not faster.

``semi_grad_input`` for a transposable W is the same product on Wᵀ's
compression, so forward and dX both use the sparse tensor cores; row-wise dX is
dense, and dW (sampled) stays on the reference product (dense matmul + gather).

Untested on this project's CPU-only CI: the tests exercising it are marked ``gpu``.
"""
import torch
import torch.nn.functional as F

from ...formats.semi import decompress
from ..registry import register_kernel

_SPARSE_DTYPES = (torch.float16, torch.bfloat16)


def _unavailable(device, dtype):
    if device.type != "cuda":
        return f"runs on CUDA tensors only, got {device.type}"
    if not dtype.is_floating_point:
        return f"needs floating tensors, got {dtype}"
    return None


def _sparse_tensor_cores(weight):
    """Whether torch's semi-structured kernels take this (out, in) weight (else: dense fallback)."""
    if weight.dtype not in _SPARSE_DTYPES or not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False
    if torch.cuda.get_device_capability(weight.device) < (8, 0):
        return False
    rows, cols = weight.shape
    return rows % 64 == 0 and cols % 64 == 0


def semi_forward(x, values, indices):
    weight = decompress(values, indices, 2 * values.shape[1])
    if _sparse_tensor_cores(weight):
        return F.linear(x, torch.sparse.to_sparse_semi_structured(weight))
    return x @ weight.T


def semi_grad_input(dy, values, indices, indices_t=None, transpose_map=None):
    if indices_t is not None:   # transposable: dX = dY W is the forward product on Wᵀ
        return semi_forward(dy, values.reshape(-1)[transpose_map], indices_t)
    return dy @ decompress(values, indices, 2 * values.shape[1])


register_kernel("semi_forward", "cuda", semi_forward, _unavailable)
register_kernel("semi_grad_input", "cuda", semi_grad_input, _unavailable)
