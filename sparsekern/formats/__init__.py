"""Storage formats: block-CSR, 2:4 compressed."""
from .block_sparse import BlockLayout, BlockSparseMatrix
from .semi_structured import SemiStructuredMatrix

__all__ = ["BlockLayout", "BlockSparseMatrix", "SemiStructuredMatrix"]
