"""Differentiable operators: shape/dtype/device checks, then kernels from the registry."""
from .bsr_linear import bsr_linear
from .conv2d import sparse_conv2d
from .lowrank_linear import low_rank_linear
from .probe import BlockProbe
from .semi_linear import semi_linear, semi_linear_dynamic

__all__ = ["BlockProbe", "bsr_linear", "low_rank_linear", "semi_linear", "semi_linear_dynamic", "sparse_conv2d"]
