"""Drop-in modules whose weights live in sparsekern formats."""
from .sparse_linear import SparseLinear

__all__ = ["SparseLinear"]
