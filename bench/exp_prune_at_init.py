"""Pruning at init, lottery tickets and freezing on Fashion-MNIST, trained on sparsekern layers.

MLP 784-2048-2048-10 (ReLU), every Linear made block-sparse (block 32 by default)
at densities 0.1 / 0.05 / 0.02, for: dense, random (uniform), ERK (random blocks),
magnitude, SNIP, GraSP, SynFlow (global ranking, as in the papers), magnitude
ranked inside each layer at ERK densities, K-starts,
dissipating gradients, K-starts + dissipating, IMP with weight rewinding, the
IMP-mask random re-init control, and freezing (dense forward, a random block
subset of that density trainable).

Protocol (identical for every row): same dense init (seed 0), Adam lr 1e-3 with
cosine decay over the run (SGD with momentum 0.9 via ``--optimizer sgd``), batch 128, ``--epochs`` passes over the
first ``--train-samples`` training images (same order for all rows), test
accuracy on the full 10k test set. Each row runs in its own process so its peak
RSS is its own. Columns: ``train_s`` the training loop of the final network
(wall-clock); ``prep_s`` what came before it (scoring, K-start trials, earlier IMP
rounds); ``state_mb`` parameters + gradients + optimizer state + buffers after
training; ``peak_rss_mb`` the process's peak resident memory (includes the
dataset and the torch runtime) and ``train_rss_mb`` how far that peak rose above
the high-water mark reached before the model was built (model, scoring, training;
for IMP rows it includes the dense round 0).

    python bench/exp_prune_at_init.py                 # all rows -> bench/results/prune_at_init.{json,md,png}
    python bench/exp_prune_at_init.py --timing        # dense vs sparse step time, alternating, one process
    python bench/exp_prune_at_init.py --run-one snip --density 0.02   # one row (JSON on stdout)
    python bench/exp_prune_at_init.py --from-json a.json b.json       # table + plot; later files' rows win

Data: Debian package ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist).
The PNG needs matplotlib (``pip install matplotlib``); without it only JSON/markdown are written.
"""
import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import datasets
import sparsekern as sk
import timing
from sparsekern.methods import (DissipatingGradients, apply_masks, freeze, iterative_magnitude_pruning, k_starts,
                                linear_weights)

METHODS = ("dense", "random", "erk", "magnitude", "magnitude-erk", "snip", "grasp", "synflow", "kstarts", "dissipating",
           "kstarts+dissipating", "imp", "freezing")
IMP_WARMUP_DENSITY = 0.3  # first IMP round prunes 1 -> 0.3, then down the requested densities


def load_fashion_mnist(train_samples=None):
    """(train_x, train_y, test_x, test_y): standardised float32 (N, 784) images, int64 labels."""
    data = datasets.load_fashion_mnist(train_samples=train_samples)
    return data.train_x, data.train_y, data.test_x, data.test_y


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))


class Trainer:
    """The one training protocol: a fixed batch order and a cosine schedule over ``total`` steps."""

    def __init__(self, data, args):
        self.x, self.y = data[0][:args.train_samples], data[1][:args.train_samples]
        self.batch, self.lr, self.optimizer_name = args.batch_size, args.lr, args.optimizer
        per_epoch = math.ceil(len(self.x) / self.batch)
        self.total = per_epoch * args.epochs
        g = torch.Generator().manual_seed(0)
        self.order = torch.cat([torch.randperm(len(self.x), generator=g) for _ in range(args.epochs)])
        self.optimizer = None

    def run(self, model, start=0, stop=None, snapshot=None, snapshot_step=None):
        """Train steps [start, stop) of the schedule with a fresh optimizer; returns wall-clock seconds."""
        stop = self.total if stop is None else stop
        opt = (torch.optim.Adam(model.parameters(), lr=self.lr) if self.optimizer_name == "adam"
               else torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9))
        model.train()
        begin = time.perf_counter()
        for step in range(start, stop):
            if snapshot is not None and step == snapshot_step:
                snapshot()
            for group in opt.param_groups:
                group["lr"] = 0.5 * self.lr * (1 + math.cos(math.pi * step / self.total))
            idx = self.order[(step * self.batch) % len(self.order):][:self.batch]
            loss = F.cross_entropy(model(self.x[idx]), self.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seconds = time.perf_counter() - begin
        self.optimizer = opt
        return seconds


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    correct = sum(int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum()) for i in range(0, len(x), 1000))
    return correct / len(x)


