"""The ``triton`` backend of the conv products: registration only.

Availability is the block-sparse linear family's rule (bsr/triton_backend.py: CUDA, or
TRITON_INTERPRET=1 on CPU for tests; fp32/fp16/bf16). Nothing here imports triton: the
kernels (triton_conv) load on the first call.
"""
import importlib

from ..bsr.triton_backend import unavailable
from ..registry import register_kernel
from .grads import paired_grads


def _lazy(name):
    def run(*args, **kwargs):
        return getattr(importlib.import_module(f"{__package__}.triton_conv"), name)(*args, **kwargs)
    run.__name__ = name
    return run


register_kernel("conv_forward", "triton", _lazy("conv_forward"), unavailable)
register_kernel("conv_grad_input", "triton", _lazy("conv_grad_input"), unavailable)
register_kernel("conv_grad_weight", "triton", _lazy("conv_grad_weight"), unavailable)
register_kernel("conv_grads", "triton", paired_grads(_lazy("conv_grad_input"), _lazy("conv_grad_weight")),
                unavailable)
