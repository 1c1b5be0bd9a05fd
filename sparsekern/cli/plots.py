"""The PNG figures of ``sparsekern train`` and ``sparsekern bench`` (matplotlib, passed in as
``plt`` so that importing this module needs nothing)."""
import math

COLORS = {"dense": "#555555", "sparse": "#d62728"}


def _smooth(values, window):
    """Centred moving geometric mean (the per-step loss is noisy and drawn on a log axis; a trailing
    average would lag). The window narrows symmetrically at both ends, so the curve starts and ends
    on the measured values."""
    logs = [math.log(max(v, 1e-12)) for v in values]
    sums = [0.0]
    for v in logs:
        sums.append(sums[-1] + v)
    out = []
    for i in range(len(logs)):
        half = min(window // 2, i, len(logs) - 1 - i)
        out.append(math.exp((sums[i + half + 1] - sums[i - half]) / (2 * half + 1)))
    return out


def _plain_log_ticks(axis, low, high):
    """Log-scale ticks as plain numbers (2, not 2x10^0); minor ones labelled at 2 and 5 only when
    the data span more than about a decade (every one otherwise, or there would be one label)."""
    from matplotlib import ticker
    labelled = "23456789" if high <= 20 * low else "25"
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in labelled else ""))


def _annotate_bars(ax, bars, texts):
    for bar, text in zip(bars, texts):
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=10)