def state_mb(model, optimizer):
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def weight_density(model):
    """Fraction of the 784-2048-2048-10 weights stored (SparseLinear) or trainable (freezing)."""
    stored = total = 0
    for m in model.modules():
        if isinstance(m, sk.methods.PartiallyTrainableLinear):
            stored += int(m.delta.block_mask.sum()) * math.prod(m.delta.block_size)
            total += m.frozen_weight.numel()
        elif isinstance(m, sk.SparseLinear):
            stored += m.nnz_blocks * math.prod(m.block_size)
            total += m.in_features * m.out_features
        elif isinstance(m, nn.Linear):
            stored += m.weight.numel()
            total += m.weight.numel()
    return stored / total


def _row(method, density, model, trainer, data, train_s, prep_s, **extra):
    return dict(method=method, density=density, weight_density=round(weight_density(model), 4),
                test_acc=accuracy(model, data[2], data[3]), train_s=round(train_s, 2), prep_s=round(prep_s, 2),
                state_mb=round(state_mb(model, trainer.optimizer), 2), **extra)


def run_one(method, density, args):
    """Rows for one method at one density (IMP: all densities of its chain)."""
    data = load_fashion_mnist(args.train_samples)
    trainer = Trainer(data, args)
    args.rss_before_model = _max_rss_mb()
    bs = args.block_size
    batch = (data[0][:args.score_samples], data[1][:args.score_samples])
    prep = time.perf_counter()
    if method == "dense":
        model = make_model()
    elif method in ("random", "erk"):
        model = sk.sparsify(make_model(), density=density, method="uniform" if method == "random" else "erk",
                            block_size=bs, generator=torch.Generator().manual_seed(0))
    elif method in ("magnitude", "snip", "grasp", "synflow"):
        model = sk.sparsify(make_model(), density=density, method=method, block_size=bs,
                            inputs=batch[0], targets=batch[1], synflow_iterations=args.synflow_iterations)
    elif method == "magnitude-erk":  # layer-wise magnitude at ERK densities (global magnitude collapses layers)
        model = sk.sparsify(make_model(), density=density, method="magnitude", allocation="erk", block_size=bs)
    elif method in ("kstarts", "kstarts+dissipating"):
        start_density = density if method == "kstarts" else min(1.0, 2 * density)
        short = max(1, trainer.total // 8)
        model, report = k_starts(make_model, lambda m: trainer.run(m, 0, short), k=args.k, density=start_density,
                                 method="erk", block_size=bs, criterion="both")
    elif method == "dissipating":
        model = sk.sparsify(make_model(), density=min(1.0, 2 * density), method="erk", block_size=bs,
                            generator=torch.Generator().manual_seed(0))
    elif method == "freezing":
        model = freeze(make_model(), density=density, block_size=bs, generator=torch.Generator().manual_seed(0))
    elif method == "imp":
        return run_imp(args, data, trainer)
    else:
        raise ValueError(f"unknown method {method!r}")
    prep_s = time.perf_counter() - prep
    if method.endswith("dissipating"):
        # First quarter of the budget at 2x density, then drop the least-moved blocks and go on.
        split = trainer.total // 4
        dg = DissipatingGradients(model)
        train_s = trainer.run(model, 0, split)
        dg.prune(density=density)
        train_s += trainer.run(model, split)
    else:
        train_s = trainer.run(model)
    extra = dict(kstarts=report) if method.startswith("kstarts") else {}
    return [_row(method, 1.0 if method == "dense" else density, model, trainer, data, train_s, prep_s, **extra)]


def run_imp(args, data, trainer):
    """IMP with weight rewinding to step k along 1 -> 0.3 -> densities, plus the re-init control."""
    schedule = sorted({IMP_WARMUP_DENSITY, *args.densities}, reverse=True)
    rows, seconds = [], []

    def train(model, snapshot):
        seconds.append(trainer.run(model, snapshot=snapshot, snapshot_step=args.rewind_step))
        return accuracy(model, data[2], data[3])

    def on_round(r, density, model, acc):
        if density in args.densities:
            rows.append(dict(method="imp", density=density, weight_density=round(weight_density(model), 4),
                             test_acc=acc, train_s=round(seconds[-1], 2), prep_s=round(sum(seconds[:-1]), 2),
                             state_mb=round(state_mb(model, trainer.optimizer), 2)))

    _, history = iterative_magnitude_pruning(make_model(), train, schedule=schedule, block_size=args.block_size,
                                             rewind="weights", on_round=on_round)
    for entry in history:
        if entry["density"] in args.densities:
            fresh = make_model(seed=1)
            control = apply_masks(fresh, entry["block_masks"], linear_weights(fresh), (args.block_size,) * 2)
            train_s = trainer.run(control)
            rows.append(_row("imp-reinit", entry["density"], control, trainer, data, train_s, 0.0))
    return rows


def _max_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def environment():
    return dict(timing.environment(), **timing.kernel_path("bsr_forward", torch.device("cpu"), torch.float32),
                dtype="float32")


def run_all(args):
    os.makedirs(args.out, exist_ok=True)
    jobs = [("dense", 1.0)] + [(m, d) for d in args.densities for m in METHODS if m not in ("dense", "imp")]
    jobs.append(("imp", min(args.densities)))
    rows, env = [], environment()
    print(f"# {timing.header(env, env)}")
    jobs = [(m, d) for m, d in jobs if not args.methods or m in args.methods]
    for method, density in jobs:
        cmd = [sys.executable, os.path.abspath(__file__), "--run-one", method, "--density", str(density)]
        cmd += forward_args(args)
        begin = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{method} at {density} failed:\n{out.stderr}")
        for row in json.loads(out.stdout.strip().splitlines()[-1]):
            rows.append({**row, **env, "block_size": args.block_size, "epochs": args.epochs,
                         "train_samples": args.train_samples})
            print(f"{row['method']:>20} d={row['density']:<5} acc={row['test_acc']:.4f} train={row['train_s']:7.1f}s "
                  f"prep={row['prep_s']:6.1f}s state={row['state_mb']:6.1f}MB rss={row['peak_rss_mb']:6.0f}MB "
                  f"(+{row['train_rss_mb']:.0f}MB) "
                  f"({time.perf_counter() - begin:.0f}s)", flush=True)
        with open(os.path.join(args.out, "prune_at_init.json"), "w") as f:
            json.dump(rows, f, indent=1)
    report(rows, args.out)


def report(rows, out):
    table = markdown(rows)
    with open(os.path.join(out, "prune_at_init.md"), "w") as f:
        f.write(table)
    print(table)
    plot(rows, os.path.join(out, "prune_at_init.png"))


def merge(paths, out):
    """Rows of several result files, a later file's (method, density) rows replacing earlier ones."""
    rows = {}
    for path in paths:
        with open(path) as f:
            rows.update({(r["method"], r["density"]): r for r in json.load(f)})
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "prune_at_init.json"), "w") as f:
        json.dump(list(rows.values()), f, indent=1)
    report(list(rows.values()), out)


