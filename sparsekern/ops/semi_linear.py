"""``semi_linear``: Y = X Wᵀ + b with W 2:4 sparse, and its autograd.

Static weights (:func:`semi_linear`): W is a :class:`SemiStructuredMatrix`
whose ``values`` receive dW sampled at the kept positions only. dX = dY W runs
the forward kernel on Wᵀ's compression when the matrix carries Wᵀ's indices
(transposable 2:4; the values are gathered from W's while the kernel packs
them), else the row-wise scatter kernel.

Dynamic weights (:func:`semi_linear_dynamic`): a dense master weight is pruned
and compressed by one fused kernel on every call; forward and dX use the 2:4
copy, and the dense weight gets the straight-through gradient dYᵀX (dense, as in
torchao's recipe: pruned weights keep learning and may come back).
"""
from typing import Optional

import torch
from torch import Tensor

from ..formats.semi import SemiStructuredMatrix, unpack_columns
from ..formats.semi_prune import check_2to4_shape
from .checks import check_linear_inputs, saved_tensors
from .dispatch import kernel, traced_backend
from .eager import eager_op
from .forward_mode import as_operand, tangent
from .outputs import token_matrix, with_leading_dims

# Optional outputs cross the op boundary as empty tensors (custom ops cannot return None).


@eager_op("sparsekern::semi_matmul", per_row=True)
def _matmul(x: Tensor, values: Tensor, indices: Tensor, backend: Optional[str]) -> Tensor:
    """x @ Wᵀ for W = (values, indices) compressed 2:4."""
    return kernel("semi_forward", x, backend)(x, values, indices)


@eager_op("sparsekern::semi_grad_input", per_row=True)
def _grad_input(dy: Tensor, values: Tensor, indices: Tensor, indices_t: Optional[Tensor],
                transpose_map: Optional[Tensor], backend: Optional[str]) -> Tensor:
    return kernel("semi_grad_input", dy, backend)(dy, values, indices, indices_t, transpose_map)


@eager_op("sparsekern::semi_grad_weight")
def _grad_weight(dy: Tensor, x: Tensor, indices: Tensor, backend: Optional[str]) -> Tensor:
    return kernel("semi_grad_weight", dy, backend)(dy, x, indices)


