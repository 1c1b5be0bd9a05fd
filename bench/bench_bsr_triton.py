"""GPU microbenchmark of the triton block-sparse kernels against cuBLAS dense and torch's BSR.

    python bench/bench_bsr_triton.py                                   # full sweep (~10 min incl. autotuning)
    python bench/bench_bsr_triton.py --dtypes bf16 --blocks 64 128 --json bench/results/bsr_triton.jsonl
    python bench/bench_bsr_triton.py --features 256 --tokens 256 --blocks 32 --dtypes fp32 --rounds 1  # smoke run

Shapes: W is (features x features) = 4096 x 4096, X is (tokens x features) with
8192 tokens. For every dtype x block x density (random uniform block mask of that
density), in one process, each pair timed back to back with
``triton.testing.do_bench`` (median), alternating sparse and dense, ``--rounds``
times; a ratio is the median over rounds of dense_ms / sparse_ms:

* ``fwd``  Y = X Wᵀ        dense: torch.matmul (cuBLAS)   sparse: bsr_forward
* ``dx``   dX = dY W       dense: torch.matmul            sparse: bsr_grad_input (transpose metadata)
* ``dw``   dW = dYᵀ X      dense: torch.matmul            sparse: bsr_grad_weight (stored blocks only)
* ``step`` fwd + dx + dw of one layer.
* ``torch_bsr_fwd``: torch's BSR Triton kernel (``to_sparse_bsr`` then
  ``torch.sparse._triton_ops.bsr_dense_mm``, computing Yᵀ = W Xᵀ) vs our forward.

Reported: ms, ratios, ``limit_frac`` = step ratio / (1/density) (1.0 = the
speed-up of doing exactly the stored work), TFLOP/s on the stored blocks, and the
relative error of the sparse forward against the dense masked product. Density
0.7 is in the default sweep to find the break-even density. Rows are printed as a
table and as JSON lines (``--json`` appends them to a file).
"""
import argparse
import json
import os
import statistics
import sys

import torch

