"""The cache of freed large kernel outputs (csrc/common/huge_page_output.h).

The CPU kernels put outputs of 2 MB or more on huge pages and, when such an
output is freed, keep its block for the next output of the same size (a training
loop asks for the same sizes every step), up to ``SPARSEKERN_OUTPUT_CACHE_MB``
(default 256, read at the extension's first use; 0 disables) per compiled
extension. These functions report and release what the cache holds, and give the
dense composites of the floor rule their outputs from the same cache.
"""
import torch

from .._extension import loaded_extension, loaded_extensions


def output_cache_info():
    """``{"bytes": ..., "blocks": ...}`` held for reuse by the loaded extensions (not in any tensor)."""
    held = [module.output_cache_info() for module in loaded_extensions()]
    return {"bytes": sum(b for b, _ in held), "blocks": sum(n for _, n in held)}


def empty_output_cache():
    """Return every cached output block to the system (tensors in use are not affected)."""
    for module in loaded_extensions():
        module.empty_output_cache()


def empty_output(family, shape, like):
    """An uninitialized contiguous tensor of ``shape`` with ``like``'s dtype and device: on
    the cached huge pages of ``sparsekern._C_<family>`` for a CPU tensor once that extension
    is loaded, else from torch. The composites the floor rule runs in place of a kernel take
    their large outputs from here, so neither side pays page faults the other does not (and
    the rule, measuring the first calls, sees the steady state of both)."""
    module = loaded_extension(family) if like.device.type == "cpu" else None
    return torch.empty(shape, dtype=like.dtype, device=like.device) if module is None else module.empty_output(
        list(shape), like)
