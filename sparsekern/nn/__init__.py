"""Drop-in modules whose weights live in sparsekern formats."""
from .low_rank_linear import LowRankLinear
from .semi_sparse_linear import SemiSparseLinear
from .sparse_linear import SparseLinear

__all__ = ["LowRankLinear", "SemiSparseLinear", "SparseLinear"]
