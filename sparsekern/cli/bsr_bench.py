"""The block-sparse linear microbenchmark (``sparsekern bench --product bsr`` and
bench/bench_bsr_linear.py): one layer, dense nn.Linear vs SparseLinear, timed alternately.

X is (tokens x in), W (out x in) with a random uniform block mask of each density. For every
block x density, in one process, rounds time the dense and the sparse version back to back
(alternating), after one warm-up round; a ratio is the median over rounds of
dense_ms / sparse_ms (> 1: sparse is faster):

* ``fwd``  Y = X Wᵀ        dense: x @ W.T (MKL/oneDNN)   sparse: bsr_forward
* ``dx``   dX = dY W       dense: dy @ W                 sparse: bsr_grad_input (transpose metadata)
* ``dw``   dW = dYᵀ X      dense: dy.T @ x               sparse: bsr_grad_weight (stored blocks only)
* ``step`` forward + backward of the layer: nn.Linear vs sparsekern.SparseLinear (bias on).
* ``bsr``  torch's own BSR forward (``W.to_sparse_bsr(block) @ X.T``) vs our forward.

``fwd``/``dx``/``dw`` time the kernels themselves; ``step`` times the layer as a user runs
it, so it includes the floor rule's choice per product (kernels/floor.py: the kernel, or
the dense composite where it measured the kernel slower), reported as ``floor``.

The options object (an argparse namespace) carries ``tokens``, ``in_features``,
``out_features``, ``reps``, ``timer``, ``no_torch_bsr`` and optionally ``device`` (default CPU;
on a GPU the registry's GPU kernels run against cuBLAS, and torch's BSR peer is left out).
"""
import os
import statistics
import warnings

import torch

from .. import kernels
from ..formats import BlockSparseMatrix
from ..kernels.bsr import cpu as bsr_cpu
from ..nn import SparseLinear
from .machine import header
from .timing import alternate, median_ratio, settle_floor

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
PRODUCTS = ("fwd", "dx", "dw", "step")


def _random_mask(grid, density, generator):
    cells = grid[0] * grid[1]
    keep = torch.randperm(cells, generator=generator)[: int(round(density * cells))]
    mask = torch.zeros(cells, dtype=torch.bool)
    mask[keep] = True
    return mask.view(grid)


