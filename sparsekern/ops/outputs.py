"""How the linear ops take (..., in) inputs as a (tokens, in) matrix and hand back their
(tokens, out) result as (..., out)."""
import math

import torch


def token_matrix(x, features):
    """``x`` (..., features) as a contiguous (tokens, features) matrix. The token count is
    spelled out, not -1: under torch.func.vmap an empty batch cannot infer it."""
    return x.reshape(math.prod(x.shape[:-1]), features).contiguous()


def with_leading_dims(y, lead, out):
    """``y`` (tokens, out) as (*lead, out), a tensor that is not a view: FSDP2 warns on a module
    output that is a view, since an in-place op on it would skip its pre-backward hook. Same
    storage, no copy, as torch.matmul makes its output. A compiled graph's outputs are the
    compiler's business (dynamo cannot trace ``_is_view``)."""
    y = y.view(*lead, out)
    if torch.compiler.is_compiling() or not y._is_view():
        return y
    return torch.ops.aten._unsafe_view(y, y.shape)
