"""Forward-mode derivatives (jvp) of the ops: torch.func.jvp, jacfwd, hessian and
torch.autograd.forward_ad.

Every product is bilinear in its two tensor operands (a bias, where there is one, enters
linearly), so an op's tangent is the same op on one operand's tangent and the other operand,
summed: rules written in the family's ops, on the same kernels. An op registers a rule
``jvp(args, tangents)`` (tangents None where an input has none); its Functions save the inputs
for it (``save_inputs``) and read them back (``saved_inputs``).
"""
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

_TENSOR = object()  # where a saved input's tensor goes back


def save_inputs(ctx, args):
    """Keep ``args`` (any nesting of tensors and constants) for the jvp."""
    leaves, spec = tree_flatten(args)
    ctx.save_for_forward(*(leaf for leaf in leaves if isinstance(leaf, torch.Tensor)))
    ctx.forward_inputs = [_TENSOR if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves], spec


def saved_inputs(ctx):
    leaves, spec = ctx.forward_inputs
    tensors = iter(ctx.saved_tensors)
    return tree_unflatten([next(tensors) if leaf is _TENSOR else leaf for leaf in leaves], spec)


def tangent(terms, zeros):
    """The sum of the terms that are not None (a term is None where its input has no tangent), or
    ``zeros()`` where none is: a Function's jvp returns a tensor for every output."""
    present = [t for t in terms if t is not None]
    if not present:
        return zeros()
    total = present[0]
    for term in present[1:]:
        total = total + term
    return total


def as_operand(t):
    """A tangent as the kernels take an operand: contiguous (tangents arrive expanded or strided)."""
    return None if t is None else t.contiguous()
