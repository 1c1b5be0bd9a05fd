"""Benchmark: block-sparse Conv2d (sparsekern.SparseConv2d) vs dense F.conv2d (CPU, or a GPU).

    python bench/bench_conv2d.py                  # the default cases, about two minutes on 2 cores
    python bench/bench_conv2d.py --reps 9 --json bench/results/conv2d.jsonl
    python bench/bench_conv2d.py --dtype bf16     # against dense bf16 (oneDNN's AMX conv where the CPU has it)
    python bench/bench_conv2d.py --device cuda --dtype bf16   # a GPU: the triton kernels against cuDNN

The cases, their timing and the table are the package's (``sparsekern.cli.conv_bench``, which
``sparsekern bench --product conv`` runs too): fwd, dx, dw and the layer step of 3x3 convs
C -> C at H x H, channels-last, each against dense F.conv2d in one process, with the path the
floor rule took for each product.
"""
import argparse
import json
import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as bench_bsr_linear.py: huge pages for large outputs

import torch  # noqa: E402

from sparsekern.cli.bsr_bench import DTYPES  # noqa: E402
from sparsekern.cli.conv_bench import HEADER, format_row, parse_shapes, run_cases  # noqa: E402
from sparsekern.kernels.microkernel import microkernel_isa  # noqa: E402
from timing import TIMER_HELP, Timer, append_rows, checked_device, environment, header  # noqa: E402


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="128x16,256x8", help="channels x spatial size, comma separated")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--stride", type=int, default=1, choices=(1, 2, 3), help="stride of the 3x3 convs")
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="of x, the weight and the gradients")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for dense and sparse")
    parser.add_argument("--reps", type=int, default=5, help="timed alternating rounds per product")
    parser.add_argument("--timer", choices=("wall", "cpu", "thread"), default="wall", help=TIMER_HELP)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU kernels against cuDNN")
    parser.add_argument("--json", default="", help="also append the JSON rows to this file")
    args = parser.parse_args(argv)
    args.device = checked_device(parser, args.device)
    return args


def main(argv=None):
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    measure = Timer(args.timer, args.device)
    env = environment(args.device)
    isa = microkernel_isa("conv") if args.device.type == "cpu" else None
    backend = "cpu" if args.device.type == "cpu" else "triton"
    print(header(env, {"backend": f"{backend} (floor rule: composite where dense wins)", "isa": isa}))
    print(f"# batch {args.batch}, {args.dtype}, channels-last, 3x3 pad 1 stride {args.stride}, block {args.block}, "
          f"{args.reps} rounds; "
          "ratio = dense ms / sparse ms")
    print(HEADER)
    rows = []
    context = {"bench": "conv2d", **env, "isa": isa}
    for row in run_cases(parse_shapes(args.shapes), args.densities, args.batch, args.block, args.reps, measure,
                         context, stride=args.stride, dtype=DTYPES[args.dtype], device=args.device):
        rows.append(row)
        print(format_row(row), flush=True)
    for row in rows:
        print(json.dumps(row))
    append_rows(rows, args.json)
    return rows


if __name__ == "__main__":
    main()
