"""Kernels: one sub-package per family of products, each with several backends.

Importing a family registers its backends; none loads compiled code or triton yet.
"""
from . import bsr, conv, floor, lowrank, microkernel, output_cache, semi  # noqa: F401  (register the kernels)
from .registry import BackendUnavailableError, available_backends, forced_backend, select_kernel, use_backend

__all__ = ["BackendUnavailableError", "available_backends", "forced_backend", "select_kernel", "use_backend"]
