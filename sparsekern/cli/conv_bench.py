"""The block-sparse Conv2d microbenchmark (``sparsekern bench --product conv`` and
bench/bench_conv2d.py): SparseConv2d vs dense F.conv2d, timed alternately.

Channels-last input of ``batch`` images, 3x3 convs (padding 1, ``stride``) C -> C at H x H
for each (C, H) of the shapes, random uniform block masks of each density, in one dtype (fp32,
fp64, bf16; dense runs in the same dtype). A ratio is the median over rounds of dense_ms /
sparse_ms (> 1: sparse is faster):

* ``fwd``  y = conv2d(x, W)   dense: F.conv2d                 sparse: the conv_forward the op picks
* ``dx``   input gradient     dense: convolution_backward     sparse: conv_grad_input
* ``dw``   weight gradient    dense: conv2d_weight            sparse: conv_grad_weight (stored blocks)
* ``step`` forward + backward of the layer: nn.Conv2d vs SparseConv2d (bias on)

``path`` is the backend that ran each product after the floor rule settled ("cpu": the
compiled kernels; "reference": the dense composite); the step's is forward + backward, its
backward one product (``conv_grads``: the kernels' dX and dW, or one dense backward).
``target`` is 0.7 / density for ``step``. ``stored`` is the density the block grid really
holds (a 4 x 4 grid at density 0.1 stores 2 blocks: 0.125) and ``limit`` = ratio x stored,
the fraction of the work-saving bound reached. The dense side uses the masked weight, so both
compute the same convolution. On a GPU (``device``) the registry's GPU kernels (triton) run
against cuDNN.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import select_kernel
from ..nn import SparseConv2d
from ..ops.dispatch import kernel
from .timing import compare, fwd_bwd

PRODUCTS = {"fwd": ("conv_forward",), "dx": ("conv_grad_input",), "dw": ("conv_grad_weight",),
            "step": ("conv_forward", "conv_grads")}
OPS = ("fwd", "dx", "dw", "step")
_TABLE = "{:>5} {:>3} {:>7} {:>6} {:>6} {:>10} {:>10} {:>7} {:>7} {:>6} {:>10}"
HEADER = _TABLE.format("C", "HW", "density", "stored", "op", "dense ms", "sparse ms", "ratio", "target", "limit",
                       "path")


def parse_shapes(text):
    """"128x16,256x8" -> [(128, 16), (256, 8)] (channels x spatial size)."""
    try:
        shapes = [tuple(int(v) for v in part.split("x")) for part in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise ValueError(f"shapes must be CxH pairs separated by commas, e.g. 128x16,256x8; got {text!r}")
    return shapes


def _mask(grid, density, generator):
    cells = grid[0] * grid[1]
    mask = torch.zeros(cells, dtype=torch.bool)
    mask[torch.randperm(cells, generator=generator)[:round(density * cells)]] = True
    return mask.view(grid)


class Case:
    """One 3x3 conv, dense and block-sparse with the same (masked) weight, and the timed callables."""

    def __init__(self, channels, size, density, batch, block, generator, stride=1, dtype=torch.float32,
                 device=torch.device("cpu")):
        self.stride = stride
        self.dense = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, dtype=dtype, device=device)
        mask = _mask((-(-channels // block),) * 2, density, generator)
        self.sparse = SparseConv2d.from_dense(self.dense, block_size=block, block_mask=mask)
        with torch.no_grad():
            self.dense.weight.copy_(self.sparse.dense_weight())
        self.x = torch.randn(batch, channels, size, size, generator=generator).to(device, dtype).to(
            memory_format=torch.channels_last)
        out = self.sparse.geometry.output_size(size, size)
        self.dy = torch.randn(batch, channels, *out, generator=generator).to(device, dtype).to(
            memory_format=torch.channels_last)
        self.w = self.dense.weight.detach()
        self.kernels = {op: kernel(products[0], self.x, None) for op, products in PRODUCTS.items() if op != "step"}
        self.values = self.sparse.values.detach()

    def path(self, op, choices):
        """What ran for ``op``: the floor rule's settled choice per product, else the registry's."""
        return "+".join(choices.get(product) or select_kernel(product, self.x.device, self.x.dtype)[0]
                        for product in PRODUCTS[op])

    def dense_fns(self):
        x, w, dy, s = self.x, self.w, self.dy, self.stride
        return {"fwd": lambda: F.conv2d(x, w, stride=s, padding=1),
                "dx": lambda: torch.ops.aten.convolution_backward(dy, x, w, None, [s, s], [1, 1], [1, 1], False, [0, 0],
                                                                  1, [True, False, False])[0],
                "dw": lambda: torch.nn.grad.conv2d_weight(x, w.shape, dy, stride=s, padding=1),
                "step": fwd_bwd(self.dense, self.x.requires_grad_(), dy)}

    def sparse_fns(self):
        k, v, layout, geo = self.kernels, self.values, self.sparse.layout(), self.sparse.geometry
        return {"fwd": lambda: k["fwd"](self.x, v, layout, geo),
                "dx": lambda: k["dx"](self.dy, v, layout, geo, tuple(self.x.shape[2:])),
                "dw": lambda: k["dw"](self.dy, self.x, layout, geo),
                "step": fwd_bwd(self.sparse, self.x.requires_grad_(), self.dy)}


def run_cases(shapes, densities, batch, block, reps, measure, context, on_case=None, on_round=None, stride=1,
              dtype=torch.float32, device=torch.device("cpu")):
    """Yield one row per (shape, density, op); ``on_case(index, count, name)`` before each case."""
    generator = torch.Generator().manual_seed(0)
    count = len(shapes) * len(densities)
    for s, (channels, size) in enumerate(shapes):
        for d, density in enumerate(densities):
            if on_case is not None:
                on_case(s * len(densities) + d, count, f"{channels}x{size}, density {density}")
            case = Case(channels, size, density, batch, block, generator, stride, dtype, device)
            dense, sparse = case.dense_fns(), case.sparse_fns()
            stored = case.sparse.density
            for op in OPS:
                row = dict(context, dtype=str(dtype).split(".")[-1], channels=channels, size=size, stride=stride,
                           batch=batch, block=block, density=density, nnz_blocks=case.sparse.nnz_blocks,
                           stored_density=stored, op=op)
                name = f"{channels}x{size}" + (f"-s{stride}" if stride > 1 else "")
                row = compare(f"{name}-d{density}-{op}", dense[op], sparse[op], reps, measure, row,
                              on_round=on_round)
                row["path"] = case.path(op, row["floor"])
                row["target"] = 0.7 / density if op == "step" and density > 0 else None
                row["limit"] = row["ratio"] * stored
                yield row


def format_row(r):
    target = "" if r["target"] is None else f"{r['target']:.2f}"
    return _TABLE.format(r["channels"], r["size"], r["density"], f"{r['stored_density']:.3f}", r["op"],
                         f"{r['dense_ms']:.2f}", f"{r['sparse_ms']:.2f}", f"{r['ratio']:.2f}", target,
                         f"{r['limit']:.2f}", r["path"])
