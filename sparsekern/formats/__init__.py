"""Storage formats: block-CSR, 2:4 compressed."""
from .bsr import BlockLayout, BlockSparseMatrix
from .semi import SemiStructuredMatrix

__all__ = ["BlockLayout", "BlockSparseMatrix", "SemiStructuredMatrix"]
