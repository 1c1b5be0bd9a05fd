"""What torch.func transforms are active around a call (functorch's interpreter stack)."""
import torch
import torch.autograd.forward_ad as forward_ad
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

_TransformType = torch._C._functorch.TransformType


def transformed():
    """Whether a torch.func transform (grad, vmap, ...) is active (never while dynamo traces: it
    cannot read the stack, and a compiled graph holds the ops as custom ops)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def differentiation_levels():
    """How many reverse-mode transforms (grad, vjp, jacrev) are on the stack; in a backward, its own is one."""
    return _count(_TransformType.Grad)


def forward_mode():
    """Whether a forward-mode transform (jvp, jacfwd, hessian) is on the stack."""
    return transformed() and _count(_TransformType.Jvp) > 0


def dual_level_active():
    """Whether torch.autograd.forward_ad's dual level is entered (inputs may carry tangents)."""
    return forward_ad._current_level >= 0


def refuse_forward_mode(name, *, active=False):
    """A clear error for ``name`` under forward mode (``active``: known to be, e.g. in a jvp)."""
    if active or forward_mode():
        raise RuntimeError(f"{name} has no forward-mode derivative (torch.func.jvp, jacfwd, hessian, "
                           "torch.autograd.forward_ad); use reverse mode (torch.func.grad, vjp, jacrev, vmap of "
                           "them) or torch.autograd's backward")


def _count(kind):
    return sum(interpreter.key() == kind for interpreter in retrieve_all_functorch_interpreters())
