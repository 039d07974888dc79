"""The statistics of a latency comparison, on plain lists (no torch): percentiles, and a speedup with its
confidence interval.

A speedup is measured block by block: in each block the reference and the candidate run one after the other, and
the block gives one log-ratio log(reference ms ÷ candidate ms). Load that changes between blocks (a neighbour
starts, the clock drops) changes both sides of a block alike, so it cancels in the ratio; what it leaves is
scatter between blocks, which the interval shows. The speedup is exp(mean log-ratio) — a geometric mean, so that
2× faster and 2× slower are symmetric — and its interval is Student's t on the log-ratios, so that evidence from
two passes over the same structure merges by concatenating their blocks.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

CONFIDENCE = 0.95  # of every speedup interval autoprune reports


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Speedup:
    """Reference time ÷ candidate time, with its confidence interval (> 1: the candidate is faster)."""

    ratio: float
    low: float
    high: float
    blocks: int

    @property
    def half_width(self) -> float:
        """The interval's relative half-width: 0.05 reads "within ±5%" (inf with fewer than two blocks)."""
        return max(self.high / self.ratio - 1.0, 1.0 - self.low / self.ratio)


EXACT = Speedup(1.0, 1.0, 1.0, 0)  # the reference against itself: the same structure, the same kernels


def speedup_of(log_ratios: Sequence[float], confidence: float = CONFIDENCE) -> Speedup:
    """The speedup that per-block log-ratios show, with a two-sided `confidence` interval."""
    count = len(log_ratios)
    if count == 0:
        raise ValueError("a speedup needs at least one block")
    mean = statistics.fmean(log_ratios)
    if count == 1:
        return Speedup(math.exp(mean), 0.0, math.inf, 1)
    error = statistics.stdev(log_ratios) / math.sqrt(count)
    half = student_t(confidence, count - 1) * error
    return Speedup(math.exp(mean), math.exp(mean - half), math.exp(mean + half), count)


def student_t(confidence: float, freedom: int) -> float:
    """The two-sided quantile of Student's t with `freedom` degrees of freedom."""
    from scipy.stats import t  # scikit-learn's own dependency: always installed with autoprune

    return float(t.ppf(0.5 + confidence / 2, freedom))


def relative_half_width(values: Sequence[float], confidence: float = CONFIDENCE) -> float:
    """How well the mean of positive `values` (a runner's block medians) is known: the interval's relative
    half-width on the log scale (inf with fewer than two values)."""
    if len(values) < 2:
        return math.inf
    logs = [math.log(value) for value in values]
    return math.exp(student_t(confidence, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))) - 1.0
