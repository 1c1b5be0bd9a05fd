"""``cpu`` backend of the conv products: the dispatcher ops of ``sparsekern._C_conv``.

Implicit GEMM over the stored channel blocks on zero-padded NHWC rows each thread places
in its own buffer (no padded copy of the activation goes through memory; no im2col), with
the register-tiled microkernels of the block-sparse linear kernels (AVX-512F, AVX2/FMA or
portable loops, chosen per CPU or forced). float32/float64 run natively; bfloat16 runs on
AVX512-BF16 dot products where the avx512 path has them, otherwise bfloat16/float16 are
widened to float32, accumulated in float32 and rounded once. The ops return channels-last
outputs; this module hands them on in the memory format F.conv2d would give for the input.
Sources: csrc/conv/.

``conv_forward_cpu(x, values, row_offsets, col_indices, geometry, bias=None)``
``conv_grad_input_cpu(dy, values, col_offsets, t_block_ids, t_row_indices, geometry, input_size)``
``conv_grad_weight_cpu(dy, x, row_indices, col_indices, geometry, bias_grad=False)`` -> (dvalues, dbias;
empty unless bias_grad: dY summed per channel on the pass that packs it)
(``geometry``: ConvGeometry.as_list()).
"""
import torch

from ..._extension import cpu_extension_unavailable, load_ops
from ..registry import register_kernel
from .geometry import ConvGeometry, output_memory_format
from .grads import paired_grads

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _register_fakes():
    torch.library.register_fake("sparsekern::conv_forward_cpu", _forward_fake)
    torch.library.register_fake("sparsekern::conv_grad_input_cpu", _grad_input_fake)
    torch.library.register_fake("sparsekern::conv_grad_weight_cpu", _grad_weight_fake)


def _channels_last(like, n, channels, height, width):
    return torch.empty(n, channels, height, width, dtype=like.dtype, device=like.device,
                       memory_format=torch.channels_last)


def _forward_fake(x, values, row_offsets, col_indices, geometry, bias=None):
    geo = ConvGeometry.from_list(geometry)
    return _channels_last(x, x.shape[0], geo.out_channels, *geo.output_size(x.shape[2], x.shape[3]))


def _grad_input_fake(dy, values, col_offsets, t_block_ids, t_row_indices, geometry, input_size):
    return _channels_last(dy, dy.shape[0], ConvGeometry.from_list(geometry).in_channels, *input_size)


def _grad_weight_fake(dy, x, row_indices, col_indices, geometry, bias_grad=False):
    geo = ConvGeometry.from_list(geometry)
    return (x.new_empty(row_indices.shape[0], geo.block_size, geo.block_size, *geo.kernel_size),
            dy.new_empty(geo.out_channels if bias_grad else 0))


def ops():
    """``torch.ops.sparsekern`` with the conv ops and their fakes registered, or None."""
    return load_ops("conv", _register_fakes)


def unavailable(device, dtype):
    return cpu_extension_unavailable("conv", _DTYPES, device, dtype)


def conv_forward(x, values, layout, geometry, bias=None):
    y = ops().conv_forward_cpu(x, values, layout.row_offsets, layout.col_indices, geometry.as_list(), bias)
    return y.contiguous(memory_format=output_memory_format(x))


def conv_grad_input(dy, values, layout, geometry, input_size):
    dx = ops().conv_grad_input_cpu(dy, values, layout.col_offsets, layout.t_block_ids, layout.t_row_indices,
                                   geometry.as_list(), list(input_size))
    return dx.contiguous(memory_format=output_memory_format(dy))


def conv_grad_weight(dy, x, layout, geometry, bias_grad=False):
    """dW, and the bias gradient summed on dW's pass over dY (a separate sum would read it again)."""
    dvalues, dbias = ops().conv_grad_weight_cpu(dy, x, layout.row_indices, layout.col_indices, geometry.as_list(),
                                                bias_grad)
    return dvalues, dbias if bias_grad else None


conv_grads = paired_grads(conv_grad_input, conv_grad_weight)

register_kernel("conv_forward", "cpu", conv_forward, unavailable)
register_kernel("conv_grad_input", "cpu", conv_grad_input, unavailable)
register_kernel("conv_grad_weight", "cpu", conv_grad_weight, unavailable)
register_kernel("conv_grads", "cpu", conv_grads, unavailable)
