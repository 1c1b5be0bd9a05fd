"""bf16 autocast vs fp32 training of a nanoGPT-style model, dense and sparse (RigL), in one process.

    python bench/bench_gpt_bf16.py                     # 4 layers, d_model 512, context 128, batch 16, density 0.1
    python bench/bench_gpt_bf16.py --rounds 8 --json bench/results/gpt_bf16.jsonl
    python bench/bench_gpt_bf16.py --layers 2 --d-model 128 --context 32 --rounds 1   # smoke run
    python bench/bench_gpt_bf16.py --compile --attention matmul   # every model under torch.compile

Four trainings from the same initialisation and batches: dense and sparse, each in fp32 and
under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (fp32 master weights, as nn.Linear
under autocast). The sparse model is the dense one through ``sparsify`` (attention and MLP
linears become SparseLinear, block 32, ERK at ``--density``; the tied head stays dense),
trained by RigL with a mask update every ``--delta`` steps. A timed unit is a chunk of
``--delta`` steps (one update step and its probe step each); the four chunks run in turn,
round after round, after one warm-up chunk each (two with ``--compile``, which runs all four
models under torch.compile: the first compiles, the second recompiles once RigL has changed the
block counts), and every ratio is the median of the
per-round ratios: sparse against dense in the same precision, and bf16 against fp32.

Reported per training: ms per step, the share of a step spent in the sparsekern ops
(torch.profiler self CPU time of ``sparsekern::`` ops over one more chunk: the Amdahl limit of
the sparse layers' speedup), and the validation loss in bits per character after the same
steps (bf16 sparse against fp32 sparse: the cost of the lower precision).

Data: character-level windows of the Debian ``fortunes`` text (``apt-get install -y fortunes``).
"""
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import profile

import datasets
from bench_compiled_gpt import Training, training_arguments
from timing import Timer, alternate, append_rows, environment, header, kernel_path, median_ratio

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
VARIANTS = tuple(f"{kind} {precision}" for precision in PRECISIONS for kind in ("dense", "sparse"))


def sparse_op_share(training):
    """Fraction of one chunk's wall time spent in sparsekern ops (profiler self CPU time)."""
    with profile() as prof:
        start = time.perf_counter()
        training.chunk()
        wall_us = (time.perf_counter() - start) * 1e6
    own = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith("sparsekern::"))
    return own / wall_us


def validation_batch(args, windows=64):
    """(ids, next-character targets) of the first ``windows`` validation windows."""
    _, _, val_x, val_y, _ = datasets.text_windows(datasets.load_fortunes(), args.context)
    x = val_x[:windows]
    return x, torch.cat([x[:, 1:], val_y[:windows, None]], 1)


def validation_bits(training, x, y):
    """Mean next-character loss in bits on the batch (x, y), in the training's precision."""
    training.model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=training.autocast, enabled=training.autocast is not None):
        logits = training.model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
    training.model.train()
    return loss.item() / math.log(2)


def main(argv=None):
    parser = training_arguments(__doc__, batch=16)
    parser.add_argument("--compile", action="store_true",
                        help="all four trainings' models under torch.compile (inductor): GELU, layer norms, "
                             "softmax and casts fused; two warm-up chunks compile")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    paths = {name: kernel_path("bsr_forward", torch.device("cpu"), dtype)
             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"# {header(env, paths['fp32'])}; bf16 kernel path: {paths['bf16']}")
    print(f"# GPT {args.layers} layers d_model {args.d_model} context {args.context} batch {args.batch}; sparse: "
          f"RigL density {args.density} block {args.block_size}, update every {args.delta} steps; median of "
          f"{args.rounds} alternating rounds of {args.delta}-step chunks, {args.timer} time"
          f"{', torch.compile' if args.compile else ''}")

    trainings = {name: Training(name, args, autocast=PRECISIONS[name.split()[1]]) for name in VARIANTS}
    warmup_s = {}
    for name, training in trainings.items():
        if args.compile:
            training.forward = torch.compile(training.model)
        start = time.perf_counter()
        # warm-up: the floor rule's measurements, first-touch memory; compiled, the first chunk
        # compiles and the second recompiles once RigL has changed the block counts
        for _ in range(2 if args.compile else 1):
            training.chunk()
        warmup_s[name] = time.perf_counter() - start
    samples, _ = alternate({name: t.chunk for name, t in trainings.items()}, args.rounds, Timer(args.timer))
    per_step = {name: [ms / args.delta for ms in times] for name, times in samples.items()}
    val_x, val_y = validation_batch(args)
    bits = {name: validation_bits(t, val_x, val_y) for name, t in trainings.items()}
    share = {name: sparse_op_share(t) for name, t in trainings.items() if name.startswith("sparse")}

    print(f"{'training':<12} {'ms/step':>9} {'dense/sparse':>13} {'fp32/bf16':>10} {'sparse ops':>11} "
          f"{'val bits/char':>14}")
    rows = []
    for name in VARIANTS:
        kind, precision = name.split()
        vs_dense = median_ratio(per_step[f"dense {precision}"], per_step[name])
        vs_fp32 = median_ratio(per_step[f"{kind} fp32"], per_step[name])
        t = trainings[name]
        row = dict(env, kernel=paths[precision], case=name, precision=precision,
                   ms_per_step=statistics.median(per_step[name]), speedup_vs_dense=vs_dense,
                   speedup_vs_fp32=vs_fp32, sparse_op_share=share.get(name), val_bits_per_char=bits[name],
                   last_loss=t.losses[-1], steps=len(t.losses), layers=args.layers, d_model=args.d_model,
                   context=args.context, batch=args.batch, density=args.density, block_size=args.block_size,
                   delta=args.delta, rounds=args.rounds, timer=args.timer, compiled=args.compile,
                   warmup_s=round(warmup_s[name], 1))
        rows.append(row)
        shown = "" if name not in share else f"{100 * share[name]:.0f} %"
        print(f"{name:<12} {row['ms_per_step']:>9.1f} {vs_dense:>12.2f}x {vs_fp32:>9.2f}x {shown:>11} "
              f"{bits[name]:>14.4f}")
    gap = bits["sparse bf16"] - bits["sparse fp32"]
    print(f"# sparse bf16 - sparse fp32 validation loss after {len(trainings['sparse fp32'].losses)} steps: "
          f"{gap:+.4f} bits/char")
    append_rows(rows, args.json)


if __name__ == "__main__":
    main()
