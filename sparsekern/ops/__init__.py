"""Differentiable operators: shape/dtype/device checks, then kernels from the registry."""
from .bsr_linear import bsr_linear
from .semi_linear import semi_linear, semi_linear_dynamic  # noqa: F401  (2:4)
from .low_rank_linear import low_rank_linear

__all__ = ["bsr_linear", "low_rank_linear"]
