"""GPU benchmark of the triton block-sparse products against cuBLAS and torch's block-sparse kernels.

    python bench/bench_bsr_triton.py --quick --json bench/results/bsr_triton.jsonl   # one small config
    python bench/bench_bsr_triton.py --json bench/results/bsr_triton.jsonl           # the sweep: 216 configs
    python bench/bench_bsr_triton.py --tokens 8192 --shapes 4096x11008 --blocks 64 --masks skewed

Sweep (every combination): tokens 4096 / 8192 / 16384; W (out x in) 4096x4096, 4096x11008,
11008x4096; blocks 32 / 64 / 128; block densities 0.5 / 0.25 / 0.1 / 0.05; masks ``uniform``
(blocks drawn uniformly) and ``skewed`` (power-law block rows: row i of a shuffled order
draws blocks with weight 1/(i+1)). bf16 operands, TF32 off (fp32 products stay fp32).

Products of one layer, X (tokens x in), dY (tokens x out):

* ``fwd``  Y = X Wᵀ      baselines: cuBLAS on the masked dense W; torch ``bsr_dense_mm``
  (untuned, and tuned by ``torch.sparse._triton_ops_meta.tune_bsr_dense_addmm``), computing Yᵀ = W Xᵀ
* ``dx``   dX = dY W     baselines: cuBLAS; torch ``bsr_dense_mm`` on Wᵀ (untuned and tuned)
* ``dw``   dW = dYᵀ X on the stored blocks   baselines: cuBLAS (dense dW); torch ``sampled_addmm``
* ``step`` fwd + dx + dw.

Timing: every callable is captured in a CUDA graph (``--graph-calls`` calls per graph) and
its kernel time is a replay's device time per call (when a capture fails: the summed kernel
times of torch's profiler); its wall time is an eager call, host launch included, between
two device synchronisations. ``--rounds`` alternating rounds (every callable once per round,
in a fixed order), the median over rounds.

Limit model: a product on a fraction d of W's blocks cannot beat d x (cuBLAS time) nor move
its bytes faster than the device's bandwidth: limit = max(d x T_dense, bytes / bandwidth),
bytes = the operand rows and columns the stored blocks touch, W's stored values and the
output, once each; bandwidth = a device-to-device copy measured at start (``--bandwidth``
overrides). ``pct_limit`` = limit / our time (1.0 = at the limit); a step's limit is the
sum of its products'.

Correctness: for every config, our three products and torch's against fp64 on the same
masked W (relative Frobenius error; ours must stay within 2e-2, else the row says WRONG and
the exit status is 1).
Rows (one per config, device name included) are printed as JSON lines and appended to
``--json``.
"""
import argparse
import dataclasses
import inspect
import itertools
import json
import os
import statistics
import sys
import time

import torch

import sparsekern as sk
from timing import append_rows, environment, header

TOKENS = (4096, 8192, 16384)
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))  # W: (out, in)
BLOCKS = (32, 64, 128)
DENSITIES = (0.5, 0.25, 0.1, 0.05)
MASKS = ("uniform", "skewed")
QUICK = dict(tokens=(4096,), shapes=((4096, 4096),), blocks=(64,), densities=(0.25,), masks=("uniform",))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRODUCTS = ("fwd", "dx", "dw")
KERNELS = {"fwd": "bsr_forward", "dx": "bsr_grad_input", "dw": "bsr_grad_weight"}
REL_ERR_BOUND = 2e-2  # bf16/fp16 operands, fp32 accumulation, against fp64
SKEW_EXPONENT = 1.0


# ------------------------------------------------------------------ cases, masks, limits (no GPU)

@dataclasses.dataclass(frozen=True)
class Case:
    tokens: int
    out_features: int
    in_features: int
    block: int
    density: float
    mask: str

    @property
    def grid(self):
        return self.out_features // self.block, self.in_features // self.block


def cases(tokens=TOKENS, shapes=SHAPES, blocks=BLOCKS, densities=DENSITIES, masks=MASKS):
    """Every combination, smallest problems first; refuses shapes the blocks do not tile."""
    bad = sorted({(o, i, b) for (o, i), b in itertools.product(shapes, blocks) if o % b or i % b})
    if bad:
        raise ValueError(f"W shapes not divisible by their block size (out, in, block): {bad}")
    return [Case(t, o, i, b, d, m) for t, (o, i), b, d, m in itertools.product(tokens, shapes, blocks, densities, masks)]


