"""Plain-SVG plot of DST experiment rows (no plotting library needed)."""
from dst_tables import mean_quality


def quality_vs_density(rows, path):
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
