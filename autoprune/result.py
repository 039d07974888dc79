"""One typed result from the trial to the registry: what a trial measured (`TrialResult`) and how the driver
recorded it (`TrialRecord`: the result, or the error it failed with)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from autoprune.config import TrialConfig, plain
from autoprune.measure.timing import LatencyProfile

STAGES = ("load", "prune", "profile", "heal", "evaluate", "count", "save")  # the keys of TrialResult.timings


@dataclass(frozen=True)
class TrialResult:
    """What a trial measured. `accuracy` is None when the trial stopped before its full healing: after profiling
    (it missed the latency target, or was not faster than the dense model), or at a rung of successive halving
    (`rungs` then holds its accuracy at each rung); `stopped` says why."""

    config: TrialConfig
    accuracy: float | None
    latency: LatencyProfile
    macs: int
    params: int
    sparsity: float  # fraction of the dense model's prunable weights that are gone
    timings: Mapping[str, float]  # seconds per stage (STAGES)
    latency_cached: bool = False  # the latency was measured earlier, on an identical structure
    extra_latency: Mapping[int, LatencyProfile] = field(default_factory=dict)  # the spec's other batch sizes
    node: str = ""  # the Ray node the trial ran on (set by the search; empty outside Ray)
    latency_keys: Mapping[int, str] = field(default_factory=dict)  # batch size → its latency-cache key
    stopped: str = ""  # why it stopped before its full healing (empty: it healed and was evaluated)
    rungs: tuple[tuple[int, float], ...] = ()  # (healing steps, top-1) at each rung it was judged at (halving.py)
    # The latency the trial measured during the search, where the search's final re-timing replaced it (None: not
    # re-timed; see driver/retime.py)
    searched_latency_ms: float | None = None
    # `accuracy` is the model's as served (in its latency's recipe: bf16, channels-last, 2:4, compiled); this is
    # the float32 model's, as trained (None where it was not evaluated)
    accuracy_fp32: float | None = None
    heal_note: str = ""  # what healing had to change (an out-of-memory error retried at half the batch)
    # The optimiser steps healing took, its rungs' evaluation branches included (None: a result saved before it
    # was counted, when every rung healed afresh)
    steps_spent: int | None = None

    @property
    def feasible(self) -> bool:
        return self.accuracy is not None

    @property
    def healing_steps(self) -> int:
        """The optimiser steps this trial spent healing: up to the rung it stopped at or to its full budget, and the
        short decays its rungs were evaluated on (a result from before rungs continued: every rung's heal)."""
        if self.steps_spent is not None:
            return self.steps_spent
        return sum(steps for steps, _ in self.rungs) + (self.config.heal.steps if self.feasible else 0)

    @property
    def best_known_accuracy(self) -> float | None:
        """Its accuracy; for a trial stopped at a rung, the accuracy it had there (a smaller budget's)."""
        return self.accuracy if self.feasible or not self.rungs else self.rungs[-1][1]

    def cost(self, metric: str) -> float:
        """The objective traded against accuracy (`config.LATENCY_METRICS`)."""
        return {"latency_ms": self.latency.median_ms, "latency_p90_ms": self.latency.p90_ms,
                "macs": self.macs, "params": self.params}[metric]

    def to_dict(self) -> dict[str, Any]:
        """The whole result as JSON-safe plain data (`from_dict` reads it back, equal)."""
        return {
            "config": plain(dataclasses.asdict(self.config)),
            "accuracy": self.accuracy,
            "latency": self.latency.as_dict(),
            "macs": self.macs,
            "params": self.params,
            "sparsity": self.sparsity,
            "timings": dict(self.timings),
            "latency_cached": self.latency_cached,
            "extra_latency": {str(batch): profile.as_dict() for batch, profile in self.extra_latency.items()},
            "node": self.node,
            "latency_keys": {str(batch): key for batch, key in self.latency_keys.items()},
            "stopped": self.stopped,
            "rungs": [list(rung) for rung in self.rungs],
            "searched_latency_ms": self.searched_latency_ms,
            "accuracy_fp32": self.accuracy_fp32,
            "heal_note": self.heal_note,
            "steps_spent": self.steps_spent,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "TrialResult":
        return cls(
            config=TrialConfig.from_dict(raw["config"]),
            accuracy=raw["accuracy"],
            latency=_profile(raw["latency"]),
            macs=int(raw["macs"]),
            params=int(raw["params"]),
            sparsity=float(raw["sparsity"]),
            timings=dict(raw["timings"]),
            latency_cached=bool(raw["latency_cached"]),
            extra_latency={int(batch): _profile(fields) for batch, fields in raw["extra_latency"].items()},
            node=str(raw["node"]),
            latency_keys={int(batch): key for batch, key in raw["latency_keys"].items()},
            stopped=str(raw.get("stopped", "")),  # absent from results saved before it existed
            rungs=tuple((int(steps), float(top1)) for steps, top1 in raw.get("rungs", ())),
            searched_latency_ms=raw.get("searched_latency_ms"),
            accuracy_fp32=raw.get("accuracy_fp32"),
            heal_note=str(raw.get("heal_note", "")),
            steps_spent=raw.get("steps_spent"),
        )

    def latency_entries(self) -> dict[str, LatencyProfile]:
        """The latency-cache entries this trial's measurements were stored under (to seed a resumed search's
        cache, so that a structure measured before the driver stopped is not measured a second time)."""
        profiles = {self.latency.batch_size: self.latency, **self.extra_latency}
        return {key: profiles[batch] for batch, key in self.latency_keys.items() if batch in profiles}


@dataclass(frozen=True)
class TrialRecord:
    """A finished trial as the driver saw it: its result, or the error it failed with."""

    trial_id: str
    result: TrialResult | None  # None when the trial failed
    error: str | None = None
    model_dir: str | None = None  # the trial's checkpoint (the saved pruned model)
    # The sampler's parameters of the trial (Tune's config); of a failed trial, its configuration as far as known
    params: Mapping[str, Any] = field(default_factory=dict)


def _profile(fields: Mapping[str, Any]) -> LatencyProfile:
    return LatencyProfile.from_dict(fields)
