"""Optuna's side of the search: the sampler, and the searcher that tells it which trials met the latency target
(Optuna's constrained TPE / NSGA-II then concentrate where the target is met)."""

from __future__ import annotations

from ray.tune.search.optuna import OptunaSearch

from autoprune.config import SearchSpec
from autoprune.space.define import SearchSpace
from autoprune.tracking.schema import TRIAL_ERROR

CONSTRAINT_ATTR = "constraint"  # Optuna user attribute: (latency − target,), feasible when ≤ 0


def make_sampler(name: str, seed: int, *, constrained: bool = False):
    """Optuna's sampler; `constrained` makes TPE / NSGA-II prefer trials that met the latency target."""
    import optuna

    constraints = {"constraints_func": _trial_constraints} if constrained else {}
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, **constraints),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed, **constraints),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),  # samples blindly: constraints do not apply
    }
    return samplers[name]()


def _trial_constraints(trial) -> tuple[float, ...]:
    # A trial with no measured latency (it failed before reporting one) has not shown that it meets the target.
    return tuple(trial.user_attrs.get(CONSTRAINT_ATTR, (1.0,)))


class ConstrainedOptunaSearch(OptunaSearch):
    """Ray Tune's OptunaSearch, told each finished trial's latency excess over `target_ms` (None: no target)."""

    def __init__(self, *args, target_ms: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.target_ms = target_ms

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # `_ot_trials` (Tune trial id → Optuna trial) is OptunaSearch's own map; a test pins that it exists.
        if result and TRIAL_ERROR in result:  # a trial that failed and said so: Optuna records it as FAIL
            result, error = None, True
        target = self.target_ms
        if target is not None and result and "latency_ms" in result and trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr(CONSTRAINT_ATTR, (float(result["latency_ms"]) - target,))
        super().on_trial_complete(trial_id, result, error)


def latency_constrained_searcher(space: SearchSpace, spec: SearchSpec) -> ConstrainedOptunaSearch:
    """The search's Optuna searcher over `space`: accuracy up, the spec's cost down, the latency target (if any)
    as a constraint."""
    target = spec.latency_target_ms
    return ConstrainedOptunaSearch(
        space=space.define,
        metric=["accuracy", spec.cost_metric],
        mode=["max", "min"],
        sampler=make_sampler(spec.search.sampler, spec.search.seed, constrained=target is not None),
        target_ms=target,
    )
