"""The pure update rules of dynamic sparse training, in one namespace: tensors in, tensors out.

Element and block granularity: :mod:`sparsekern.methods.dst.rules`; 2:4 granularity:
:mod:`sparsekern.methods.dst.semi_rules`.
"""
from .dst.rules import (allocate, dpf_mask, drop_and_grow, ggr_update, n_to_drop, rigl_update,  # noqa: F401
                        set_update, snfs_update, topk_mask, topkast_masks, topkast_penalty_grad)
from ..formats.semi_prune import check_2to4_shape, transposable_patterns  # noqa: F401
from .dst.semi_rules import semi_drop_and_grow, semi_rigl_update, semi_set_update  # noqa: F401
