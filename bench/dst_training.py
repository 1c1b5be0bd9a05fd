"""One DST training run of bench/exp_dst.py and its measurements (quality, step times,
mask-update cost, training-state and peak memory), and the dense-vs-DST speed comparison."""
import math
import statistics
import time

import torch
import torch.nn.functional as F

import sparsekern as sk
from models import fashion_model
from timing import PeakMemory, Timer, alternate, median_ratio

METHODS = {"static": sk.methods.DynamicSparsity, "set": sk.methods.SET, "rigl": sk.methods.RigL,
           "snfs": sk.methods.SNFS, "topkast": sk.methods.TopKAST, "ggr": sk.methods.GGR, "dpf": sk.methods.DPF}
SCORED = ("rigl", "snfs", "ggr")  # the methods that take --score-method


def state_mb(model, optimizer, driver):
    """Training state: parameters, buffers, gradients, optimizer state, driver probes and shadows."""
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
    """Stored weights over the dense weights of the sparse layers (block, conv and 2:4)."""
    stored = total = 0
    for m in model.modules():
        if isinstance(m, (sk.SparseLinear, sk.SparseConv2d)):
            stored += m.values.numel()  # nnz blocks x block (x kh x kw taps)
            total += m.padded_shape[0] * m.padded_shape[1] * math.prod(getattr(m, "kernel_size", ()))
        elif isinstance(m, sk.SemiSparseLinear):
            stored += m.values.numel()
            total += m.in_features * m.out_features
    return stored / total if total else 1.0


@torch.no_grad()
def evaluate(task, model, x, y):
    """Test accuracy (fashion) or validation bits per character (text)."""
    model.eval()
    total, n = 0.0, len(x)
    for i in range(0, n, 2000):
        out = model(x[i:i + 2000])
        total += float((out.argmax(1) == y[i:i + 2000]).sum()) if task == "fashion" else \
            float(F.cross_entropy(out, y[i:i + 2000], reduction="sum")) / math.log(2)
    model.train()
    return total / n


def run(task, method, density, data, args, seed=0):
    """Train and evaluate one (task, method, density, seed): its JSON row."""
    with PeakMemory() as peak:
        row, model = _train(task, method, density, data, args, seed)
    row["peak_mb"] = None if peak.mb is None else round(peak.mb, 1)
    row["quality"] = round(evaluate(task, model, data[2], data[3]), 4)
    return row


def _driver(method, model, opt, density, delta, t_end, ramp_end, args, seed):
    options = {"score_method": args.score_method} if method in SCORED else {}
    if ramp_end is not None:
        options["ramp_end"] = ramp_end
    driver = METHODS[method](model, opt, density=density, delta=delta, alpha=args.alpha,
                             t_end=0 if method == "static" else t_end, schedule=args.schedule, seed=seed, **options)
    if args.sparse_init:
        # Keep the activation scale of the dense init: fan-in shrank to density * in_features.
        with torch.no_grad():
            for name, layer in driver.layers:  # random block masks (2:4 layers keep their magnitude pruning)
                if layer.density == 0:  # ERK rounded a small block grid to no block: nothing to scale
                    continue
                layer.values.mul_(layer.density ** -0.5)
                if hasattr(driver, "shadow"):  # Top-KAST's exploration blocks: same scale
                    driver.shadow[name][0].mul_(layer.density ** -0.5)
    return driver


