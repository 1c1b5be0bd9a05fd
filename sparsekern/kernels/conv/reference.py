"""Reference conv products in plain torch: the oracle, and the composite the op falls back to
where the compiled kernels would lose (the floor rule, see policy.py).

Dense F.conv2d and its gradients on the weight with every unstored block zero; dW is the
dense weight gradient read out on the stored blocks. Any device and dtype. ``conv_grads``
gives dX and dW from one dense backward (the composite's backward when both are needed).
"""
import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from ..registry import register_kernel
from .blocks import dense_conv_weight, gather_blocks
from .geometry import output_memory_format


def _padded(x, geometry):
    """x and the padding argument of F.conv2d: asymmetric padding is applied to x first."""
    if geometry.symmetric_padding is not None:
        return x, geometry.symmetric_padding
    t, b, l, r = geometry.padding
    return F.pad(x, (l, r, t, b)), 0


def _unpadded(dx, geometry, input_size, memory_format):
    """The gradient of the padded input cropped to the input, as a new tensor in ``memory_format``."""
    if geometry.symmetric_padding is not None:
        return dx.contiguous(memory_format=memory_format)
    t, _, l, _ = geometry.padding
    return dx[:, :, t:t + input_size[0], l:l + input_size[1]].clone(memory_format=memory_format)


def conv_forward(x, values, layout, geometry, bias=None):
    x, padding = _padded(x, geometry)
    y = F.conv2d(x, dense_conv_weight(values, layout, geometry), bias, geometry.stride, padding, geometry.dilation,
                 geometry.groups)
    return y.contiguous(memory_format=output_memory_format(x))


def conv_grad_input(dy, values, layout, geometry, input_size):
    t, b, l, r = geometry.padding
    padding = geometry.symmetric_padding or 0
    height, width = input_size
    if geometry.symmetric_padding is None:
        height, width = height + t + b, width + l + r
    # The input enters the backward only through its shape and memory format: an unwritten
    # stand-in in dY's format makes dX come out in that format (no conversion pass).
    stand_in = torch.empty(dy.shape[0], geometry.in_channels, height, width, dtype=dy.dtype, device=dy.device,
                           memory_format=output_memory_format(dy))
    dx = torch.ops.aten.convolution_backward(
        dy, stand_in, dense_conv_weight(values, layout, geometry), None, list(geometry.stride),
        list(_pair(padding)), list(geometry.dilation), False, [0, 0], geometry.groups, [True, False, False])[0]
    return _unpadded(dx, geometry, input_size, output_memory_format(dy))


def _dense_backward(dy, x, weight, layout, geometry, needs_dx, bias_grad):
    """One dense convolution backward: (dX of the padded input or None, dW read out on the stored
    blocks, dbias or None)."""
    xp, padding = _padded(x, geometry)
    (kh, kw), bs = geometry.kernel_size, geometry.block_size
    dx, dw, db = torch.ops.aten.convolution_backward(
        dy, xp, weight, [geometry.out_channels] if bias_grad else None, list(geometry.stride),
        list(_pair(padding)), list(geometry.dilation), False, [0, 0], geometry.groups,
        [needs_dx, layout.nnz_blocks > 0, bias_grad])
    dvalues = gather_blocks(dw, layout, geometry).contiguous() if dw is not None else x.new_zeros(0, bs, bs, kh, kw)
    return dx, dvalues, db


def conv_grad_weight(dy, x, layout, geometry, bias_grad=False):
    """(dvalues, dbias or None) from one dense convolution backward without dX."""
    kh, kw = geometry.kernel_size
    shape_only = dy.new_empty(1).expand(geometry.out_channels, geometry.in_per_group, kh, kw)  # no dX: no values
    return _dense_backward(dy, x, shape_only, layout, geometry, False, bias_grad)[1:]


def conv_grads(dy, x, values, layout, geometry, bias_grad=False):
    """(dx, dvalues, dbias or None) from one dense convolution backward, as nn.Conv2d's backward
    runs them (they share its passes over dY: separate calls cost a dense step 15% more here,
    a separate bias sum 3 % more in bf16)."""
    dx, dvalues, db = _dense_backward(dy, x, dense_conv_weight(values, layout, geometry), layout, geometry, True,
                                      bias_grad)
    return _unpadded(dx, geometry, x.shape[2:], output_memory_format(dy)), dvalues, db


register_kernel("conv_forward", "reference", conv_forward)
register_kernel("conv_grad_input", "reference", conv_grad_input)
register_kernel("conv_grad_weight", "reference", conv_grad_weight)
register_kernel("conv_grads", "reference", conv_grads)
