"""Dynamic sparse training on real data, on the real kernels.

Two tasks, each at several densities, for dense / static ERK / SET / RigL /
SNFS / Top-KAST / GGR / DPF:

- ``fashion``: Fashion-MNIST MLP 784-H-H-10 (H=2048), test accuracy.
- ``text``: character-level MLP language model on the Debian ``fortunes`` text
  (context of C characters, embedding, two hidden layers), validation bits/char.

Hidden layers are ``sparsekern.SparseLinear`` (block size ``--block-size``) at
ERK densities; embedding and output layers stay dense. Every run uses the same
data order, initial seed and SGD(momentum 0.9) with a cosine learning rate;
sparse layers' initial weights are scaled by density**-0.5 (the dense init's
activation scale at the reduced fan-in; ``--dense-init`` turns this off).
Columns: quality, train wall-clock and its ratio to dense, training-state
memory (parameters, gradients, optimizer state, driver shadows and probes),
peak memory (the process's peak resident memory during model building and
training, above its resident memory before: activations and temporaries
included; bench/timing.py ``PeakMemory``), and the *mask-update cost*: the
extra time of an update step over a median step (probe backward + rebuild),
in steps, and as a fraction of the ΔT=100 steps it is amortized over in
RigL's default schedule.

Usage (a few minutes on 2 cores at the defaults):
    python bench/exp_dst.py --json dst.jsonl
    python bench/exp_dst.py --task fashion --densities 0.1 --methods dense rigl --epochs 3
    python bench/exp_dst.py --speed --densities 0.1   # dense vs RigL, alternating ΔT=100-step chunks
    # DPF with the paper's schedule, on block-32 layers, and at element granularity (block 1: slow)
    python bench/exp_dst.py --task fashion --densities 0.1 --methods dpf \
        --delta 16 --t-end 1 --dpf-ramp-end 0.5 --tag=-paper
    python bench/exp_dst.py --task fashion --densities 0.1 --methods dpf --block-size 1 --tag=-element
    python bench/exp_dst.py --task fashion --densities 0.1 --methods dense rigl --epochs 1 \
        --hidden 256 --train-samples 1280 --json ''   # smoke run

Modules: data in bench/datasets.py, networks in bench/models.py, one run and the speed
comparison in bench/dst_training.py, tables in bench/dst_tables.py, the plot in bench/svg_plot.py.

Data: ``apt-get install -y dataset-fashion-mnist fortunes``.
"""
import argparse
import json

import torch

import datasets
from dst_tables import paired_differences, quality_pivot, runs_table
from dst_training import METHODS, run, speed
from models import CharMLP, fashion_model
from svg_plot import quality_vs_density
from timing import append_rows, environment, header, kernel_path


def task_data(task, args):
    """(train_x, train_y, eval_x, eval_y, make_model(sparse, seed)) of ``task``."""
    if task == "fashion":
        data = datasets.load_fashion_mnist()  # standardised with the full training set's statistics
        return (data.train_x[:args.train_samples], data.train_y[:args.train_samples], data.test_x, data.test_y,
                lambda sparse, seed: fashion_model(sparse, args, seed))
    tx, ty, vx, vy, vocab = datasets.text_windows(datasets.load_fortunes(), args.context)
    g = torch.Generator().manual_seed(0)
    train = torch.randperm(len(tx), generator=g)[:args.text_samples]
    val = torch.randperm(len(vx), generator=g)[:args.val_samples]
    return tx[train], ty[train], vx[val], vy[val], lambda sparse, seed: CharMLP(sparse, vocab, args, seed)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["fashion", "text", "both"], default="both")
    p.add_argument("--methods", nargs="+", default=["dense", *METHODS], choices=["dense", *METHODS])
    p.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.05, 0.02])
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--hidden-layer", choices=["block", "semi", "semi-transposable"], default="block",
                   help="sparse hidden layers: SparseLinear (--block-size), or 2:4 SemiSparseLinear "
                        "(row-wise or transposable; density fixed at 0.5, --densities ignored by them)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seeds", nargs="+", type=int, default=[0],
                   help="seed of the initial weights, masks, driver choices and data order (one run per seed)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--delta", type=int, default=20, help="steps between mask updates (short runs: < 100)")
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--t-end", type=float, default=0.75, help="last mask update at this fraction of the steps")
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine", help="drop-fraction schedule")
    p.add_argument("--dpf-ramp-end", type=float, default=None,
                   help="DPF reaches its target density at this fraction of the steps (default: at --t-end); "
                        "the paper's setting: --delta 16 --t-end 1 --dpf-ramp-end <fraction>")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--train-samples", type=int, default=25600)
    p.add_argument("--context", type=int, default=16)
    p.add_argument("--embed", type=int, default=32)
    p.add_argument("--text-hidden", type=int, default=1024)
    p.add_argument("--text-samples", type=int, default=51200)
    p.add_argument("--val-samples", type=int, default=20000)
    p.add_argument("--dense-init", dest="sparse_init", action="store_false",
                   help="keep nn.Linear's init on sparse layers (default: scale by density**-0.5)")
    p.add_argument("--score-method", default="auto", choices=["auto", "gram", "product"],
                   help="how RigL/SNFS/GGR get dense-gradient block scores")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--speed", action="store_true", help="only time dense vs --speed-method (alternating chunks)")
    p.add_argument("--speed-method", default="rigl", choices=list(METHODS))
    p.add_argument("--speed-block-sizes", nargs="+", type=int, default=[32])
    p.add_argument("--speed-delta", type=int, default=100)
    p.add_argument("--speed-rounds", type=int, default=5)
    p.add_argument("--speed-precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: both trainings under torch.autocast('cpu', dtype=torch.bfloat16)")
    p.add_argument("--speed-compile", action="store_true",
                   help="both trainings' models under torch.compile (inductor); two untimed warm-up chunks "
                        "compile, then recompile once RigL changes the block counts")
    p.add_argument("--tag", default="", help="appended to the method name in the rows (to tell settings apart)")
    p.add_argument("--json", default=None, help="append JSON rows to this file")
    p.add_argument("--plot", default=None, help="write quality vs density as an SVG file")
    p.add_argument("--from-json", default=None, help="no training: table and plot from saved JSON rows")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_json:
        rows = [json.loads(line) for line in open(args.from_json) if line.strip()]
        print(runs_table(rows))
        print(quality_pivot(rows))
        if any(r["method"] == "static" and "seed" in r for r in rows):
            print(paired_differences(rows))
        if args.plot:
            quality_vs_density(rows, args.plot)
        return
    env = environment()
    path = kernel_path("bsr_forward" if args.hidden_layer == "block" else "semi_forward", torch.device("cpu"),
                       torch.float32)
    env.update(path, dtype="float32")
    print(f"# {header(env, path)}")
    if args.speed:
        data = datasets.load_fashion_mnist()
        for row in speed(args, env, data.train_x, data.train_y):
            print(json.dumps(row), flush=True)
            append_rows([row], args.json)
        return
    rows = []
    for task in (["fashion", "text"] if args.task == "both" else [args.task]):
        data = task_data(task, args)
        for seed, method in ((s, m) for s in args.seeds for m in args.methods):
            for density in ([1.0] if method == "dense" else args.densities):
                row = {**run(task, method, density, data, args, seed), **env}
                rows.append(row)
                print(json.dumps(row), flush=True)
                append_rows([row], args.json)
    print(runs_table(rows))
    print(quality_pivot(rows))
    if args.plot:
        quality_vs_density(rows, args.plot)


if __name__ == "__main__":
    main()
