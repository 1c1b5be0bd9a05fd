"""Kernels: one sub-package per family of products, each with several backends."""
from . import bsr  # noqa: F401  (registers the block-sparse kernels)
from . import semi  # noqa: F401  (registers the 2:4 kernels)
from . import lowrank  # noqa: F401  (registers the low-rank kernels)
from .registry import BackendUnavailableError, available_backends, forced_backend, select_kernel, use_backend

__all__ = ["BackendUnavailableError", "available_backends", "forced_backend", "select_kernel", "use_backend"]
