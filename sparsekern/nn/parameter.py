"""Changing a Parameter's shape in place, for structures that grow and shrink."""
import torch


def replace_data_(param, data):
    """Give ``param`` the tensor ``data`` (any shape), keeping the Parameter object.

    Optimizers keep holding the same object; ``.grad`` is cleared because its shape
    is stale. Autograd caches one AccumulateGrad node per leaf with the leaf's old
    shape, and keeps it while any old graph is alive (e.g. the previous ``loss``):
    the next backward would then fail with "invalid gradient ... expected shape
    <old>". torch drops that cache only when ``.data`` changes dtype, hence the
    brief detour through another dtype.
    """
    other = torch.float32 if data.dtype == torch.float64 else torch.float64
    param.data = data.new_empty(0, dtype=other)
    param.data = data
    param.grad = None
    # A graph recorded before the swap must not put its gradient on the new structure:
    # a new version makes its backward refuse (ops.checks.saved_tensors says why).
    torch.autograd.graph.increment_version(param)
