"""torch.autocast for the sparse layers: compute as nn.Linear would inside an autocast region.

nn.Linear under autocast casts its input and weight to the region's low-precision dtype and
returns that dtype, its master weights staying fp32. The sparse layers' ops are custom ops,
which autocast does not reach, so each layer casts its operands itself; the casts are
differentiable, so the fp32 parameters receive their gradients as with nn.Linear.
"""
import torch


def autocast_dtype(x, weight_dtype):
    """The dtype to compute in for input ``x`` and weights of ``weight_dtype``: autocast's
    low-precision dtype inside an autocast region (float64 is left alone, as autocast does),
    else None (no cast)."""
    device = x.device.type
    if weight_dtype == torch.float64 or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def outside_autocast(x):
    """A context in which the already-cast op runs without autocast, as nn.Linear's matmul does:
    the kernels' own internals (reference matmuls, pruning scores) keep their precision."""
    return torch.autocast(x.device.type, enabled=False)


def cast(tensor, dtype):
    """``tensor`` in ``dtype`` (None passes through; so does an absent tensor)."""
    return tensor if tensor is None or dtype is None else tensor.to(dtype)