def _train(task, method, density, data, args, seed):
    """One training run: (its JSON row without quality and peak memory, the trained model)."""
    train_x, train_y, _, _, make = data
    sparse = method != "dense"
    model = make(sparse, seed)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9,
                          weight_decay=getattr(args, "weight_decay", 0.0))
    steps = args.epochs * (len(train_x) // args.batch)
    delta, t_end = args.delta, int(args.t_end * steps)
    ramp_end = int(args.dpf_ramp_end * steps) if method == "dpf" and args.dpf_ramp_end is not None else None
    # Methods without a driver (e.g. pruning at init) got their structure from ``make``.
    driver = _driver(method, model, opt, density, delta, t_end, ramp_end, args, seed) \
        if sparse and method in METHODS else None
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
            "stored_density": round(stored_density(model), 4),
            "block_size": (args.block_size if getattr(args, "hidden_layer", "block") == "block" else args.hidden_layer)
            if sparse else None,
            "metric": "test_acc" if task == "fashion" else "val_bits_per_char",
            "train_s": round(sum(times), 3), "step_ms": round(1000 * median, 3), "steps": steps,
            "updates": len(updates), "update_cost_steps": round(cost_steps, 3),
            "score_method": args.score_method if method in SCORED else None,
            "update_frac_dt100": round(cost_steps / 100, 5),
            "rebuild_ms": round(1000 * statistics.mean(driver.update_seconds), 3)
            if driver is not None and driver.update_seconds else 0.0,
            "state_mb": round(state_mb(model, opt, driver), 2), "final_loss": round(loss.item(), 4)}, model


def speed(args, env, train_x, train_y, make=None, fields=None):
    """Dense vs DST training, alternating chunks of ΔT steps (one full update period: the
    probe step and the rebuild included) in one process. Yields JSON rows with the median
    chunk-time ratio. ``make(sparse, density)`` builds the model (default: the Fashion-MNIST
    MLP of ``args``), ``fields`` describe it in the rows (default: the MLP's hidden width)."""
    make = make or (lambda sparse, density: fashion_model(sparse, args))
    fields = fields or {"hidden": args.hidden}
    for block in args.speed_block_sizes:
        for density in args.densities:
            args.block_size = block
            g = torch.Generator().manual_seed(0)
            chunks, drivers = {}, {}
            for name in ("dense", args.speed_method):
                model = make(name != "dense", density)
                opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
                options = {"score_method": args.score_method} if name in SCORED else {}
                drivers[name] = None if name == "dense" else METHODS[name](
                    model, opt, density=density, delta=args.speed_delta, alpha=args.alpha,
                    t_end=0 if name == "static" else 10 ** 9, **options)
                chunks[name] = _chunk(model, opt, drivers[name], train_x, train_y, args, g)
            warmup_s = {}
            if args.speed_compile:  # the first chunk compiles, the second recompiles once the block counts change
                for name, chunk in chunks.items():
                    start = time.perf_counter()
                    chunk(), chunk()
                    warmup_s[name] = round(time.perf_counter() - start, 1)
            ms, _ = alternate(chunks, args.speed_rounds, Timer())
            dense, sparse = ms["dense"], ms[args.speed_method]
            driver = drivers[args.speed_method]
            yield {"task": "fashion-speed", "method": args.speed_method, "density": density, "block_size": block,
                   **fields, "batch": args.batch, "delta": args.speed_delta, "precision": args.speed_precision,
                   "compiled": args.speed_compile, "compile_warmup_s": warmup_s,
                   "dense_ms_per_step": round(statistics.median(dense) / args.speed_delta, 3),
                   "sparse_ms_per_step": round(statistics.median(sparse) / args.speed_delta, 3),
                   "median_speedup": round(median_ratio(dense, sparse), 3),
                   "ratios": [round(d / s, 3) for d, s in zip(dense, sparse)],
                   "updates": len(driver.update_seconds),
                   "rebuild_ms": round(1000 * statistics.median(driver.update_seconds), 3)
                   if driver.update_seconds else 0.0, **env}


def _chunk(model, opt, driver, train_x, train_y, args, generator):
    """A callable: ``args.speed_delta`` training steps on random batches (forward and loss under
    bf16 autocast with ``args.speed_precision == "bf16"``: fp32 master weights, as nn.Linear's;
    the model under torch.compile with ``args.speed_compile``)."""
    bf16 = args.speed_precision == "bf16"
    forward = torch.compile(model) if args.speed_compile else model

    def run():
        for _ in range(args.speed_delta):
            idx = torch.randint(0, len(train_x), (args.batch,), generator=generator)
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(forward(train_x[idx]), train_y[idx])
            loss.backward()
            opt.step()
            if driver is not None:
                driver.step()
    return run
