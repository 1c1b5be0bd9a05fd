"""Drop-in modules whose weights live in sparsekern formats."""
from .low_rank_linear import LowRankLinear
from .sparse_linear import SparseLinear
from .semi_sparse_linear import SemiSparseLinear  # noqa: F401  (2:4)

__all__ = ["LowRankLinear", "SparseLinear"]
