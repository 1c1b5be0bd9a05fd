"""sparsekern: kernels that make dimensionality-reduced training faster than dense.

Importing is cheap: no GPU query, no compiled extension and no triton is loaded
until a kernel first runs.
"""
from . import kernels, ops
from .formats import BlockLayout, BlockSparseMatrix
from .kernels import BackendUnavailableError, use_backend
from .nn import LowRankLinear, SparseLinear
from .formats import SemiStructuredMatrix  # noqa: F401  (2:4)
from .nn import SemiSparseLinear  # noqa: F401  (2:4)
from .pruning import prune_2to4  # noqa: F401  (2:4)
from . import methods  # noqa: E402  (after nn: methods build on it)
from .methods import DLRT, sparsify

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "BlockLayout",
    "BlockSparseMatrix",
    "DLRT",
    "LowRankLinear",
    "SparseLinear",
    "kernels",
    "methods",
    "ops",
    "sparsify",
    "use_backend",
]