def block_mask(kind, grid, density, seed=0):
    """Bool (rows, cols) grid with round(density x cells) blocks (at least one), on CPU.

    ``uniform``: cells drawn uniformly. ``skewed``: cells drawn without replacement with
    weight 1/(r+1)^SKEW_EXPONENT for the block row at rank r of a random order, so a few
    rows hold many blocks and many rows few (rows fill up at most)."""
    rows, cols = grid
    cells = rows * cols
    count = min(cells, max(1, round(density * cells)))
    gen = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        picked = torch.randperm(cells, generator=gen)[:count]
    elif kind == "skewed":
        rank = torch.randperm(rows, generator=gen)
        row_weight = (rank.double() + 1) ** -SKEW_EXPONENT
        picked = torch.multinomial(row_weight.repeat_interleave(cols), count, replacement=False, generator=gen)
    else:
        raise ValueError(f"unknown mask kind {kind!r}; use one of {MASKS}")
    mask = torch.zeros(cells, dtype=torch.bool)
    mask[picked] = True
    return mask.view(rows, cols)


def product_bytes(case, mask, element_bytes):
    """Bytes each product must move at least: the rows of dY / columns of X its stored blocks
    touch, W's stored values and the output, once each (block metadata: 8 bytes per block)."""
    t, b = case.tokens, case.block
    stored = int(mask.sum()) * (b * b * element_bytes + 8)
    in_used = int(mask.any(0).sum()) * b   # columns of X (features in) some block reads
    out_used = int(mask.any(1).sum()) * b  # features out some block writes
    return {
        "fwd": element_bytes * (t * in_used + t * case.out_features) + stored,
        "dx": element_bytes * (t * out_used + t * case.in_features) + stored,
        "dw": element_bytes * (t * out_used + t * in_used) + stored,
    }


def limits(dense_ms, density, nbytes, bandwidth_gbs):
    """Per product and per step: the time no kernel can beat, max(d x T_dense, bytes / bandwidth)
    (ms; bandwidth in GB/s), and which bound it is."""
    out = {}
    for product in PRODUCTS:
        compute, memory = density * dense_ms[product], nbytes[product] / (bandwidth_gbs * 1e6)
        out[product] = (max(compute, memory), "compute" if compute >= memory else "memory")
    out["step"] = (sum(out[p][0] for p in PRODUCTS), None)
    return out


def pct_of_limit(limit_ms, sparse_ms):
    """limit / measured: 1.0 = at the limit."""
    return {name: limit_ms[name][0] / sparse_ms[name] for name in limit_ms}


def write_rows(rows, path):
    """Print the rows as JSON lines and append them to ``path`` (nothing written if empty)."""
    print("# JSON rows")
    for row in rows:
        print(json.dumps(row))
    append_rows(rows, path)


# ------------------------------------------------------------------ timing (GPU)

def _profiler_ms(fn, calls):
    """Summed device time per call of the kernels ``fn`` launches, from torch's profiler."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / calls


class KernelTimer:
    """Device ms per call of ``fn``: CUDA-graph replays of ``calls`` captured calls, or the
    profiler's kernel sum where capture fails (``method`` says which)."""

    def __init__(self, fn, calls):
        self.fn, self.calls, self.graph, self.error = fn, calls, None, None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs need
            fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    fn()
            graph.replay()
            torch.cuda.synchronize()
            self.graph = graph
        except Exception as error:  # noqa: BLE001  (recorded in the row; the profiler times it)
            self.error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            torch.cuda.synchronize()
        self.method = "cuda_graph" if self.graph is not None else "profiler"

    def __call__(self):
        if self.graph is None:
            return _profiler_ms(self.fn, self.calls)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self.graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / self.calls


