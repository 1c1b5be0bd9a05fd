"""Sparse and low-rank training of convolutional networks on Fashion-MNIST, on the real kernels.

ResNet (bench/cnn_models.py: ResNet-20 style, 3 stages of ``--blocks`` basic blocks at
``--widths``, batch norm, channels-last activations) trained dense and, at each of
``--densities``, with:

- ``erk``: static random blocks at ERK densities (``sk.sparsify(method="erk")``);
- ``snip``, ``synflow``: pruning at init (``sk.sparsify``; SNIP scores one training batch of
  ``--prune-batch`` images, SynFlow needs only the input shape; global ranking, as in the papers);
- ``set``, ``rigl``, ``ggr``: dynamic sparse training drivers (``sk.methods``) on the ERK structure;
- ``dpf``: starts dense and prunes gradually to the ERK densities (``sk.methods.DPF``).

Every conv except the one-channel stem becomes ``sk.SparseConv2d`` (``--block-size`` channels per
block side, all taps; at block 16 a 32-channel conv has a 2x2 block grid); the stem and the
classifier stay dense. Every run of a seed has the same dense initialisation and data order; SGD
(momentum 0.9, ``--weight-decay``) with a cosine learning rate; no data augmentation. Kept values
of every sparse structure are scaled by density**-0.5 (``--dense-init`` turns this off; DPF starts
dense): with batch norm after each conv this sets the weights' effective step size, not the scale
of the activations.
Training loop, drivers and measurements are bench/dst_training.py's (those of bench/exp_dst.py).

Per run: test accuracy (the first ``--test-samples`` test images, all 10,000 by default), wall
time per epoch (update steps and probes included; evaluation and pruning-at-init scoring not:
``prep_s``) and its ratio to the dense run of the same seed, stored density of the sparse layers,
training-state memory (weights, gradients, optimizer state, buffers, driver probes and shadows),
peak memory.

DLRT: LeNet-5 (``--lenet-widths``) with every conv and hidden linear layer ``sk.LowRankConv2d`` /
``sk.LowRankLinear`` (the truncated SVD of the dense init at rank min(``--dlrt-rank``, full)),
trained by ``sk.methods.DLRT`` at each of ``--dlrt-tols``, next to dense LeNet-5 trained by
plain SGD at the same lr, batches and seed (bench/exp_dlrt.py's protocol): accuracy, rank per
layer, compression (1 - parameters / dense parameters, whole network), training time.

Usage:
    # the default experiment: 3 seeds x (dense + 7 methods x 2 densities) ResNet runs of 10 epochs
    # of 60,000 images, plus LeNet-5 / DLRT (about two days on 2 cores: docs/conv.md)
    python bench/exp_cnn.py --json bench/results/exp_cnn.jsonl --plot bench/results/exp_cnn.png
    # reduced: one seed, 2,560 training images, 2 epochs at batch 64 (80 steps per run), 2,000 test
    # images (about 12 minutes on 2 quiet cores)
    python bench/exp_cnn.py --seeds 0 --train-samples 2560 --epochs 2 --batch 64 --prune-batch 64 \
        --delta 5 --test-samples 2000 --json bench/results/exp_cnn.jsonl --plot bench/results/exp_cnn.png
    # smoke run (1-4 minutes on 2 shared cores)
    python bench/exp_cnn.py --seeds 0 --train-samples 640 --epochs 1 --batch 64 --delta 2 --test-samples 500 \
        --densities 0.1 --methods dense erk rigl dpf --dlrt-tols 0.1 --json ''
    python bench/exp_cnn.py --from-json bench/results/exp_cnn.jsonl --plot exp_cnn.png   # tables, plot only
    # per-epoch speed, dense vs RigL (update steps included) in alternating 20-step chunks, one process
    python bench/exp_cnn.py --speed --speed-method rigl --densities 0.1 --batch 64 --delta 20
    # the same with both models under torch.compile (batch norm, ReLU and adds fused by inductor)
    python bench/exp_cnn.py --speed --speed-method rigl --densities 0.1 --batch 64 --delta 20 --speed-compile

Data: ``apt-get install -y dataset-fashion-mnist`` (bench/datasets.py). The plot needs matplotlib.
"""
import argparse
import dataclasses
import json
import time

import torch

