"""CPU benchmark: block-sparse linear layer (sparsekern cpu backend) vs dense nn.Linear.

    python bench/bench_bsr_linear.py                       # defaults, a few minutes on 2 cores
    python bench/bench_bsr_linear.py --tokens 2048 --in-features 4096 --out-features 4096 --blocks 32

X is (tokens x in), W (out x in) with a random uniform block mask of each density.
For every block x density, in one process, ``--reps`` rounds each time the dense
and the sparse version back to back (alternating), after one warm-up round; a
ratio is the median over rounds of dense_ms / sparse_ms (> 1: sparse is faster):

* ``fwd``  Y = X Wᵀ        dense: x @ W.T (MKL/oneDNN)   sparse: bsr_forward
* ``dx``   dX = dY W       dense: dy @ W                 sparse: bsr_grad_input (transpose metadata)
* ``dw``   dW = dYᵀ X      dense: dy.T @ x               sparse: bsr_grad_weight (stored blocks only)
* ``step`` forward + backward of the layer: nn.Linear vs sparsekern.SparseLinear (bias on).
* ``bsr``  torch's own BSR forward (``W.to_sparse_bsr(block) @ X.T``) vs our forward.

Also printed: ``limit`` = step ratio x density (1.0 = the speed-up of doing
exactly the stored work), GFLOP/s on the stored blocks, and the relative error of
the sparse forward/dX/dW against the dense masked layer (the dense runs use the
masked weight, so their outputs are the reference). Rows go to a table and to
JSON lines (``--json``, default bench/results/bsr_linear.jsonl).

pytest-benchmark microbenchmarks of the same products (small shapes) are at the
end of this file; pytest collects them only when given the file:
``python -m pytest bench/bench_bsr_linear.py -p no:cacheprovider --benchmark-only``.
"""
import argparse
import os
import statistics
import warnings

# Large outputs (32 MiB for 2048 x 4096 fp32) are fresh allocations on every call;
# without huge pages their page faults cost ~13 ms per product on both the dense
# and the sparse side, capping every ratio. torch reads this once, at its first
# allocation; set THP_MEM_ALLOC_ENABLE=0 to measure without.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

