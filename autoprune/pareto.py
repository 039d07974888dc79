"""Multi-objective maths: the non-dominated set and the 2-D hypervolume on arrays, and the front of a search's trials."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def non_dominated(points: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    """Boolean mask of the points no other point dominates (at least as good in all objectives, better in one).

    Duplicates of a non-dominated point are all kept.
    """
    points = np.asarray(points, dtype=float)
    if points.size == 0:
        return np.zeros(0, dtype=bool)
    signs = np.where(np.asarray(maximize), -1.0, 1.0)  # turn every objective into one to minimise
    costs = points * signs
    better_or_equal = (costs[:, None, :] <= costs[None, :, :]).all(-1)  # [i, j]: i is at least as good as j
    strictly_better = (costs[:, None, :] < costs[None, :, :]).any(-1)
    dominated = (better_or_equal & strictly_better).any(0)
    return ~dominated


def hypervolume_2d(accuracy: Sequence[float], cost: Sequence[float], *, reference: tuple[float, float]) -> float:
    """Area dominated by (accuracy ↑, cost ↓) points and bounded by `reference` = (worst accuracy, worst cost)."""
    ref_accuracy, ref_cost = reference
    pairs = sorted(
        (c, a) for a, c in zip(accuracy, cost) if a > ref_accuracy and c < ref_cost
    )  # by cost ascending
    area, best_accuracy = 0.0, ref_accuracy
    for index, (c, a) in enumerate(pairs):
        best_accuracy = max(best_accuracy, a)
        next_cost = pairs[index + 1][0] if index + 1 < len(pairs) else ref_cost
        area += (next_cost - c) * (best_accuracy - ref_accuracy)
    return area


def pareto_front(records: list[Any], cost_metric: str = "latency_ms", *, dense: Any = None) -> list[Any]:
    """The feasible, finished trials (TrialRecords; `dense` a TrialResult) that no other one beats on both accuracy and cost; fastest first.

    The dense model takes part as a competitor, so that a pruned model it beats on both counts (masks that run the
    same dense kernels, say) is not offered as a trade-off; the dense model itself is never on the returned front.
    """
    candidates = [r for r in records if r.result is not None and r.result.feasible and r.model_dir]
    if not candidates:
        return []
    points = [[r.result.accuracy, r.result.cost(cost_metric)] for r in candidates]
    if dense is not None:
        points.append([dense.accuracy, dense.cost(cost_metric)])
    mask = non_dominated(np.array(points), maximize=[True, False])[: len(candidates)]
    return sorted((r for r, keep in zip(candidates, mask) if keep), key=lambda r: r.result.cost(cost_metric))