import datasets
from cnn_models import RESNET_DENSE, LeNet5, ResNet, conv_macs, ranks
from dst_tables import mean_quality, paired_differences, quality_pivot
from dst_training import evaluate, run, speed
from exp_dlrt import count_params, markdown as dlrt_markdown, train as dlrt_train
import sparsekern as sk
from timing import append_rows, environment, header, kernel_path

PRUNED = {"erk": "erk", "snip": "snip", "synflow": "synflow"}  # method -> sk.sparsify method, no driver
DRIVEN = ("set", "rigl", "ggr", "dpf")  # drivers of dst_training.METHODS
ALL = ("dense", *PRUNED, *DRIVEN)


def resnet_maker(method, density, args, train_x, train_y):
    """``make(sparse, seed)`` of dst_training.run: the ResNet of ``seed`` converted for ``method``.
    Records the conversion's seconds (SNIP / SynFlow scoring) in ``maker.prep_s``."""
    def maker(sparse, seed):
        model = ResNet(args.widths, args.blocks, seed=seed)
        start = time.perf_counter()
        if sparse:
            batch = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))[:args.prune_batch]
            score = {"snip": dict(inputs=train_x[batch], targets=train_y[batch]),
                     "synflow": dict(input_shape=(train_x.shape[1],))}.get(method, {})
            # DPF starts dense (every block stored) and prunes down to the ERK densities itself;
            # the drivers adopt sparsify's ERK structure.
            model = sk.sparsify(model, density=1.0 if method == "dpf" else density, method=PRUNED.get(method, "erk"),
                                block_size=args.block_size, dense_layers=RESNET_DENSE,
                                generator=torch.Generator().manual_seed(seed), **score)
            empty = [n for n, m in model.named_modules() if isinstance(m, sk.SparseConv2d) and m.nnz_blocks == 0]
            if empty:  # a conv without blocks cuts its residual branch (or, as a shortcut, the whole stage)
                print(f"# warning: {method} at density {density}: no block stored in {', '.join(empty)} "
                      f"(block grid too small for --block-size {args.block_size})", flush=True)
            if method in PRUNED and args.sparse_init:  # drivers scale their layers (dst_training._driver)
                with torch.no_grad():
                    for layer in model.modules():
                        if isinstance(layer, sk.SparseConv2d) and layer.density > 0:
                            layer.values.mul_(layer.density ** -0.5)
        maker.prep_s = time.perf_counter() - start
        return model
    return maker


def resnet_runs(args, env, data):
    train_x, train_y = data.train_x[:args.train_samples], data.train_y[:args.train_samples]
    test_x, test_y = data.test_x[:args.test_samples], data.test_y[:args.test_samples]
    rows, dense = [], {}
    for seed in args.seeds:
        # Dense first: every sparse row's time ratio is against the dense run of its seed.
        for method in sorted(args.methods, key=lambda m: m != "dense"):
            for density in ([1.0] if method == "dense" else args.densities):
                make = resnet_maker(method, density, args, train_x, train_y)
                row = run("fashion", method, density, (train_x, train_y, test_x, test_y, make), args, seed)
                epoch_s = row["train_s"] / args.epochs
                if method == "dense":
                    dense[seed] = epoch_s
                row.update(model="resnet", widths=args.widths, blocks=args.blocks, weight_decay=args.weight_decay,
                           lr=args.lr, batch=args.batch, test_samples=len(test_x), prep_s=round(make.prep_s, 3),
                           epoch_s=round(epoch_s, 3),
                           epoch_vs_dense=round(epoch_s / dense[seed], 3) if seed in dense else None, **env)
                rows.append(row)
                print(json.dumps(row), flush=True)
                append_rows([row], args.json)
    return rows


