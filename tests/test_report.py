"""The reports a person reads: the table, and the plots (PNG and hover-able SVG in HTML)."""

from autoprune.tracking.report import plot_html, plot_png, table

ROWS = [
    {"trial": "a", "prune": "structured", "heal": "distill", "sparsity": 0.45, "accuracy": 0.97, "latency_ms": 2.6,
     "latency_p90_ms": 2.7, "macs": 2_070_000, "params": 125_338, "pareto": True},
    {"trial": "b", "prune": "magnitude", "heal": "none", "sparsity": 0.6, "accuracy": 0.95, "latency_ms": 3.6,
     "latency_p90_ms": 3.9, "macs": 3_470_000, "params": 214_090, "pareto": False},
    {"trial": "c", "prune": "failed", "heal": "", "error": "boom", "pareto": False},
    {"trial": "dense", "prune": "dense", "heal": "none", "accuracy": 0.99, "latency_ms": 3.5, "pareto": False},
]


def test_table_formats_and_marks_missing_values():
    text = table(ROWS[:3])
    lines = text.splitlines()
    assert "top-1" in lines[0] and "MMACs" in lines[0]
    assert "0.9700" in lines[2] and "2.07" in lines[2] and "125,338" in lines[2]
    assert "—" in lines[4]  # a failed trial has no accuracy
    assert len({len(line) for line in lines}) == 1  # columns line up


def test_plots_are_written(tmp_path):
    png = plot_png(ROWS, tmp_path / "p.png", title="t", device="cpu: x")
    assert png.read_bytes()[:4] == b"\x89PNG"
    page = plot_html(ROWS, tmp_path / "p.html", title="t <&>", device="cpu: x").read_text()
    assert page.count("<circle") >= 3 and "<title>" in page and "t &lt;&amp;&gt;" in page
    assert "trial: a" in page and "stroke-width" in page  # hover text, and the front point outlined