import sparsekern as sk
from timing import alternate, append_rows, environment, header, kernel_path, median_ratio

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PRODUCTS = {"fwd": "bsr_forward", "dx": "bsr_grad_input", "dw": "bsr_grad_weight"}


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.7, 0.5, 0.25, 0.1, 0.05])
    parser.add_argument("--blocks", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--features", type=int, default=4096, help="in = out features of W")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=3, help="alternating sparse/dense rounds per pair")
    parser.add_argument("--json", help="append JSON rows to this file")
    return parser.parse_args(argv)


def _do_bench(fn):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _torch_bsr_forward(dense_w, block, x):
    """Yᵀ = W Xᵀ with torch's BSR Triton kernel, or (None, reason) when it cannot run."""
    try:
        from torch.sparse._triton_ops import bsr_dense_mm
        w_bsr = dense_w.to_sparse_bsr((block, block))
        xt = x.T.contiguous()
        bsr_dense_mm(w_bsr, xt)
        return (lambda: bsr_dense_mm(w_bsr, xt)), None
    except Exception as error:  # noqa: BLE001  (report, don't hide: the row says why)
        return None, f"{type(error).__name__}: {error}"


def _measure(args, dtype_name, block, density, device, env):
    dtype, f, t = DTYPES[dtype_name], args.features, args.tokens
    kernels = {name: sk.kernels.select_kernel(product, device, dtype, backend="triton")[1]
               for name, product in PRODUCTS.items()}
    grid = f // block
    gen = torch.Generator().manual_seed(0)
    cells = grid * grid
    mask = torch.zeros(cells, dtype=torch.bool)
    mask[torch.randperm(cells, generator=gen)[:max(1, round(density * cells))]] = True
    dense_w = torch.randn(f, f, generator=gen).to(device=device, dtype=dtype)
    weight = sk.BlockSparseMatrix.from_dense(dense_w, block, block_mask=mask.view(grid, grid).to(device))
    masked_w = weight.to_dense()
    values, layout = weight.values, weight.layout
    x = torch.randn(t, f, device=device, dtype=dtype)
    dy = torch.randn(t, f, device=device, dtype=dtype)

    products = {
        "fwd": (lambda: x @ masked_w.T, lambda: kernels["fwd"](x, values, layout)),
        "dx": (lambda: dy @ masked_w, lambda: kernels["dx"](dy, values, layout)),
        "dw": (lambda: dy.T @ x, lambda: kernels["dw"](dy, x, layout)),
    }
    pairs = dict(products, step=(lambda: [dense() for dense, _ in products.values()],
                                 lambda: [sparse() for _, sparse in products.values()]))
    torch_bsr, torch_bsr_error = _torch_bsr_forward(masked_w, block, x)
    if torch_bsr is not None:
        pairs["torch_bsr_fwd"] = (torch_bsr, pairs["fwd"][1])

    # alternate's warm-up calls autotune (and compile) every kernel: out of the timings.
    fns = {(name, side): fn for name, pair in pairs.items() for side, fn in zip(("baseline", "sparse"), pair)}
    times, _ = alternate(fns, args.rounds, _do_bench)
    y = kernels["fwd"](x, values, layout).float()
    y_ref = x.float() @ masked_w.float().T
    rel_err = ((y - y_ref).norm() / y_ref.norm().clamp_min(1e-30)).item()
    stored_flop = 2.0 * t * layout.nnz_blocks * block * block
    row = dict(env, **kernel_path("bsr_forward", device, dtype), bench="bsr_triton",
               allow_tf32=torch.backends.cuda.matmul.allow_tf32, dtype=dtype_name, tokens=t, out_features=f,
               in_features=f, block=block, density=layout.density, nnz_blocks=layout.nnz_blocks,
               rel_err_fwd=rel_err, torch_bsr_error=torch_bsr_error)
    for name in pairs:
        baseline_ms, sparse_ms = times[name, "baseline"], times[name, "sparse"]
        row[f"{name}_baseline_ms"] = statistics.median(baseline_ms)
        row[f"{name}_sparse_ms"] = statistics.median(sparse_ms)
        row[f"{name}_ratio"] = median_ratio(baseline_ms, sparse_ms)
    for name, products in (("fwd", 1), ("dx", 1), ("dw", 1), ("step", 3)):
        row[f"{name}_tflops_stored"] = products * stored_flop / row[f"{name}_sparse_ms"] / 1e9
    row["limit_frac"] = row["step_ratio"] * layout.density
    return row


def _print_header():
    print(f"{'dtype':5} {'blk':>4} {'dens':>5} | {'fwd x':>6} {'dx x':>6} {'dw x':>6} {'step x':>6} {'%lim':>5} "
          f"| {'TF/s':>6} | {'vsTorchBSR':>10} | {'relerr':>7}")


def _print_row(row):
    vs_torch = f"{row['torch_bsr_fwd_ratio']:10.2f}" if "torch_bsr_fwd_ratio" in row else f"{'n/a':>10}"
    print(f"{row['dtype']:5} {row['block']:4d} {row['density']:5.3f} | {row['fwd_ratio']:6.2f} {row['dx_ratio']:6.2f} "
          f"{row['dw_ratio']:6.2f} {row['step_ratio']:6.2f} {100 * row['limit_frac']:5.0f} "
          f"| {row['step_tflops_stored']:6.1f} | {vs_torch} | {row['rel_err_fwd']:7.1e}", flush=True)


def main(argv=None):
    args = _parse(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_bsr_triton.py needs a CUDA GPU (torch.cuda.is_available() is False); the triton kernels' "
                 "correctness on CPU is covered by tests/test_bsr_triton.py under TRITON_INTERPRET=1.")
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the benchmark times compiled kernels, not the interpreter")
    bad = [b for b in args.blocks if args.features % b]
    if bad:
        sys.exit(f"--features {args.features} is not divisible by block sizes {bad}")
    device = torch.device("cuda")
    env = environment(device)
    print(f"# {header(env, kernel_path('bsr_forward', device, DTYPES[args.dtypes[0]]))}, triton {env['triton']}, "
          f"W {args.features}x{args.features}, {args.tokens} tokens; ratios = dense ms / sparse ms "
          f"(vsTorchBSR = torch BSR fwd ms / ours), %lim = step ratio x density, TF/s on stored blocks (step)")
    _print_header()
    rows = []
    for dtype_name in args.dtypes:
        for block in args.blocks:
            for density in args.densities:
                rows.append(_measure(args, dtype_name, block, density, device, env))
                _print_row(rows[-1])
    print("# JSON rows")
    for row in rows:
        print(json.dumps(row))
    append_rows(rows, args.json)


if __name__ == "__main__":
    main()