def forward_args(args):
    out = ["--block-size", str(args.block_size), "--epochs", str(args.epochs), "--train-samples",
           str(args.train_samples), "--batch-size", str(args.batch_size), "--optimizer", args.optimizer, "--lr", str(args.lr), "--k", str(args.k),
           "--score-samples", str(args.score_samples), "--synflow-iterations", str(args.synflow_iterations),
           "--rewind-step", str(args.rewind_step), "--densities", *map(str, args.densities)]
    return out


def markdown(rows):
    dense = next((r for r in rows if r["method"] == "dense"), None)
    lines = ["| method | density | test acc | train s | vs dense | prep s | state MB | peak RSS MB (+ over data) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (-r["density"], METHODS.index(r["method"].replace("-reinit", ""))
                                         + 0.5 * r["method"].endswith("reinit"))):
        speed = f"{dense['train_s'] / r['train_s']:.2f}x" if dense else "-"
        lines.append(f"| {r['method']} | {r['density']} | {r['test_acc']:.4f} | {r['train_s']:.1f} | {speed} | "
                     f"{r['prep_s']:.1f} | {r['state_mb']:.1f} | {r['peak_rss_mb']:.0f} (+{r['train_rss_mb']:.0f}) |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG (pip install matplotlib)")
        return
    # Right panel: training-state memory (deterministic). Wall-clock on a shared machine is
    # not (see the --timing mode for speed, measured alternating in one process).
    fig, (ax_acc, ax_mem) = plt.subplots(1, 2, figsize=(13, 5))
    dense = next((r for r in rows if r["method"] == "dense"), None)
    colors = plt.get_cmap("tab20").colors
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense")):
        pts = sorted((r["density"], r["test_acc"], r["state_mb"]) for r in rows if r["method"] == method)
        style = dict(ls="--" if method in ("random", "imp-reinit") else "-", marker="o", color=colors[i % 20],
                     label=method)
        ax_acc.plot([p[0] for p in pts], [p[1] for p in pts], **style)
        ax_mem.plot([p[0] for p in pts], [p[2] for p in pts], **style)
    if dense:
        ax_acc.axhline(dense["test_acc"], color="k", lw=1, label="dense")
        ax_mem.axhline(dense["state_mb"], color="k", lw=1, label="dense")
    for ax, label in ((ax_acc, "test accuracy"), (ax_mem, "params + grads + optimizer state (MB)")):
        ax.set_xscale("log")
        ax.set_xlabel("weight density")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_mem.set_yscale("log")
    ax_acc.legend(fontsize=7, ncol=2)
    fig.suptitle("Fashion-MNIST MLP 784-2048-2048-10, block-sparse sparsekern layers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def _train_step(model, opt, x, y, batch):
    """A callable: one training step, on the next batch of (x, y) at each call."""
    step = iter(range(10 ** 9))

    def run():
        start = next(step) * batch % (len(x) - batch)
        loss = F.cross_entropy(model(x[start:start + batch]), y[start:start + batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


def step_times(args):
    """Dense vs sparse training steps on real batches, alternating in one process (bench/timing.py):
    median step times and the median of the per-round ratios to dense."""
    x, y = load_fashion_mnist()[:2]
    models = {"dense": make_model(),
              "erk": sk.sparsify(make_model(), density=0.1, method="erk", block_size=args.block_size),
              "uniform": sk.sparsify(make_model(), density=0.1, method="uniform", block_size=args.block_size),
              "freezing": freeze(make_model(), density=0.1, block_size=args.block_size),
              "unstructured": sk.sparsify(make_model(), density=0.1, method="uniform", block_size=1)}
    make_opt = (lambda ps: torch.optim.Adam(ps, lr=args.lr)) if args.optimizer == "adam" else (
        lambda ps: torch.optim.SGD(ps, lr=args.lr, momentum=0.9))
    steps = {k: _train_step(m, make_opt(m.parameters()), x, y, args.batch_size) for k, m in models.items()}
    # Unstructured = 1x1 blocks: exact, but much slower than dense: timed in the first 5 rounds only.
    measure = timing.Timer()
    times, _ = timing.alternate(steps, 5, measure)
    rest = {k: fn for k, fn in steps.items() if k != "unstructured"}
    for name, ms in timing.alternate(rest, args.timing_steps - 5, measure)[0].items():
        times[name] += ms
    steps_per_epoch = math.ceil(60000 / args.batch_size)
    env = environment()
    print(f"# {timing.header(env, env)}")
    for name, ms in times.items():
        med = statistics.median(ms)
        print(json.dumps({**env, "model": name, "density": 0.1 if name != "dense" else 1.0,
                          "block_size": 1 if name == "unstructured" else args.block_size, "batch": args.batch_size,
                          "median_step_ms": round(med, 2), "epoch_s_estimate": round(med * steps_per_epoch / 1e3, 1),
                          "speedup_vs_dense": round(timing.median_ratio(times["dense"], ms), 2)}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.05, 0.02])
    p.add_argument("--methods", nargs="*", help="subset of rows to run (default: all)")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-samples", type=int, default=60000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--k", type=int, default=3, help="K-starts candidates")
    p.add_argument("--score-samples", type=int, default=512, help="batch for SNIP/GraSP scores")
    p.add_argument("--synflow-iterations", type=int, default=100)
    p.add_argument("--rewind-step", type=int, default=20, help="IMP rewinds weights to this step of round 0")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--run-one", metavar="METHOD")
    p.add_argument("--density", type=float)
    p.add_argument("--timing", action="store_true")
    p.add_argument("--timing-steps", type=int, default=30, help="alternating rounds (at least 5)")
    p.add_argument("--from-json", nargs="+", metavar="FILE", help="only rebuild table and plot from result files")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.from_json:
        merge(args.from_json, args.out)
    elif args.timing:
        step_times(args)
    elif args.run_one:
        rows = run_one(args.run_one, args.density, args)
        peak = _max_rss_mb()
        print(json.dumps([{**r, "peak_rss_mb": round(peak, 1), "train_rss_mb": round(peak - args.rss_before_model, 1)}
                          for r in rows]))
    else:
        run_all(args)


if __name__ == "__main__":
    main()
