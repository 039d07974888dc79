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
