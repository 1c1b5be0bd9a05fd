"""Benchmark: block-sparse linear layer (SparseLinear) vs dense nn.Linear (CPU, or a GPU).

    python bench/bench_bsr_linear.py                       # defaults, a few minutes on 2 cores
    python bench/bench_bsr_linear.py --tokens 2048 --in-features 4096 --out-features 4096 --blocks 32
    python bench/bench_bsr_linear.py --device cuda --dtype bf16 --tokens 8192 --in-features 4096 \
        --out-features 4096 --blocks 64 --densities 1.0 0.5 0.25 0.1   # a GPU: the floor rule against cuBLAS

On a GPU (``--device cuda``) the same cases run the registry's GPU kernels (triton) against
cuBLAS, so the ``step`` column and ``floor`` show what the floor rule keeps there; the
kernels themselves against cuBLAS, CUDA-graph timed, are bench/bench_bsr_triton.py's.

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

# Large outputs (32 MiB for 2048 x 4096 fp32) are fresh allocations on every call;
# without huge pages their page faults cost ~13 ms per product on both the dense
# and the sparse side, capping every ratio. torch reads this once, at its first
# allocation; set THP_MEM_ALLOC_ENABLE=0 to measure without.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

import sparsekern as sk  # noqa: E402
# The cases, the table and the timing are the package's (`sparsekern bench` runs the same code).
from sparsekern.cli.bsr_bench import DTYPES, HEADER, LEGEND, PRODUCTS, Case, format_row, run_cases, title  # noqa: E402
from timing import TIMER_HELP, Timer, append_rows, checked_device, environment, kernel_path  # noqa: E402

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
    parser.add_argument("--no-torch-bsr", action="store_true", help="skip torch's BSR forward (the peer; CPU only)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU kernels against cuBLAS")
    parser.add_argument("--json", default=DEFAULT_JSON, help="append JSON rows here ('' to skip)")
    args = parser.parse_args(argv)
    args.device = checked_device(parser, args.device)
    return args


def main(argv=None):
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    measure = Timer(args.timer, args.device)
    dtype = DTYPES[args.dtype]
    for b in args.blocks:
        if args.in_features % b or args.out_features % b:
            raise SystemExit(f"--in-features {args.in_features} and --out-features {args.out_features} "
                             f"must be multiples of block {b}")
    env, path = environment(args.device), kernel_path("bsr_forward", args.device, dtype)
    context = {"bench": "bsr_linear", **env, **path}
    print(title(env, path, args))
    print(LEGEND)
    print(HEADER)
    rows = []
    for row in run_cases(args, measure, context):
        rows.append(row)
        print(format_row(row), flush=True)
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
