"""2:4 (SemiSparseLinear) vs dense nn.Linear: forward, forward+backward, prune+compress.

    python bench/bench_semi_linear.py                     # CPU fp32: 2048 tokens, 4096 -> 4096
    python bench/bench_semi_linear.py --device cuda --dtype bfloat16 \\
        --shapes 13008,1024,4096 13008,4096,1024          # the GPU shapes (ViT-L MLP, batch 13008 tokens)
    python bench/bench_semi_linear.py --timer thread --threads 1 --json bench/results/semi_linear.jsonl
    python -m pytest bench/bench_semi_linear.py -p no:cacheprovider --benchmark-only   # small-shape microbenchmarks

Shapes are ``tokens,in_features,out_features``. The cases and their timing are the package's
(``sparsekern.cli.semi_bench``, which ``sparsekern bench --product semi`` runs too): ``fwd``,
``fwd+bwd static``, ``fwd+bwd static rowwise``, ``fwd+bwd dynamic`` and ``prune``.
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

import sparsekern as sk  # noqa: E402
from sparsekern.cli.semi_bench import CASES, HEADER, format_row, run_cases  # noqa: E402
from timing import TIMER_HELP, Timer, append_rows, environment, fwd_bwd, header, kernel_path  # noqa: E402


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
    print(HEADER)
    rows = []
    for row in run_cases(args.shapes, args.repeats, dtype, device, args.cases, Timer(args.timer, device),
                         {"bench": "semi_linear", **env, **path}):
        rows.append(row)
        print(format_row(row), flush=True)
    for r in rows:
        print(json.dumps(r))
    append_rows(rows, args.json)


# pytest-benchmark microbenchmarks (small shapes; the command is in the module docstring).
def test_bench_semi_linear_fwd_bwd(benchmark):
    layer = sk.SemiSparseLinear(512, 512)
    x = torch.randn(256, 512, requires_grad=True)
    benchmark(fwd_bwd(layer, x, torch.randn(256, 512)))


def test_bench_semi_prune(benchmark):
    _, prune = sk.kernels.select_kernel("semi_prune_compress", torch.device("cpu"), torch.float32)
    weight = torch.randn(512, 512)
    benchmark(lambda: prune(weight, True))


if __name__ == "__main__":
    main()
