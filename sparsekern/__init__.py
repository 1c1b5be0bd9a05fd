"""sparsekern: kernels that make dimensionality-reduced training faster than dense.

Importing is cheap: no GPU query, no compiled extension and no triton is loaded
until a kernel first runs.
"""
from . import kernels, ops
from .formats import BlockLayout, BlockSparseMatrix
from .kernels import BackendUnavailableError, use_backend
from .nn import SparseLinear

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "BlockLayout",
    "BlockSparseMatrix",
    "SparseLinear",
    "kernels",
    "ops",
    "use_backend",
]
