"""Input checks shared by the linear ops: one wording for the same mistakes."""
import torch


def check_linear_inputs(op, x, weight_shape, weight_dtype, weight_device, bias):
    """x (..., in) against a weight of ``weight_shape`` (out, in) and an optional bias (out,)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    n, k = weight_shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)} but weight of shape {(n, k)} needs a last dim of {k}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{op} needs floating tensors, got {x.dtype}")
    if x.dtype != weight_dtype:
        raise TypeError(f"x has dtype {x.dtype} but the weight has dtype {weight_dtype}")
    if x.device != weight_device:
        raise ValueError(f"x is on {x.device} but the weight is on {weight_device}")
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n},) for weight of shape {(n, k)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise TypeError(f"bias is {bias.dtype} on {bias.device}, expected {x.dtype} on {x.device}")


def check_layer_input(x, in_features):
    """A layer's input: a tensor of at least 1 dim whose last dim is ``in_features``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"input has shape {tuple(x.shape)}, expected last dim {in_features} (and at least 1 dim)")


def saved_tensors(ctx, op):
    """``ctx.saved_tensors``, with the reason spelled out when a weight of the forward was
    replaced before the backward (restructuring a layer bumps its values' version, so autograd
    refuses rather than putting the old structure's gradient on the new one)."""
    try:
        return ctx.saved_tensors
    except RuntimeError as exc:
        if "modified by an inplace operation" not in str(exc):
            raise
        raise RuntimeError(f"{op}: a weight used by this forward was replaced or modified in place before "
                           "the backward (set_block_mask, set_mask, set_factors or a sparse-training update "
                           "between forward and backward?); run the backward first") from exc
