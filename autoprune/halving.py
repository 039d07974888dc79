"""Successive halving on two objectives: a trial heals in rungs and goes on only while it is near the front.

Ray Tune's schedulers and Optuna's pruners rank trials by one number; a pruning search has two (accuracy and
latency), and its latency is known before healing starts. So a trial whose healing trains is judged at rungs —
fractions of the search's full healing budget, the same steps for every trial (1/9 and 1/3 of it by default; 0 is
the pruned model before any training) — against every result seen at that rung so far, in the way of
multi-objective successive halving (MO-ASHA, Schmucker et al. 2021): the results are ranked as NSGA-II ranks a
population — fronts of (accuracy at the rung, latency), a point beaten when one at least as fast is more accurate
by more than `margin`, then crowding distance within a front — and the trial goes on if it is among the best
1/`eta` of them.

A rung does not restart the heal: the trial's heal runs on a warm-up–stable–decay schedule, a rung's accuracy is
measured on a branch decayed briefly from the rung's weights (`rung_decay` steps, then put back), and a promoted
trial continues from the rung with its optimiser state. A trial healed through every rung costs its full budget
plus the rungs' short decays (about 1.04 times it at the default rungs), not a heal per rung; and it ends exactly
as it would have without rungs. Judging is asynchronous (as ASHA's): the first trials at a rung have little to be
judged against and go on.

The judge is one small Ray actor in a search (`SharedRungJudge`), a plain object without Ray (`LocalRungJudge`).
A judge that is gone never stops a trial.
"""

from __future__ import annotations

import logging
import math
from typing import Protocol, Sequence

from autoprune.config import Halving

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 60
MIN_RUNG_STEPS = 2  # a rung of fewer steps than this (other than the zero-shot rung) says nothing about the trial
RUNG_DECAY = 0.1  # a rung's evaluation branch decays the learning rate over this fraction of the rung's steps


def rungs_of(budget: int, fractions: Sequence[float], *, trial_steps: int | None = None) -> list[tuple[float, int]]:
    """(fraction, healing steps) of each rung a trial passes through before its full healing: each fraction of the
    full `budget`, rounded. A rung of 1 to MIN_RUNG_STEPS − 1 steps, or not shorter than the trial's own healing
    (`trial_steps`, by default the budget), or no longer than the rung before it, is left out; a rung at 0 is the
    pruned model before training."""
    trial_steps = budget if trial_steps is None else trial_steps
    rungs: list[tuple[float, int]] = []
    for fraction in sorted(fractions):
        count = round(budget * fraction)
        if (fraction == 0 or MIN_RUNG_STEPS <= count) and count < trial_steps and (not rungs or count > rungs[-1][1]):
            rungs.append((fraction, count))
    return rungs


def rung_decay(steps: int) -> int:
    """The optimiser steps of a rung's evaluation branch, at `steps` healing steps: RUNG_DECAY of them, at least 1."""
    return max(1, round(RUNG_DECAY * steps))


def outdone(accuracy: float, latency_ms: float, others: Sequence[tuple[float, float]], margin: float) -> bool:
    """Whether a trial at least as fast as (`accuracy`, `latency_ms`) was more accurate by more than `margin`."""
    return any(other_latency <= latency_ms and other_accuracy > accuracy + margin
               for other_accuracy, other_latency in others)


def among_the_best(point: tuple[float, float], others: Sequence[tuple[float, float]], *, margin: float,
                   eta: int) -> bool:
    """Whether (accuracy, latency) `point` is among the best ⌈n/eta⌉ of the n results (it and `others`), as NSGA-II
    ranks them: fronts are peeled off one after another (`outdone` with `margin` decides who beats whom), and in
    the front that straddles the cut the more isolated points come first (crowding distance: a front's fastest
    and most accurate points always, then those with the widest gap to their neighbours). Ties go on together."""
    remaining = [*others, point]
    places = math.ceil(len(remaining) / eta)
    while remaining:
        front = [p for p in remaining if not outdone(*p, [q for q in remaining if q is not p], margin)]
        if any(p is point for p in front):
            if len(front) <= places:
                return True
            crowding = _crowding(front)
            mine = next(c for p, c in zip(front, crowding) if p is point)
            return sum(1 for c in crowding if c > mine) < places
        places -= len(front)
        if places <= 0:
            return False
        remaining = [p for p in remaining if not any(p is q for q in front)]
    return False


def _crowding(front: Sequence[tuple[float, float]]) -> list[float]:
    """NSGA-II's crowding distance of each point of a front: the ends of each objective are infinitely far, the
    others as far as the gap between their neighbours (each objective scaled by its range in the front)."""
    distance = [0.0] * len(front)
    for axis in (0, 1):
        order = sorted(range(len(front)), key=lambda i: front[i][axis])
        span = front[order[-1]][axis] - front[order[0]][axis] or 1.0
        distance[order[0]] = distance[order[-1]] = math.inf
        for before, here, after in zip(order, order[1:], order[2:]):
            distance[here] += (front[after][axis] - front[before][axis]) / span
    return distance


class RungJudge(Protocol):
    halving: Halving

    def promote(self, fraction: float, accuracy: float, latency_ms: float) -> bool:
        """Record a trial's result at the rung of this fraction of the full budget; whether it goes on healing."""


class LocalRungJudge:
    """The results seen at each rung (keyed by the rung's fraction of the budget), within one process."""

    def __init__(self, halving: Halving) -> None:
        self.halving = halving
        self.seen: dict[float, list[tuple[float, float]]] = {}

    def promote(self, fraction: float, accuracy: float, latency_ms: float) -> bool:
        others = self.seen.setdefault(round(fraction, 6), [])
        verdict = among_the_best((accuracy, latency_ms), others, margin=self.halving.margin, eta=self.halving.eta)
        others.append((accuracy, latency_ms))  # a stopped trial's result is a competitor as well
        return verdict


class SharedRungJudge:
    """A handle on one Ray actor that judges every trial of a search; it pickles, so trial workers can use it."""

    def __init__(self, actor, halving: Halving) -> None:
        self.actor, self.halving = actor, halving

    @classmethod
    def start(cls, halving: Halving) -> "SharedRungJudge":
        import ray

        # num_cpus=0: a comparison must not take a trial's CPU slot. Restarted (empty) if it dies.
        actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(LocalRungJudge).remote(halving)
        return cls(actor, halving)

    def promote(self, fraction: float, accuracy: float, latency_ms: float) -> bool:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            return ray.get(self.actor.promote.remote(fraction, accuracy, latency_ms),
                           timeout=CALL_TIMEOUT_S)
        except (RayActorError, GetTimeoutError) as error:
            log.warning("rung judge unavailable (%s): the trial goes on", type(error).__name__)
            return True
