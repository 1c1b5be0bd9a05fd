"""``sparse_conv2d``: Y = conv2d(X, W) + b with W block-sparse over channels, and its autograd.

Forward, dX and dW each run a conv kernel from the registry; an automatic choice of
compiled kernels is subject to the measured floor rule (kernels/floor.py, with the conv
specifics in kernels/conv/policy.py: the kernels where they beat dense F.conv2d, else the
composite). dW is computed on the stored blocks only. The ops are torch.library custom ops
with fake implementations, so torch.compile traces them without graph breaks.
"""
import dataclasses
from typing import Optional

import torch
from torch import Tensor

from ..formats.bsr import BlockLayout
from ..kernels import floor, select_kernel
from ..kernels.conv import ConvGeometry, output_memory_format
from .checks import saved_tensors
from .dispatch import kernel, traced_backend
from .batching import unmapped
from .eager import eager_op
from .forward_mode import as_operand, tangent
from .transforms import transformed
from .probe import BlockProbe, own_positions

# A layout crosses the op boundary as its index tensors; its shape and block size follow from the geometry.
_LAYOUT_FIELDS = ("block_mask", "row_offsets", "col_indices", "row_indices", "col_offsets", "t_block_ids",
                  "t_row_indices")


def _flat(layout):
    return [getattr(layout, field) for field in _LAYOUT_FIELDS]


def _unflat(tensors, geometry):
    bs = geometry.block_size
    return BlockLayout(geometry.padded_shape, (bs, bs), *tensors)


def _forward(x, values, bias, layout, geometry, backend):
    geo = ConvGeometry.from_list(geometry)
    return kernel("conv_forward", x, backend)(x, values, _unflat(layout, geo), geo, bias)


@eager_op("sparsekern::conv2d", per_row=True)
def _conv2d(x: Tensor, values: Tensor, bias: Optional[Tensor], layout: list[Tensor], geometry: list[int],
            backend: Optional[str]) -> Tensor:
    return _forward(x, values, bias, layout, geometry, backend)


@eager_op("sparsekern::conv2d_probed", per_row=True)
def _conv2d_probed(x: Tensor, values: Tensor, bias: Optional[Tensor], probe_values: Tensor, layout: list[Tensor],
                   probe_layout: list[Tensor], own_positions: Optional[Tensor], geometry: list[int],
                   backend: Optional[str]) -> Tensor:
    """conv2d whose backward also gives ``probe_values`` the weight gradient on the probe's blocks.

    ``own_positions`` (nnz,): where each of the weight's blocks sits in the probe, when the
    probe holds them all; the weight's gradient is then read out of the probe's."""
    return _forward(x, values, bias, layout, geometry, backend)


@eager_op("sparsekern::conv2d_grad_input", per_row=True)
def _grad_input(dy: Tensor, values: Tensor, layout: list[Tensor], geometry: list[int], input_size: list[int],
                backend: Optional[str]) -> Tensor:
    geo = ConvGeometry.from_list(geometry)
    return kernel("conv_grad_input", dy, backend)(dy, values, _unflat(layout, geo), geo, tuple(input_size))


@eager_op("sparsekern::conv2d_grad_weight")
def _grad_weight(dy: Tensor, x: Tensor, layout: list[Tensor], geometry: list[int], bias_grad: bool,
                 backend: Optional[str]) -> tuple[Tensor, Tensor]:
    """dW on the stored blocks and (if ``bias_grad``, else an empty tensor) the bias gradient,
    which the kernels sum on dW's pass over dY."""
    geo = ConvGeometry.from_list(geometry)
    dw, db = kernel("conv_grad_weight", x, backend)(dy, x, _unflat(layout, geo), geo, bias_grad)
    return dw, dy.new_empty(0) if db is None else db


@eager_op("sparsekern::conv2d_grads")
def _grads(dy: Tensor, x: Tensor, values: Tensor, layout: list[Tensor], geometry: list[int], bias_grad: bool,
           backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor]:
    """dX, dW and (if ``bias_grad``, else an empty tensor: custom ops return no None) the bias
    gradient of one backward: the kernels' two products and a sum of dY, or (the composite) one
    dense convolution backward as nn.Conv2d's, whichever the floor rule finds faster."""
    geo = ConvGeometry.from_list(geometry)
    dx, dw, db = kernel("conv_grads", dy, backend)(dy, x, values, _unflat(layout, geo), geo, bias_grad)
    return dx, dw, dy.new_empty(0) if db is None else db


