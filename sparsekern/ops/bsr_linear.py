"""``bsr_linear``: Y = X Wᵀ + b with W block-sparse, and its autograd.

Forward, dX and dW each run a block-sparse kernel from the registry; nothing
dense of W's shape is formed. dW is the *sampled* product dYᵀX computed on the
stored blocks only. An optional ``grad_probe`` asks for dW on another set of
blocks (a superset, or every block for dense scores) without changing the
forward: this is how RigL/SNFS/Top-KAST/DPF obtain their scores.
"""
import torch

from ..formats.block_sparse import BlockSparseMatrix
from ..kernels import forced_backend, select_kernel


def _kernel(product, like, backend):
    return select_kernel(product, like.device, like.dtype, backend)[1]


class _BsrLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, bias, probe_values, layout, probe_layout, backend):
        y = _kernel("bsr_forward", x, backend)(x, values, layout)
        if bias is not None:
            y += bias
        ctx.save_for_backward(x, values)
        ctx.layout, ctx.probe_layout, ctx.backend = layout, probe_layout, backend
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, values = ctx.saved_tensors
        layout, probe_layout, backend = ctx.layout, ctx.probe_layout, ctx.backend
        dy = dy.contiguous()
        needs_dx, needs_dw, needs_db, needs_probe = ctx.needs_input_grad[:4]
        dx = _kernel("bsr_grad_input", dy, backend)(dy, values, layout) if needs_dx else None
        db = dy.sum(0) if ctx.has_bias and needs_db else None
        dprobe = dw = None
        if needs_probe:
            dprobe = _kernel("bsr_grad_weight", dy, backend)(dy, x, probe_layout)
        if needs_dw:
            if dprobe is not None:
                # Blocks the probe already covers are not computed twice.
                pos = probe_layout.positions_of(layout)
                covered = pos >= 0
                if bool(covered.all()):
                    dw = dprobe[pos]
            if dw is None:
                dw = _kernel("bsr_grad_weight", dy, backend)(dy, x, layout)
        return dx, dw, db, dprobe, None, None, None


def _check_inputs(x, weight, bias, grad_probe):
    if not isinstance(weight, BlockSparseMatrix):
        raise TypeError(f"weight must be a sparsekern.BlockSparseMatrix, got {type(weight).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    n, k = weight.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)} but weight of shape {(n, k)} needs a last dim of {k}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x has dtype {x.dtype} but weight values have dtype {weight.dtype}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"bsr_linear needs floating tensors, got {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n},) for weight of shape {(n, k)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise TypeError(f"bias is {bias.dtype} on {bias.device}, expected {x.dtype} on {x.device}")
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
    x2d = x.reshape(-1, k).contiguous()
    probe_values = None if grad_probe is None else grad_probe.values
    probe_layout = None if grad_probe is None else grad_probe.layout
    y = _BsrLinear.apply(x2d, weight.values.contiguous(), bias, probe_values, weight.layout, probe_layout, forced_backend())
    return y.view(*lead, n)