def wall_ms(fn, calls=3):
    """Wall ms per eager call (host launch included), the device synchronised around."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / calls


def measure_bandwidth(device, gib=1):
    """Device-to-device copy bandwidth in GB/s (read + write), the median of 5 timed copies."""
    n = gib * 2 ** 30 // 4
    src, dst = torch.empty(n, dtype=torch.float32, device=device), torch.empty(n, dtype=torch.float32, device=device)
    dst.copy_(src)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 2 * n * 4 / (statistics.median(times) * 1e6)


# ------------------------------------------------------------------ baselines

def _torch_triton_ops():
    """torch's block-sparse triton ops, or the reason they are missing."""
    try:
        from torch.sparse import _triton_ops as ops
    except ImportError as error:
        return None, f"torch.sparse._triton_ops is not importable ({error})"
    missing = [name for name in ("bsr_dense_mm", "bsr_dense_addmm", "sampled_addmm") if getattr(ops, name, None) is None]
    if missing:
        return None, f"torch {torch.__version__} lacks torch.sparse._triton_ops.{', '.join(missing)}"
    return ops, None


def _tuner():
    try:
        from torch.sparse._triton_ops_meta import tune_bsr_dense_addmm
    except ImportError as error:
        return None, f"torch {torch.__version__} has no torch.sparse._triton_ops_meta.tune_bsr_dense_addmm ({error})"
    return tune_bsr_dense_addmm, None


def torch_baselines(w_masked, block, x, dy, tune):
    """{name: callable} of torch's kernels on this layer, and {name: why not} for those that
    cannot run here (a missing API, a shape or block torch refuses)."""
    fns, errors = {}, {}
    ops, reason = _torch_triton_ops()
    names = ("torch_bsr_fwd", "torch_bsr_dx", "torch_sampled_dw") + (("torch_bsr_fwd_tuned", "torch_bsr_dx_tuned")
                                                                     if tune else ())
    if ops is None:
        return fns, dict.fromkeys(names, reason)
    # fwd: Yᵀ = W Xᵀ; dx: dXᵀ = Wᵀ dYᵀ (torch multiplies a BSR matrix on the left).
    operands = {"fwd": (w_masked.to_sparse_bsr((block, block)), x.T.contiguous()),
                "dx": (w_masked.T.contiguous().to_sparse_bsr((block, block)), dy.T.contiguous())}
    for product, (bsr, dense) in operands.items():
        name = f"torch_bsr_{product}"
        try:
            ops.bsr_dense_mm(bsr, dense)
            fns[name] = lambda bsr=bsr, dense=dense: ops.bsr_dense_mm(bsr, dense)
        except Exception as error:  # noqa: BLE001  (the row says why)
            errors[name] = f"{type(error).__name__}: {error}"
            continue
        if not tune:
            continue
        tuner, reason = _tuner()
        if tuner is None or "meta" not in inspect.signature(ops.bsr_dense_addmm).parameters:
            errors[f"{name}_tuned"] = reason or "bsr_dense_addmm takes no meta parameters in this torch"
            continue
        out = dense.new_empty(bsr.shape[0], dense.shape[1])
        try:
            meta = tuner(out, bsr, dense, beta=0, alpha=1, out=out)
            fns[f"{name}_tuned"] = (lambda bsr=bsr, dense=dense, out=out, meta=meta:
                                    ops.bsr_dense_addmm(out, bsr, dense, beta=0, alpha=1, out=out, meta=meta))
        except Exception as error:  # noqa: BLE001
            errors[f"{name}_tuned"] = f"{type(error).__name__}: {error}"
    pattern, dyt = operands["fwd"][0], dy.T.contiguous()
    try:
        ops.sampled_addmm(pattern, dyt, x, beta=0.0)
        fns["torch_sampled_dw"] = lambda: ops.sampled_addmm(pattern, dyt, x, beta=0.0)
    except Exception as error:  # noqa: BLE001
        errors["torch_sampled_dw"] = f"{type(error).__name__}: {error}"
    return fns, errors


# ------------------------------------------------------------------ one config

