"""What `autoprune bench replay` measures of a replayed search: the hypervolume (fixed reference point, as a share
of the pool's front) and, per run, the hypervolume at the caps and the cost to reach each target."""

from __future__ import annotations


from typing import Mapping, Sequence

import numpy as np

from autoprune.pareto import hypervolume_2d
from autoprune.bench.replay_pool import TARGETS


# ---- hypervolume -------------------------------------------------------------------------------------------


class _Front:
    """The non-dominated points told so far, inside the reference box, and their hypervolume."""

    def __init__(self, reference: tuple[float, float]) -> None:
        self.reference = reference
        self.points: list[tuple[float, float]] = []
        self.area = 0.0

    def add(self, accuracy: float, ratio: float) -> None:
        if accuracy <= self.reference[0] or ratio >= self.reference[1]:
            return
        if any(a >= accuracy and c <= ratio for a, c in self.points):
            return
        self.points = [(a, c) for a, c in self.points if not (accuracy >= a and ratio <= c)] + [(accuracy, ratio)]
        self.area = hypervolume_2d([a for a, _ in self.points], [c for _, c in self.points], reference=self.reference)


# ---- per run -----------------------------------------------------------------------------------------------


def cost_to_reach(trajectory: Sequence[Sequence[float]], target: float, *, cap_steps: float,
                  cap_seconds: float) -> dict:
    """The healing steps and the seconds spent when the run's normalised hypervolume first reached `target`, each
    censored at its cap (a run that did not reach it within the cap counts the cap, and `reached_*` is False)."""
    hit = next((point for point in trajectory if point[2] >= target - 1e-12), None)
    steps_ok = hit is not None and hit[0] <= cap_steps
    seconds_ok = hit is not None and hit[1] <= cap_seconds
    return {"steps": hit[0] if steps_ok else cap_steps, "reached_steps": steps_ok,
            "seconds": hit[1] if seconds_ok else cap_seconds, "reached_seconds": seconds_ok}


def _within(trajectory, axis: int, cap: float) -> float:
    return max((point[2] for point in trajectory if point[axis] <= cap), default=0.0)


def summarise_run(run: Mapping, *, reference: tuple[float, float]) -> dict:
    """What the statistics need of a run: the hypervolume at each cap, the cost to reach each target, the lookups,
    and where its healing went."""
    from autoprune.pareto import non_dominated

    cap_steps, cap_seconds = run["cap_steps"], run["cap_seconds"]
    trajectory = run["trajectory"]
    counted = [t for t in run["trials"] if t["spent"][0] <= cap_steps]
    done = [t for t in counted if t["state"] == "complete"]
    inside = [(t["accuracy"], t["latency_ratio"]) for t in done
              if t["accuracy"] > reference[0] and t["latency_ratio"] < reference[1]]
    healed = [t for t in done if t["trains"]]  # healed to the end of its budget (the full one, or the one sampled)
    share = None
    if inside and healed:
        mask = non_dominated(np.array(inside), maximize=[True, False])
        latencies = [c for (_, c), keep in zip(inside, mask) if keep]
        low, high = min(latencies), max(latencies)
        share = sum(1 for t in healed if low <= t["latency_ratio"] <= high) / len(healed)
    nearest = [t for t in run["trials"] if not t["exact"]]
    return {
        "hv_at_steps_cap": _within(trajectory, 0, cap_steps),
        "hv_at_seconds_cap": _within(trajectory, 1, cap_seconds),
        "reach": {f"{target:g}": cost_to_reach(trajectory, target, cap_steps=cap_steps, cap_seconds=cap_seconds)
                  for target in TARGETS},
        # the same, as shares of what this seed can reach: a pool seed whose own front is below a target would
        # otherwise censor every arm alike at that seed, and the paired test would learn nothing from it
        "reach_of_ceiling": {f"{target:g}": cost_to_reach(trajectory, target * run.get("ceiling", 1.0),
                                                          cap_steps=cap_steps, cap_seconds=cap_seconds)
                             for target in TARGETS},
        "trials": len(counted), "complete": len(done), "healed": len(healed),
        "pruned": sum(1 for t in counted if t["state"] == "pruned"),
        "not_faster": sum(1 for t in counted if t["state"] == "not_faster"),
        "healed_in_front_range": share,
        "exact": len(run["trials"]) - len(nearest), "nearest": len(nearest), "relaxed": sum(
            1 for t in nearest if t["relaxed"]),
        "distance_sum": sum(t["distance"] for t in nearest),
        "truncated": run.get("truncated", False),
    }


