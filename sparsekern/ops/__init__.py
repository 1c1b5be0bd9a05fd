"""Differentiable operators: shape/dtype/device checks, then kernels from the registry."""
from .bsr_linear import bsr_linear

__all__ = ["bsr_linear"]
