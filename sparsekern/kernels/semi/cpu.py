"""C++ 2:4 products on CPU (``sparsekern._C_semi``, csrc/semi/semi.cpp): fp32 with AVX2 + FMA.

The extension is loaded on first use; without it (or on a CPU without AVX2, or
for another dtype) this backend reports itself unavailable and the registry
picks the reference one.
"""
import torch

from ..._extension import extension_failure, load_extension
from ...formats.semi_structured import decompress
from ..registry import register_kernel
from .reference import semi_prune_compress


def _module():
    return load_extension("semi")


def _unavailable(device, dtype):
    if device.type != "cpu":
        return f"runs on CPU tensors only, got {device.type}"
    if dtype != torch.float32:
        return f"supports float32 only, got {dtype}"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"needs AVX2 + FMA, this CPU reports {torch.backends.cpu.get_cpu_capability()}"
    if _module() is None:
        return f"extension sparsekern._C_semi not loaded ({extension_failure('semi')})"
    return None


def semi_forward(x, values, indices):
    return _module().forward(x, values, indices)


def semi_grad_input(dy, values, indices, indices_t=None, transpose_map=None):
    if indices_t is not None:
        return _module().grad_input_transposed(dy, values, indices_t, transpose_map)
    # Row-wise-only 2:4: W's columns are irregular, and a scatter kernel reached less than
    # half of MKL's dense speed here, so dX is the dense product (use transposable 2:4).
    return dy @ decompress(values, indices, 2 * values.shape[1])


def semi_grad_weight(dy, x, indices):
    return _module().grad_weight(dy, x, indices)


register_kernel("semi_forward", "cpu", semi_forward, _unavailable)
register_kernel("semi_grad_input", "cpu", semi_grad_input, _unavailable)
register_kernel("semi_grad_weight", "cpu", semi_grad_weight, _unavailable)
# Pruning is a few vectorised torch ops (topk, one small matmul), already fast on CPU.
register_kernel("semi_prune_compress", "cpu", semi_prune_compress, _unavailable)
