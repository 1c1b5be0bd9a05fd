"""Methods: pure functions (densities, scores, masks) and thin drivers that apply them to sparsekern layers."""
from .density import er_densities, erk_densities, layer_densities, uniform_densities  # noqa: F401
from .masks import (block_scores, expand_block_mask, global_magnitude_mask, global_topk_masks,  # noqa: F401
                    layerwise_topk_masks, nm_mask, topk_mask)
from .saliency import (grasp_scores, magnitude_scores, random_scores, snip_scores, synflow_masks,  # noqa: F401
                       synflow_scores)
from .sparsify import compute_block_masks, sparsify  # noqa: F401
from .freezing import PartiallyTrainableLinear, freeze  # noqa: F401
from . import functional  # noqa: F401
from .dpf import DPF  # noqa: F401
from .dst import GGR, SET, SNFS, DynamicSparsity, RigL  # noqa: F401
from .topkast import TopKAST  # noqa: F401
from .lottery import apply_masks, geometric_schedule, iterative_magnitude_pruning, linear_weights, prune_remaining  # noqa: F401,E501
from .kstarts import k_starts, select_fittest  # noqa: F401
from .dissipating import DissipatingGradients, relative_change  # noqa: F401
from .dlrt import DLRT  # noqa: F401
