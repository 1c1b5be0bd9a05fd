"""sparsekern: kernels that make dimensionality-reduced training faster than dense.

Quickstart::

    import torch, sparsekern as sk

    layer = sk.SparseLinear(4096, 4096, block_size=32, density=0.1)  # drop-in nn.Linear, 10% of blocks
    conv = sk.SparseConv2d(128, 128, 3, padding=1, block_size=32, density=0.1)  # drop-in nn.Conv2d
    model = sk.sparsify(model, density=0.1, method="erk", block_size=32)  # every nn.Linear and nn.Conv2d
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rigl = sk.methods.RigL(model, optimizer, density=0.1, delta=100, t_end=total_steps)
    for x, t in loader:
        loss_fn(model(x), t).backward(); optimizer.step(); optimizer.zero_grad()
        rigl.step()                                   # drop/grow blocks, optimizer state moved with them
    sk.methods.restructure(layer, optimizer, mask)    # a structure change by hand (mask: bool block grid)
    dense_model = sk.densify(model)                   # back to nn.Linear / nn.Conv2d for any dense consumer

Also: 2:4 layers (``SemiSparseLinear``), low-rank layers and DLRT (``LowRankLinear``,
``LowRankConv2d``, ``DLRT``), pruning at initialization in ``sk.methods``;
``sk.use_backend(name)`` forces a kernel backend. The ``sparsekern`` command (``info``,
``train``, ``bench``) shows what runs on this machine and how fast against dense.
Importing is cheap: no GPU query, no compiled extension and no triton is loaded until a
kernel first runs.
"""
from . import kernels, ops
from .formats import BlockLayout, BlockSparseMatrix, SemiStructuredMatrix
from .kernels.output_cache import empty_output_cache, output_cache_info
from .kernels import BackendUnavailableError, use_backend
from .nn import LowRankConv2d, LowRankLinear, SemiSparseLinear, SparseConv2d, SparseLinear
from .formats.semi_prune import prune_2to4
from . import methods  # after nn: methods build on the layers
from .methods import DLRT, densify, sparsify

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "BlockLayout",
    "BlockSparseMatrix",
    "DLRT",
    "LowRankConv2d",
    "LowRankLinear",
    "SemiSparseLinear",
    "SemiStructuredMatrix",
    "SparseConv2d",
    "SparseLinear",
    "densify",
    "kernels",
    "empty_output_cache",
    "methods",
    "ops",
    "output_cache_info",
    "prune_2to4",
    "sparsify",
    "use_backend",
]
