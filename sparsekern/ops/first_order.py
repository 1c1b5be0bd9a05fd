"""Backwards that autograd cannot differentiate again, refusing a second backward clearly.

Most ops' backwards are written in differentiable ops (the block-sparse and static 2:4
products, the low-rank layers under ``create_graph=True``); the rest, the dynamic 2:4 mode's
straight-through gradient and DLRT's K/L-gradients, are no gradient of a function to
differentiate, and their kernels' outputs carry no graph. Under ``create_graph=True`` (gradient
penalties, Hessian-vector products, MAML-style inner steps) a gradient without a graph is
silently a constant: a penalty on dX would get no gradient on the weights. torch's
``once_differentiable`` guards only where an incoming gradient requires grad, which misses the
common case of a weight that does (dy a constant, dX = dy W). Here every tensor a backward returns under ``create_graph=True`` hangs
from a node that raises a clear error if a second backward reaches it; first-order training
with ``create_graph=True`` is unaffected. Under torch.func the same holds by another route:
functorch's autograd cannot hold such a node, so a first-order backward raises the error at once
where an enclosing transform (grad of grad) would differentiate it.
"""
import functools

import torch
from torch._C import _functions

from .transforms import differentiation_levels, transformed


def first_order(name):
    """Decorator for a ``backward(ctx, *grads)`` of the layer or op ``name`` (see the module docstring)."""
    message = (f"{name} is differentiable once: its backward runs kernels that autograd cannot differentiate, so "
               "a second backward through it (a gradient penalty, a Hessian-vector product, any gradient of "
               "a gradient taken with create_graph=True) is not supported").encode()

    def wrap(backward):
        @functools.wraps(backward)
        def run(ctx, *grads):
            if transformed() and differentiation_levels() > 1:
                raise RuntimeError(message.decode())
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if transformed() or not torch.is_grad_enabled():
                return outputs
            single = isinstance(outputs, torch.Tensor)
            outputs = (outputs,) if single else tuple(outputs)
            tensors = [o for o in outputs if isinstance(o, torch.Tensor)]
            if not tensors:
                return outputs[0] if single else outputs
            guarded = _functions.DelayedError(message, len(tensors))(
                *[t.detach().requires_grad_() for t in tensors])
            guarded = iter((guarded,) if isinstance(guarded, torch.Tensor) else guarded)
            outputs = tuple(next(guarded) if isinstance(o, torch.Tensor) else o for o in outputs)
            return outputs[0] if single else outputs
        return run
    return wrap
