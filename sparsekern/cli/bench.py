"""``sparsekern bench``: the kernel microbenchmarks of bench/ (the same cases and timing, from
``bsr_bench``, ``conv_bench``, ``semi_bench`` and ``lowrank_bench``), with progress, the ratio
table, JSON rows and, with matplotlib, a plot: the training-step speed-up against density per
block size (bsr, conv), or the speed-up of each case (semi, lowrank)."""
import os
import time

import torch

from . import arguments, bsr_bench, conv_bench, lowrank_bench, semi_bench
from .errors import CliError
from .machine import environment, header, kernel_path
from .output import PLOT_HINT, matplotlib_or_none, out_dir, write_json_lines
from .progress import Progress, format_duration
from .timing import TIMER_HELP, Timer

PRODUCTS = ("bsr", "conv", "semi", "lowrank")
DTYPES = bsr_bench.DTYPES
FEATURES = {"bsr": 2048, "semi": 4096, "lowrank": 4096}  # each family's documented default shape
BLOCKS = {"bsr": [16, 32, 64], "conv": [32]}
DENSITIES = {"bsr": [1.0, 0.5, 0.25, 0.1, 0.05], "conv": [1.0, 0.5, 0.25, 0.1]}
NAMES = {"bsr": "bsr_linear", "conv": "conv2d", "semi": "semi_linear", "lowrank": "lowrank_linear"}


