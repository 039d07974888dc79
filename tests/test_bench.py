"""The benchmark commands at toy size: the JSON rows carry the fields the README's tables are built from."""

from __future__ import annotations

import pytest

from autoprune import bench
from autoprune.spec import ModelSpec
from conftest import TINY_VIT


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
