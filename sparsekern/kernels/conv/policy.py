"""The floor rule: a conv product never runs slower than dense F.conv2d in the same dtype.

The registry picks a backend by device and dtype; on top of that, an automatic choice of the
compiled ``cpu`` kernels falls back to the composite (the ``reference`` backend: dense
F.conv2d on the densified weight, gradient read out on the stored blocks) where measurement
says the kernels lose. A forced backend (``use_backend``) is always obeyed.

The rule reads the *effective* density: the multiply-adds the kernels do (stored blocks,
padding channels included) over those of the dense conv, so a 16-channel conv in 32-channel
blocks counts 4x. Crossovers measured on a 2-core Zen3 (AVX2/FMA), fp32, batch 64, block 32, one thread, against
the fastest dense call (F.conv2d; for dX, convolution_backward in the input's memory format),
ratios dense / sparse (docs/conv.md has the table):
  forward and dX, 3x3: 0.77-0.88 at density 1, 1.07-1.16 at 0.75, 1.26-1.40 at 0.6; dX NCHW
  1.02 at 0.75;
  1x1 (a plain GEMM, where dense is strongest): forward 0.94-1.02, dX 0.97 at 0.5; 1.57 at 0.125;
  dW: 1.10-1.31 at density 1 in either format;
  images of one pixel: dX 0.93 at density 0.5;
  almost no work (e.g. 64 channels 1x1, no stored block): placement and output passes lose.
Dense conv in the other dtypes is slower here (no native kernels for them on AVX2): at
density 1 the kernels win fwd/dX/dW 1.3-2.5/1.1-1.2/1.3-2.1x in fp64, 7.8/39/3.9x in bf16,
5.9/25/17x in fp16, so there the thresholds below apply to fp32 only.
"""
import torch

from ..registry import select_kernel

_FORWARD_MAX = {True: 0.7, False: 0.3}   # by "the kernel has more than one tap"
_GRAD_INPUT_MAX = {(True, True): 0.7, (True, False): 0.6, (False, True): 0.3, (False, False): 0.3}  # (taps > 1, NHWC)
_GRAD_WEIGHT_MAX = 1.0
_MIN_PIXELS = 4          # per image: output pixels (forward, dW), input pixels (dX)
_MIN_WORK_PER_INPUT = 8  # multiply-adds per input element below which the memory passes dominate


def effective_density(layout, geometry):
    """Multiply-adds of the stored blocks (padding channels included) over those of the dense conv."""
    dense = geometry.out_channels * geometry.in_per_group
    return layout.nnz_blocks * geometry.block_size ** 2 / dense


def kernel_wins(product, layout, geometry, channels_last, pixels, dtype=torch.float32):
    """Whether the compiled kernels beat dense F.conv2d for such a call (the floor rule)."""
    density = effective_density(layout, geometry)
    taps = geometry.kernel_size[0] * geometry.kernel_size[1]
    if pixels < _MIN_PIXELS or geometry.in_per_group * taps * density < _MIN_WORK_PER_INPUT:
        return False
    if dtype != torch.float32:
        return density <= 1.0 and (product != "conv_grad_input" or geometry.stride == (1, 1))
    if product == "conv_forward":
        return density <= _FORWARD_MAX[taps > 1]
    if product == "conv_grad_input":
        # dX spreads dY over a stride-dilated buffer: stride^2 more work than needed.
        return geometry.stride == (1, 1) and density <= _GRAD_INPUT_MAX[taps > 1, channels_last]
    return density <= _GRAD_WEIGHT_MAX


def conv_kernel(product, like, backend, layout, geometry, channels_last, pixels):
    """(backend name, implementation) of ``product`` for this call: the registry's choice, or
    the composite where the floor rule says the compiled kernels would lose."""
    name, fn = select_kernel(product, like.device, like.dtype, backend)
    if backend is None and name == "cpu" and not kernel_wins(product, layout, geometry, channels_last, pixels,
                                                             like.dtype):
        return select_kernel(product, like.device, like.dtype, "reference")
    return name, fn