import sparsekern as sk  # noqa: E402
from timing import (TIMER_HELP, Timer, alternate, append_rows, environment, header, kernel_path,  # noqa: E402
                    median_ratio)

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}
PRODUCTS = ("fwd", "dx", "dw", "step")
DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bsr_linear.jsonl")


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--in-features", type=int, default=2048)
    parser.add_argument("--out-features", type=int, default=2048)
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1, 0.05])
    parser.add_argument("--blocks", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for dense and sparse")
    parser.add_argument("--reps", type=int, default=5, help="timed alternating rounds per configuration")
    parser.add_argument("--timer", choices=("wall", "cpu", "thread"), default="wall", help=TIMER_HELP)
    parser.add_argument("--no-torch-bsr", action="store_true", help="skip torch's BSR forward (the peer)")
    parser.add_argument("--json", default=DEFAULT_JSON, help="append JSON rows here ('' to skip)")
    return parser.parse_args(argv)


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
        self.x = torch.randn(m, k, generator=generator).to(dtype)
        self.dy = torch.randn(m, n, generator=generator).to(dtype)
        mask = _random_mask((n // block, k // block), density, generator)
        self.dense = torch.nn.Linear(k, n, dtype=dtype)
        with torch.no_grad():  # the dense layer holds the masked weight: its outputs are the reference
            self.dense.weight.copy_(sk.BlockSparseMatrix.from_dense(self.dense.weight, block, mask).to_dense())
        self.sparse = sk.SparseLinear.from_dense(self.dense, block_size=block, block_mask=mask)
        self.weight = self.sparse.sparse_weight()
        self.layout, self.values = self.weight.layout, self.weight.values.detach()
        self.w = self.dense.weight.detach()
        self.kernels = {p: sk.kernels.select_kernel(p, self.x.device, dtype)[1]
                        for p in ("bsr_forward", "bsr_grad_input", "bsr_grad_weight")}
        self.torch_bsr = None if args.no_torch_bsr else self.w.to_sparse_bsr((block, block))

    def dense_fns(self):
        return {"fwd": lambda: self.x @ self.w.T, "dx": lambda: self.dy @ self.w,
                "dw": lambda: self.dy.T @ self.x, "step": lambda: self._step(self.dense)}

    def sparse_fns(self):
        k = self.kernels
        return {"fwd": lambda: k["bsr_forward"](self.x, self.values, self.layout),
                "dx": lambda: k["bsr_grad_input"](self.dy, self.values, self.layout),
                "dw": lambda: k["bsr_grad_weight"](self.dy, self.x, self.layout),
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


def run_case(args, block, density, dtype, generator, measure, context):
    """One block x density: ``context`` (the environment fields) plus times, ratios and errors."""
    case = Case(args, block, density, dtype, generator)
    dense, sparse = case.dense_fns(), case.sparse_fns()
    fns = {f"{side}_{p}": fn for p in PRODUCTS for side, fn in (("dense", dense[p]), ("sparse", sparse[p]))}
    if case.torch_bsr is not None:
        fns["torch_bsr_fwd"] = lambda: case.torch_bsr @ case.x.T
    times, _ = alternate(fns, args.reps, measure)
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
    return row


HEADER = (f"{'block':>5} {'density':>7} | {'fwd':>6} {'dx':>6} {'dw':>6} {'step':>6} {'ideal':>6} {'limit':>6} | "
          f"{'bsr':>6} {'tBSR':>6} | {'GF/s fwd':>8} {'step':>6} | {'dense ms':>8} {'sparse':>7} | {'max err':>8}")


def _format(row):
    opt = lambda key: f"{row[key]:6.2f}" if key in row else f"{'-':>6}"  # noqa: E731
    ideal = 1 / row["density"] if row["density"] else float("inf")
    return (f"{row['block']:>5} {row['density']:7.3f} | {row['fwd_ratio']:6.2f} {row['dx_ratio']:6.2f} "
            f"{row['dw_ratio']:6.2f} {row['step_ratio']:6.2f} {ideal:6.1f} {row['step_limit_frac']:6.2f} | "
            f"{opt('fwd_ratio_vs_torch_bsr')} {opt('torch_bsr_fwd_ratio_vs_dense')} | "
            f"{row['fwd_gflops_stored']:8.1f} {row['step_gflops_stored']:6.1f} | "
            f"{row['step_dense_ms']:8.1f} {row['step_sparse_ms']:7.1f} | "
            f"{max(row['fwd_rel_err'], row['dx_rel_err'], row['dw_rel_err']):8.1e}")


def main(argv=None):
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    measure = Timer(args.timer)
    dtype = DTYPES[args.dtype]
    for b in args.blocks:
        if args.in_features % b or args.out_features % b:
            raise SystemExit(f"--in-features {args.in_features} and --out-features {args.out_features} "
                             f"must be multiples of block {b}")
    env, path = environment(), kernel_path("bsr_forward", torch.device("cpu"), dtype)
    context = {"bench": "bsr_linear", **env, **path}
    print(f"# {header(env, path)}, "
          f"{args.dtype}, X {args.tokens}x{args.in_features}, W {args.out_features}x{args.in_features}, "
          f"median of {args.reps} alternating rounds, {args.timer} time, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}")
    print("# ratios = dense ms / sparse ms (fwd, dx, dw, fwd+bwd step); ideal = 1/density; limit = step x density;")
    print("# bsr = torch BSR fwd ms / ours; tBSR = dense / torch BSR fwd; GF/s on stored blocks; "
          "max err = relative error vs dense masked")
    print(HEADER)
    rows = []
    generator = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
        for block in args.blocks:
            for density in args.densities:
                rows.append(run_case(args, block, density, dtype, generator, measure, context))
                print(_format(rows[-1]), flush=True)
    append_rows(rows, args.json)
    return rows


# --- pytest-benchmark microbenchmarks (see the module docstring for the command) ---

def _micro_case(density):
    args = _parse(["--tokens", "512", "--in-features", "1024", "--out-features", "1024", "--no-torch-bsr"])
    return Case(args, 32, density, torch.float32, torch.Generator().manual_seed(0))


try:
    import pytest

    _cpu_built = "cpu" in sk.kernels.available_backends("bsr_forward", torch.device("cpu"), torch.float32)

    @pytest.mark.skipif(not _cpu_built, reason="the cpu backend (sparsekern._C_bsr) is not built")
    @pytest.mark.parametrize("product", PRODUCTS)
    @pytest.mark.parametrize("density", [1.0, 0.25, 0.05])
    def test_sparse_cpu(benchmark, product, density):
        benchmark(_micro_case(density).sparse_fns()[product])

    @pytest.mark.parametrize("product", PRODUCTS)
    def test_dense(benchmark, product):
        benchmark(_micro_case(1.0).dense_fns()[product])
except ImportError:  # pytest is only needed for the microbenchmarks
    pass


if __name__ == "__main__":
    main()