def _fake_output(x, geometry):
    geo = ConvGeometry.from_list(geometry)
    return torch.empty(x.shape[0], geo.out_channels, *geo.output_size(x.shape[2], x.shape[3]), dtype=x.dtype,
                       device=x.device, memory_format=output_memory_format(x))


@_conv2d.register_fake
def _(x, values, bias, layout, geometry, backend):
    return _fake_output(x, geometry)


@_conv2d_probed.register_fake
def _(x, values, bias, probe_values, layout, probe_layout, own_positions, geometry, backend):
    return _fake_output(x, geometry)


def _fake_grad_input(dy, geometry, input_size):
    geo = ConvGeometry.from_list(geometry)
    return torch.empty(dy.shape[0], geo.in_channels, *input_size, dtype=dy.dtype, device=dy.device,
                       memory_format=output_memory_format(dy))


def _fake_grad_weight(dy, x, layout, geometry, bias_grad):
    geo = ConvGeometry.from_list(geometry)
    return (x.new_empty(layout[2].shape[0], geo.block_size, geo.block_size, *geo.kernel_size),
            dy.new_empty(geo.out_channels if bias_grad else 0))


@_grad_input.register_fake
def _(dy, values, layout, geometry, input_size, backend):
    return _fake_grad_input(dy, geometry, input_size)


@_grad_weight.register_fake
def _(dy, x, layout, geometry, bias_grad, backend):
    return _fake_grad_weight(dy, x, layout, geometry, bias_grad)


@_grads.register_fake
def _(dy, x, values, layout, geometry, bias_grad, backend):
    dx = torch.empty(x.shape, dtype=dy.dtype, device=dy.device, memory_format=output_memory_format(dy))
    return dx, values.new_empty(values.shape), dy.new_empty(dy.shape[1] if bias_grad else 0)


def _samples_as_channels(t):
    """(samples, N, C, H, W) -> (N, samples * C, H, W): sample s in channels s*C.. (a view for one
    image a sample in the usual layout; the kernels take either memory format)."""
    samples, n, c, h, w = t.shape
    return t.transpose(0, 1).reshape(n, samples * c, h, w)


