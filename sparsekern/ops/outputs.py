"""How the linear ops hand back their (tokens, out) result as (..., out)."""
import torch


def with_leading_dims(y, lead, out):
    """``y`` (tokens, out) as (*lead, out), a tensor that is not a view: FSDP2 warns on a module
    output that is a view, since an in-place op on it would skip its pre-backward hook. Same
    storage, no copy, as torch.matmul makes its output. A compiled graph's outputs are the
    compiler's business (dynamo cannot trace ``_is_view``)."""
    y = y.view(*lead, out)
    if torch.compiler.is_compiling() or not y._is_view():
        return y
    return torch.ops.aten._unsafe_view(y, y.shape)
