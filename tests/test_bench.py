"""The benchmark commands at toy size: the JSON rows carry the fields the README's tables are built from."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import TINY_VIT

from autoprune.bench import methods as bench
from autoprune.config import ModelSpec


@pytest.fixture
def tiny_models(monkeypatch):
    tiny = ModelSpec(TINY_VIT.name, 10, train_steps=5, kwargs=TINY_VIT.kwargs)
    monkeypatch.setitem(bench.BENCH_MODELS, "tiny", tiny)  # a real model, trained for 5 steps instead of 1500


def test_healing_rows_and_table(tiny_models, tmp_path):
    settings = bench.HealingBench(models=("tiny",), methods=("none", "align"), sparsities=(0.75,),
                                  calibration_fractions=(0.01,), seeds=(0, 1), steps=2)
    rows = bench.run_healing(settings, cache_dir=tmp_path, echo=lambda line: None)
    assert len(rows) == 4
    for row in rows:
        assert {"method", "heal", "sparsity", "calibration_fraction", "seed", "accuracy", "dense_accuracy"} <= set(row)
        assert row["sparsity"] == 0.75 and row["calibration_fraction"] == 0.01 and 0 <= row["accuracy"] <= 1
    table = bench.healing_markdown(rows)
    assert "| align |" in table and "75% sparse, 1% calib (13 img)" in table


def test_pruning_rows_and_table(tiny_models, tmp_path):
    settings = bench.PruningBench(models=("tiny",), methods=("magnitude", "structured"), sparsities=(0.5,),
                                  seeds=(0,), heal="none")
    rows = bench.run_pruning(settings, cache_dir=tmp_path, echo=lambda line: None)
    by_method = {row["method"]: row for row in rows}
    assert by_method["magnitude"]["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert by_method["magnitude"]["macs_ratio"] == pytest.approx(1.0)
    assert by_method["structured"]["macs_ratio"] > 1.1  # physically smaller
    assert "healing: none" in bench.pruning_markdown(rows)


def test_latency_bench_rows_and_formats():
    from conftest import TINY_RESNET, TINY_VIT

    from autoprune.bench import latency as bench_latency

    table = {"vit": (TINY_VIT.name, dict(TINY_VIT.kwargs, num_classes=10), (3, 32, 32)),
             "resnet": (TINY_RESNET.name, dict(TINY_RESNET.kwargs, num_classes=10), (3, 32, 32))}
    settings = bench_latency.LatencyBench(models=("vit", "resnet"), batch_size=2, round_to=4, warmup=1, repeats=3,
                                          threads=1)
    rows = bench_latency.run(settings, echo=lambda line: None, table=table)
    assert len(rows) == 2 * 4
    for row in rows:
        assert {"model", "format", "ratio", "batch_size", "dtype", "device", "dense_ms", "pruned_ms", "macs_ratio",
                "speedup", "spread"} <= set(row)
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["pruned_ms"])
        low, high = row["speedup_range"]  # the lowest and highest of the alternating rounds' speedups
        assert 0 < low <= high and row["rounds"] == 3
    structured = [r for r in rows if r["format"] == "structured"]
    assert all(r["macs_ratio"] > 1.0 for r in structured)
    assert [r["macs_ratio"] for r in structured if r["model"] == "vit"] == sorted(
        r["macs_ratio"] for r in structured if r["model"] == "vit")  # more removed, fewer MACs
    two_four = [r for r in rows if r["format"] == "2:4"]
    assert all(r["ran_as"] == "dense" and "CUDA" in r["note"] and r["macs_ratio"] == 1.0 for r in two_four)
    assert "2:4 (dense kernels)" in bench_latency.markdown(rows)
    layouts = bench_latency.run(replace(settings, models=("resnet",), memory_format="auto"), echo=lambda line: None,
                                table=table)
    assert all(r["memory_format"] in ("contiguous", "channels_last") for r in layouts)
    assert "memory format" not in bench_latency.markdown(layouts)  # the winner is in the column, not a note per row


def test_shrink_keeps_the_function_shape_and_rounds_widths():
    from conftest import TINY_BOTTLENECK, TINY_VIT

    from autoprune.bench.latency import shrink, two_four
    from autoprune.measure.formats import is_two_four

    for source in (TINY_VIT, TINY_BOTTLENECK):
        model = source.create().eval()
        small = shrink(model, 0.5, 4)
        x = torch.randn(2, 3, 32, 32)
        assert small(x).shape == model(x).shape
        assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    small = shrink(TINY_VIT.create(), 0.6, 4)
    assert all(block.mlp.fc1.out_features % 4 == 0 for block in small.blocks)
    masked = two_four(TINY_VIT.create())
    layers = [m for m in masked.modules() if isinstance(m, torch.nn.Linear) and m is not masked.get_classifier()]
    assert layers and all(is_two_four(layer.weight) for layer in layers)


def test_the_faults_bench_reads_worker_memory_per_process_in_trial_order():
    from types import SimpleNamespace

    from autoprune.bench.faults import _worker_memory, text

    def trial(pid, at, rss):
        return SimpleNamespace(last_result={"worker_pid": pid, "timestamp": at, "worker_rss_mb": rss})

    # worker 7: warm-up after its first trial, then flat; worker 8: one trial; a trial with no result is skipped
    trials = [trial(7, 3, 910.0), trial(7, 1, 700.0), trial(8, 2, 690.0), trial(7, 2, 900.0), trial(7, 4, 910.0),
              trial(7, 5, 910.0), SimpleNamespace(last_result=None)]
    rows = _worker_memory(trials)
    assert [(r["pid"], r["trials"]) for r in rows] == [(7, 5), (8, 1)]
    assert (rows[0]["first_mb"], rows[0]["second_mb"], rows[0]["last_mb"]) == (700.0, 900.0, 910.0)
    assert rows[0]["later_trend_mb_per_trial"] == 0.0  # the later half (910, 910, 910) does not grow
    report = {"planned": 6, "finished": 5, "failed": 1, "retried": 1, "lost": 0, "mlflow_agrees": True,
              "registry_agrees": False, "front": 2, "wall_s": 9.0, "failures": ["boom"], "worker_killed": True,
              "workers": rows}
    printed = text(report)
    assert "| 6 | 5 | 1 | 1 | 0 | yes | NO | 2 | 9 |" in printed and "| 1 | 5 | 700 | 900 | 910 | +0.0 |" in printed


def test_the_search_bench_grid_covers_uniform_sparsity_by_method_within_the_space():
    """The grid baseline: every method that removes structure at evenly spaced values of the demo's range (on its
    step), all healed alike; each point is a valid configuration of the space."""
    from autoprune.bench import search as bench_search
    from autoprune.models import layer_groups
    from autoprune.space.define import SearchSpace
    from autoprune.space.load import parse_spec

    spec = parse_spec(bench_search.arm_spec("reference", "grid", 0, 24))
    space = SearchSpace(spec, layer_groups(TINY_VIT.create()))
    points = bench_search.grid_points(space, 24)
    assert len(points) == 24 and {p["prune.method"] for p in points} == {"structured", "vbp"}
    sparsities = sorted({p["prune.sparsity.knot0"] for p in points})
    assert len(sparsities) == 12 and sparsities[0] == 0.3 and sparsities[-1] == 0.9
    assert all(p.get("prune.sparsity.knot0") == p.get("prune.sparsity.knot1") for p in points)  # uniform
    for point in points:
        config = space.to_config(point)
        assert config.heal.method == "distill" and config.heal.steps == 120 and config.heal.calibration_images == 256


def test_the_search_bench_summary_reads_hypervolume_curves_and_trials_to_reach_the_best():
    from autoprune.bench import search as bench_search

    def run(arm, seed, trials):
        return {"task": "reference", "arm": arm, "seed": seed, "wall_s": 1.0, "dense_accuracy": 0.99,
                "dense_latency_ms": 4.0, "device": "cpu", "trials": trials}

    slow = {"accuracy": 0.95, "latency_ms": 3.0, "stopped": "", "steps": 10}
    fast = {"accuracy": 0.90, "latency_ms": 2.0, "stopped": "", "steps": 10}
    masked = {"accuracy": None, "latency_ms": 4.0, "stopped": "not faster than the dense model", "steps": 0}
    runs = [run("tpe", 0, [slow, fast] + [masked] * 6), run("random", 0, [masked] * 6 + [slow, masked])]
    summary = bench_search.summarise(runs)["reference"]
    assert summary["reference"] == (0.85, 4.0)
    tpe, random = summary["arms"]["tpe"], summary["arms"]["random"]
    best = (4.0 - 3.0) * (0.95 - 0.85) + (3.0 - 2.0) * (0.90 - 0.85)
    assert tpe["curve"][8][0] == pytest.approx(best) and tpe["trials_to_95"] == 2 and tpe["steps_to_95"] == 20
    assert random["reached"] == 0 and random["cannot_join_share"] == 7 / 8
    assert "| tpe | 1 |" in bench_search.markdown(bench_search.summarise(runs))
    # paired by seed: tpe's front is above random's by the area of its faster point
    difference, wins, pairs = tpe["paired"]["random"]
    assert difference == pytest.approx(best - (4.0 - 3.0) * (0.95 - 0.85)) and (wins, pairs) == (1, 1)
    assert "(above on 1/1 seeds)" in bench_search.markdown(bench_search.summarise(runs))
    # runs at another concurrency are a table of their own
    runs.append({**run("tpe", 0, [slow]), "concurrency": 1})
    assert set(bench_search.summarise(runs)) == {"reference", "reference, 1 at once"}


def test_the_noise_bench_times_both_ways_and_compares_loaded_with_quiet(monkeypatch):
    """One real measurement per method at toy size (the demo ViT shrunk), then the comparison the table prints."""
    from autoprune.bench import noise

    monkeypatch.setattr(noise, "SPARSITIES", (0.75,))
    monkeypatch.setattr(noise, "DENSE_REPEATS", 2)
    quiet = noise.measure("demo-vit", dense_quiet_ms=None)
    assert set(quiet["old"]) == set(quiet["paired"]) == {"75%"}
    paired = quiet["paired"]["75%"]
    assert paired["low"] <= paired["speedup"] <= paired["high"] and not paired["not_faster"]
    assert quiet["baseline_ms"] > 0 and quiet["conditions"]["cpus"] >= 1
    slower = {**quiet, "old": {"75%": {**quiet["old"]["75%"], "ms": quiet["baseline_ms"] * 2,
                                       "speedup": 0.5, "not_faster": True}}}
    rows = noise.compare(quiet, slower)
    assert rows["old"]["flipped"] == 1 and rows["old"]["not_faster_loaded"] == 1  # the old way's failure, shown
    assert rows["paired"]["flipped"] == 0 and rows["paired"]["speedup_error_median"] == 0
    table = noise.markdown({"demo-vit": {"quiet": quiet, "loaded": slower, "compare": rows}}, None)
    assert "| demo-vit | old |" in table and "| demo-vit | paired |" in table


def test_the_pool_spreads_a_quasi_random_design_and_the_grid_over_the_flat_space():
    """Every point is a configuration of the space (every parameter of the flat space, within its range); the
    design is deterministic and covers each method; the grid is uniform sparsity up to the range's top."""
    from autoprune.bench import pool
    from autoprune.models import layer_groups
    from autoprune.space.define import SearchSpace
    from autoprune.space.load import parse_spec

    raw = pool.task_spec("reference")
    raw["space"]["prune"]["methods"] = ["structured", "vbp"]
    spec = parse_spec(raw)
    space = SearchSpace(spec, layer_groups(TINY_VIT.create()))
    points = pool.design(space, 40)
    assert points == pool.design(space, 40) and points[:10] == pool.design(space, 10)  # a sequence: it resumes
    assert {p["prune.method"] for p in points} == {"structured", "vbp"} and len({p["heal.method"] for p in points}) == 4
    for point in points:
        config = space.to_config(point)
        assert all(0.3 <= s <= 0.9 for s in config.prune.sparsity.values()) and config.heal.steps in (0, 120)
        assert point["heal.lr"] == 0 or 3e-4 <= point["heal.lr"] <= 3e-3
    grid = pool.grid(space)
    assert len(grid) == 24 and max(p["prune.sparsity.knot0"] for p in grid) == 0.9
    assert all(p["prune.sparsity.knot0"] == p["prune.sparsity.knot1"] and p["heal.method"] == "distill" for p in grid)


def test_the_schedule_bench_reads_paired_differences():
    from autoprune.bench.schedule import markdown

    rows = [{"wsd": 0.90, "cosine": 0.91}, {"wsd": 0.95, "cosine": 0.94}, {"wsd": 0.80, "cosine": 0.82}]
    table = markdown({"decay": 0.2, "rows": rows})
    assert "| last 20% of the steps | 3 | -0.0067 | -0.0100 | 1 | 2 | 0.750 |" in table
