"""The floor rule for the conv products: what kernels/floor.py measures and what it need not.

An automatic choice of compiled kernels (``cpu``, and ``triton`` on GPUs) runs under the
measured floor rule like every other family: per shape class (geometry, memory format, batch rounded up to a power of
two, image size, density in 1/16 steps) the first calls time the kernels against the
composite (the ``reference`` backend: dense F.conv2d on the densified weight, dW read out on
the stored blocks) and keep the faster. Where the layer needs dX and dW, the two compete as
one product, ``conv_grads``: the kernels' dX and dW against one dense convolution backward
(nn.Conv2d's; two separate dense calls cost a dense step 15 % more).

The rule reads the *effective* density: the multiply-adds the kernels do (stored blocks,
padding channels included) over those of the dense conv. Calls decided without measuring
(on CPUs; on GPUs every class is measured):
  sure win: fp32 or fp64, more than one tap and at most a quarter of the dense work. The
    kernels won 2.2-4.4x there on a Zen3 (AVX2/FMA) against oneDNN in every product, and on
    an Intel Xeon against oneDNN's AVX-512 conv 1.3-2.5x per product at block 16 and a
    quarter (32 channels, 28x28, batch 64), more at lower densities; the composite would
    form the dense weight to lose. bf16 and fp16 are always measured: the kernels widen
    them to fp32, and a CPU's native half-precision conv can be several times faster (on
    the AMX Xeon, oneDNN's bf16 conv step against the kernels' at a quarter of the work,
    128 channels, 16x16, batch 64: 0.53x, the kernels slower);
  sure lose: images under 4 pixels, or a dense conv of under 8 multiply-adds per input
    element: the kernels' placement and output passes cost as much as the whole dense
    product (a 1x1 conv 4 -> 64 at 28x28, batch 64: the kernels 4.3x slower forward).
    The density does not enter: the composite does the dense work at any density, so a
    sparser layer only widens the kernels' lead (at 1/16 of the dense work or less, 1x1
    and empty layers included, they won 1.1-22x on the Zen3).
"""
from typing import NamedTuple

import torch

from ..floor import density_bucket, register_floor, tokens_bucket
from .geometry import output_memory_format

_MIN_PIXELS = 4          # per image: output pixels (forward, dW), input pixels (dX)
_MIN_WORK_PER_INPUT = 8  # dense multiply-adds per input element below which the memory passes dominate
_SURE_WIN_WORK = 4       # at most 1/4 of the dense multiply-adds, in the 1/16 steps of density_bucket
_NATIVE_DTYPES = (torch.float32, torch.float64)  # what the kernels compute in (half types are widened)


def _weights(layout, geometry):
    """(weights the stored blocks hold, padding channels included; weights of the dense conv), per tap."""
    return layout.nnz_blocks * geometry.block_size ** 2, geometry.out_channels * geometry.in_per_group


def _density_step(layout, geometry):
    """The effective density in 1/16 steps, rounded up."""
    return density_bucket(*_weights(layout, geometry))


def _taps(geometry):
    return geometry.kernel_size[0] * geometry.kernel_size[1]


def _too_little_work(call):
    return call.pixels < _MIN_PIXELS or call.geometry.in_per_group * _taps(call.geometry) < _MIN_WORK_PER_INPUT


def _sure_win(call):
    steps = _density_step(call.layout, call.geometry)
    return (call.operand.dtype in _NATIVE_DTYPES and _taps(call.geometry) > 1 and steps <= _SURE_WIN_WORK
            and not _too_little_work(call))


def _shape_class(call):
    return (tuple(call.geometry.as_list()), output_memory_format(call.operand), tokens_bucket(call.operand.shape[0]),
            call.image, _density_step(call.layout, call.geometry))


class _Call(NamedTuple):
    """What the rule reads of a call: the activation operand (its memory format and batch), the
    input image size and the pixels per image the kernel loops over."""
    operand: torch.Tensor
    image: tuple
    pixels: int
    layout: object
    geometry: object


def _forward(x, values, layout, geometry, bias=None):
    height, width = geometry.output_size(x.shape[2], x.shape[3])
    return _Call(x, tuple(x.shape[2:]), height * width, layout, geometry)


def _grad_input(dy, values, layout, geometry, input_size):
    return _Call(dy, tuple(input_size), input_size[0] * input_size[1], layout, geometry)


def _grad_weight(dy, x, layout, geometry, bias_grad=False):
    return _Call(x, tuple(x.shape[2:]), dy.shape[2] * dy.shape[3], layout, geometry)


def _grads(dy, x, values, layout, geometry, bias_grad=False):
    return _grad_input(dy, values, layout, geometry, x.shape[2:])


def _register(product, facts):
    register_floor(product, "reference", lambda *args: _shape_class(facts(*args)),
                   lambda *args: _sure_win(facts(*args)), lambda *args: _too_little_work(facts(*args)))


_register("conv_forward", _forward)
_register("conv_grad_input", _grad_input)
_register("conv_grad_weight", _grad_weight)
_register("conv_grads", _grads)   # dX and dW of one backward
