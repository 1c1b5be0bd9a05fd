"""The cache of freed large kernel outputs (csrc/common/huge_page_output.h).

The CPU kernels put outputs of 2 MB or more on huge pages and, when such an
output is freed, keep its block for the next output of the same size (a training
loop asks for the same sizes every step), up to ``SPARSEKERN_OUTPUT_CACHE_MB``
(default 128, read at the extension's first use; 0 disables) per compiled
extension. These functions report and release what the cache holds.
"""
from .._extension import loaded_extensions


def output_cache_info():
    """``{"bytes": ..., "blocks": ...}`` held for reuse by the loaded extensions (not in any tensor)."""
    held = [module.output_cache_info() for module in loaded_extensions()]
    return {"bytes": sum(b for b, _ in held), "blocks": sum(n for _, n in held)}


def empty_output_cache():
    """Return every cached output block to the system (tensors in use are not affected)."""
    for module in loaded_extensions():
        module.empty_output_cache()
