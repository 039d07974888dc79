"""Pareto maths on hand-checked points."""

import numpy as np
import pytest

from autoprune.pareto import hypervolume_2d, non_dominated


def test_non_dominated_accuracy_up_latency_down():
    points = np.array([
        [0.90, 1.0],  # front
        [0.95, 2.0],  # front
        [0.85, 1.5],  # dominated by the first
        [0.95, 3.0],  # dominated by the second (same accuracy, slower)
        [0.99, 5.0],  # front
    ])
    assert non_dominated(points, maximize=[True, False]).tolist() == [True, True, False, False, True]


def test_duplicates_on_the_front_are_kept_and_empty_input_is_empty():
    assert non_dominated(np.array([[1.0, 1.0], [1.0, 1.0]]), [True, False]).tolist() == [True, True]
    assert non_dominated(np.zeros((0, 2)), [True, False]).tolist() == []


def test_hypervolume_of_a_staircase():
    # points (acc, cost): (0.5, 1), (0.8, 2); reference (0, 4): 0.5·(2−1) + 0.8·(4−2) = 2.1
    assert hypervolume_2d([0.5, 0.8], [1.0, 2.0], reference=(0.0, 4.0)) == pytest.approx(2.1)
    assert hypervolume_2d([0.5, 0.8, 0.4], [1.0, 2.0, 3.0], reference=(0.0, 4.0)) == pytest.approx(2.1)


def test_the_dense_model_competes_but_is_never_on_the_front(bundle):
    from autoprune.config import HealConfig, PruneConfig, TrialConfig
    from autoprune.measure.timing import LatencyProfile
    from autoprune.pareto import pareto_front
    from autoprune.result import TrialRecord, TrialResult

    def result(accuracy, ms):
        latency = LatencyProfile(ms, ms, 0.0, 1, "float32", "cpu", 1, 5, (3, 8, 8), "x")
        return TrialResult(TrialConfig(PruneConfig("none"), HealConfig("none")), accuracy, latency, 1, 1, 0.0, {})

    masked = TrialRecord("masked", result(0.95, 4.2), model_dir="m")  # same kernels as dense, a bit less accurate
    smaller = TrialRecord("smaller", result(0.93, 3.0), model_dir="s")
    dense = result(0.96, 4.0)
    assert pareto_front([masked, smaller], dense=dense) == [smaller]
    assert pareto_front([masked, smaller]) == [smaller, masked]
