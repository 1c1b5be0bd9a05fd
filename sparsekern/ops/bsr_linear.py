"""``bsr_linear``: Y = X Wᵀ + b with W block-sparse, and its autograd.

Forward, dX and dW each run a block-sparse kernel from the registry; nothing
dense of W's shape is formed. dW is the *sampled* product dYᵀX computed on the
stored blocks only. An optional ``grad_probe`` asks for dW on another set of
blocks (a superset, or every block for dense scores) without changing the
forward: this is how RigL/SNFS/Top-KAST/DPF obtain their scores. The probe is a
second op (``bsr_linear_probed``), so the core op's schema carries no probe.
"""
from typing import Optional

import torch
from torch import Tensor

from ..formats.bsr import BlockLayout, BlockSparseMatrix
from .checks import check_linear_inputs, saved_tensors
from .dispatch import kernel, traced_backend
from .batching import unmapped
from .eager import eager_op
from .forward_mode import as_operand, tangent
from .outputs import token_matrix, with_leading_dims
from .probe import own_positions

# A layout crosses the op boundary as its index tensors plus (shape, block size).
_LAYOUT_FIELDS = ("block_mask", "row_offsets", "col_indices", "row_indices", "col_offsets", "t_block_ids",
                  "t_row_indices")


def _flat(layout):
    return [getattr(layout, field) for field in _LAYOUT_FIELDS]


def _layout(tensors, shape, block):
    return BlockLayout(tuple(shape), tuple(block), *tensors)


@eager_op("sparsekern::bsr_grad_input", per_row=True)
def _grad_input(dy: Tensor, values: Tensor, layout: list[Tensor], shape: list[int], block: list[int],
                backend: Optional[str]) -> Tensor:
    return kernel("bsr_grad_input", dy, backend)(dy, values, _layout(layout, shape, block))


@eager_op("sparsekern::bsr_grad_weight")
def _grad_weight(dy: Tensor, x: Tensor, layout: list[Tensor], shape: list[int], block: list[int], bias_grad: bool,
                 backend: Optional[str]) -> tuple[Tensor, Tensor]:
    """dW on the stored blocks and (if ``bias_grad``, else an empty tensor: custom ops return no
    None) the bias gradient, which the cpu kernels sum on dW's pass over dY."""
    dw, db = kernel("bsr_grad_weight", dy, backend)(dy, x, _layout(layout, shape, block), bias_grad)
    return dw, dy.new_empty(0) if db is None else db


@eager_op("sparsekern::bsr_linear", per_row=True)
def _linear(x: Tensor, values: Tensor, bias: Optional[Tensor], layout: list[Tensor], shape: list[int],
            block: list[int], backend: Optional[str]) -> Tensor:
    return kernel("bsr_forward", x, backend)(x, values, _layout(layout, shape, block), bias)


@eager_op("sparsekern::bsr_linear_probed", per_row=True)
def _linear_probed(x: Tensor, values: Tensor, bias: Optional[Tensor], probe_values: Tensor, layout: list[Tensor],
                   probe_layout: list[Tensor], own_positions: Optional[Tensor], shape: list[int], block: list[int],
                   backend: Optional[str]) -> Tensor:
    """bsr_linear whose backward also gives ``probe_values`` dYᵀX on the probe's blocks.

    ``own_positions`` (nnz,): where each of the weight's blocks sits in the probe, when the
    probe holds them all; the weight's gradient is then read out of the probe's."""
    return kernel("bsr_forward", x, backend)(x, values, _layout(layout, shape, block), bias)


@_grad_input.register_fake
def _(dy, values, layout, shape, block, backend):
    return dy.new_empty(dy.shape[0], shape[1])


@_grad_weight.register_fake
def _(dy, x, layout, shape, block, bias_grad, backend):
    return x.new_empty(layout[2].shape[0], *block), dy.new_empty(shape[0] if bias_grad else 0)


@_linear.register_fake
def _(x, values, bias, layout, shape, block, backend):
    return x.new_empty(x.shape[0], shape[0])


@_linear_probed.register_fake
def _(x, values, bias, probe_values, layout, probe_layout, own_positions, shape, block, backend):
    return x.new_empty(x.shape[0], shape[0])