def train_figure(plt, report, path):
    """Loss vs training time of both runs; bars of median step time and of memory."""
    labels, runs, cfg, env = report["labels"], report["runs"], report["config"], report["environment"]
    colors = [COLORS["dense"], COLORS["sparse"]]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2), gridspec_kw={"width_ratios": [2.2, 1, 1]})

    ax = axes[0]
    window = max(5, min(51, len(report["curves"][labels[0]]["loss"]) // 20))
    for label, color in zip(labels, colors):
        curve = report["curves"][label]
        acc = 100 * runs[label]["test_accuracy"]
        ax.plot(curve["time_s"], curve["loss"], color=color, alpha=0.2, linewidth=0.8)
        ax.plot(curve["time_s"], _smooth(curve["loss"], window), color=color, linewidth=2,
                label=f"{label} (test accuracy {acc:.1f} %)")
    ax.set_yscale("log")
    losses = [x for label in labels for x in report["curves"][label]["loss"] if x > 0]
    _plain_log_ticks(ax.yaxis, min(losses, default=1), max(losses, default=1))
    ax.set_xlabel("training time (s, wall clock of the run's own steps)")
    ax.set_ylabel("training loss (cross-entropy, log scale)")
    ax.set_title(f"Training loss vs time (faint: per step; line: geometric mean of {window} steps)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right")

    ax = axes[1]
    ms = [runs[label]["step_ms_median"] for label in labels]
    bars = ax.bar(labels, ms, color=colors)
    _annotate_bars(ax, bars, [f"{v:.1f} ms" for v in ms])
    ax.set_ylabel("median step time (ms)")
    ax.set_title(f"Step time: sparse {report['speed_ratio']:.2f}x faster" if report["speed_ratio"] >= 1
                 else f"Step time: sparse {1 / report['speed_ratio']:.2f}x slower")
    ax.set_ylim(0, max(ms) * 1.18)
    ax.grid(True, axis="y", alpha=0.3)

    ax = axes[2]
    groups = ["peak RSS growth\n(first chunk)", "weights + grads\n+ optimizer state"]
    top = 1e-3
    for i, (label, color) in enumerate(zip(labels, colors)):
        values = [runs[label]["peak_mb"], runs[label]["state_mb"]]
        xs = [g + (i - 0.5) * 0.38 for g in range(len(groups))]
        bars = ax.bar(xs, [v or 0 for v in values], width=0.38, color=color, label=label)
        _annotate_bars(ax, bars, ["n/a" if v is None else f"{v:.1f}" for v in values])
        top = max(top, *(v or 0 for v in values))
        before = runs[label].get("peak_mb_before_first_update")
        if before is not None:  # the part of the peak that the mask update's scores add
            ax.hlines(before, xs[0] - 0.19, xs[0] + 0.19, colors="black", linestyles="--",
                      label=f"{label} before its first mask update")
            ax.annotate(f"{before:.1f}", (xs[0], before), xytext=(0, -12), textcoords="offset points",
                        ha="center", fontsize=9, color="white")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylim(0, top * 1.5)  # room for the legend above the bars
    ax.set_ylabel("memory (MiB)")
    ax.set_title("Memory of training")
    ax.legend(loc="upper right", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)

    method = {"2:4": "2:4 semi-structured", "lowrank": f"low-rank r={cfg['rank']}"}.get(
        cfg["method"], f"{cfg['method']}, density {cfg['density']}, block {cfg['block_size']}")
    data = report["dataset"]
    fig.suptitle(f"sparsekern train: {report['model']} "
                 f"on {data['name']}, dense vs {method}; {cfg['steps']} steps of batch {cfg['batch_size']}\n"
                 f"{env['cpu']}, {env['threads']} threads, torch {env['torch']}; ratio = median over alternating "
                 f"{report['chunk_steps']}-step chunk pairs", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _speedup_vs_density(plt, series, title, path):
    """Step speed-up vs density, one line per ``series`` {label: [(density, ratio)]}, with the
    1/density limit and the dense level drawn, sparser to the right."""
    fig, ax = plt.subplots(figsize=(8.5, 6))
    densities = sorted({d for points in series.values() for d, _ in points if d > 0})
    for label, points in series.items():
        points = sorted(points)
        ax.plot([d for d, _ in points], [r for _, r in points], marker="o", linewidth=2, label=label)
    if densities:
        ax.plot(densities, [1 / d for d in densities], linestyle="--", color="black", label="ideal: 1 / density")
    ax.axhline(1.0, color="grey", linewidth=1, linestyle=":", label="dense speed")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ratios = [r for points in series.values() for _, r in points] + [1.0] + [1 / d for d in densities]
    _plain_log_ticks(ax.yaxis, min(ratios), max(ratios))
    ax.set_xticks(densities, [f"{d:g}" for d in densities])
    ax.set_xticks([], minor=True)
    ax.invert_xaxis()  # sparser to the right
    ax.set_xlabel("density (fraction of blocks stored, log scale)")
    ax.set_ylabel("speed-up of a training step (dense ms / sparse ms, log scale)")
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_figure(plt, rows, path):
    """Block-sparse linear: training-step speed-up vs density, one line per block size."""
    series = {}
    for row in rows:
        series.setdefault(f"block {row['block']}", []).append((row["density"], row["step_ratio"]))
    first = rows[0]
    _speedup_vs_density(plt, series, f"Block-sparse layer vs dense nn.Linear: forward + dX + dW\n"
                        f"X {first['tokens']}x{first['in_features']}, W {first['out_features']}x{first['in_features']}, "
                        f"{first['dtype']}, {first['cpu']}, {first['threads']} threads", path)


def conv_figure(plt, rows, path):
    """Block-sparse conv: layer-step speed-up vs density, one line per conv shape and block."""
    series = {}
    for row in rows:
        if row["op"] == "step":
            label = f"{row['channels']} ch, {row['size']}x{row['size']}, block {row['block']}"
            series.setdefault(label, []).append((row["density"], row["ratio"]))
    first = rows[0]
    _speedup_vs_density(plt, series, f"SparseConv2d vs dense F.conv2d (3x3): forward + dX + dW\n"
                        f"batch {first['batch']}, channels-last, fp32, {first['cpu']}, {first['threads']} threads",
                        path)


def case_ratio_figure(plt, rows, path):
    """One bar per benchmark case (and rank): its speed-up over dense, with the dense level drawn."""
    labels = [row["case"] + (f", rank {row['rank']}" if "rank" in row else "") for row in rows]
    ratios = [row["ratio"] for row in rows]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(rows) + 2.2))
    # Red where sparse wins, grey where it loses; prune (a cost, lower is better) in blue.
    colors = ["#1f77b4" if row["case"] == "prune" else COLORS["sparse"] if row["ratio"] >= 1 else COLORS["dense"]
              for row in rows]
    bars = ax.barh(labels, ratios, color=colors)
    for bar, row in zip(bars, rows):
        text = f"{row['ratio']:.3f} of a dense fwd" if row["case"] == "prune" else f"{row['ratio']:.2f}x"
        ax.annotate(text, (bar.get_width(), bar.get_y() + bar.get_height() / 2), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize=10)
    ax.axvline(1.0, color="black", linewidth=1, linestyle="--", label="dense speed")
    ax.invert_yaxis()  # first case on top
    ax.set_xlim(0, max(ratios + [1.0]) * 1.25)
    ax.set_xlabel("speed-up (dense ms / sparse ms; prune: its time as a fraction of a dense forward)")
    first = rows[0]
    ax.set_title(f"{first['bench']} vs dense nn.Linear: X {first['tokens']}x{first['in_features']}, "
                 f"W {first['out_features']}x{first['in_features']}, {first['dtype']}\n"
                 f"{first['cpu']}, {first['threads']} threads", fontsize=11)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
