"""CPU benchmark: block-sparse Conv2d (sparsekern.SparseConv2d) vs dense F.conv2d.

    python bench/bench_conv2d.py                  # the default cases, about two minutes on 2 cores
    python bench/bench_conv2d.py --reps 9 --json bench/results/conv2d.jsonl

Channels-last input of ``--batch`` images, 3x3 convs (padding 1) C -> C at H x H for each
(C, H) of ``--shapes``, random uniform block masks of each density (block ``--block``),
fp32. In one process, rounds time the dense and the sparse version back to back
(alternating, bench/timing.py); a ratio is the median over rounds of dense_ms / sparse_ms
(> 1: sparse is faster):

* ``fwd``  y = conv2d(x, W)   dense: F.conv2d            sparse: the conv_forward the op picks
* ``dx``   input gradient     dense: convolution_backward  sparse: conv_grad_input
  (on channels-last, conv2d_input would be 1.2-1.4x slower: its stand-in input is NCHW)
* ``dw``   weight gradient    dense: conv2d_weight       sparse: conv_grad_weight (stored blocks)
* ``step`` forward + backward of the layer: nn.Conv2d vs SparseConv2d (bias on)

``path`` is the backend the floor rule picked for the product ("cpu": the compiled kernels;
"reference": the dense composite; in a step, "reference dX+dW": one dense backward gives both);
``target`` is 0.7 / density for ``step``. The dense side
uses the masked weight, so both compute the same convolution.
"""
import argparse
import json
import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as bench_bsr_linear.py: huge pages for large outputs

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import sparsekern as sk  # noqa: E402
from sparsekern.kernels.conv import conv_kernel, cpu as conv_cpu  # noqa: E402
from timing import TIMER_HELP, Timer, append_rows, compare, environment, fwd_bwd, header  # noqa: E402

PRODUCTS = {"fwd": "conv_forward", "dx": "conv_grad_input", "dw": "conv_grad_weight"}
TABLE = "{:>5} {:>3} {:>7} {:>6} {:>10} {:>10} {:>7} {:>7} {:>10}"


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="128x16,256x8", help="channels x spatial size, comma separated")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for dense and sparse")
    parser.add_argument("--reps", type=int, default=5, help="timed alternating rounds per product")
    parser.add_argument("--timer", choices=("wall", "cpu", "thread"), default="wall", help=TIMER_HELP)
    parser.add_argument("--json", default="", help="also append the JSON rows to this file")
    return parser.parse_args(argv)


def _mask(grid, density, generator):
    cells = grid[0] * grid[1]
    mask = torch.zeros(cells, dtype=torch.bool)
    mask[torch.randperm(cells, generator=generator)[:round(density * cells)]] = True
    return mask.view(grid)


class Case:
    """One 3x3 conv, dense and block-sparse with the same (masked) weight, and the timed callables."""

    def __init__(self, channels, size, density, args, generator):
        self.dense = nn.Conv2d(channels, channels, 3, padding=1)
        grid = (-(-channels // args.block),) * 2
        mask = _mask(grid, density, generator)
        with torch.no_grad():
            probe = sk.SparseConv2d.from_dense(self.dense, block_size=args.block, block_mask=mask)
            self.dense.weight.copy_(probe.dense_weight())
        self.sparse = sk.SparseConv2d.from_dense(self.dense, block_size=args.block, block_mask=mask)
        self.x = torch.randn(args.batch, channels, size, size, generator=generator).to(memory_format=torch.channels_last)
        self.dy = torch.randn(args.batch, channels, size, size, generator=generator).to(
            memory_format=torch.channels_last)
        self.w = self.dense.weight.detach()
        layout, geometry = self.sparse.layout(), self.sparse.geometry
        self.paths, self.kernels = {}, {}
        for key, product in PRODUCTS.items():
            self.paths[key], self.kernels[key] = conv_kernel(product, self.x, None, layout, geometry, True, size * size)
        self.values = self.sparse.values.detach()

    def step_path(self):
        """The paths of a layer step: dX and dW come from one dense backward where dX is the composite's."""
        paths = self.paths
        backward = "reference dX+dW" if paths["dx"] == "reference" else f"{paths['dx']}+{paths['dw']}"
        return f"{paths['fwd']}+{backward}"

    def dense_fns(self):
        x, w, dy = self.x, self.w, self.dy
        return {"fwd": lambda: F.conv2d(x, w, padding=1),
                "dx": lambda: torch.ops.aten.convolution_backward(dy, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0],
                                                                  1, [True, False, False])[0],
                "dw": lambda: torch.nn.grad.conv2d_weight(x, w.shape, dy, padding=1),
                "step": fwd_bwd(self.dense, self.x.requires_grad_(), dy)}

    def sparse_fns(self):
        k, v, layout, geo = self.kernels, self.values, self.sparse.layout(), self.sparse.geometry
        return {"fwd": lambda: k["fwd"](self.x, v, layout, geo),
                "dx": lambda: k["dx"](self.dy, v, layout, geo, tuple(self.x.shape[2:])),
                "dw": lambda: k["dw"](self.dy, self.x, layout, geo),
                "step": fwd_bwd(self.sparse, self.x.requires_grad_(), self.dy)}


def main(argv=None):
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    measure = Timer(args.timer)
    env = environment()
    isa = conv_cpu.isa()
    print(header(env, {"backend": "cpu (floor rule: composite where dense wins)", "isa": isa}))
    print(f"# batch {args.batch}, fp32, channels-last, 3x3 pad 1, block {args.block}, {args.reps} rounds; "
          "ratio = dense ms / sparse ms")
    print(TABLE.format("C", "HW", "density", "op", "dense ms", "sparse ms", "ratio", "target", "path"))
    rows = []
    generator = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        channels, size = (int(v) for v in shape.split("x"))
        for density in args.densities:
            case = Case(channels, size, density, args, generator)
            dense, sparse = case.dense_fns(), case.sparse_fns()
            for op in ("fwd", "dx", "dw", "step"):
                path = case.step_path() if op == "step" else case.paths[op]
                context = {"bench": "conv2d", **env, "isa": isa, "channels": channels, "size": size,
                           "batch": args.batch, "block": args.block, "density": density,
                           "nnz_blocks": case.sparse.nnz_blocks, "op": op, "path": path}
                row = compare(f"{channels}x{size}-d{density}-{op}", dense[op], sparse[op], args.reps, measure,
                              context)
                row["target"] = 0.7 / density if op == "step" else None
                rows.append(row)
                target = "" if row["target"] is None else f"{row['target']:.2f}"
                print(TABLE.format(channels, size, density, op, f"{row['dense_ms']:.2f}", f"{row['sparse_ms']:.2f}",
                                   f"{row['ratio']:.2f}", target, path), flush=True)
    for row in rows:
        print(json.dumps(row))
    append_rows(rows, args.json)
    return rows


if __name__ == "__main__":
    main()