def _rel_err(got, want):
    got = got.to(torch.float64)
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _errors(kernels, values, layout, x, dy, w_masked, baselines):
    """Relative error against fp64 on the same operands: our three products, and torch's
    (transposed outputs of bsr_dense_mm; sampled_addmm's blocks, in our block order)."""
    x64, dy64, w64 = x.double(), dy.double(), w_masked.double()
    want = {"fwd": x64 @ w64.T, "dx": dy64 @ w64,
            "dw": sk.BlockSparseMatrix.from_dense(dy64.T @ x64, layout.block_size, block_mask=layout.block_mask).values}
    errors = {"ours_fwd": _rel_err(kernels["fwd"](x, values, layout), want["fwd"]),
              "ours_dx": _rel_err(kernels["dx"](dy, values, layout), want["dx"]),
              "ours_dw": _rel_err(kernels["dw"](dy, x, layout), want["dw"])}
    for name, fn in baselines.items():
        got = fn()
        product = name.split("_")[2]
        errors[name] = _rel_err(got.values() if product == "dw" else got.T, want[product])
    return errors


def run_case(case, args, device, env, bandwidth):
    dtype = DTYPES[args.dtype]
    kernels = {p: sk.kernels.select_kernel(KERNELS[p], device, dtype, backend="triton")[1] for p in PRODUCTS}
    mask = block_mask(case.mask, case.grid, case.density, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    w = torch.randn(case.out_features, case.in_features, generator=gen).to(device=device, dtype=dtype)
    weight = sk.BlockSparseMatrix.from_dense(w, case.block, block_mask=mask.to(device))
    values, layout = weight.values, weight.layout
    w_masked = weight.to_dense()
    x = torch.randn(case.tokens, case.in_features, device=device, dtype=dtype)
    dy = torch.randn(case.tokens, case.out_features, device=device, dtype=dtype)

    fns = {
        "ours_fwd": lambda: kernels["fwd"](x, values, layout),
        "ours_dx": lambda: kernels["dx"](dy, values, layout),
        "ours_dw": lambda: kernels["dw"](dy, x, layout)[0],
        "cublas_fwd": lambda: x @ w_masked.T,
        "cublas_dx": lambda: dy @ w_masked,
        "cublas_dw": lambda: dy.T @ x,
    }
    baselines, torch_errors = torch_baselines(w_masked, case.block, x, dy, tune=not args.no_tune)
    fns.update(baselines)
    rel_err = _errors(kernels, values, layout, x, dy, w_masked, baselines)  # also compiles and autotunes ours
    timers = {name: KernelTimer(fn, args.graph_calls) for name, fn in fns.items()}
    kernel_samples, wall_samples = {name: [] for name in fns}, {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            kernel_samples[name].append(timers[name]())
            wall_samples[name].append(wall_ms(fn))
    kernel = {name: statistics.median(s) for name, s in kernel_samples.items()}
    wall = {name: statistics.median(s) for name, s in wall_samples.items()}

    density = layout.density
    nbytes = product_bytes(case, mask, torch.finfo(dtype).bits // 8)
    dense_ms = {p: kernel[f"cublas_{p}"] for p in PRODUCTS}
    sparse_ms = {p: kernel[f"ours_{p}"] for p in PRODUCTS}
    sparse_ms["step"] = sum(sparse_ms[p] for p in PRODUCTS)
    limit = limits(dense_ms, density, nbytes, bandwidth)
    pct = pct_of_limit(limit, sparse_ms)

    row = dict(env, bench="bsr_triton", dtype=args.dtype, allow_tf32=torch.backends.cuda.matmul.allow_tf32,
               **dataclasses.asdict(case), density_actual=density, nnz_blocks=layout.nnz_blocks,
               empty_block_rows=int((~mask.any(1)).sum()), max_blocks_per_row=int(mask.sum(1).max()),
               bandwidth_gbs=bandwidth, rounds=args.rounds, graph_calls=args.graph_calls,
               rel_err_bound=REL_ERR_BOUND, correct=all(rel_err[f"ours_{p}"] <= REL_ERR_BOUND for p in PRODUCTS),
               torch_errors=torch_errors)
    for name in fns:
        row[f"{name}_kernel_ms"], row[f"{name}_wall_ms"] = kernel[name], wall[name]
        row[f"{name}_timer"], row[f"{name}_rel_err"] = timers[name].method, rel_err.get(name)
        if timers[name].error:
            row[f"{name}_capture_error"] = timers[name].error
    for p in PRODUCTS:
        row[f"bytes_{p}"] = nbytes[p]
        row[f"speedup_{p}"] = dense_ms[p] / sparse_ms[p]
    for name in (*PRODUCTS, "step"):
        row[f"limit_{name}_ms"], row[f"limit_{name}_bound"] = limit[name]
        row[f"pct_limit_{name}"] = pct[name]
    row["speedup_step"] = sum(dense_ms.values()) / sparse_ms["step"]
    row["ours_step_wall_ms"] = sum(wall[f"ours_{p}"] for p in PRODUCTS)
    row["cublas_step_wall_ms"] = sum(wall[f"cublas_{p}"] for p in PRODUCTS)
    return row


def _print_header():
    print(f"{'tokens':>6} {'W':>11} {'blk':>4} {'dens':>5} {'mask':>7} | {'fwd x':>6} {'dx x':>6} {'dw x':>6} "
          f"{'step x':>6} | {'%lim f':>6} {'%lim dx':>7} {'%lim dw':>7} {'%lim st':>7} | {'vs torch':>8} | "
          f"{'max err':>7}")


def _print_row(row):
    shape = f"{row['out_features']}x{row['in_features']}"
    torch_ms = row.get("torch_bsr_fwd_tuned_kernel_ms", row.get("torch_bsr_fwd_kernel_ms"))
    vs_torch = f"{torch_ms / row['ours_fwd_kernel_ms']:8.2f}" if torch_ms else f"{'n/a':>8}"
    err = max(row[f"ours_{p}_rel_err"] for p in PRODUCTS)
    print(f"{row['tokens']:6d} {shape:>11} {row['block']:4d} {row['density_actual']:5.3f} {row['mask']:>7} | "
          f"{row['speedup_fwd']:6.2f} {row['speedup_dx']:6.2f} {row['speedup_dw']:6.2f} {row['speedup_step']:6.2f} | "
          f"{100 * row['pct_limit_fwd']:6.0f} {100 * row['pct_limit_dx']:7.0f} {100 * row['pct_limit_dw']:7.0f} "
          f"{100 * row['pct_limit_step']:7.0f} | {vs_torch} | {err:7.1e}{'' if row['correct'] else '  WRONG'}",
          flush=True)


def _shape(text):
    try:
        out, inp = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a W shape is OUTxIN, e.g. 4096x11008; got {text!r}") from None
    return out, inp


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one small config (4096 tokens, W 4096x4096, block 64, density 0.25, uniform)")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--shapes", type=_shape, nargs="+", default=list(SHAPES), help="W shapes as OUTxIN")
    parser.add_argument("--blocks", type=int, nargs="+", default=list(BLOCKS))
    parser.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    parser.add_argument("--masks", nargs="+", choices=MASKS, default=list(MASKS))
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians over rounds")
    parser.add_argument("--graph-calls", type=int, default=10, help="calls captured per CUDA graph")
    parser.add_argument("--no-tune", action="store_true", help="skip torch's bsr_dense_addmm tuner (slow)")
    parser.add_argument("--bandwidth", type=float, help="device bandwidth in GB/s (default: a measured copy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="append JSON rows to this file")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, list(value))
    return args


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_bsr_triton.py times GPU kernels and needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "on CPU the kernels' correctness is covered by tests/test_bsr_triton.py under TRITON_INTERPRET=1.")
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the benchmark times compiled kernels, not the interpreter")
    try:
        todo = cases(args.tokens, args.shapes, args.blocks, args.densities, args.masks)
    except ValueError as error:
        sys.exit(str(error))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    env = environment(device)
    bandwidth = args.bandwidth or measure_bandwidth(device)
    print(f"# {header(env, {'backend': 'triton'})}, triton {env['triton']}, {args.dtype}, TF32 off, "
          f"copy bandwidth {bandwidth:.0f} GB/s; {len(todo)} configs; x = cuBLAS kernel ms / ours; "
          f"%lim = max(d x cuBLAS, bytes / bandwidth) / ours; vs torch = torch bsr_dense_mm fwd (tuned if run) / ours")
    _print_header()
    rows = []
    for case in todo:
        rows.append(run_case(case, args, device, env, bandwidth))
        _print_row(rows[-1])
        torch.cuda.empty_cache()
    write_rows(rows, args.json)
    return 0 if all(row["correct"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