@_grad_weight.register_batching
def _(batch, in_dims, dy, x, layout, shape, block, bias_grad, backend):
    """Per-sample dW of samples of at most a block's height of tokens (per-sample gradients,
    vmap of grad): each stored block's outer products gathered straight into the stacked output,
    in one pass instead of one kernel call per sample and a copy into the stack."""
    if in_dims[0] is None or in_dims[1] is None or not all(unmapped(d) for d in in_dims[2:]):
        return None
    dy, x = dy.movedim(in_dims[0], 0), x.movedim(in_dims[1], 0)
    tokens, (bh, bw) = dy.shape[1], block
    if tokens > bh:
        return None
    rows = dy.reshape(batch, tokens, shape[0] // bh, bh)[:, :, layout[3].long()]  # (S, T, nnz, bh)
    cols = x.reshape(batch, tokens, shape[1] // bw, bw)[:, :, layout[2].long()]
    db = dy.sum(1) if bias_grad else dy.new_empty(batch, 0)
    return (torch.einsum("stnb,stnc->snbc", rows, cols), db), (0, 0)


def _setup_product(ctx, inputs, output):
    """dX's (dy, values, layout, shape, block, backend) and dW's (dy, x, layout, shape, block,
    bias_grad, backend): their two tensor operands, and the structure."""
    ctx.save_for_backward(*inputs[:2])
    ctx.meta = (*inputs[2:5], inputs[-1])


def _backward_grad_input(ctx, ggx):
    """dX = dY W is bilinear in (dY, W): its gradients are the family's other two products."""
    dy, values = saved_tensors(ctx, "bsr_grad_input")
    layout, shape, block, backend = ctx.meta
    ggx = ggx.contiguous()
    needs_dy, needs_values = ctx.needs_input_grad[:2]
    d_dy = _linear(ggx, values, None, layout, shape, block, backend) if needs_dy else None
    d_values = _grad_weight(dy, ggx, layout, shape, block, False, backend)[0] if needs_values else None
    return d_dy, d_values, [None] * len(layout), None, None, None


def _backward_grad_weight(ctx, ggw, ggb):
    """dW = dYᵀX on the stored blocks, bilinear in (dY, X): X ggWᵀ and dY ggW with ggW on W's blocks;
    db = dY summed over the tokens: ggb's share of dY is ggb on every row."""
    dy, x = saved_tensors(ctx, "bsr_grad_weight")
    layout, shape, block, backend = ctx.meta
    needs_dy, needs_x = ctx.needs_input_grad[:2]
    d_dy = d_x = None
    if ggw is not None:
        ggw = ggw.contiguous()
        d_dy = _linear(x, ggw, None, layout, shape, block, backend) if needs_dy else None
        d_x = _grad_input(dy, ggw, layout, shape, block, backend) if needs_x else None
    if needs_dy and ggb is not None and ggb.numel():
        share = ggb.expand_as(dy)
        d_dy = share if d_dy is None else d_dy + share
    return d_dy, d_x, [None] * len(layout), None, None, None, None


def _setup_context(ctx, inputs, output):
    x, values, bias, layout, shape, block, backend = inputs
    ctx.save_for_backward(x, values)
    ctx.meta = layout, shape, block, backend
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    x, values = saved_tensors(ctx, "bsr_linear")
    layout, shape, block, backend = ctx.meta
    dy = dy.contiguous()
    needs_dx, needs_dw, needs_db = ctx.needs_input_grad[:3]
    needs_db = ctx.has_bias and needs_db
    dx = _grad_input(dy, values, layout, shape, block, backend) if needs_dx else None
    dw = db = None
    if needs_dw:
        dw, db = _weight_grads(dy, x, layout, shape, block, needs_db, backend)
    elif needs_db:
        db = dy.sum(0)
    # Gradients mirror the inputs' structure: one None per layout index tensor.
    return dx, dw, db, [None] * len(layout), None, None, None


def _weight_grads(dy, x, layout, shape, block, needs_db, backend):
    """(dW, db or None): the bias gradient on dW's pass over dY."""
    dw, db = _grad_weight(dy, x, layout, shape, block, needs_db, backend)
    return dw, db if needs_db else None


def _setup_probed(ctx, inputs, output):
    x, values, bias, _, layout, probe_layout, own_positions, shape, block, backend = inputs
    ctx.save_for_backward(x, values, own_positions)
    ctx.meta = layout, probe_layout, shape, block, backend
    ctx.has_bias = bias is not None


def _backward_probed(ctx, dy):
    x, values, own_positions = saved_tensors(ctx, "bsr_linear")
    layout, probe_layout, shape, block, backend = ctx.meta
    dy = dy.contiguous()
    needs_dx, needs_dw, needs_db, needs_probe = ctx.needs_input_grad[:4]
    needs_db = ctx.has_bias and needs_db
    dx = _grad_input(dy, values, layout, shape, block, backend) if needs_dx else None
    dprobe = dw = db = None
    if needs_probe:
        dprobe, db = _weight_grads(dy, x, probe_layout, shape, block, needs_db, backend)
    if needs_dw and dprobe is not None and own_positions is not None:
        dw = dprobe[own_positions]
    elif needs_dw:
        dw, own_db = _weight_grads(dy, x, layout, shape, block, needs_db and db is None, backend)
        db = own_db if db is None else db
    if needs_db and db is None:
        db = dy.sum(0)
    return dx, dw, db, dprobe, [None] * len(layout), [None] * len(probe_layout), None, None, None, None


def _jvp_grad_input(args, tangents):
    dy, values, layout, shape, block, backend = args
    d_dy, d_values = map(as_operand, tangents[:2])
    return tangent([None if d_dy is None else _grad_input(d_dy, values, layout, shape, block, backend),
                    None if d_values is None else _grad_input(dy, d_values, layout, shape, block, backend)],
                   lambda: dy.new_zeros(dy.shape[0], shape[1]))


def _jvp_grad_weight(args, tangents):
    """The tangents of (dW on the stored blocks, db): dW is bilinear in (dY, X), db linear in dY."""
    dy, x, layout, shape, block, bias_grad, backend = args
    d_dy, d_x = map(as_operand, tangents[:2])
    dw = tangent([None if d_dy is None else _grad_weight(d_dy, x, layout, shape, block, False, backend)[0],
                  None if d_x is None else _grad_weight(dy, d_x, layout, shape, block, False, backend)[0]],
                 lambda: x.new_zeros(layout[2].shape[0], *block))
    db = dy.new_zeros(shape[0] if bias_grad else 0) if d_dy is None or not bias_grad else d_dy.sum(0)
    return dw, db


def _linear_tangent(x, values, d_x, d_values, d_bias, layout, shape, block, backend):
    return tangent([None if d_x is None else _linear(d_x, values, None, layout, shape, block, backend),
                    None if d_values is None else _linear(x, d_values, None, layout, shape, block, backend),
                    None if d_bias is None else d_bias.expand(x.shape[0], shape[0])],
                   lambda: x.new_zeros(x.shape[0], shape[0]))


def _jvp(args, tangents):
    x, values, bias, layout, shape, block, backend = args
    return _linear_tangent(x, values, *map(as_operand, tangents[:3]), layout, shape, block, backend)


def _jvp_probed(args, tangents):
    """The probe enters as a zero perturbation of W on its own blocks: its tangent acts like W's."""
    x, values, bias, _, layout, probe_layout, _, shape, block, backend = args
    d_x, d_values, d_bias, d_probe = map(as_operand, tangents[:4])
    y = _linear_tangent(x, values, d_x, d_values, d_bias, layout, shape, block, backend)
    return y if d_probe is None else y + _linear(x, d_probe, None, probe_layout, shape, block, backend)


# Every backward is written in the family's differentiable ops: second (and higher) backwards
# run on the same kernels; so are the forward-mode rules.
_grad_input.register_autograd(_backward_grad_input, _setup_product, differentiable=True, jvp=_jvp_grad_input)
_grad_weight.register_autograd(_backward_grad_weight, _setup_product, differentiable=True, jvp=_jvp_grad_weight)
_linear.register_autograd(_backward, _setup_context, differentiable=True, jvp=_jvp)
_linear_probed.register_autograd(_backward_probed, _setup_probed, differentiable=True, jvp=_jvp_probed)


def _check_inputs(x, weight, bias, grad_probe):
    if not isinstance(weight, BlockSparseMatrix):
        raise TypeError(f"weight must be a sparsekern.BlockSparseMatrix, got {type(weight).__name__}")
    check_linear_inputs("bsr_linear", x, weight.shape, weight.dtype, weight.device, bias)
    if grad_probe is not None:
        if not isinstance(grad_probe, BlockSparseMatrix):
            raise TypeError(f"grad_probe must be a BlockSparseMatrix, got {type(grad_probe).__name__}")
        if grad_probe.shape != weight.shape or grad_probe.block_size != weight.block_size:
            raise ValueError(
                f"grad_probe has shape {grad_probe.shape} and block size {grad_probe.block_size}, expected "
                f"{weight.shape} and {weight.block_size} like the weight")
        if grad_probe.dtype != x.dtype or grad_probe.device != x.device:
            raise TypeError(f"grad_probe is {grad_probe.dtype} on {grad_probe.device}, "
                            f"expected {x.dtype} on {x.device}")


def bsr_linear(x, weight, bias=None, *, grad_probe=None):
    """Y = x @ weight.to_dense().T + bias, computed only on the stored blocks.

    x: (..., in_features); weight: BlockSparseMatrix (out_features, in_features);
    bias: (out_features,) or None. Returns (..., out_features).

    Gradients: x gets dY W (through the transpose metadata); ``weight.values`` gets
    dYᵀX on its stored blocks; bias gets the sum of dY. ``grad_probe`` (optional,
    same shape and block size, values requiring grad) receives dYᵀX on *its*
    blocks, e.g. every block for dense gradient scores. Its values are not read:
    it enters the forward as a zero perturbation of W.
    """
    _check_inputs(x, weight, bias, grad_probe)
    n, k = weight.shape
    lead = x.shape[:-1]
    x2d = token_matrix(x, k)
    values, layout, shape, block = weight.values.contiguous(), _flat(weight.layout), list(weight.shape), \
        list(weight.block_size)
    bias = None if bias is None else bias.contiguous()
    if grad_probe is None:
        y = _linear(x2d, values, bias, layout, shape, block, traced_backend())
    else:
        y = _linear_probed(x2d, values, bias, grad_probe.values, layout, _flat(grad_probe.layout),
                           own_positions(grad_probe, weight.layout), shape, block, traced_backend())
    return with_leading_dims(y, lead, n)
