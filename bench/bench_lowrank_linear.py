"""Low-rank vs dense linear layers: forward+backward and a full training step.

    python bench/bench_lowrank_linear.py                      # CPU fp32, 4096x4096, 2048 tokens, r = 256 and 64
    python bench/bench_lowrank_linear.py --ranks 256 --repeats 9 --json bench/results/lowrank_linear.jsonl
    python bench/bench_lowrank_linear.py --threads 1          # steadier on a machine shared with other jobs
    python bench/bench_lowrank_linear.py --keep-freed-memory  # no page faults for fresh 32 MB outputs (both sides)
    python bench/bench_lowrank_linear.py --balanced           # steady state: low-rank timed in blocks of calls
    python -m pytest bench/bench_lowrank_linear.py -p no:cacheprovider --benchmark-only   # small-shape microbenchmarks

The cases (``fwd+bwd``, ``unfused``, ``step``) and their timing are the package's
(``sparsekern.cli.lowrank_bench``, which ``sparsekern bench --product lowrank`` runs too).
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
from sparsekern.cli.lowrank_bench import CASES, HEADER, dlrt_step, format_row, run_cases  # noqa: E402
from timing import TIMER_HELP, Timer, append_rows, environment, fwd_bwd, header, kernel_path  # noqa: E402


def keep_freed_memory():
    """Make glibc keep freed large blocks mapped (no mmap/munmap per >= 32 MB tensor).

    By default every fresh y / dx of 2048 x 4096 fp32 that torch allocates is a
    new mapping that is page-faulted in again (the dense side's; sparsekern's
    kernels reuse their own freed outputs, see sparsekern.output_cache_info).
    Applies to everything torch allocates on both sides; Linux/glibc only.
    """
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 2 ** 31 - 1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--in-features", type=int, default=4096)
    parser.add_argument("--out-features", type=int, default=4096)
    parser.add_argument("--ranks", type=int, nargs="+", default=[256, 64])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc mallopt: keep freed large blocks mapped (see keep_freed_memory)")
    parser.add_argument("--balanced", action="store_true",
                        help="time the low-rank side in blocks of back-to-back calls as long as one dense call "
                             "(steady state, as in training; default: one call per sample)")
    parser.add_argument("--timer", choices=("wall", "cpu", "thread"), default="wall", help=TIMER_HELP)
    parser.add_argument("--json", help="append the JSON rows to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory and not keep_freed_memory():
        raise SystemExit("mallopt refused the thresholds")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    env, path = environment(device), kernel_path("lowrank_forward", device, dtype)
    print(f"# {header(env, path)}, {args.dtype}, median of {args.repeats} alternating rounds, {args.timer} time"
          f"{', balanced' if args.balanced else ''}")
    print(HEADER)
    rows = []
    for row in run_cases(args.tokens, args.in_features, args.out_features, args.ranks, args.repeats, dtype, device,
                         args.cases, Timer(args.timer, device), {"bench": "lowrank_linear", **env, **path},
                         args.balanced):
        rows.append(dict(row, keep_freed_memory=args.keep_freed_memory, balanced=args.balanced))
        print(format_row(row), flush=True)
    for r in rows:
        print(json.dumps(r))
    append_rows(rows, args.json)


# pytest-benchmark microbenchmarks (small shapes; the command is in the module docstring).
def test_bench_lowrank_fwd_bwd(benchmark):
    layer = sk.LowRankLinear(512, 512, 32)
    x = torch.randn(256, 512, requires_grad=True)
    benchmark(fwd_bwd(layer, x, torch.randn(256, 512)))


def test_bench_dlrt_step(benchmark):
    layer = sk.LowRankLinear(512, 512, 32)
    x = torch.randn(256, 512, requires_grad=True)
    benchmark(dlrt_step(layer, x, torch.randn(256, 512), 1e-6, 32))


if __name__ == "__main__":
    main()
