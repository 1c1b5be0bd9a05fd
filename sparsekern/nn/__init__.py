"""Drop-in modules whose weights live in sparsekern formats."""
from .bsr_linear import SparseLinear
from .conv2d import SparseConv2d
from .lowrank_conv2d import LowRankConv2d
from .lowrank_linear import LowRankLinear
from .partially_trainable_conv2d import PartiallyTrainableConv2d
from .partially_trainable_linear import PartiallyTrainableLinear
from .semi_linear import SemiSparseLinear

__all__ = ["LowRankConv2d", "LowRankLinear", "PartiallyTrainableConv2d", "PartiallyTrainableLinear",
           "SemiSparseLinear", "SparseConv2d",
           "SparseLinear"]
