"""autoprune: a Ray-distributed AutoML search for pruned timm vision models.

Optuna (through Ray Tune) searches the pruning method, per-layer sparsity and healing budget; every trial measures
accuracy and latency on its own worker; the Pareto-optimal models are registered in MLflow.
Heavy modules (Ray, MLflow, torch) load on first use, so `import autoprune` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "search": "autoprune.driver.search",
    "retarget": "autoprune.driver.retarget",
    "SearchOutcome": "autoprune.driver.outcome",
    "best": "autoprune.tracking.select",
    "front": "autoprune.tracking.select",
    "load_model": "autoprune.tracking.select",
    "ModelChoice": "autoprune.tracking.select",
    "run_trial": "autoprune.trial",
    "TrialContext": "autoprune.trial",
    "TrialResult": "autoprune.result",
    "load_spec": "autoprune.space",
    "parse_spec": "autoprune.space",
    "SearchSpec": "autoprune.config",
    "TrialConfig": "autoprune.config",
    "PruneConfig": "autoprune.config",
    "HealConfig": "autoprune.config",
    "AutopruneError": "autoprune.errors",
    "SpecError": "autoprune.errors",
    "NoModelMeetsTarget": "autoprune.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'autoprune' has no attribute {name!r}")