def add_parser(subparsers):
    p = subparsers.add_parser(
        "bench", help="one sparse layer vs dense nn.Linear / F.conv2d: fwd, dX, dW and step speed-ups",
        description="Kernel microbenchmarks: dense nn.Linear vs one sparse layer, timed alternately in one "
                    "process; ratios are medians over rounds of dense ms / sparse ms (> 1: sparse is faster). "
                    "bsr: SparseLinear (forward, dX, dW, training step) per block size and density; conv: "
                    "SparseConv2d vs F.conv2d (3x3, channels-last), the same per shape and density; semi: "
                    "SemiSparseLinear 2:4 (forward, forward+backward static/row-wise/dynamic, prune); lowrank: "
                    "LowRankLinear (forward+backward, two-GEMM composite, DLRT step) per rank. Prints the table; "
                    "writes JSON rows and, with matplotlib, a PNG.",
        formatter_class=arguments.HelpFormatter)
    p.add_argument("--product", choices=PRODUCTS, default="bsr", help="kernel family")
    p.add_argument("--tokens", type=arguments.positive_int, default=2048, help="rows of X")
    p.add_argument("--features", type=arguments.positive_int, default=None,
                   help="W is features x features (default: bsr 2048, semi and lowrank 4096)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="of X, W and the gradients")
    p.add_argument("--reps", type=arguments.positive_int, default=5, help="timed alternating rounds per case")
    p.add_argument("--densities", type=arguments.density, nargs="+", default=None,
                   help="bsr, conv: fractions of the blocks stored (default: bsr 1 0.5 0.25 0.1 0.05, conv "
                        "1 0.5 0.25 0.1)")
    p.add_argument("--blocks", type=arguments.positive_int, nargs="+", default=None,
                   help="bsr, conv: block edges (square blocks; default: bsr 16 32 64, conv 32)")
    p.add_argument("--conv-shapes", default="128x16,256x8",
                   help="conv: channels x image size of each 3x3 conv C -> C, comma separated")
    p.add_argument("--batch", type=arguments.positive_int, default=64, help="conv: images per batch")
    p.add_argument("--no-torch-bsr", action="store_true", help="bsr: skip torch's BSR forward (the peer)")
    p.add_argument("--ranks", type=arguments.positive_int, nargs="+", default=[256, 64], help="lowrank: ranks")
    p.add_argument("--threads", type=arguments.positive_int, default=None,
                   help="torch threads (default: torch's own choice)")
    p.add_argument("--timer", choices=("wall", "cpu", "thread"), default="wall", help=TIMER_HELP)
    p.add_argument("--out", default=None, help="output folder (default: ./sparsekern-bench-<timestamp>/)")
    p.set_defaults(run=run)
    return p


def _check(args):
    if args.product == "conv":
        try:
            args.shapes = conv_bench.parse_shapes(args.conv_shapes)
        except ValueError as exc:
            raise CliError(f"--conv-shapes: {exc}") from None
    if args.product == "bsr":
        bad = [b for b in args.blocks if args.features % b]
        if bad:
            raise CliError(f"--features {args.features} must be a multiple of every block size; not of {bad}")
    if args.product == "semi" and args.features % 4:
        raise CliError(f"--features {args.features}: 2:4 layers need a multiple of 4")
    if args.product == "lowrank":
        bad = [r for r in args.ranks if r > args.features]
        if bad:
            raise CliError(f"--ranks {bad} exceed --features {args.features}")


def _cases(args, measure, context, on_case, on_round):
    """The product's rows (a generator), its table header and line format, and its first line."""
    dtype, cpu = DTYPES[args.dtype], torch.device("cpu")
    if args.product == "conv":
        def cases():
            for block in args.blocks:
                yield from conv_bench.run_cases(args.shapes, args.densities, args.batch, block, args.reps, measure,
                                                context, on_case, on_round, dtype=dtype)
        head = f"# {args.dtype}, batch {args.batch}, channels-last, 3x3 pad 1, median of {args.reps} alternating rounds"
        return cases(), f"{head}\n{conv_bench.HEADER}", conv_bench.format_row
    if args.product == "bsr":
        def announce(index, count, block, density):
            on_case(index, count, f"block {block}, density {density}")
        return (bsr_bench.run_cases(args, measure, context, announce, on_round),
                f"{bsr_bench.LEGEND}\n{bsr_bench.HEADER}", bsr_bench.format_row)
    protocol = f"{args.dtype}, median of {args.reps} alternating rounds, {args.timer} time"
    if args.product == "semi":
        rows = semi_bench.run_cases([(args.tokens, args.features, args.features)], args.reps, dtype, cpu,
                                    semi_bench.CASES, measure, context, on_case, on_round)
        return rows, f"# {protocol}\n{semi_bench.HEADER}", semi_bench.format_row
    rows = lowrank_bench.run_cases(args.tokens, args.features, args.features, args.ranks, args.reps, dtype, cpu,
                                   lowrank_bench.CASES, measure, context, on_case=on_case, on_round=on_round)
    return rows, f"# {protocol}\n{lowrank_bench.HEADER}", lowrank_bench.format_row


def run(args):
    args.features = args.features or FEATURES.get(args.product)
    args.blocks = args.blocks or BLOCKS.get(args.product)
    args.densities = args.densities or DENSITIES.get(args.product)
    _check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.in_features = args.out_features = args.features  # the names the bsr cases read
    measure = Timer(args.timer)
    folder = out_dir(args.out, "bench")
    name = NAMES[args.product]
    env = environment()
    path = kernel_path(f"{args.product}_forward", torch.device("cpu"), DTYPES[args.dtype])
    context = {"bench": name, **env, **path}
    if args.product == "bsr":
        print(bsr_bench.title(env, path, args))
    elif args.product == "conv":
        print(f"# {header(env, path)}; the floor rule may send a product to the dense composite (path column)")
    else:
        print(f"# {header(env, path)}, X {args.tokens}x{args.features}, W {args.features}x{args.features}")
    progress = Progress(["bench"])
    start = time.perf_counter()
    case = {}

    def on_case(index, count, label):
        case.update(index=index, count=count, name=f"case {index + 1}/{count} ({label})")
        progress.update("bench", f"{case['name']}: building", force=True)

    def on_round(done, rounds):
        elapsed = time.perf_counter() - start
        fraction = (case["index"] + (done + 1) / (rounds + 1)) / case["count"]  # the warm-up counts as a round
        progress.update("bench", f"{case['name']}: round {done}/{rounds}  elapsed {format_duration(elapsed)}  "
                                 f"ETA {format_duration(elapsed * (1 - fraction) / fraction)}")

    rows_iter, table_head, format_row = _cases(args, measure, context, on_case, on_round)
    print(table_head, flush=True)
    rows = []
    for row in rows_iter:
        rows.append(row)
        progress.write(format_row(row))
    progress.update("bench", f"{len(rows)} cases in {format_duration(time.perf_counter() - start)}", force=True)
    progress.close()
    json_path = os.path.join(folder, f"{name}.jsonl")
    write_json_lines(rows, json_path)
    print(f"JSON rows: {json_path}")
    plt = matplotlib_or_none()
    if plt is None:
        print(PLOT_HINT)
    else:
        from .plots import bench_figure, case_ratio_figure, conv_figure
        png = os.path.join(folder, f"{name}.png")
        if args.product == "bsr":
            bench_figure(plt, rows, png)
        elif args.product == "conv":
            conv_figure(plt, rows, png)
        else:
            case_ratio_figure(plt, rows, png)
        print(f"plot: {png}")
    return 0
