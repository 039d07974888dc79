"""What a person reads: the front as a text table, and accuracy-vs-latency plots (PNG, and an HTML page whose
points show their configuration on hover — plain SVG, so it opens in MLflow's artifact viewer and offline).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Mapping, Sequence

DENSE = "dense"  # the `prune` value of the reference row, drawn apart from the trials
Row = Mapping[str, Any]  # one trial: trial, prune, heal, accuracy, latency_ms, … and `pareto` (bool)

TABLE_COLUMNS = (
    ("trial", "trial", "{}"),
    ("prune", "prune", "{}"),
    ("heal", "heal", "{}"),
    ("sparsity", "sparsity", "{:.2f}"),
    ("accuracy", "top-1", "{:.4f}"),
    ("latency_ms", "latency ms", "{:.3f}"),
    ("latency_p90_ms", "p90 ms", "{:.3f}"),
    ("macs", "MMACs", "{:.2f}"),
    ("params", "params", "{:,}"),
)


def table(rows: Sequence[Row], columns=TABLE_COLUMNS) -> str:
    """A fixed-width text table (markdown-compatible)."""
    header = [title for _, title, _ in columns]
    body = []
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            if key == "macs" and value is not None:
                value = value / 1e6
            cells.append("—" if value is None else fmt.format(value))
        body.append(cells)
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *body)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def _points(rows: Sequence[Row]) -> list[Row]:
    return [row for row in rows if row.get("accuracy") is not None and row.get("latency_ms") is not None]


def plot_png(rows: Sequence[Row], path: str | Path, *, title: str, device: str) -> Path:
    """Every finished trial as a point, the Pareto front highlighted and joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = _points(rows)
    front = sorted((row for row in points if row.get("pareto")), key=lambda row: row["latency_ms"])
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    methods = sorted({row["prune"] for row in points} - {DENSE})
    for method in methods:
        mine = [row for row in points if row["prune"] == method]
        axes.scatter([r["latency_ms"] for r in mine], [r["accuracy"] for r in mine], label=method, alpha=0.6, s=28)
    for row in (row for row in points if row["prune"] == DENSE):
        axes.scatter([row["latency_ms"]], [row["accuracy"]], marker="*", s=180, c="k", label="dense (reference)",
                     zorder=5)
    if front:
        axes.plot([r["latency_ms"] for r in front], [r["accuracy"] for r in front], "k-", lw=1, zorder=3)
        axes.scatter([r["latency_ms"] for r in front], [r["accuracy"] for r in front], facecolors="none",
                     edgecolors="k", s=90, lw=1.5, label="Pareto front", zorder=4)
    axes.set_xlabel(f"median latency (ms) — {device}")
    axes.set_ylabel("top-1 accuracy")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_html(rows: Sequence[Row], path: str | Path, *, title: str, device: str) -> Path:
    """The same plot as self-contained SVG in HTML; hovering a point shows its trial's configuration."""
    points = _points(rows)
    width, height, margin = 760, 460, 60
    if points:
        xs = [row["latency_ms"] for row in points]
        ys = [row["accuracy"] for row in points]
        x_low, x_high = min(xs), max(xs)
        y_low, y_high = min(ys), max(ys)
    else:
        x_low = y_low = 0.0
        x_high = y_high = 1.0
    x_pad = (x_high - x_low) * 0.05 or 0.05
    y_pad = (y_high - y_low) * 0.05 or 0.05
    x_scale = lambda v: margin + (v - x_low + x_pad) / (x_high - x_low + 2 * x_pad) * (width - 2 * margin)  # noqa
    y_scale = lambda v: height - margin - (v - y_low + y_pad) / (y_high - y_low + 2 * y_pad) * (height - 2 * margin)  # noqa
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    colours = {m: palette[i % len(palette)] for i, m in enumerate(sorted({r["prune"] for r in points}))}
    front = sorted((r for r in points if r.get("pareto")), key=lambda r: r["latency_ms"])
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">']
    parts.append(f'<rect x="{margin}" y="{margin}" width="{width - 2 * margin}" height="{height - 2 * margin}" '
                 'fill="none" stroke="#999"/>')
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        xv = x_low + (x_high - x_low) * fraction
        yv = y_low + (y_high - y_low) * fraction
        parts.append(f'<text x="{x_scale(xv):.1f}" y="{height - margin + 18}" font-size="11" '
                     f'text-anchor="middle">{xv:.3g}</text>')
        parts.append(f'<text x="{margin - 6}" y="{y_scale(yv):.1f}" font-size="11" text-anchor="end">{yv:.3f}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 15}" font-size="12" text-anchor="middle">'
                 f'median latency (ms) — {html.escape(device)}</text>')
    parts.append(f'<text x="15" y="{height / 2}" font-size="12" transform="rotate(-90 15 {height / 2})" '
                 'text-anchor="middle">top-1 accuracy</text>')
    if len(front) > 1:
        path_points = " ".join(f"{x_scale(r['latency_ms']):.1f},{y_scale(r['accuracy']):.1f}" for r in front)
        parts.append(f'<polyline points="{path_points}" fill="none" stroke="black"/>')
    for row in points:
        tip = "\n".join(f"{key}: {value}" for key, value in row.items() if key != "pareto")
        stroke = ' stroke="black" stroke-width="2"' if row.get("pareto") else ""
        parts.append(f'<circle cx="{x_scale(row["latency_ms"]):.1f}" cy="{y_scale(row["accuracy"]):.1f}" r="6" '
                     f'fill="{colours[row["prune"]]}" fill-opacity="0.7"{stroke}><title>{html.escape(tip)}</title>'
                     "</circle>")
    for index, (method, colour) in enumerate(colours.items()):
        parts.append(f'<circle cx="{width - margin - 120}" cy="{margin + 15 + 18 * index}" r="5" fill="{colour}"/>'
                     f'<text x="{width - margin - 110}" y="{margin + 19 + 18 * index}" font-size="11">'
                     f"{html.escape(method)}</text>")
    parts.append("</svg>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
            f"<h3>{html.escape(title)}</h3><p>Hover a point for its configuration; outlined points are on the "
            f"Pareto front.</p>{''.join(parts)}</body></html>")
    path = Path(path)
    path.write_text(page)
    return path
