"""2:4 (SemiSparseLinear) vs dense nn.Linear: forward, forward+backward, prune+compress.

    python bench/bench_semi_linear.py                     # CPU fp32: 2048 tokens, 4096 -> 4096
    python bench/bench_semi_linear.py --device cuda --dtype bfloat16 \\
        --shapes 13008,1024,4096 13008,4096,1024          # the GPU shapes (ViT-L MLP, batch 13008 tokens)
    python bench/bench_semi_linear.py --timer thread --threads 1 --json bench/results/semi_linear.jsonl
    python -m pytest bench/bench_semi_linear.py -p no:cacheprovider --benchmark-only   # small-shape microbenchmarks

Shapes are ``tokens,in_features,out_features``. Rows (each timed in the same
process as its dense baseline, alternating, ratio = median over repeats of
dense_ms / sparse_ms for the pair measured back to back):

* ``fwd``: inference forward (no autograd), static transposable 2:4.
* ``fwd+bwd static``: y = layer(x); y.backward(dy), x requiring grad, bias on;
  static mode (compressed parameter, dX through Wᵀ's compression, sampled dW).
* ``fwd+bwd static rowwise``: the same with row-wise 2:4 (dX by the scatter kernel).
* ``fwd+bwd dynamic``: dense master weight re-pruned (transposable) every call,
  dense straight-through dW.
* ``prune``: one prune+compress (transposable, W and Wᵀ) of the weight; its
  ``ratio`` is prune_ms / dense forward ms (the fraction of a matmul it costs).

Rows are printed as a table and as JSON lines (``--json`` appends them to a file).
"""
import argparse
import json
import os

# Huge pages for torch's large CPU allocations, on both sides, as in bench_bsr_linear.py:
# every fresh 32 MB output is otherwise page-faulted in 4 KB at a time. torch reads this
# once, at its first allocation; THP_MEM_ALLOC_ENABLE=0 measures without.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import sparsekern as sk  # noqa: E402
from timing import TIMER_HELP, Timer, append_rows, compare, environment, fwd_bwd, header, kernel_path  # noqa: E402

CASES = ("fwd", "fwd+bwd static", "fwd+bwd static rowwise", "fwd+bwd dynamic", "prune")


def _forward(layer, x):
    def run():
        with torch.no_grad():
            layer(x)
    return run


def _prune(weight):
    _, fn = sk.kernels.select_kernel("semi_prune_compress", weight.device, weight.dtype)
    return lambda: fn(weight, True)


def run(shapes, repeats, dtype, device, cases, measure, context):
    rows = []
    for tokens, in_features, out_features in shapes:
        torch.manual_seed(0)
        factory = dict(device=device, dtype=dtype)
        x = torch.randn(tokens, in_features, **factory, requires_grad=True)
        dy = torch.randn(tokens, out_features, **factory)
        dense = nn.Linear(in_features, out_features, **factory)
        row = dict(context, dtype=str(dtype).replace("torch.", ""), tokens=tokens, in_features=in_features,
                   out_features=out_features, sparsity="2:4")
        layers = {
            "fwd": lambda: sk.SemiSparseLinear.from_dense(dense),
            "fwd+bwd static": lambda: sk.SemiSparseLinear.from_dense(dense),
            "fwd+bwd static rowwise": lambda: sk.SemiSparseLinear.from_dense(dense, transposable=False),
            "fwd+bwd dynamic": lambda: sk.SemiSparseLinear.from_dense(dense, mode="dynamic"),
        }
        for case in cases:
            if case == "prune":
                rows.append(compare(case, _forward(dense, x), _prune(dense.weight.detach()), repeats, measure,
                                    row, as_fraction=True))
            elif case == "fwd":
                rows.append(compare(case, _forward(dense, x), _forward(layers[case](), x), repeats, measure, row))
            else:
                rows.append(compare(case, fwd_bwd(dense, x, dy), fwd_bwd(layers[case](), x, dy), repeats,
                                    measure, row))
    return rows


def _shape(text):
    parts = tuple(int(p) for p in text.split(","))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"shape must be tokens,in_features,out_features, got {text!r}")
    return parts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=_shape, nargs="+", default=[(2048, 4096, 4096)])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--timer", choices=("wall", "cpu", "thread"), default="wall", help=TIMER_HELP)
    parser.add_argument("--json", help="append the JSON rows to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    env, path = environment(device), kernel_path("semi_forward", device, dtype)
    print(f"# {header(env, path)}, {args.dtype}, median of {args.repeats} alternating rounds, {args.timer} time")
    rows = run(args.shapes, args.repeats, dtype, device, args.cases, Timer(args.timer, device),
               {"bench": "semi_linear", **env, **path})
    print(f"{'case':<24} {'shape (tokens,in,out)':>22} {'dense ms':>10} {'2:4 ms':>9} {'ratio':>7}")
    for r in rows:
        shape = f"{r['tokens']},{r['in_features']},{r['out_features']}"
        ratio = f"{r['ratio']:.3f} of fwd" if r["case"] == "prune" else f"{r['ratio']:.2f}x"
        print(f"{r['case']:<24} {shape:>22} {r['dense_ms']:>10.1f} {r['sparse_ms']:>9.1f} {ratio:>7}")
    for r in rows:
        print(json.dumps(r))
    append_rows(rows, args.json)


# pytest-benchmark microbenchmarks (small shapes; the command is in the module docstring).
def test_bench_semi_linear_fwd_bwd(benchmark):
    layer = sk.SemiSparseLinear(512, 512)
    x = torch.randn(256, 512, requires_grad=True)
    benchmark(fwd_bwd(layer, x, torch.randn(256, 512)))


def test_bench_semi_prune(benchmark):
    benchmark(_prune(torch.randn(512, 512)))


if __name__ == "__main__":
    main()
