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
    # DPF with the paper's schedule, on block-32 layers and as the element-granularity reference
    python bench/exp_dst.py --task fashion --densities 0.1 --methods dpf dpf-masked \
        --delta 16 --t-end 1 --dpf-ramp-end 0.5 --tag=-paper

Data: ``apt-get install -y dataset-fashion-mnist fortunes``.
"""
import argparse
import glob
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import datasets  # noqa: E402  (bench/datasets.py: this script's folder is on sys.path)
from timing import PeakMemory  # noqa: E402  (bench/timing.py)
import sparsekern as sk  # noqa: E402
from sparsekern.kernels import select_kernel  # noqa: E402
from sparsekern.methods import DPF, GGR, SET, SNFS, DynamicSparsity, RigL, TopKAST, erk_densities  # noqa: E402
from sparsekern.methods.functional import dpf_mask  # noqa: E402
from sparsekern.methods.schedules import DropSchedule, gradual_density  # noqa: E402

FORTUNES = "/usr/share/games/fortunes"
METHODS = {"static": DynamicSparsity, "set": SET, "rigl": RigL, "snfs": SNFS, "topkast": TopKAST, "ggr": GGR,
           "dpf": DPF}


# ------------------------------------------------------------------ data

def load_fashion_mnist():
    """(train_x, train_y, test_x, test_y), images standardised float32 (N, 784)."""
    data = datasets.load_fashion_mnist()
    return data.train_x, data.train_y, data.test_x, data.test_y


def load_fortunes(root=FORTUNES):
    """The fortune files (not the offensive ones) as one string of printable ASCII and newlines."""
    paths = sorted(p for p in glob.glob(os.path.join(root, "*")) if os.path.isfile(p) and "." not in os.path.basename(p))
    if not paths:
        raise FileNotFoundError(f"no fortune files under {root}: apt-get install -y fortunes")
    text = "".join(open(p, encoding="latin-1").read() for p in paths)
    return "".join(c for c in text if c == "\n" or " " <= c <= "~")


def text_windows(text, context):
    """(train_x, train_y, val_x, val_y, vocab): windows of ``context`` char ids -> next char (last 10% = val)."""
    vocab = sorted(set(text))
    lut = torch.zeros(128, dtype=torch.int64)
    lut[[ord(c) for c in vocab]] = torch.arange(len(vocab))
    ids = lut[torch.frombuffer(bytearray(text.encode("ascii")), dtype=torch.uint8).long()]
    windows = ids.unfold(0, context + 1, 1)
    split = int(0.9 * len(windows))
    return windows[:split, :-1], windows[:split, -1], windows[split:, :-1], windows[split:, -1], len(vocab)


# ------------------------------------------------------------------ models

def hidden(sparse, n_in, n_out, args):
    """A hidden layer: nn.Linear (dense runs), SparseLinear, or 2:4 SemiSparseLinear (``--hidden-layer``)."""
    if not sparse:
        return nn.Linear(n_in, n_out)
    if args.hidden_layer == "block":
        return sk.SparseLinear(n_in, n_out, block_size=args.block_size)
    return sk.SemiSparseLinear(n_in, n_out, transposable=args.hidden_layer == "semi-transposable")


def fashion_model(sparse, args, seed=0):
    torch.manual_seed(seed)
    h = args.hidden
    return nn.Sequential(hidden(sparse, 784, h, args), nn.ReLU(),
                         hidden(sparse, h, h, args), nn.ReLU(), nn.Linear(h, 10))


class CharMLP(nn.Module):
    def __init__(self, sparse, vocab, args, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, args.embed)
        self.body = nn.Sequential(hidden(sparse, args.context * args.embed, args.text_hidden, args),
                                  nn.ReLU(), hidden(sparse, args.text_hidden, args.text_hidden, args),
                                  nn.ReLU(), nn.Linear(args.text_hidden, vocab))

    def forward(self, x):
        return self.body(self.embed(x).flatten(1))


# ------------------------------------------------------------------ reference: DPF on masked dense layers

class _StraightThroughMask(nn.Module):
    """Forward value W ⊙ M; the gradient reaches all of W unmasked (DPF's error feedback)."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, weight):
        return weight + (weight * self.mask - weight).detach()


class MaskedDPF:
    """Reference only, not a sparsekern driver: DPF as the paper's code runs it, on the dense
    nn.Linear hidden layers at element granularity (the last Linear stays dense). Forward with
    W ⊙ M, the gradient there updates all of W; every ``delta`` steps until ``t_end``, M = the
    top |w| at Zhu & Gupta's cubic density (ERK targets), reached at ``ramp_end`` (None: at the
    last update). Everything is dense, so it is no faster than dense: for quality only (element
    granularity on SparseLinear with DPF's dense probe is too slow on this CPU)."""

    def __init__(self, model, *, density, delta, t_end, ramp_end=None):
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]
        self.targets = erk_densities([tuple(layer.weight.shape) for layer in self.layers], density)
        self.schedule = DropSchedule(delta=delta, t_end=t_end)
        self.ramp_end = ramp_end if ramp_end is not None else ((t_end - 1) // delta) * delta
        self.masks = [torch.ones_like(layer.weight, dtype=torch.bool) for layer in self.layers]
        for layer, mask in zip(self.layers, self.masks):
            torch.nn.utils.parametrize.register_parametrization(layer, "weight", _StraightThroughMask(mask))
        self.t, self.update_seconds, self._probes = 0, [], {}

    def step(self):
        self.t += 1
        if not self.schedule.is_update_step(self.t):
            return False
        start = time.perf_counter()
        with torch.no_grad():
            for layer, mask, target in zip(self.layers, self.masks, self.targets):
                density = gradual_density(self.t, target, t_end=self.ramp_end)
                mask.copy_(dpf_mask(layer.parametrizations.weight.original, density))
        self.update_seconds.append(time.perf_counter() - start)
        return True

    def stored_density(self):
        return sum(int(m.sum()) for m in self.masks) / sum(m.numel() for m in self.masks)


# ------------------------------------------------------------------ one run

def state_mb(model, optimizer, driver):
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    if driver is not None:
        probes = [getattr(p, "product", p) for p in driver._probes.values()]  # ScoreProbe or BlockSparseMatrix
        tensors += [p.values for p in probes if p is not None]
        tensors += [t for p in driver._probes.values() for t in getattr(p, "xs", []) + getattr(p, "dys", [])
                    if t is not None]
        if hasattr(driver, "shadow"):
            tensors += [p for p, _ in driver.shadow.values()]
            tensors += [t for s in driver.shadow_optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2 ** 20


def stored_density(model):
    stored = total = 0
    for m in model.modules():
        if isinstance(m, sk.SparseLinear):
            stored += m.nnz_blocks * math.prod(m.block_size)
            total += m.padded_shape[0] * m.padded_shape[1]
        elif isinstance(m, sk.SemiSparseLinear):
            stored += m.values.numel()
            total += m.in_features * m.out_features
    return stored / total if total else 1.0


@torch.no_grad()
def evaluate(task, model, x, y):
    model.eval()
    total, n = 0.0, len(x)
    for i in range(0, n, 2000):
        out = model(x[i:i + 2000])
        total += float((out.argmax(1) == y[i:i + 2000]).sum()) if task == "fashion" else \
            float(F.cross_entropy(out, y[i:i + 2000], reduction="sum")) / math.log(2)
    model.train()
    return total / n


def run(task, method, density, data, args, seed=0):
    with PeakMemory() as peak:
        row, model = _train(task, method, density, data, args, seed)
    row["peak_mb"] = None if peak.mb is None else round(peak.mb, 1)
    row["quality"] = round(evaluate(task, model, data[2], data[3]), 4)
    return row


def _train(task, method, density, data, args, seed):
    """One training run: (its JSON row without quality and peak memory, the trained model)."""
    train_x, train_y, _, _, make = data
    sparse = method not in ("dense", "dpf-masked")  # SparseLinear hidden layers
    model = make(sparse, seed)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    steps = args.epochs * (len(train_x) // args.batch)
    delta, t_end = args.delta, int(args.t_end * steps)
    ramp_end = int(args.dpf_ramp_end * steps) if method.startswith("dpf") and args.dpf_ramp_end is not None \
        else None
    driver = None
    if method == "dpf-masked":
        driver = MaskedDPF(model, density=density, delta=delta, t_end=t_end, ramp_end=ramp_end)
    elif sparse:
        options = {"score_method": args.score_method} if method in ("rigl", "snfs", "ggr") else {}
        if ramp_end is not None:
            options["ramp_end"] = ramp_end
        driver = METHODS[method](model, opt, density=density, delta=delta, alpha=args.alpha,
                                 t_end=0 if method == "static" else t_end, schedule=args.schedule, seed=seed,
                                 **options)
        if args.sparse_init:
            # Keep the activation scale of the dense init: fan-in shrank to density * in_features.
            with torch.no_grad():
                for name, layer in driver.layers:  # random block masks (2:4 layers keep their magnitude pruning)
                    layer.values.mul_(layer.density ** -0.5)
                    if hasattr(driver, "shadow"):  # Top-KAST's exploration blocks: same scale
                        driver.shadow[name][0].mul_(layer.density ** -0.5)
    order = torch.cat([torch.randperm(len(train_x), generator=torch.Generator().manual_seed(1000 * seed + e))
                       for e in range(args.epochs)])
    times, updates = [], []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 0.5 * args.lr * (1 + math.cos(math.pi * step / steps))
        idx = order[step * args.batch:(step + 1) * args.batch]
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
        loss.backward()
        opt.step()
        changed = driver.step() if driver is not None else False
        times.append(time.perf_counter() - start)
        if changed:
            updates.append(step)
    median = statistics.median(t for i, t in enumerate(times) if i not in set(updates))
    extra = [max(times[i] - median, 0.0) / median for i in updates]
    cost_steps = statistics.mean(extra) if extra else 0.0
    return {"task": task, "method": method + args.tag, "density": 1.0 if method == "dense" else density, "seed": seed,
            "epochs": args.epochs, "delta": delta, "train_samples": len(train_x),
            "t_end": t_end, "schedule": args.schedule, "ramp_end": ramp_end,
            "stored_density": round(driver.stored_density() if method == "dpf-masked" else stored_density(model), 4),
            "block_size": "masked-element" if method == "dpf-masked" else
            (args.block_size if args.hidden_layer == "block" else args.hidden_layer) if sparse else None,
            "metric": "test_acc" if task == "fashion" else "val_bits_per_char",
            "train_s": round(sum(times), 3), "step_ms": round(1000 * median, 3), "steps": steps,
            "updates": len(updates), "update_cost_steps": round(cost_steps, 3),
            "score_method": args.score_method if method in ("rigl", "snfs", "ggr") else None,
            "update_frac_dt100": round(cost_steps / 100, 5),
            "rebuild_ms": round(1000 * statistics.mean(driver.update_seconds), 3)
            if driver is not None and driver.update_seconds else 0.0,
            "state_mb": round(state_mb(model, opt, driver), 2), "final_loss": round(loss.item(), 4)}, model


# ------------------------------------------------------------------ driver

def environment():
    backend = select_kernel("bsr_forward", torch.device("cpu"), torch.float32)[0]
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "triton": triton_version, "backend": backend, "dtype": "float32"}


def task_data(task, args):
    if task == "fashion":
        tx, ty, ex, ey = load_fashion_mnist()
        return (tx[:args.train_samples], ty[:args.train_samples], ex, ey,
                lambda sparse, seed: fashion_model(sparse, args, seed))
    tx, ty, vx, vy, vocab = text_windows(load_fortunes(), args.context)
    g = torch.Generator().manual_seed(0)
    train = torch.randperm(len(tx), generator=g)[:args.text_samples]
    val = torch.randperm(len(vx), generator=g)[:args.val_samples]
    return tx[train], ty[train], vx[val], vy[val], lambda sparse, seed: CharMLP(sparse, vocab, args, seed)


def markdown(rows):
    lines = ["| task | method | density | quality | train s | vs dense | median step ms | vs dense | state MB "
             "| peak MB | update cost (steps) | % of ΔT=100 | rebuild ms |", "|" + "---|" * 13]
    dense = {r["task"]: r for r in rows if r["method"] == "dense"}
    for r in rows:
        base = dense.get(r["task"])
        speed = f"{base['train_s'] / r['train_s']:.2f}x" if base else "-"
        step = f"{base['step_ms'] / r['step_ms']:.2f}x" if base else "-"
        lines.append(f"| {r['task']} | {r['method']} | {r['density']} | {r['quality']:.4f} {r['metric']} | "
                     f"{r['train_s']:.1f} | {speed} | {r['step_ms']:.1f} | {step} | {r['state_mb']:.1f} | "
                     f"{'-' if r.get('peak_mb') is None else format(r['peak_mb'], '.1f')} | "
                     f"{r['update_cost_steps']:.2f} | "
                     f"{100 * r['update_frac_dt100']:.2f} | {r['rebuild_ms']:.1f} |")
    return "\n".join(lines)


def mean_quality(rows):
    """{(task, method, density): (mean, sample sd or None, n)} over seeds."""
    groups = {}
    for r in rows:
        groups.setdefault((r["task"], r["method"], r["density"]), []).append(r["quality"])
    return {k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else None, len(v)) for k, v in groups.items()}


def _cell(stat):
    mean, sd, n = stat
    return f"{mean:.4f}" if sd is None else f"{mean:.4f} ± {sd:.4f} ({n})"


def quality_pivot(rows):
    """Quality per method (rows) and density (columns), one table per task; with several
    seeds, mean ± sample standard deviation (number of seeds)."""
    out, stats = [], mean_quality(rows)
    for task in dict.fromkeys(r["task"] for r in rows):
        sub = [r for r in rows if r["task"] == task]
        dens = sorted({r["density"] for r in sub if r["method"] != "dense"}, reverse=True)
        out += [f"{task} ({sub[0]['metric']})", "",
                "| method | " + " | ".join(f"density {d}" for d in dens) + " |", "|---|" + "---|" * len(dens)]
        for method in dict.fromkeys(r["method"] for r in sub):
            q = {d: stat for (t, m, d), stat in stats.items() if t == task and m == method}
            cells = [_cell(q[1.0])] * len(dens) if method == "dense" else [
                _cell(q[d]) if d in q else "-" for d in dens]
            out.append(f"| {method} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def speed(args, env):
    """Dense vs DST training on the Fashion-MNIST MLP, alternating chunks of ΔT steps
    (one full update period: the probe step and the rebuild included) in one process.
    Yields JSON rows with the median chunk-time ratio."""
    tx, ty, _, _ = load_fashion_mnist()
    for block in args.speed_block_sizes:
        for density in args.densities:
            args.block_size = block
            runners = {}
            for name in ("dense", args.speed_method):
                model = fashion_model(name != "dense", args)
                opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
                options = {"score_method": args.score_method} if name in ("rigl", "snfs", "ggr") else {}
                driver = None if name == "dense" else METHODS[name](
                    model, opt, density=density, delta=args.speed_delta, alpha=args.alpha, t_end=10 ** 9, **options)
                runners[name] = (model, opt, driver)
            chunk_s = {name: [] for name in runners}
            g = torch.Generator().manual_seed(0)
            for round_ in range(args.speed_rounds + 1):  # round 0 warms up
                for name, (model, opt, driver) in runners.items():
                    start = time.perf_counter()
                    for _ in range(args.speed_delta):
                        idx = torch.randint(0, len(tx), (args.batch,), generator=g)
                        opt.zero_grad(set_to_none=True)
                        F.cross_entropy(model(tx[idx]), ty[idx]).backward()
                        opt.step()
                        if driver is not None:
                            driver.step()
                    if round_:
                        chunk_s[name].append(time.perf_counter() - start)
            ratios = [d / s for d, s in zip(chunk_s["dense"], chunk_s[args.speed_method])]
            driver = runners[args.speed_method][2]
            yield {"task": "fashion-speed", "method": args.speed_method, "density": density, "block_size": block,
                   "hidden": args.hidden, "batch": args.batch, "delta": args.speed_delta,
                   "dense_ms_per_step": round(1000 * statistics.median(chunk_s["dense"]) / args.speed_delta, 3),
                   "sparse_ms_per_step": round(1000 * statistics.median(chunk_s[args.speed_method]) / args.speed_delta, 3),
                   "median_speedup": round(statistics.median(ratios), 3), "ratios": [round(r, 3) for r in ratios],
                   "updates": len(driver.update_seconds),
                   "rebuild_ms": round(1000 * statistics.median(driver.update_seconds), 3), **env}


def paired_differences(rows, baseline="static"):
    """Per task: each method's quality minus ``baseline``'s at the same density and seed (same
    initial weights and data order), as mean ± sd over seeds and the count of seeds it is ahead."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        sub = [r for r in rows if r["task"] == task]
        base = {(r["density"], r["seed"]): r["quality"] for r in sub if r["method"] == baseline}
        dens = sorted({d for d, _ in base}, reverse=True)
        sign = -1 if sub[0]["metric"] == "val_bits_per_char" else 1  # positive = better
        out += [f"{task}: {sub[0]['metric']} minus {baseline}'s, same seed (positive = better; "
                "mean ± sd, seeds ahead/seeds)", "",
                "| method | " + " | ".join(f"density {d}" for d in dens) + " |", "|---|" + "---|" * len(dens)]
        for method in dict.fromkeys(r["method"] for r in sub if r["method"] not in ("dense", baseline)):
            cells = []
            for d in dens:
                diff = [sign * (r["quality"] - base[(d, r["seed"])]) for r in sub
                        if r["method"] == method and r["density"] == d and (d, r["seed"]) in base]
                if not diff:
                    cells.append("-")
                    continue
                sd = f" ± {statistics.stdev(diff):.4f}" if len(diff) > 1 else ""
                cells.append(f"{statistics.mean(diff):+.4f}{sd} ({sum(x > 0 for x in diff)}/{len(diff)})")
            out.append(f"| {method} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def svg_plot(rows, path):
    """Quality (mean over seeds) vs density, one line per method, one panel per task (plain SVG)."""
    rows = [{"task": t, "method": m, "density": d, "quality": q, "metric": metric[t]}
            for metric in [{r["task"]: r["metric"] for r in rows}]
            for (t, m, d), (q, _, _) in mean_quality(rows).items()]
    colors = ["#000000", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    tasks = sorted({r["task"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    w, h, pad = 420, 300, 50
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * len(tasks)}" height="{h + 20 * len(methods)}" '
           'font-family="sans-serif" font-size="11">']
    for k, task in enumerate(tasks):
        sub = [r for r in rows if r["task"] == task]
        dens = sorted({r["density"] for r in sub if r["method"] != "dense"})
        qs = [r["quality"] for r in sub]
        lo, hi = min(qs), max(qs)
        hi = hi if hi > lo else lo + 1
        x0 = k * w

        def xy(i, q):
            x = x0 + pad + (w - 2 * pad) * (i / max(len(dens) - 1, 1))
            return x, h - pad - (h - 2 * pad) * (q - lo) / (hi - lo)
        out.append(f'<text x="{x0 + w / 2}" y="20" text-anchor="middle">{task}: {sub[0]["metric"]}</text>')
        out.append(f'<text x="{x0 + w / 2}" y="{h - 10}" text-anchor="middle">density</text>')
        for i, d in enumerate(dens):
            out.append(f'<text x="{xy(i, lo)[0]}" y="{h - pad + 15}" text-anchor="middle">{d}</text>')
        for q in (lo, hi):
            out.append(f'<text x="{x0 + pad - 5}" y="{xy(0, q)[1]}" text-anchor="end">{q:.3f}</text>')
        for m, method in enumerate(methods):
            pts = sorted((r["density"], r["quality"]) for r in sub if r["method"] == method)
            color = colors[m % len(colors)]
            if method == "dense" and pts:
                (_, y), (x_end, _) = xy(0, pts[0][1]), xy(len(dens) - 1, lo)
                out.append(f'<line x1="{x0 + pad}" y1="{y}" x2="{x_end}" y2="{y}" stroke="{color}" '
                           'stroke-dasharray="4"/>')
                continue
            line = " ".join("%.1f,%.1f" % xy(dens.index(d), q) for d, q in pts)
            out.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="2"/>')
    for m, method in enumerate(methods):
        y = h + 15 + 20 * m
        out.append(f'<rect x="10" y="{y - 9}" width="10" height="10" fill="{colors[m % len(colors)]}"/>'
                   f'<text x="25" y="{y}">{method}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["fashion", "text", "both"], default="both")
    p.add_argument("--methods", nargs="+", default=["dense", *METHODS], choices=["dense", *METHODS, "dpf-masked"],
                   help="dpf-masked: reference DPF on masked dense layers at element granularity (MaskedDPF)")
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
                   help="how RigL/SNFS/GGR get dense-gradient block scores (sparsekern.methods.dst_scores)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--speed", action="store_true", help="only time dense vs --speed-method (alternating chunks)")
    p.add_argument("--speed-method", default="rigl", choices=list(METHODS))
    p.add_argument("--speed-block-sizes", nargs="+", type=int, default=[32])
    p.add_argument("--speed-delta", type=int, default=100)
    p.add_argument("--speed-rounds", type=int, default=5)
    p.add_argument("--tag", default="", help="appended to the method name in the rows (to tell settings apart)")
    p.add_argument("--json", default=None, help="append JSON rows to this file")
    p.add_argument("--plot", default=None, help="write quality vs density as an SVG file")
    p.add_argument("--from-json", default=None, help="no training: table and plot from saved JSON rows")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_json:
        rows = [json.loads(line) for line in open(args.from_json) if line.strip()]
        print(markdown(rows))
        print(quality_pivot(rows))
        if any(r["method"] == "static" and "seed" in r for r in rows):
            print(paired_differences(rows))
        if args.plot:
            svg_plot(rows, args.plot)
        return
    env = environment()
    print(json.dumps(env))
    if args.speed:
        for row in speed(args, env):
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
        return
    rows = []
    for task in (["fashion", "text"] if args.task == "both" else [args.task]):
        data = task_data(task, args)
        for seed, method in ((s, m) for s in args.seeds for m in args.methods):
            for density in ([1.0] if method == "dense" else args.densities):
                row = {**run(task, method, density, data, args, seed), **env}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(row) + "\n")
    print(markdown(rows))
    print(quality_pivot(rows))
    if args.plot:
        svg_plot(rows, args.plot)


if __name__ == "__main__":
    main()
