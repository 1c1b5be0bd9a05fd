from .block_sparse import BlockLayout, BlockSparseMatrix
from .semi_structured import SemiStructuredMatrix  # noqa: F401  (2:4)

__all__ = ["BlockLayout", "BlockSparseMatrix"]
