"""How the ops reach the kernels: the backend a graph was traced with, and the registry lookup.

The ops are torch.library custom ops with fake implementations, so torch.compile traces each
linear as graph nodes (no graph break) and the registry dispatches at run time; a compiled
graph keeps the backend that was forced when it was traced.
"""
from ..kernels import forced_backend, select_kernel
from ..kernels.floor import with_floor


def traced_backend():
    """The backend forced by ``use_backend`` (None: automatic), a trace-time constant."""
    return forced_backend()


# = torch.compiler.assume_constant_result(traced_backend), which would import torch._dynamo
# (and with it triton) at `import sparsekern`; the decorator only sets this flag (tested).
traced_backend._dynamo_marked_constant = True


def kernel(product, like, backend):
    """The registry's implementation of ``product`` for tensors like ``like``; an automatic
    choice of compiled kernels is subject to the floor rule (kernels/floor.py)."""
    name, fn = select_kernel(product, like.device, like.dtype, backend)
    if backend is None and forced_backend() is None:
        return with_floor(product, fn, like, name)
    return fn