def speed_runs(args, env, data):
    """Per-epoch speed of the ResNet, dense vs ``args.speed_method`` side by side (dst_training.speed)."""
    args.speed_delta, args.speed_block_sizes = args.delta, [args.block_size]
    train_x, train_y = data.train_x[:args.train_samples], data.train_y[:args.train_samples]

    def make(sparse, density):
        return resnet_maker("erk", density, args, train_x, train_y)(sparse, 0)

    print(f"# alternating chunks of {args.delta} steps of batch {args.batch}, {args.speed_rounds} rounds, block "
          f"{args.block_size}, {args.speed_precision}{', torch.compile' if args.speed_compile else ''}\n"
          "| method | density | dense ms / step | sparse ms / step | speedup | mask updates |\n|---|---|---|---|---|---|")
    for row in speed(args, env, train_x, train_y, make, {"model": "resnet", "widths": args.widths,
                                                          "blocks": args.blocks}):
        print(f"| {row['method']} | {row['density']} | {row['dense_ms_per_step']:.1f} | "
              f"{row['sparse_ms_per_step']:.1f} | {row['median_speedup']:.2f}x | {row['updates']} |", flush=True)
        append_rows([row], args.json)


def resnet_table(rows):
    lines = ["| method | density | seed | test acc | s / epoch | vs dense | stored density | state MB | peak MB "
             "| updates | rebuild ms | prep s |", "|" + "---|" * 12]
    for r in rows:
        ratio = "-" if r.get("epoch_vs_dense") is None else f"{r['epoch_vs_dense']:.2f}x"
        peak = "-" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}"
        lines.append(f"| {r['method']} | {r['density']} | {r['seed']} | {r['quality']:.4f} | {r['epoch_s']:.1f} | "
                     f"{ratio} | {r['stored_density']:.4f} | {r['state_mb']:.1f} | {peak} | {r['updates']} | "
                     f"{r['rebuild_ms']:.1f} | {r['prep_s']:.1f} |")
    return "\n".join(lines)


def dlrt_runs(args, env, data):
    """Dense LeNet-5, then DLRT at each tolerance (same init, batches and lr)."""
    data = dataclasses.replace(data, train_x=data.train_x[:args.train_samples],
                               train_y=data.train_y[:args.train_samples])
    test = (data.test_x[:args.test_samples], data.test_y[:args.test_samples])
    rows = []
    for seed in args.seeds:
        base = dict(env, dataset="fashion-mnist", model="lenet5", widths=args.lenet_widths, seed=seed,
                    epochs=args.epochs, batch=args.batch, lr=args.dlrt_lr, train_samples=len(data.train_x))
        dense = LeNet5(args.lenet_widths, seed=seed)
        dense_params = count_params(dense)
        dense_s = dlrt_train(dense, data, args.epochs, args.batch, args.dlrt_lr, seed=seed)
        rows.append(dict(base, method="dense", theta=None, accuracy=evaluate("fashion", dense, *test), ranks=None,
                         parameters=dense_params, compression=0.0, train_s=dense_s, time_vs_dense=1.0))
        print(json.dumps(rows[-1]), flush=True)
        for tol in args.dlrt_tols:
            net = LeNet5(args.lenet_widths, rank=args.dlrt_rank, seed=seed)
            initial = ranks(net)
            seconds = dlrt_train(net, data, args.epochs, args.batch, args.dlrt_lr, theta=tol, seed=seed)
            rows.append(dict(base, method="dlrt", theta=tol, initial_ranks=initial,
                             accuracy=evaluate("fashion", net, *test), ranks=ranks(net), parameters=count_params(net),
                             compression=1 - count_params(net) / dense_params, train_s=seconds,
                             time_vs_dense=seconds / dense_s))
            print(json.dumps(rows[-1]), flush=True)
    append_rows(rows, args.json)
    return rows


