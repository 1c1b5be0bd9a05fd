"""Methods: pure functions (densities, scores, masks, update rules) and thin drivers that apply
them to sparsekern layers, by purpose: ``pruning`` (at initialization, lottery tickets,
K-starts, dissipating gradients, freezing), ``dst`` (dynamic sparse training) and
``lowrank`` (DLRT)."""
from ..nn import PartiallyTrainableConv2d, PartiallyTrainableLinear  # noqa: F401
from . import functional  # noqa: F401
from .dst import DPF, GGR, SET, SNFS, DynamicSparsity, RigL, TopKAST  # noqa: F401
from .dst.state import restructure  # noqa: F401
from .lowrank import DLRT  # noqa: F401
from .pruning import (DissipatingGradients, apply_masks, block_scores, compute_block_masks, densify,  # noqa: F401
                      er_densities, erk_densities, expand_block_mask, freeze, geometric_schedule,
                      global_magnitude_mask, global_topk_masks, grasp_scores,
                      iterative_magnitude_pruning, k_starts, layer_densities, layerwise_topk_masks,
                      linear_weights, magnitude_scores, nm_mask, prune_remaining, random_scores,
                      relative_change, select_fittest, snip_scores, sparsify, synflow_masks,
                      synflow_scores, topk_mask, uniform_densities)
