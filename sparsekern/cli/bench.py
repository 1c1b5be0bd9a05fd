"""``sparsekern bench``: the block-sparse layer microbenchmark of bench/bench_bsr_linear.py (the
same cases and timing: sparsekern.cli.bsr_bench), with progress, the ratio table, JSON rows and,
with matplotlib, a plot of the training-step speed-up against density per block size."""
import os
import time

import torch

from . import arguments
from .bsr_bench import DTYPES, HEADER, LEGEND, format_row, run_cases, title
from .errors import CliError
from .machine import environment, kernel_path
from .output import PLOT_HINT, matplotlib_or_none, out_dir, write_json_lines
from .progress import Progress, format_duration
from .timing import TIMER_HELP, Timer

PRODUCTS = ("bsr", "semi", "lowrank")
NOT_YET = {"semi": "bench/bench_semi_linear.py", "lowrank": "bench/bench_lowrank_linear.py"}


def add_parser(subparsers):
    p = subparsers.add_parser(
        "bench", help="block-sparse layer vs dense nn.Linear: fwd, dX, dW and step speed-ups",
        description="The block-sparse layer microbenchmark of bench/bench_bsr_linear.py: dense nn.Linear vs "
                    "SparseLinear (forward, dX, dW and the training step), timed alternately in one process; "
                    "ratios are medians over rounds of dense ms / sparse ms (> 1: sparse is faster). Prints the "
                    "table; writes JSON rows and, with matplotlib, a PNG.",
        formatter_class=arguments.HelpFormatter)
    p.add_argument("--product", choices=PRODUCTS, default="bsr", help="kernel family (only bsr so far)")
    p.add_argument("--densities", type=arguments.density, nargs="+", default=[1.0, 0.5, 0.25, 0.1, 0.05],
                   help="fractions of the blocks stored")
    p.add_argument("--blocks", type=arguments.positive_int, nargs="+", default=[16, 32, 64],
                   help="block edges (square blocks)")
    p.add_argument("--tokens", type=arguments.positive_int, default=2048, help="rows of X")
    p.add_argument("--features", type=arguments.positive_int, default=2048, help="W is features x features")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="of X, W and the gradients")
    p.add_argument("--reps", type=arguments.positive_int, default=5, help="timed alternating rounds per case")
    p.add_argument("--threads", type=arguments.positive_int, default=None,
                   help="torch threads (default: torch's own choice)")
    p.add_argument("--timer", choices=("wall", "cpu", "thread"), default="wall", help=TIMER_HELP)
    p.add_argument("--no-torch-bsr", action="store_true", help="skip torch's BSR forward (the peer)")
    p.add_argument("--out", default=None, help="output folder (default: ./sparsekern-bench-<timestamp>/)")
    p.set_defaults(run=run)
    return p


def run(args):
    if args.product in NOT_YET:
        raise CliError(f"--product {args.product}: not yet available in the CLI; from a source checkout run "
                       f"python {NOT_YET[args.product]}")
    bad = [b for b in args.blocks if args.features % b]
    if bad:
        raise CliError(f"--features {args.features} must be a multiple of every block size; not of {bad}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.in_features = args.out_features = args.features  # the names the shared cases read
    measure = Timer(args.timer)
    folder = out_dir(args.out, "bench")
    env, path = environment(), kernel_path("bsr_forward", torch.device("cpu"), DTYPES[args.dtype])
    context = {"bench": "bsr_linear", **env, **path}
    print(title(env, path, args))
    print(LEGEND)
    print(HEADER, flush=True)
    progress = Progress(["bench"])
    start = time.perf_counter()
    case = {}

    def on_case(index, count, block, density):
        case.update(index=index, count=count, name=f"case {index + 1}/{count} (block {block}, density {density})")
        progress.update("bench", f"{case['name']}: building", force=True)

    def on_round(done, rounds):
        elapsed = time.perf_counter() - start
        fraction = (case["index"] + (done + 1) / (rounds + 1)) / case["count"]  # the warm-up counts as a round
        progress.update("bench", f"{case['name']}: round {done}/{rounds}  elapsed {format_duration(elapsed)}  "
                                 f"ETA {format_duration(elapsed * (1 - fraction) / fraction)}")

    rows = []
    for row in run_cases(args, measure, context, on_case, on_round):
        rows.append(row)
        progress.write(format_row(row))
    progress.update("bench", f"{len(rows)} cases in {format_duration(time.perf_counter() - start)}", force=True)
    progress.close()
    json_path = os.path.join(folder, "bsr_linear.jsonl")
    write_json_lines(rows, json_path)
    print(f"JSON rows: {json_path}")
    plt = matplotlib_or_none()
    if plt is None:
        print(PLOT_HINT)
    else:
        from .plots import bench_figure
        png = os.path.join(folder, "bsr_linear.png")
        bench_figure(plt, rows, png)
        print(f"plot: {png}")
    return 0