@eager_op("sparsekern::semi_prune_compress")
def _prune_compress(weight: Tensor, transposable: bool, backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(values, indices, values_t, indices_t); the last two are empty unless ``transposable``."""
    values, indices, values_t, indices_t = kernel("semi_prune_compress", weight, backend)(weight, transposable)
    if values_t is None:
        values_t, indices_t = weight.new_empty(0), indices.new_empty(0)
    return values, indices, values_t, indices_t


def _forward(x, values, bias, indices, backend):
    return kernel("semi_forward", x, backend)(x, values, indices, bias)  # the composite fuses it into its GEMM


@eager_op("sparsekern::semi_linear", per_row=True)
def _linear(x: Tensor, values: Tensor, bias: Optional[Tensor], indices: Tensor, indices_t: Optional[Tensor],
            transpose_map: Optional[Tensor], backend: Optional[str]) -> Tensor:
    return _forward(x, values, bias, indices, backend)


@eager_op("sparsekern::semi_linear_probed", per_row=True)
def _linear_probed(x: Tensor, values: Tensor, bias: Optional[Tensor], probe_values: Tensor, indices: Tensor,
                   indices_t: Optional[Tensor], transpose_map: Optional[Tensor], probe_indices: Tensor,
                   backend: Optional[str]) -> Tensor:
    """semi_linear whose backward also gives ``probe_values`` dYᵀX at ``probe_indices``' kept
    positions (the DST methods' probe on the complement of the mask)."""
    return _forward(x, values, bias, indices, backend)


@eager_op("sparsekern::semi_linear_dynamic")
def _linear_dynamic(x: Tensor, weight: Tensor, bias: Optional[Tensor], transposable: bool,
                    backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, values, indices, values_t, indices_t): the 2:4 copy is returned for the backward."""
    values, indices, values_t, indices_t = _prune_compress(weight, transposable, backend)
    return _forward(x, values, bias, indices, backend), values, indices, values_t, indices_t


def _compressed_shapes(weight, transposable):
    (n, k), packed = weight.shape, lambda cols: (cols + 7) // 8  # noqa: E731
    shapes = [((n, k // 2), weight.dtype), ((n, packed(k)), torch.uint8)]
    if transposable:
        shapes += [((k, n // 2), weight.dtype), ((k, packed(n)), torch.uint8)]
    else:
        shapes += [((0,), weight.dtype), ((0,), torch.uint8)]
    return [weight.new_empty(shape, dtype=dtype) for shape, dtype in shapes]


@_matmul.register_fake
def _(x, values, indices, backend):
    return x.new_empty(x.shape[0], values.shape[0])


@_grad_input.register_fake
def _(dy, values, indices, indices_t, transpose_map, backend):
    return dy.new_empty(dy.shape[0], 2 * values.shape[1])


@_grad_weight.register_fake
def _(dy, x, indices, backend):
    return x.new_empty(dy.shape[1], x.shape[1] // 2)


@_prune_compress.register_fake
def _(weight, transposable, backend):
    return tuple(_compressed_shapes(weight, transposable))


@_linear.register_fake
def _(x, values, bias, indices, indices_t, transpose_map, backend):
    return x.new_empty(x.shape[0], values.shape[0])


@_linear_probed.register_fake
def _(x, values, bias, probe_values, indices, indices_t, transpose_map, probe_indices, backend):
    return x.new_empty(x.shape[0], values.shape[0])


@_linear_dynamic.register_fake
def _(x, weight, bias, transposable, backend):
    return (x.new_empty(x.shape[0], weight.shape[0]), *_compressed_shapes(weight, transposable))


@_grad_weight.register_batching
def _(batch, in_dims, dy, x, indices, backend):
    """Per-sample dW of samples of at most 4 tokens (per-sample gradients, vmap of grad): each kept
    weight's products gathered from its group of 4 inputs straight into the stacked output, in one
    pass instead of one kernel call per sample (at one token, mostly its fixed cost) and a stack."""
    if in_dims[0] is None or in_dims[1] is None or in_dims[2] is not None:
        return None
    dy, x = dy.movedim(in_dims[0], 0), x.movedim(in_dims[1], 0)
    (tokens, out), k = dy.shape[1:], x.shape[2]
    if tokens > 4:
        return None
    positions = (unpack_columns(indices, k) % 4).view(1, 1, out, k // 4, 2)  # kept positions per group
    groups = x.reshape(batch, tokens, 1, k // 4, 4).expand(batch, tokens, out, k // 4, 4)
    kept = torch.gather(groups, 4, positions.expand(batch, tokens, out, k // 4, 2)).view(batch, tokens, out, k // 2)
    if tokens == 1:
        return kept[:, 0].mul_(dy[:, 0, :, None]), 0
    return torch.einsum("sto,stoj->soj", dy, kept), 0


def _setup_product(ctx, inputs, output):
    """The matmul's and dW's (a, b, indices, backend): their operands and W's indices."""
    ctx.save_for_backward(*inputs[:3])
    ctx.backend = inputs[3]


def _backward_matmul(ctx, ggy):
    """x Wᵀ is bilinear in (x, W): x gets ggY W (the row-wise dX product), W ggYᵀx at its kept positions."""
    x, values, indices = saved_tensors(ctx, "semi_linear")
    ggy = ggy.contiguous()
    needs_x, needs_values = ctx.needs_input_grad[:2]
    d_x = _grad_input(ggy, values, indices, None, None, ctx.backend) if needs_x else None
    d_values = _grad_weight(ggy, x, indices, ctx.backend) if needs_values else None
    return d_x, d_values, None, None


def _setup_grad_input(ctx, inputs, output):
    dy, values, indices, indices_t, transpose_map, backend = inputs
    ctx.save_for_backward(dy, values, indices)
    ctx.backend = backend


def _backward_grad_input(ctx, ggx):
    """dX = dY W: dY gets ggX Wᵀ (the forward product), W dYᵀggX at its kept positions."""
    dy, values, indices = saved_tensors(ctx, "semi_linear")
    ggx = ggx.contiguous()
    needs_dy, needs_values = ctx.needs_input_grad[:2]
    d_dy = _matmul(ggx, values, indices, ctx.backend) if needs_dy else None
    d_values = _grad_weight(dy, ggx, indices, ctx.backend) if needs_values else None
    return d_dy, d_values, None, None, None, None


def _backward_grad_weight(ctx, ggw):
    """dW = dYᵀX at W's kept positions: dY gets X ggWᵀ, X dY ggW, ggW on those positions."""
    dy, x, indices = saved_tensors(ctx, "semi_linear")
    ggw = ggw.contiguous()
    needs_dy, needs_x = ctx.needs_input_grad[:2]
    d_dy = _matmul(x, ggw, indices, ctx.backend) if needs_dy else None
    d_x = _grad_input(dy, ggw, indices, None, None, ctx.backend) if needs_x else None
    return d_dy, d_x, None, None


def _setup_static(ctx, inputs, output):
    x, values, bias, indices, indices_t, transpose_map, backend = inputs
    ctx.save_for_backward(x, values, indices, indices_t, transpose_map)
    ctx.backend, ctx.has_bias = backend, bias is not None


def _backward_static(ctx, dy):
    x, values, indices, indices_t, transpose_map = saved_tensors(ctx, "semi_linear")
    dy = dy.contiguous()
    needs_dx, needs_dw, needs_db = ctx.needs_input_grad[:3]
    dx = _grad_input(dy, values, indices, indices_t, transpose_map, ctx.backend) if needs_dx else None
    dw = _grad_weight(dy, x, indices, ctx.backend) if needs_dw else None
    db = dy.sum(0) if ctx.has_bias and needs_db else None
    return dx, dw, db, None, None, None, None


def _setup_probed(ctx, inputs, output):
    x, values, bias, _, indices, indices_t, transpose_map, probe_indices, backend = inputs
    ctx.save_for_backward(x, values, indices, indices_t, transpose_map, probe_indices)
    ctx.backend, ctx.has_bias = backend, bias is not None


def _backward_probed(ctx, dy):
    x, values, indices, indices_t, transpose_map, probe_indices = saved_tensors(ctx, "semi_linear")
    dy = dy.contiguous()
    needs_dx, needs_dw, needs_db, needs_probe = ctx.needs_input_grad[:4]
    dx = _grad_input(dy, values, indices, indices_t, transpose_map, ctx.backend) if needs_dx else None
    dw = _grad_weight(dy, x, indices, ctx.backend) if needs_dw else None
    db = dy.sum(0) if ctx.has_bias and needs_db else None
    dprobe = _grad_weight(dy, x, probe_indices, ctx.backend) if needs_probe else None
    return dx, dw, db, dprobe, None, None, None, None, None


def _setup_dynamic(ctx, inputs, output):
    x, weight, bias, transposable, backend = inputs
    _, values, indices, values_t, indices_t = output
    ctx.save_for_backward(x, values, indices, values_t, indices_t)
    ctx.backend, ctx.has_bias = backend, bias is not None
    ctx.set_materialize_grads(False)  # the compressed copy is an internal output: no zero gradients for it


def _backward_dynamic(ctx, dy, *_compressed_grads):
    x, values, indices, values_t, indices_t = saved_tensors(ctx, "semi_linear_dynamic")
    if dy is None:
        return None, None, None, None, None
    dy = dy.contiguous()
    needs_dx, needs_dw, needs_db = ctx.needs_input_grad[:3]
    dx = None
    if needs_dx and values_t.numel() > 0:   # transposable: the forward product on the fresh Wᵀ
        dx = _matmul(dy, values_t, indices_t, ctx.backend)
    elif needs_dx:
        dx = _grad_input(dy, values, indices, None, None, ctx.backend)
    dw = dy.T.mm(x) if needs_dw else None  # straight-through: the dense gradient
    db = dy.sum(0) if ctx.has_bias and needs_db else None
    return dx, dw, db, None, None


def _linear_tangent(x, values, indices, d_x, d_values, d_bias, backend):
    """The tangent of x Wᵀ (+ bias), bilinear in (x, W)."""
    return tangent([None if d_x is None else _matmul(d_x, values, indices, backend),
                    None if d_values is None else _matmul(x, d_values, indices, backend),
                    None if d_bias is None else d_bias.expand(x.shape[0], values.shape[0])],
                   lambda: x.new_zeros(x.shape[0], values.shape[0]))


def _jvp_matmul(args, tangents):
    x, values, indices, backend = args
    return _linear_tangent(x, values, indices, *map(as_operand, tangents[:2]), None, backend)


def _jvp_grad_input(args, tangents):
    dy, values, indices, indices_t, transpose_map, backend = args
    d_dy, d_values = map(as_operand, tangents[:2])
    return tangent(
        [None if d_dy is None else _grad_input(d_dy, values, indices, indices_t, transpose_map, backend),
         None if d_values is None else _grad_input(dy, d_values, indices, indices_t, transpose_map, backend)],
        lambda: dy.new_zeros(dy.shape[0], 2 * values.shape[1]))


def _jvp_grad_weight(args, tangents):
    dy, x, indices, backend = args
    d_dy, d_x = map(as_operand, tangents[:2])
    return tangent([None if d_dy is None else _grad_weight(d_dy, x, indices, backend),
                    None if d_x is None else _grad_weight(dy, d_x, indices, backend)],
                   lambda: x.new_zeros(dy.shape[1], x.shape[1] // 2))


def _jvp_static(args, tangents):
    x, values, bias, indices, indices_t, transpose_map, backend = args
    return _linear_tangent(x, values, indices, *map(as_operand, tangents[:3]), backend)


def _jvp_probed(args, tangents):
    """The probe enters as a zero perturbation of W at its own positions: its tangent acts like W's."""
    x, values, bias, _, indices, indices_t, transpose_map, probe_indices, backend = args
    d_x, d_values, d_bias, d_probe = map(as_operand, tangents[:4])
    y = _linear_tangent(x, values, indices, d_x, d_values, d_bias, backend)
    return y if d_probe is None else y + _matmul(x, d_probe, probe_indices, backend)


# The static products' backwards and forward-mode rules are written in the family's differentiable
# ops (second and higher derivatives run on the same kernels); the dynamic mode's straight-through
# gradient is first-order (its mask is re-chosen from the weight on every call).
_matmul.register_autograd(_backward_matmul, _setup_product, differentiable=True, jvp=_jvp_matmul)
_grad_input.register_autograd(_backward_grad_input, _setup_grad_input, differentiable=True, jvp=_jvp_grad_input)
_grad_weight.register_autograd(_backward_grad_weight, _setup_product, differentiable=True, jvp=_jvp_grad_weight)
_linear.register_autograd(_backward_static, _setup_static, differentiable=True, jvp=_jvp_static)
_linear_probed.register_autograd(_backward_probed, _setup_probed, differentiable=True, jvp=_jvp_probed)
# No forward-mode rule: the straight-through gradient is no derivative of the forward.
_linear_dynamic.register_autograd(_backward_dynamic, _setup_dynamic)


def semi_linear(x, weight, bias=None, *, grad_probe=None):
    """Y = x @ weight.to_dense().T + bias with ``weight`` a :class:`SemiStructuredMatrix`.

    x: (..., in_features); weight (out_features, in_features); returns
    (..., out_features). ``weight.values`` (if it requires grad) receives dYᵀX at
    the kept positions only, shape (out, in/2). If the matrix carries Wᵀ's
    indices (transposable 2:4), dX = dY W runs the forward product on Wᵀ, with
    Wᵀ's values read out of ``values`` through ``weight.transpose_map()``.
    ``grad_probe`` (optional, a SemiStructuredMatrix of the same shape, values requiring
    grad) receives dYᵀX at *its* kept positions, e.g. the complement of the mask for
    dense-gradient scores; its values are not read.
    """
    if not isinstance(weight, SemiStructuredMatrix):
        raise TypeError(f"weight must be a sparsekern.SemiStructuredMatrix, got {type(weight).__name__}")
    check_linear_inputs("semi_linear", x, weight.shape, weight.dtype, weight.device, bias)
    n, k = weight.shape
    lead = x.shape[:-1]
    transpose_map = None if weight.indices_t is None else weight.transpose_map()
    args = (token_matrix(x, k), weight.values.contiguous(), bias)
    if grad_probe is None:
        y = _linear(*args, weight.indices, weight.indices_t, transpose_map, traced_backend())
    else:
        if not isinstance(grad_probe, SemiStructuredMatrix) or grad_probe.shape != weight.shape:
            raise ValueError(f"grad_probe must be a SemiStructuredMatrix of shape {weight.shape}, got "
                             f"{getattr(grad_probe, 'shape', type(grad_probe).__name__)}")
        if grad_probe.dtype != weight.dtype or grad_probe.values.device != weight.values.device:
            raise TypeError(f"grad_probe is {grad_probe.dtype} on {grad_probe.values.device}, expected "
                            f"{weight.dtype} on {weight.values.device}")
        y = _linear_probed(*args, grad_probe.values, weight.indices, weight.indices_t, transpose_map,
                           grad_probe.indices, traced_backend())
    return with_leading_dims(y, lead, n)


def semi_linear_dynamic(x, weight, bias=None, *, transposable=True):
    """Y = x @ (weight * prune_2to4(weight, transposable)).T + bias, pruning on every call.

    weight: dense (out_features, in_features) tensor (the master weight). The
    forward and dX run 2:4 kernels on the freshly pruned copy; ``weight`` receives
    the straight-through gradient dYᵀX (dense).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"weight must be a 2-D tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    check_2to4_shape(weight.shape, transposable)
    check_linear_inputs("semi_linear_dynamic", x, tuple(weight.shape), weight.dtype, weight.device, bias)
    n, k = weight.shape
    lead = x.shape[:-1]
    y = _linear_dynamic(token_matrix(x, k), weight.contiguous(), bias, bool(transposable),
                        traced_backend())[0]
    return with_leading_dims(y, lead, n)
