"""Drop-in modules whose weights live in sparsekern formats."""
from .low_rank_linear import LowRankLinear
from .sparse_linear import SparseLinear

__all__ = ["LowRankLinear", "SparseLinear"]
