"""Markdown tables of the DST experiment rows (bench/exp_dst.py): one line per run, quality
per method and density (mean ± sd over seeds), and paired differences against a baseline."""
import statistics


def runs_table(rows):
    """One line per run, speed against the dense run of the same task."""
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
