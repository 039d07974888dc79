"""Resuming a search whose driver stopped: which parent run, and whether it can be resumed (same spec, Tune's
state still in storage)."""

from __future__ import annotations

from typing import Any

from autoprune.config import SearchSpec
from autoprune.errors import AutopruneError
from autoprune.tracking.publish import experiment_path
from autoprune.tracking.store import Tracker


def resumable_parent(tracker: Tracker, spec: SearchSpec, resume: str, storage: str) -> str:
    """The parent run id of the search to resume, once it is known that it can be: same spec, Tune state there."""
    from ray import tune

    if resume == "latest":
        run = tracker.unfinished_search(spec.name)
        if run is None:
            raise AutopruneError(f"no unfinished search named {spec.name!r} in experiment {spec.mlflow.experiment!r}"
                                 " to resume; run it without --resume, or pass the run id to resume")
        resume = run.info.run_id
    else:
        Tracker.for_search_run(tracker.tracking_uri, resume)  # exists, and is a search
    logged = tracker.search_spec(resume)
    changed = sorted(_differences(logged, spec.as_dict()))
    if changed:
        raise AutopruneError(f"search run {resume} ran with a different spec (changed: {', '.join(changed)}); resume"
                             " it with the spec it started with, or start a new search")
    path = experiment_path(storage, resume)
    if not tune.Tuner.can_restore(path):
        raise AutopruneError(f"search run {resume} left no Ray Tune state at {path!r}; resume with the --workdir"
                             " or --storage it ran with")
    return resume


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [key for name in sorted(set(old) | set(new))
                for key in _differences(old.get(name), new.get(name), f"{prefix}{name}.")]
    return [] if old == new else [prefix.rstrip(".")]
