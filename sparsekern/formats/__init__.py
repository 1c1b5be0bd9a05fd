from .block_sparse import BlockLayout, BlockSparseMatrix

__all__ = ["BlockLayout", "BlockSparseMatrix"]
