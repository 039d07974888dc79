"""Per-layer sparsity chosen by cost (`space.prune.sparsity.mode: macs`): the sampler proposes how far to prune —
`prune.reduction`, 0 for the cost of every group at the range's `low`, 1 for every group at its `high`, log-spaced
in between — and a shape over depth (relative weights, the hardest-pruned group at 1); the trial solves the one
scale of that shape whose pruned structure costs the target, before it heals.

Why: a sampler that proposes sparsities learns where a trial lands on the latency axis only once it has paid for
it, and two proposals far apart in sparsity may land on the same latency. Here the latency axis is (nearly) what
the sampler proposes: every healed trial lands where it was aimed. The cost is counted, not timed — multiply-
accumulates for a method that removes structure (latency follows them), non-zero weights for one that masks
(what a sparse kernel would execute) — because counting a structure takes milliseconds and timing it seconds;
the trial's structure is timed once afterwards, as every trial's is.

Sparsity of group g at scale t: low + (high − low) · min(1, t · shape_g). At t = 0 every group is at `low`; at
t = 1 / min(shape) every group is at `high`; the cost falls monotonically in between, so bisection finds t.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

TOLERANCE = 0.01  # the solve stops within 1% of the target cost (channel rounding makes exact targets rare)
ITERATIONS = 14  # bisection halvings at most: the scale to 1/16,000 of its range
SHAPE_FLOOR = 0.1  # the shape's smallest weight: a group is pruned at least a tenth as hard as the hardest


def shaped(shape: Mapping[str, float], scale: float, low: float, high: float) -> dict[str, float]:
    """Each group's sparsity at `scale` (shape weights relative to the largest)."""
    top = max(shape.values())
    return {group: min(high, low + (high - low) * min(1.0, scale * weight / top)) for group, weight in shape.items()}


def solve(cost: Callable[[Mapping[str, float]], float], shape: Mapping[str, float], reduction: float, *,
          low: float, high: float, tolerance: float = TOLERANCE,
          iterations: int = ITERATIONS) -> tuple[dict[str, float], float]:
    """(the groups' sparsities, their cost ÷ the target's) for `reduction` along `shape`: the scale whose cost is
    nearest the target among those tried. `cost` prunes a copy at the given sparsities and counts."""
    if not shape:
        raise ValueError("no layer groups to spread the sparsity over")
    if not any(weight > 0 for weight in shape.values()):
        raise ValueError(f"a shape needs a positive weight, got {dict(shape)}")
    if not 0.0 <= reduction <= 1.0:
        raise ValueError(f"reduction must lie in [0, 1], got {reduction}")
    lightest = cost(dict.fromkeys(shape, low))
    heaviest = cost(dict.fromkeys(shape, high))
    if reduction == 0.0 or lightest <= heaviest:  # nothing to solve: the range costs the same throughout
        return dict.fromkeys(shape, low), 1.0
    target = math.exp((1 - reduction) * math.log(lightest) + reduction * math.log(heaviest))
    top = max(shape.values())
    lo, hi = 0.0, top / min(w for w in shape.values() if w > 0)  # at `hi`, every pruned group is at `high`
    best, best_gap = dict.fromkeys(shape, high), heaviest / target
    if abs(best_gap - 1) <= tolerance:  # every group at `high` meets it already (reduction 1: the coarse start's top)
        return best, best_gap
    for _ in range(iterations):
        middle = (lo + hi) / 2
        sparsity = shaped(shape, middle, low, high)
        ratio = cost(sparsity) / target
        if abs(ratio - 1) < abs(best_gap - 1):
            best, best_gap = sparsity, ratio
        if abs(ratio - 1) <= tolerance:
            break
        lo, hi = (middle, hi) if ratio > 1 else (lo, middle)
    return best, best_gap
