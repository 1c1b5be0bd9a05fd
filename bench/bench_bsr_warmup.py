"""How a block-sparse forward's time depends on what ran before it: calls 1..N timed after the
same forward (back to back), after a dense GEMM of the same shape and dtype, and after an idle
pause. Side-by-side benchmarks alternate single calls, so the sparse side always runs right
after the dense one; where the CPU needs several calls to return to speed (an AMX Xeon's bf16
products did), that protocol measures the first calls, and this one shows by how much.

    python bench/bench_bsr_warmup.py                                   # bf16, density 0.1 and 0.05
    python bench/bench_bsr_warmup.py --dtype fp32 --densities 0.1 --json bench/results/bsr_warmup.jsonl
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as bench_bsr_linear.py: no 4 KiB page faults on outputs

import torch  # noqa: E402

import sparsekern as sk  # noqa: E402
from sparsekern.kernels.floor import set_floor_mode  # noqa: E402
from timing import append_rows, environment, header, kernel_path  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def calls_after(before, call, calls, rounds):
    """Median over rounds of each of ``calls`` timed calls of ``call`` right after ``before()``, in ms."""
    times = []
    for _ in range(rounds):
        before()
        row = []
        for _ in range(calls):
            start = time.perf_counter()
            call()
            row.append((time.perf_counter() - start) * 1e3)
        times.append(row)
    return [statistics.median(row[i] for row in times) for i in range(calls)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.05])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--features", type=int, default=4096, help="in and out features")
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--calls", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--pause-ms", type=float, default=40.0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="append the rows to this JSON-lines file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    set_floor_mode("off")  # the kernel on every call: its warm-up is what is measured
    dtype, n = DTYPES[args.dtype], args.features
    env, path = environment(), kernel_path("bsr_forward", torch.device("cpu"), dtype)
    print("# " + header(env, path))
    print(f"# forward of X {args.tokens}x{n} by a {n}x{n} block-{args.block} layer, {args.dtype}; median of "
          f"{args.rounds} rounds of {args.calls} calls; the dense forward x @ w.T of the same shape for reference")
    x, w = torch.randn(args.tokens, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    rows = []
    with torch.no_grad():
        dense_ms = calls_after(lambda: None, lambda: x @ w.t(), 3, args.rounds)[-1]
        for density in args.densities:
            layer = sk.SparseLinear(n, n, block_size=args.block, density=density, bias=False, dtype=dtype)
            befores = {"back to back": lambda: layer(x), "after dense": lambda: x @ w.t(),
                       f"after {args.pause_ms:g} ms idle": lambda: time.sleep(args.pause_ms / 1e3)}
            for name, before in befores.items():
                ms = calls_after(before, lambda: layer(x), args.calls, args.rounds)
                print(f"density {density:<5g} {name:18s} calls 1-{args.calls} ms: " + " ".join(f"{t:6.2f}" for t in ms)
                      + f"   dense / first {dense_ms / ms[0]:5.2f}x, dense / last {dense_ms / ms[-1]:5.2f}x")
                rows.append(dict(bench="bsr_warmup", **env, **path, dtype=args.dtype, tokens=args.tokens,
                                 features=n, block=args.block, density=density, before=name, call_ms=ms,
                                 dense_ms=dense_ms, rounds=args.rounds))
    print(f"# dense forward (warm, back to back): {dense_ms:.2f} ms")
    append_rows(rows, args.json)


if __name__ == "__main__":
    main()
