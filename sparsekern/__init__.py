"""sparsekern: kernels that make dimensionality-reduced training faster than dense.

Importing is cheap: no GPU query, no compiled extension and no triton is loaded
until a kernel first runs.
"""
from . import kernels, ops
from .formats import BlockLayout, BlockSparseMatrix, SemiStructuredMatrix
from .kernels.output_cache import empty_output_cache, output_cache_info
from .kernels import BackendUnavailableError, use_backend
from .nn import LowRankLinear, SemiSparseLinear, SparseLinear
from .formats.semi_prune import prune_2to4
from . import methods  # after nn: methods build on the layers
from .methods import DLRT, densify, sparsify

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "BlockLayout",
    "BlockSparseMatrix",
    "DLRT",
    "LowRankLinear",
    "SemiSparseLinear",
    "SemiStructuredMatrix",
    "SparseLinear",
    "densify",
    "kernels",
    "empty_output_cache",
    "methods",
    "ops",
    "output_cache_info",
    "prune_2to4",
    "sparsify",
    "use_backend",
]