def _rel_err(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


class Case:
    """Dense and sparse versions of one layer, with the callables that are timed."""

    def __init__(self, args, block, density, dtype, generator):
        m, k, n = args.tokens, args.in_features, args.out_features
        device = torch.device(getattr(args, "device", "cpu"))
        self.x = torch.randn(m, k, generator=generator).to(device, dtype)
        self.dy = torch.randn(m, n, generator=generator).to(device, dtype)
        mask = _random_mask((n // block, k // block), density, generator)
        self.dense = torch.nn.Linear(k, n, dtype=dtype, device=device)
        with torch.no_grad():  # the dense layer holds the masked weight: its outputs are the reference
            self.dense.weight.copy_(BlockSparseMatrix.from_dense(self.dense.weight, block, mask).to_dense())
        self.sparse = SparseLinear.from_dense(self.dense, block_size=block, block_mask=mask)
        self.weight = self.sparse.sparse_weight()
        self.layout, self.values = self.weight.layout, self.weight.values.detach()
        self.w = self.dense.weight.detach()
        self.kernels = {p: kernels.select_kernel(p, self.x.device, dtype)[1]
                        for p in ("bsr_forward", "bsr_grad_input", "bsr_grad_weight")}
        # torch's CPU BSR matmul (MKL) has fp32 and fp64 kernels only: no peer row in half types
        peer = not args.no_torch_bsr and dtype in (torch.float32, torch.float64) and device.type == "cpu"
        self.torch_bsr = self.w.to_sparse_bsr((block, block)) if peer else None

    def dense_fns(self):
        return {"fwd": lambda: self.x @ self.w.T, "dx": lambda: self.dy @ self.w,
                "dw": lambda: self.dy.T @ self.x, "step": lambda: self._step(self.dense)}

    def sparse_fns(self):
        k = self.kernels
        return {"fwd": lambda: k["bsr_forward"](self.x, self.values, self.layout),
                "dx": lambda: k["bsr_grad_input"](self.dy, self.values, self.layout),
                "dw": lambda: k["bsr_grad_weight"](self.dy, self.x, self.layout)[0],
                "step": lambda: self._step(self.sparse)}

    def _step(self, layer):
        layer.zero_grad(set_to_none=True)
        x = self.x.detach().requires_grad_()
        layer(x).backward(self.dy)
        return x.grad

    def errors(self):
        """Relative errors of the sparse products against the dense masked layer."""
        dense, sparse = self.dense_fns(), self.sparse_fns()
        (rb, cb), (br, bc) = self.layout.grid, self.layout.block_size
        dw_blocks = dense["dw"]().reshape(rb, br, cb, bc).transpose(1, 2)[self.layout.row_indices,
                                                                           self.layout.col_indices]
        return {"fwd": _rel_err(sparse["fwd"](), dense["fwd"]()), "dx": _rel_err(sparse["dx"](), dense["dx"]()),
                "dw": _rel_err(sparse["dw"](), dw_blocks) if self.layout.nnz_blocks else 0.0}


def run_case(args, block, density, dtype, generator, measure, context, on_round=None):
    """One block x density: ``context`` (the environment fields) plus times, ratios and errors.
    ``on_round(done, rounds)`` reports the timing rounds as they finish."""
    case = Case(args, block, density, dtype, generator)
    dense, sparse = case.dense_fns(), case.sparse_fns()
    choices = settle_floor(sparse["step"])
    fns = {f"{side}_{p}": fn for p in PRODUCTS for side, fn in (("dense", dense[p]), ("sparse", sparse[p]))}
    if case.torch_bsr is not None:
        fns["torch_bsr_fwd"] = lambda: case.torch_bsr @ case.x.T
    times, _ = alternate(fns, args.reps, measure, on_round=on_round)
    m, n, k = args.tokens, args.out_features, args.in_features
    stored_flop = 2 * m * case.layout.nnz_blocks * block * block
    row = dict(context, dtype=str(dtype).split(".")[-1], tokens=m, in_features=k, out_features=n, block=block,
               density=case.layout.density, reps=args.reps, timer=args.timer)
    for p in PRODUCTS:
        d, s = times[f"dense_{p}"], times[f"sparse_{p}"]
        row[f"{p}_dense_ms"], row[f"{p}_sparse_ms"] = statistics.median(d), statistics.median(s)
        row[f"{p}_ratio"] = median_ratio(d, s)
        row[f"{p}_gflops_stored"] = stored_flop * (3 if p == "step" else 1) / row[f"{p}_sparse_ms"] / 1e6
    row["step_limit_frac"] = row["step_ratio"] * case.layout.density
    if "torch_bsr_fwd" in times:
        row["torch_bsr_fwd_ms"] = statistics.median(times["torch_bsr_fwd"])
        row["fwd_ratio_vs_torch_bsr"] = median_ratio(times["torch_bsr_fwd"], times["sparse_fwd"])
        row["torch_bsr_fwd_ratio_vs_dense"] = median_ratio(times["dense_fwd"], times["torch_bsr_fwd"])
    row.update({f"{p}_rel_err": e for p, e in case.errors().items()})
    row["floor"] = choices
    if dtype == torch.bfloat16 and case.x.device.type == "cpu":
        row["bf16_engine"] = bsr_cpu.bf16_engine(block)
    return row


HEADER = (f"{'block':>5} {'density':>7} | {'fwd':>6} {'dx':>6} {'dw':>6} {'step':>6} {'ideal':>6} {'limit':>6} | "
          f"{'bsr':>6} {'tBSR':>6} | {'GF/s fwd':>8} {'step':>6} | {'dense ms':>8} {'sparse':>7} | {'max err':>8} | "
          f"floor")
LEGEND = ("# ratios = dense ms / sparse ms (fwd, dx, dw, fwd+bwd step); ideal = 1/density; limit = step x density;\n"
          "# bsr = torch BSR fwd ms / ours; tBSR = dense / torch BSR fwd; GF/s on stored blocks; "
          "max err = relative error vs dense masked;\n# floor = the floor rule's choice in the step for fwd/dx/dw: "
          "k = kernel, d = dense composite, ? = still measuring, kd = each for some shapes, "
          "- = not measured (density <= 1/4 or the rule off: the kernel runs)")


def format_row(row):
    """One table line under HEADER."""
    opt = lambda key: f"{row[key]:6.2f}" if key in row else f"{'-':>6}"  # noqa: E731
    ideal = 1 / row["density"] if row["density"] else float("inf")
    return (f"{row['block']:>5} {row['density']:7.3f} | {row['fwd_ratio']:6.2f} {row['dx_ratio']:6.2f} "
            f"{row['dw_ratio']:6.2f} {row['step_ratio']:6.2f} {ideal:6.1f} {row['step_limit_frac']:6.2f} | "
            f"{opt('fwd_ratio_vs_torch_bsr')} {opt('torch_bsr_fwd_ratio_vs_dense')} | "
            f"{row['fwd_gflops_stored']:8.1f} {row['step_gflops_stored']:6.1f} | "
            f"{row['step_dense_ms']:8.1f} {row['step_sparse_ms']:7.1f} | "
            f"{max(row['fwd_rel_err'], row['dx_rel_err'], row['dw_rel_err']):8.1e} | {_floor_column(row)}")


def _floor_column(row):
    choices = row.get("floor", {})
    letter = {**dict.fromkeys(kernels.floor.KERNEL_BACKENDS, "k"), "dense": "d", "measuring": "?"}
    return "/".join("".join(letter.get(c, "-") for c in choices.get(p, "").split("/"))
                    for p in ("bsr_forward", "bsr_grad_input", "bsr_grad_weight"))


def title(env, path, args):
    """The line above the table: machine, kernel path, shapes and protocol (and for bf16 on the
    CPU, what computes each block size: tiles, strips or widened to fp32)."""
    text = (f"# {header(env, path)}, "
            f"{args.dtype}, X {args.tokens}x{args.in_features}, W {args.out_features}x{args.in_features}, "
            f"median of {args.reps} alternating rounds, {args.timer} time, "
            f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}")
    if DTYPES[args.dtype] == torch.bfloat16 and getattr(args, "device", torch.device("cpu")).type == "cpu":
        engines = "; ".join(f"block {block} {bsr_cpu.bf16_engine(block)}" for block in args.blocks)
        text += f"\n# bf16 engine: {engines}"
    return text


def run_cases(args, measure, context, on_case=None, on_round=None):
    """Every ``args.blocks`` x ``args.densities`` case in that order, as rows (a generator).
    ``on_case(index, count, block, density)`` announces a case before it is built."""
    dtype = DTYPES[args.dtype]
    cases = [(block, density) for block in args.blocks for density in args.densities]
    generator = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
        for index, (block, density) in enumerate(cases):
            if on_case is not None:
                on_case(index, len(cases), block, density)
            yield run_case(args, block, density, dtype, generator, measure, context, on_round)
