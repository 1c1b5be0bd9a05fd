"""Backend registry: which implementation of a product runs on which tensors.

A *product* is one kernel contract (e.g. ``"bsr_forward"``); a *backend* is one
implementation of it (``"reference"``, ``"dense"``, ``"cpu"``, ``"triton"``, ``"cuda"``;
``dense`` is the vendor composite on torch's GEMMs in the input dtype, where the reference
is not already that: the dense masked GEMM of a sparse format, the factor GEMMs of the
low-rank products; the floor rule falls back to it). Each
registration carries an ``unavailable(device, dtype)`` probe that returns None
when the backend can run on such tensors, or a sentence saying why not. Probes
are called at dispatch time, never at import time, so importing sparsekern
queries no GPU and loads no compiled code.

Selection: a backend forced with :func:`use_backend` is used or an error is
raised (never a silent fallback); otherwise the first available backend in the
device's priority list wins, and ``reference`` always can. On CPU, a dtype the compiled
kernels lack runs the ``dense`` composite where a family has one.
"""
import contextvars
from dataclasses import dataclass
from typing import Callable, Optional

import torch

BACKEND_NAMES = ("reference", "dense", "cpu", "triton", "cuda")
# Fastest first. Triton on CPU (TRITON_INTERPRET=1) is for tests only: forced, never chosen.
_PRIORITY = {
    "cpu": ("cpu", "dense", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("sparsekern_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the given tensors (the message says why)."""


@dataclass(frozen=True)
class _Registration:
    fn: Callable
    unavailable: Callable[[torch.device, torch.dtype], Optional[str]]


_kernels: dict[str, dict[str, _Registration]] = {}


def _always_available(device, dtype):
    return None


def register_kernel(product, backend, fn, unavailable=_always_available):
    """Register ``fn`` as ``backend``'s implementation of ``product``."""
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKEND_NAMES}")
    _kernels.setdefault(product, {})[backend] = _Registration(fn, unavailable)


class use_backend:  # noqa: N801  (a function to its callers; a class so it works both ways)
    """Force every sparsekern kernel to run on backend ``name``.

    ``name`` is one of "reference", "dense", "cpu", "triton", "cuda", or None for
    automatic selection. As a context manager it holds for the block only::

        with sparsekern.use_backend("reference"):
            y = layer(x)

    As a plain call it holds from then on (in this thread or task), until
    ``use_backend(None)``. Kernels that the backend cannot run on the given tensors
    raise :class:`BackendUnavailableError` instead of falling back.
    """

    def __init__(self, name):
        if name is not None and name not in BACKEND_NAMES:
            raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES} or None")
        self._token = _forced.set(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _forced.reset(self._token)
        return False


def forced_backend():
    """The backend forced by the innermost :func:`use_backend`, or None."""
    return _forced.get()


def select_kernel(product, device, dtype, backend=None):
    """Return ``(backend_name, fn)`` for ``product`` on tensors of ``device``/``dtype``.

    ``backend`` overrides the context (autograd passes the forward's choice to
    backward, which may run on another thread where the context is not set).
    """
    implementations = _kernels.get(product)
    if not implementations:
        raise KeyError(f"no kernel registered for product {product!r}")
    name = backend if backend is not None else _forced.get()
    if name is not None:
        registration = implementations.get(name)
        if registration is None:
            raise BackendUnavailableError(
                f"backend {name!r} does not implement {product!r} (implemented by: {sorted(implementations)})")
        reason = registration.unavailable(device, dtype)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {name!r} cannot run {product!r} on {device.type} {dtype}: {reason}")
        return name, registration.fn
    for candidate in _PRIORITY.get(device.type, ("reference",)):
        registration = implementations.get(candidate)
        if registration is not None and registration.unavailable(device, dtype) is None:
            return candidate, registration.fn
    return "reference", implementations["reference"].fn


def available_backends(product, device, dtype):
    """Names of the backends that could run ``product`` on such tensors (for tests and benchmarks)."""
    return [name for name, reg in _kernels.get(product, {}).items() if reg.unavailable(device, dtype) is None]