def plot(rows, path):
    """Test accuracy vs sparsity, one line per method (mean ± sd over seeds), dense as a dashed line."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"# no plot: matplotlib is not installed (pip install matplotlib); {path} not written")
        return
    stats = mean_quality([r for r in rows if r.get("model") == "resnet"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(m for _, m, _ in stats):
        points = sorted((1 - d, mean, sd or 0.0) for (_, m, d), (mean, sd, _) in stats.items() if m == method)
        if method == "dense":
            ax.axhline(points[0][1], color="k", linestyle="--", label="dense")
            continue
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                    capsize=3, label=method)
    ax.set_xlabel("sparsity (1 - density of the sparse layers)")
    ax.set_ylabel("test accuracy")
    ax.set_title("ResNet on Fashion-MNIST")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"# plot written to {path}")


def report(rows, plot_path):
    resnet = [r for r in rows if r.get("model") == "resnet"]
    lenet = [r for r in rows if r.get("model") == "lenet5"]
    if resnet:
        print(resnet_table(resnet))
        print(quality_pivot(resnet))
        if any(r["method"] == "erk" for r in resnet):
            print(paired_differences(resnet, baseline="erk"))
    if lenet:
        print(dlrt_markdown(lenet))
    if plot_path and resnet:
        plot(rows, plot_path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=list(ALL), choices=ALL,
                   help="ResNet runs (none: only LeNet-5 / DLRT)")
    p.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.05], help="sparsities 0.9 and 0.95")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="seed of the initial weights, masks, driver choices and data order (one run per seed)")
    p.add_argument("--widths", nargs=3, type=int, default=[32, 64, 128])
    p.add_argument("--blocks", type=int, default=3, help="basic blocks per stage (3: ResNet-20)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-samples", type=int, default=60000, help="the first this many training images")
    p.add_argument("--test-samples", type=int, default=10000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--delta", type=int, default=100, help="steps between mask updates (short runs: fewer)")
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--t-end", type=float, default=0.75, help="last mask update at this fraction of the steps")
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine", help="drop-fraction schedule")
    p.add_argument("--dpf-ramp-end", type=float, default=None,
                   help="DPF reaches its target density at this fraction of the steps (default: at --t-end)")
    p.add_argument("--score-method", default="auto", choices=["auto", "gram", "product"],
                   help="how RigL/GGR get dense-gradient block scores")
    p.add_argument("--prune-batch", type=int, default=128, help="SNIP's scoring batch")
    p.add_argument("--dense-init", dest="sparse_init", action="store_false",
                   help="keep the dense init on sparse layers (default: scale kept values by density**-0.5)")
    p.add_argument("--lenet-widths", nargs="+", type=int, default=[20, 50, 500],
                   help="conv1 conv2 hidden...: 20 50 500 is Caffe's LeNet, 6 16 120 84 the original")
    p.add_argument("--dlrt-tols", nargs="*", type=float, default=[0.1, 0.2], help="DLRT tolerances θ (none: no "
                   "LeNet rows)")
    p.add_argument("--dlrt-rank", type=int, default=100, help="initial rank cap of the low-rank layers")
    p.add_argument("--dlrt-lr", type=float, default=0.05)
    p.add_argument("--speed", action="store_true",
                   help="only time training dense vs --speed-method at each density: alternating chunks of --delta "
                        "steps (one mask update each) in one process, the median chunk-time ratio")
    p.add_argument("--speed-method", default="rigl", choices=["static", "set", "rigl", "ggr"],
                   help="on the ERK structure of --block-size ('static': no mask updates)")
    p.add_argument("--speed-rounds", type=int, default=7)
    p.add_argument("--speed-precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: both trainings under torch.autocast('cpu', dtype=torch.bfloat16)")
    p.add_argument("--speed-compile", action="store_true",
                   help="both trainings' models under torch.compile (inductor); two untimed warm-up chunks "
                        "compile, then recompile once RigL changes the block counts")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tag", default="", help="appended to the method name in the rows (to tell settings apart)")
    p.add_argument("--json", default=None, help="append JSON rows to this file")
    p.add_argument("--plot", default=None, help="write test accuracy vs sparsity as a PNG (needs matplotlib)")
    p.add_argument("--from-json", default=None, help="no training: tables and plot from saved JSON rows")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_json:
        report([json.loads(line) for line in open(args.from_json) if line.strip()], args.plot)
        return
    env = environment()
    path = kernel_path("conv_forward", torch.device("cpu"), torch.float32)
    env.update(path, dtype="float32")
    print(f"# {header(env, path)}")
    print(f"# ResNet {args.widths} x {args.blocks} blocks: {conv_macs(ResNet(args.widths, args.blocks)) / 1e6:.1f}M "
          f"multiply-adds per image forward (dense); LeNet-5 {args.lenet_widths}: "
          f"{conv_macs(LeNet5(args.lenet_widths)) / 1e6:.2f}M")
    data = datasets.load_fashion_mnist()  # standardised with the full training set's statistics
    if args.speed:
        speed_runs(args, env, data)
        return
    rows = resnet_runs(args, env, data) if args.methods else []
    if args.dlrt_tols:
        rows += dlrt_runs(args, env, data)
    report(rows, args.plot)


if __name__ == "__main__":
    main()