def _per_sample_weight_grads(batch, dy, x, layout, geometry, bias_grad, backend):
    """(dW, db) of every sample at once, or None where the trick does not apply: the samples as
    the groups of one convolution, the block mask tiled once per sample down the rows, so one
    sampled dW call computes every sample's blocks (in the original order, sample after sample)."""
    geo = ConvGeometry.from_list(geometry)
    if geo.out_channels % geo.block_size:
        return None  # a block row would straddle two samples
    grouped = dataclasses.replace(geo, in_channels=batch * geo.in_channels, out_channels=batch * geo.out_channels,
                                  groups=batch * geo.groups)
    tiled = BlockLayout.from_block_mask(layout[0].repeat(batch, 1), grouped.padded_shape,
                                        (geo.block_size, geo.block_size))
    dw, db = _grad_weight(_samples_as_channels(dy), _samples_as_channels(x), _flat(tiled), grouped.as_list(),
                          bias_grad, backend)
    return dw.view(batch, dw.shape[0] // batch, *dw.shape[1:]), db.view(batch, geo.out_channels if bias_grad else 0)


def _mapped_activations(in_dims, dy, x):
    """dY and X with the mapped dim first, or None unless both are mapped and nothing else is."""
    if in_dims[0] is None or in_dims[1] is None or not all(unmapped(d) for d in in_dims[2:]):
        return None
    return dy.movedim(in_dims[0], 0), x.movedim(in_dims[1], 0)


@_grad_weight.register_batching
def _(batch, in_dims, dy, x, layout, geometry, bias_grad, backend):
    """Per-sample dW (vmap of grad) in one kernel call instead of one per sample."""
    mapped = _mapped_activations(in_dims, dy, x)
    grads = None if mapped is None else _per_sample_weight_grads(batch, *mapped, layout, geometry, bias_grad, backend)
    return None if grads is None else (grads, (0, 0))


@_grads.register_batching
def _(batch, in_dims, dy, x, values, layout, geometry, bias_grad, backend):
    """Per-sample dX (the samples folded into the images) and dW (one call for every sample)."""
    mapped = None if in_dims[2] is not None else _mapped_activations(in_dims[:2] + in_dims[3:], dy, x)
    grads = None if mapped is None else _per_sample_weight_grads(batch, *mapped, layout, geometry, bias_grad, backend)
    if grads is None:
        return None
    dy, x = mapped
    dx = _grad_input(dy.flatten(0, 1), values, layout, geometry, list(x.shape[3:]), backend)
    return (dx.view(x.shape), *grads), (0, 0, 0)


def _setup_product(ctx, inputs, output):
    """dX's (dy, values, layout, geometry, input_size, backend) and dW's (dy, x, layout, geometry,
    bias_grad, backend): their two tensor operands, and the structure."""
    ctx.save_for_backward(*inputs[:2])
    ctx.meta = inputs[2], inputs[3], inputs[-1]


def _through_grad_input(dy, values, ggx, meta, needs_dy, needs_values):
    """(dY's, W's) gradients for ggX of dX, the transposed conv of dY by W (bilinear in the two):
    the forward conv of ggX by W and the weight gradient of ggX against dY."""
    layout, geometry, backend = meta
    return (_conv2d(ggx, values, None, layout, geometry, backend) if needs_dy else None,
            _grad_weight(dy, ggx, layout, geometry, False, backend)[0] if needs_values else None)


def _through_grad_weight(dy, x, ggw, meta, needs_dy, needs_x):
    """(dY's, X's) gradients for ggW of dW, sampled on the stored blocks (bilinear in dY and X): the
    conv of X by ggW and the input gradient of dY through ggW."""
    layout, geometry, backend = meta
    ggw = ggw.contiguous()
    return (_conv2d(x, ggw, None, layout, geometry, backend) if needs_dy else None,
            _grad_input(dy, ggw, layout, geometry, list(x.shape[2:]), backend) if needs_x else None)


def _backward_grad_input(ctx, ggx):
    dy, values = saved_tensors(ctx, "sparse_conv2d")
    return (*_through_grad_input(dy, values, ggx, ctx.meta, *ctx.needs_input_grad[:2]), [None] * len(ctx.meta[0]),
            None, None, None)


def _backward_grad_weight(ctx, ggw, ggb):
    dy, x = saved_tensors(ctx, "sparse_conv2d")
    needs_dy, needs_x = ctx.needs_input_grad[:2]
    d_dy, d_x = (None, None) if ggw is None else _through_grad_weight(dy, x, ggw, ctx.meta, needs_dy, needs_x)
    return _with_bias_share(d_dy, ggb, dy, needs_dy), d_x, [None] * len(ctx.meta[0]), None, None, None


def _with_bias_share(d_dy, ggb, dy, needs_dy):
    """dY's gradient plus ggb's share (the bias gradient sums dY over batch and pixels)."""
    if not needs_dy or ggb is None or not ggb.numel():
        return d_dy
    share = ggb[None, :, None, None].expand_as(dy)
    return share if d_dy is None else d_dy + share


def _setup_grads(ctx, inputs, output):
    dy, x, values, layout, geometry, bias_grad, backend = inputs
    ctx.save_for_backward(dy, x, values)
    ctx.meta = layout, geometry, backend


def _backward_grads(ctx, ggx, ggw, ggb):
    """The gradients of (dX, dW, db) together: dY gets both products' share and ggb."""
    dy, x, values = saved_tensors(ctx, "sparse_conv2d")
    needs_dy, needs_x, needs_values = ctx.needs_input_grad[:3]
    from_dx, d_values = (None, None) if ggx is None else _through_grad_input(dy, values, ggx, ctx.meta, needs_dy,
                                                                             needs_values)
    from_dw, d_x = (None, None) if ggw is None else _through_grad_weight(dy, x, ggw, ctx.meta, needs_dy, needs_x)
    d_dy = from_dx if from_dw is None else from_dw if from_dx is None else from_dx + from_dw
    return _with_bias_share(d_dy, ggb, dy, needs_dy), d_x, d_values, [None] * len(ctx.meta[0]), None, None, None


def _setup_context(ctx, inputs, output):
    x, values, bias, layout, geometry, backend = inputs
    ctx.save_for_backward(x, values)
    ctx.meta = layout, geometry, backend
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    x, values = saved_tensors(ctx, "sparse_conv2d")
    layout, geometry, backend = ctx.meta
    dy = dy.contiguous(memory_format=output_memory_format(x))
    needs_dx, needs_dw, needs_db = ctx.needs_input_grad[:3]
    needs_db = ctx.has_bias and needs_db
    if needs_dx and needs_dw:
        dx, dw, db = _grads(dy, x, values, layout, geometry, needs_db, backend)
        db = db if needs_db else None
    else:
        dx = _grad_input(dy, values, layout, geometry, list(x.shape[2:]), backend) if needs_dx else None
        dw = db = None
        if needs_dw:
            dw, db = _weight_grads(dy, x, layout, geometry, needs_db, backend)
        elif needs_db:
            db = dy.sum((0, 2, 3))
    return dx, dw, db, [None] * len(layout), None, None


def _weight_grads(dy, x, layout, geometry, needs_db, backend):
    """(dW, db or None): the bias gradient on dW's pass over dY."""
    dw, db = _grad_weight(dy, x, layout, geometry, needs_db, backend)
    return dw, db if needs_db else None


def _setup_probed(ctx, inputs, output):
    x, values, bias, _, layout, probe_layout, own_positions, geometry, backend = inputs
    ctx.save_for_backward(x, values, own_positions)
    ctx.meta = layout, probe_layout, geometry, backend
    ctx.has_bias = bias is not None


def _backward_probed(ctx, dy):
    x, values, own_positions = saved_tensors(ctx, "sparse_conv2d")
    layout, probe_layout, geometry, backend = ctx.meta
    dy = dy.contiguous(memory_format=output_memory_format(x))
    needs_dx, needs_dw, needs_db, needs_probe = ctx.needs_input_grad[:4]
    needs_db = ctx.has_bias and needs_db
    dx = _grad_input(dy, values, layout, geometry, list(x.shape[2:]), backend) if needs_dx else None
    dprobe = dw = db = None
    if needs_probe:
        dprobe, db = _weight_grads(dy, x, probe_layout, geometry, needs_db, backend)
    if needs_dw and dprobe is not None and own_positions is not None:
        dw = dprobe[own_positions]
    elif needs_dw:
        dw, own_db = _weight_grads(dy, x, layout, geometry, needs_db and db is None, backend)
        db = own_db if db is None else db
    if needs_db and db is None:
        db = dy.sum((0, 2, 3))
    return dx, dw, db, dprobe, [None] * len(layout), [None] * len(probe_layout), None, None, None


def _input_grad_tangent(dy, values, d_dy, d_values, layout, geometry, input_size, backend):
    """The tangent of dX = convᵀ(dY, W), bilinear in (dY, W)."""
    return tangent([None if d_dy is None else _grad_input(d_dy, values, layout, geometry, input_size, backend),
                    None if d_values is None else _grad_input(dy, d_values, layout, geometry, input_size, backend)],
                   lambda: _fake_grad_input(dy, geometry, input_size).zero_())


def _weight_grad_tangents(dy, x, d_dy, d_x, layout, geometry, bias_grad, backend):
    """The tangents of (dW on the stored blocks, db): dW is bilinear in (dY, X), db linear in dY."""
    dw = tangent([None if d_dy is None else _grad_weight(d_dy, x, layout, geometry, False, backend)[0],
                  None if d_x is None else _grad_weight(dy, d_x, layout, geometry, False, backend)[0]],
                 lambda: _fake_grad_weight(dy, x, layout, geometry, False)[0].zero_())
    db = dy.new_zeros(geometry.out_channels if bias_grad else 0) if d_dy is None or not bias_grad \
        else d_dy.sum((0, 2, 3))
    return dw, db


def _conv_tangent(x, values, d_x, d_values, d_bias, layout, geometry, backend):
    return tangent([None if d_x is None else _conv2d(d_x, values, None, layout, geometry, backend),
                    None if d_values is None else _conv2d(x, d_values, None, layout, geometry, backend),
                    None if d_bias is None else d_bias[:, None, None].expand(_fake_output(x, geometry).shape)],
                   lambda: _fake_output(x, geometry).zero_())


def _jvp_grad_input(args, tangents):
    dy, values, layout, geometry, input_size, backend = args
    return _input_grad_tangent(dy, values, *map(as_operand, tangents[:2]), layout, geometry, input_size, backend)


def _jvp_grad_weight(args, tangents):
    dy, x, layout, geometry, bias_grad, backend = args
    return _weight_grad_tangents(dy, x, *map(as_operand, tangents[:2]), layout, geometry, bias_grad, backend)


def _jvp_grads(args, tangents):
    dy, x, values, layout, geometry, bias_grad, backend = args
    d_dy, d_x, d_values = map(as_operand, tangents[:3])
    dx = _input_grad_tangent(dy, values, d_dy, d_values, layout, geometry, list(x.shape[2:]), backend)
    return (dx, *_weight_grad_tangents(dy, x, d_dy, d_x, layout, geometry, bias_grad, backend))


def _jvp(args, tangents):
    x, values, bias, layout, geometry, backend = args
    return _conv_tangent(x, values, *map(as_operand, tangents[:3]), layout, geometry, backend)


def _jvp_probed(args, tangents):
    """The probe enters as a zero perturbation of W on its own blocks: its tangent acts like W's."""
    x, values, bias, _, layout, probe_layout, _, geometry, backend = args
    d_x, d_values, d_bias, d_probe = map(as_operand, tangents[:4])
    y = _conv_tangent(x, values, d_x, d_values, d_bias, layout, geometry, backend)
    return y if d_probe is None else y + _conv2d(x, d_probe, None, probe_layout, geometry, backend)


# Every backward is written in the family's differentiable ops: second (and higher) backwards
# run on the same kernels; so are the forward-mode rules.
_grad_input.register_autograd(_backward_grad_input, _setup_product, differentiable=True, jvp=_jvp_grad_input)
_grad_weight.register_autograd(_backward_grad_weight, _setup_product, differentiable=True, jvp=_jvp_grad_weight)
_grads.register_autograd(_backward_grads, _setup_grads, differentiable=True, jvp=_jvp_grads)
_conv2d.register_autograd(_backward, _setup_context, differentiable=True, jvp=_jvp)
_conv2d_probed.register_autograd(_backward_probed, _setup_probed, differentiable=True, jvp=_jvp_probed)


def _check_inputs(x, values, layout, geometry, bias):
    if not isinstance(geometry, ConvGeometry):
        raise TypeError(f"geometry must be a ConvGeometry, got {type(geometry).__name__}")
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    bs = geometry.block_size
    if layout.shape != geometry.padded_shape or layout.block_size != (bs, bs):
        raise ValueError(f"layout of shape {layout.shape} and block size {layout.block_size} does not fit the "
                         f"geometry ({geometry.padded_shape}, block {bs})")
    expected = (layout.nnz_blocks, bs, bs, *geometry.kernel_size)
    if not isinstance(values, torch.Tensor) or tuple(values.shape) != expected:
        raise ValueError(f"values has shape {tuple(getattr(values, 'shape', ()))}, the layout needs {expected}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"sparse_conv2d expects a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    if x.shape[1] != geometry.in_channels:
        raise ValueError(f"input has {x.shape[1]} channels (shape {tuple(x.shape)}), expected "
                         f"in_channels = {geometry.in_channels}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"sparse_conv2d needs floating tensors, got input of dtype {x.dtype}")
    if x.dtype != values.dtype:
        raise TypeError(f"input has dtype {x.dtype} but the weight has dtype {values.dtype}")
    if x.device != values.device:
        raise ValueError(f"input is on {x.device} but the weight is on {values.device}")
    height, width = geometry.output_size(x.shape[2], x.shape[3])
    if height < 1 or width < 1:
        (t, b, l, r), (kh, kw), (dh, dw) = geometry.padding, geometry.kernel_size, geometry.dilation
        raise ValueError(f"input of spatial size {tuple(x.shape[2:])} padded by (top, bottom, left, right) = "
                         f"{(t, b, l, r)} is smaller than the dilated kernel "
                         f"{(dh * (kh - 1) + 1, dw * (kw - 1) + 1)}")
    if bias is not None:
        if tuple(bias.shape) != (geometry.out_channels,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({geometry.out_channels},)")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise TypeError(f"bias is {bias.dtype} on {bias.device}, expected {x.dtype} on {x.device}")


def _check_probe(grad_probe, values, layout):
    if not isinstance(grad_probe, BlockProbe):
        raise TypeError(f"grad_probe must be a sparsekern.ops.BlockProbe, got {type(grad_probe).__name__}")
    probe_values, probe_layout = grad_probe.values, grad_probe.layout
    if probe_layout.shape != layout.shape or probe_layout.block_size != layout.block_size:
        raise ValueError(f"grad_probe's layout has shape {probe_layout.shape} and block size "
                         f"{probe_layout.block_size}, expected {layout.shape} and {layout.block_size} like the weight's")
    if tuple(probe_values.shape[1:]) != tuple(values.shape[1:]):
        raise ValueError(f"grad_probe's values have blocks of shape {tuple(probe_values.shape[1:])}, the weight's "
                         f"are {tuple(values.shape[1:])}")
    if probe_values.dtype != values.dtype or probe_values.device != values.device:
        raise TypeError(f"grad_probe is {probe_values.dtype} on {probe_values.device}, expected {values.dtype} "
                        f"on {values.device}")


def _settled_on_the_composite(x, values, layout, geometry, bias):
    """Whether the floor rule has finally sent this call's forward, and the backward product
    it will need, to the composite. The composite is then run as plain autograd through the
    densified weight: nn.Conv2d's own passes, without the ops' second densified weight and
    dW read-out copy (on a Zen 4, bf16 at density 1: 0.964-0.984x of nn.Conv2d through the ops,
    0.986-0.989x this way). Never under torch.compile or a forced backend, where the ops run as
    traced or transformed (torch.func), nor where the rule is off (floor.final_choice)."""
    if traced_backend() is not None or torch.compiler.is_compiling() or transformed():
        return False
    backend = select_kernel("conv_forward", x.device, x.dtype)[0]
    if floor.final_choice("conv_forward", backend, x, x, values, layout, geometry, bias) != "reference":
        return False
    needs_dx, needs_dw = torch.is_grad_enabled() and x.requires_grad, torch.is_grad_enabled() and values.requires_grad
    if not (needs_dx or needs_dw):
        return True
    # dY as the backward will see it (shape, memory format), without memory
    dy = torch.empty(x.shape[0], geometry.out_channels, *geometry.output_size(x.shape[2], x.shape[3]), dtype=x.dtype,
                     device="meta", memory_format=output_memory_format(x))
    if needs_dx and needs_dw:
        product, args = "conv_grads", (dy, x, values, layout, geometry, bias is not None)
    elif needs_dx:
        product, args = "conv_grad_input", (dy, values, layout, geometry, tuple(x.shape[2:]))
    else:
        product, args = "conv_grad_weight", (dy, x, layout, geometry)
    return floor.final_choice(product, select_kernel(product, x.device, x.dtype)[0], x, *args) == "reference"


def sparse_conv2d(x, values, layout, geometry, bias=None, *, grad_probe=None):
    """F.conv2d(x, W, bias, ...) with W = (values, layout) block-sparse over channels; computed
    on the stored blocks where that is faster than dense (the floor rule).

    x: (N, C, H, W) in any memory format (channels-last is the fast path); values:
    (nnz, bs, bs, kh, kw) on ``layout`` (a BlockLayout of ``geometry.padded_shape``);
    geometry: a ConvGeometry; bias: (out_channels,) or None. Returns (N, O, Ho, Wo) in the
    memory format F.conv2d would give. Gradients: x gets the input gradient, ``values`` the
    weight gradient on its stored blocks, bias the sum of dY. ``grad_probe`` (optional, a
    BlockProbe on the same grid, values requiring grad) receives the weight gradient on *its*
    blocks, e.g. every block for dense gradient scores; its values are not read.
    """
    _check_inputs(x, values, layout, geometry, bias)
    bias = None if bias is None else bias.contiguous()
    values = values.contiguous()
    if grad_probe is None:
        if _settled_on_the_composite(x, values, layout, geometry, bias):
            return select_kernel("conv_forward", x.device, x.dtype, "reference")[1](x, values, layout, geometry, bias)
        return _conv2d(x, values, bias, _flat(layout), geometry.as_list(), traced_backend())
    _check_probe(grad_probe, values, layout)
    return _conv2d_probed(x, values, bias, grad_probe.values, _flat(layout), _flat(grad_probe.layout),
                          own_positions(grad_probe, layout), geometry.as_list(), traced_backend())
