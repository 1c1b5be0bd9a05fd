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
import torch

from ..formats.semi_structured import SemiStructuredMatrix
from ..kernels import forced_backend, select_kernel
from ..pruning import check_2to4_shape
from .checks import check_linear_inputs


def _kernel(product, like, backend):
    return select_kernel(product, like.device, like.dtype, backend)[1]


def _grad_input(dy, values, indices, indices_t, transpose_map, backend):
    return _kernel("semi_grad_input", dy, backend)(dy, values, indices, indices_t, transpose_map)


class _SemiLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, bias, indices, indices_t, transpose_map, backend):
        y = _kernel("semi_forward", x, backend)(x, values, indices)
        if bias is not None:
            y += bias
        ctx.save_for_backward(x, values, indices, indices_t, transpose_map)
        ctx.backend, ctx.has_bias = backend, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, values, indices, indices_t, transpose_map = ctx.saved_tensors
        dy = dy.contiguous()
        needs_dx, needs_dw, needs_db = ctx.needs_input_grad[:3]
        dx = _grad_input(dy, values, indices, indices_t, transpose_map, ctx.backend) if needs_dx else None
        dw = _kernel("semi_grad_weight", dy, ctx.backend)(dy, x, indices) if needs_dw else None
        db = dy.sum(0) if ctx.has_bias and needs_db else None
        return dx, dw, db, None, None, None, None


class _SemiLinearDynamic(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, transposable, backend):
        values, indices, values_t, indices_t = _kernel("semi_prune_compress", weight, backend)(weight, transposable)
        y = _kernel("semi_forward", x, backend)(x, values, indices)
        if bias is not None:
            y += bias
        ctx.save_for_backward(x, values, indices, values_t, indices_t)
        ctx.backend, ctx.has_bias = backend, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, values, indices, values_t, indices_t = ctx.saved_tensors
        dy = dy.contiguous()
        needs_dx, needs_dw, needs_db = ctx.needs_input_grad[:3]
        dx = None
        if needs_dx and values_t is not None:   # transposable: the forward product on the fresh Wᵀ
            dx = _kernel("semi_forward", dy, ctx.backend)(dy, values_t, indices_t)
        elif needs_dx:
            dx = _grad_input(dy, values, indices, None, None, ctx.backend)
        dw = dy.T.mm(x) if needs_dw else None  # straight-through: the dense gradient
        db = dy.sum(0) if ctx.has_bias and needs_db else None
        return dx, dw, db, None, None


def semi_linear(x, weight, bias=None):
    """Y = x @ weight.to_dense().T + bias with ``weight`` a :class:`SemiStructuredMatrix`.

    x: (..., in_features); weight (out_features, in_features); returns
    (..., out_features). ``weight.values`` (if it requires grad) receives dYᵀX at
    the kept positions only, shape (out, in/2). If the matrix carries Wᵀ's
    indices (transposable 2:4), dX = dY W runs the forward product on Wᵀ, with
    Wᵀ's values read out of ``values`` through ``weight.transpose_map()``.
    """
    if not isinstance(weight, SemiStructuredMatrix):
        raise TypeError(f"weight must be a sparsekern.SemiStructuredMatrix, got {type(weight).__name__}")
    check_linear_inputs("semi_linear", x, weight.shape, weight.dtype, weight.device, bias)
    n, k = weight.shape
    lead = x.shape[:-1]
    transpose_map = None if weight.indices_t is None else weight.transpose_map()
    y = _SemiLinear.apply(x.reshape(-1, k).contiguous(), weight.values.contiguous(), bias,
                          weight.indices, weight.indices_t, transpose_map, forced_backend())
    return y.view(*lead, n)


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
    y = _SemiLinearDynamic.apply(x.reshape(-1, k).contiguous(), weight.contiguous(), bias, bool(transposable),
                                 forced_backend())
    return y.view(*lead, n)
