"""One typed result from the trial to the registry: what a trial measured (`TrialResult`) and how the driver
recorded it (`TrialRecord`: the result, or the error it failed with)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from autoprune.config import TrialConfig
from autoprune.measure.timing import LatencyProfile

STAGES = ("load", "prune", "profile", "heal", "evaluate", "count", "save")  # the keys of TrialResult.timings


@dataclass(frozen=True)
class TrialResult:
    """What a trial measured. `accuracy` is None when the trial missed the latency target and stopped early."""

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

    @property
    def feasible(self) -> bool:
        return self.accuracy is not None

    def cost(self, metric: str) -> float:
        """The objective traded against accuracy (`spec.LATENCY_METRICS`)."""
        return {"latency_ms": self.latency.median_ms, "latency_p90_ms": self.latency.p90_ms,
                "macs": self.macs, "params": self.params}[metric]

    def metrics(self) -> dict[str, Any]:
        """Flat values for `tune.report`; `from_metrics` reads them back on the driver."""
        metrics: dict[str, Any] = {
            # An infeasible trial reports accuracy 0 so that the sampler sees it as a bad point.
            "accuracy": self.accuracy if self.feasible else 0.0,
            "feasible": int(self.feasible),
            "latency_ms": self.latency.median_ms,
            "latency_p90_ms": self.latency.p90_ms,
            "latency_spread": self.latency.spread,
            "macs": self.macs,
            "params": self.params,
            "sparsity": self.sparsity,
            "config_json": self.config.to_json(),
            "latency_json": json.dumps(self.latency.as_dict()),
            "latency_cached": int(self.latency_cached),
            "node": self.node,
            "extra_latency_json": json.dumps({batch: p.as_dict() for batch, p in self.extra_latency.items()}),
            "latency_keys_json": json.dumps(self.latency_keys),
        }
        metrics.update({f"latency_ms_batch{batch}": p.median_ms for batch, p in self.extra_latency.items()})
        metrics.update({f"time_{stage}_s": seconds for stage, seconds in self.timings.items()})
        return metrics

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> "TrialResult":
        def profile(fields: dict) -> LatencyProfile:
            return LatencyProfile(**{**fields, "input_size": tuple(fields["input_size"])})

        extra = json.loads(metrics.get("extra_latency_json", "{}"))
        return cls(
            config=TrialConfig.from_json(metrics["config_json"]),
            accuracy=metrics["accuracy"] if metrics["feasible"] else None,
            latency=profile(json.loads(metrics["latency_json"])),
            macs=int(metrics["macs"]),
            params=int(metrics["params"]),
            sparsity=float(metrics["sparsity"]),
            timings={stage: metrics[f"time_{stage}_s"] for stage in STAGES if f"time_{stage}_s" in metrics},
            latency_cached=bool(metrics.get("latency_cached", 0)),
            extra_latency={int(batch): profile(fields) for batch, fields in extra.items()},
            node=str(metrics.get("node", "")),
            latency_keys={int(batch): key for batch, key in json.loads(metrics.get("latency_keys_json", "{}")).items()},
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
    params: Mapping[str, Any] = field(default_factory=dict)  # a failed trial's configuration, as far as it is known
