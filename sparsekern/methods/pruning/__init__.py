"""Pruning at initialization, lottery tickets, K-starts, dissipating gradients and freezing:
layer densities, saliency scores, masks from scores, and the functions that apply them."""
from .density import er_densities, erk_densities, layer_densities, uniform_densities  # noqa: F401
from .dissipating import DissipatingGradients, relative_change  # noqa: F401
from .freezing import freeze  # noqa: F401
from .kstarts import k_starts, select_fittest  # noqa: F401
from .lottery import apply_masks, geometric_schedule, iterative_magnitude_pruning, linear_weights, prune_remaining  # noqa: F401,E501
from .masks import (block_scores, expand_block_mask, global_magnitude_mask, global_topk_masks,  # noqa: F401
                    layerwise_topk_masks, nm_mask, topk_mask)
from .saliency import (grasp_scores, magnitude_scores, random_scores, snip_scores, synflow_masks,  # noqa: F401
                       synflow_scores)
from .sparsify import compute_block_masks, densify, sparsify  # noqa: F401
