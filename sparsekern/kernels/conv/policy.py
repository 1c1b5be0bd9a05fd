"""The floor rule: a conv product never runs slower than dense F.conv2d in the same dtype.

The registry picks a backend by device and dtype; on top of that, an automatic choice of the
compiled ``cpu`` kernels falls back to the composite (the ``reference`` backend: dense
F.conv2d on the densified weight, gradient masked to the stored blocks) where measurement
says the kernels lose. A forced backend (``use_backend``) is always obeyed.
"""
from ..registry import select_kernel

# Crossovers measured on a 2-core Zen3 (AVX2/FMA), fp32, channels-last, batch 64, 3x3 and
# 1x1 convs, block 32, against F.conv2d (oneDNN): see docs/conv.md.
_MAX_DENSITY = {"conv_forward": 0.75, "conv_grad_input": 0.75, "conv_grad_weight": 0.75}
_MIN_PIXELS = 64  # output (forward, dW) or input (dX) pixels per image below which dense wins


def kernel_wins(product, layout, geometry, channels_last, pixels):
    """Whether the compiled kernels beat dense F.conv2d for such a call (the floor rule)."""
    if product == "conv_grad_input" and geometry.stride != (1, 1):
        return False  # dX spreads dY over a stride-dilated buffer: stride^2 more work than needed
    return channels_last and pixels >= _MIN_PIXELS and layout.density <= _MAX_DENSITY[product]


def conv_kernel(product, like, backend, layout, geometry, channels_last, pixels):
    """(backend name, implementation) of ``product`` for this call: the registry's choice, or
    the composite where the floor rule says the compiled kernels would lose."""
    name, fn = select_kernel(product, like.device, like.dtype, backend)
    if backend is None and name == "cpu" and not kernel_wins(product, layout, geometry, channels_last, pixels):
        return select_kernel(product, like.device, like.dtype, "reference")
    return name, fn
