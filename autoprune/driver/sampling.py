"""Optuna's side of the search: the sampler, and the searcher that tells it which trials met the latency target
(Optuna's constrained TPE / GP / NSGA-II then concentrate where the target is met)."""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

from ray.tune.search.optuna import OptunaSearch

from autoprune.config import SearchSpec
from autoprune.driver.warm import Completed
from autoprune.space.define import SearchSpace
from autoprune.tracking.schema import STOPPED_AT_RUNG, TRIAL_ERROR

# The samplers made for tens of trials begin with SearchSpace.coarse_start (method × a few uniform sparsities up to
# the top of the range) rather than with random trials.
COARSE_START = ("tpe_grouped", "gp")
LATENCY_CONSTRAINT = "latency_over_target_ms"  # Optuna constraint (trial.set_constraint): feasible when ≤ 0
NO_LATENCY = 1.0  # the excess given to a completed trial that measured no latency: it has not shown it meets the target


def make_sampler(name: str, seed: int, *, trials: int | None = None):
    """Optuna's sampler. The constrained ones (all but random) read each trial's latency constraint, which the
    searcher sets on the trial (Optuna's `trial.set_constraint`), so TPE / NSGA-II / GP prefer configurations that
    met the target. `trials` (the search's budget) sizes the random start-up of the small-budget samplers."""
    import optuna

    startup = max(3, (trials or 30) // 5)  # a fifth of the budget at random, at least 3 (Optuna's default: 10)
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        # TPE for tens of trials: joint (multivariate) densities, grouped by the conditional space's branches
        # (each method's options), a short random start, and a constant liar so concurrent trials spread out.
        "tpe_grouped": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                                          n_startup_trials=startup, constant_liar=True),
        # Gaussian-process Bayesian optimisation (constrained, several objectives), made for 10–100-trial budgets.
        # The space is flat (space/define.py), so it models every parameter; were one drawn at random, it would say so.
        "gp": lambda: optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup),
        # A population of a quarter of the budget (4 to 50, Optuna's default): with fewer trials than one population
        # NSGA-II never breeds, and is a random search by another name
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed, population_size=nsga2_population(trials)),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),  # samples blindly: constraints do not apply
    }
    with warnings.catch_warnings():  # TPE's `group` is marked experimental; it is what the conditional space needs
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return samplers[name]()


def nsga2_population(trials: int | None) -> int:
    """NSGA-II's population for a search of `trials`: four generations at least, within Optuna's bounds of use."""
    return min(50, max(4, (trials or 200) // 4))


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
        if target is not None and trial_id in self._ot_trials:
            # A trial with no measured latency (it stopped before reporting one) has not shown it meets the target.
            excess = float(result["latency_ms"]) - target if result and "latency_ms" in result else NO_LATENCY
            self._ot_trials[trial_id].set_constraint(LATENCY_CONSTRAINT, excess)
        if result and result.get(STOPPED_AT_RUNG):
            # Successive halving stopped it part-way: Optuna records it as pruned, never as a completed trial whose
            # accuracy at a small budget would read as final (OptunaSearch tells PRUNED for a trial without values)
            result = None
        super().on_trial_complete(trial_id, result, error)

    def tell_earlier(self, completed: Sequence[Completed]) -> None:
        """Earlier trials (a warm start from a search that measured the same way) as completed Optuna trials."""
        import optuna

        for trial in completed:
            constraints = None if self.target_ms is None else {LATENCY_CONSTRAINT: trial.latency_ms - self.target_ms}
            pruned = trial.values is None  # stopped at a rung: pruned, as it was told the first time
            self._ot_study.add_trial(optuna.trial.create_trial(
                params=dict(trial.params), distributions=dict(trial.distributions),
                values=None if pruned else list(trial.values), constraints=constraints,
                state=optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.COMPLETE))


def latency_constrained_searcher(space: SearchSpace, spec: SearchSpec, *,
                                 first_points: Sequence[Mapping[str, Any]] = (),
                                 coarse_start: bool = True) -> ConstrainedOptunaSearch:
    """The search's Optuna searcher over `space`: accuracy up, the spec's cost down, the latency target (if any)
    as a constraint. `first_points` (Optuna parameters, say a grid's) are evaluated first, in order; a parameter
    a point leaves out is sampled. `coarse_start: False` leaves the small-budget samplers' coarse start out (a
    warm start's completed trials already show the sampler the range)."""
    target = spec.latency_target_ms
    if spec.search.sampler in COARSE_START and coarse_start:
        first_points = [*first_points, *space.coarse_start(spec.search.trials)]
    return ConstrainedOptunaSearch(
        space=space.define,
        metric=["accuracy", spec.cost_metric],
        mode=["max", "min"],
        sampler=make_sampler(spec.search.sampler, spec.search.seed, trials=spec.search.trials),
        points_to_evaluate=[dict(point) for point in first_points] or None,  # Optuna's enqueue_trial
        target_ms=target,
    )
