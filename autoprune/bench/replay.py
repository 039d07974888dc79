"""`autoprune bench replay`: search strategies replayed against a table of configurations evaluated once.

A live search benchmark (bench/search.py) pays for every trial it runs, so it affords a handful of seeds, and a
handful of seeds cannot tell two samplers apart. Here the expensive part is done once: `bench/pool.py` evaluates
a few hundred configurations of a space (a quasi-random design and a grid) at several healing fidelities, with two
healing seeds, and commits the table (the *pool*). A search strategy (an *arm*) is then replayed against it: its
Optuna sampler asks for a trial, the pool answers with the configuration's measured accuracy and latency — the
same one when the sampler asks for a point the pool holds, else the nearest configuration of the same methods —
and the arm's spending is counted in healing steps and in seconds, from what the pool measured each stage to cost.
Twenty paired seeds per arm then take a fraction of a second per run for TPE and random search; GPSampler's arms
take most of a benchmark's time (about half a second per trial it proposes, see `run`).

What the replay can and cannot say:
- Every arm is held to one cost cap (healing steps; the run goes on until a seconds cap is spent too), and is
  compared at equal cost, never at equal trials: successive halving runs more, cheaper trials, and a sampled
  healing budget (autoprune < 0.2: `space.heal.budget: searched`) runs trials that cost less and are worth less.
- A sampler's point not in the pool is answered by its nearest neighbour, so the replay cannot reward a sampler for
  finding a point better than every one the pool holds; the report says how often the answer was not exact, and how
  far away on average. The pool's best front (every configuration, both seeds) is the yardstick: hypervolume is
  reported as a share of it.
- The healing seed is part of the noise a search meets: replay seed s reads pool seed s mod 2 for every trial.
- A rung's accuracy in the pool is that of the live search's rung (a continued heal branched at that step and
  decayed briefly), so halving is replayed with the accuracies it would have judged. A sampled budget of s steps is
  answered by interpolating the rungs' accuracies in log(steps): an approximation of a heal of s steps (its
  schedule decays over s steps, a rung's over a tenth of the rung), which flatters the old space a little if at all.

Concurrency (`concurrency` trials at once) is simulated in time: each trial's stages finish after the seconds the
pool measured for them, the first to finish is judged or told first, and only then is the next trial asked for —
so a constant liar, and a rung judged with fewer results, matter as they do live.

Statistics per task and arm, over the seeds: the normalised hypervolume at the cap, the cost to reach 90% and 95%
of the pool's hypervolume (censored at the cap: a run that never reaches it counts the cap, and the reached count
says how many did), and for the cost to 95% paired tests against random search and against the sampled-budget
default (Wilcoxon signed-rank; the ratio of median costs with a paired bootstrap interval). `rank_agreement` says
how well a rung's accuracy ranks configurations as the full budget does (Kendall τ), which is what halving relies
on.
"""

from __future__ import annotations

import argparse
import copy
import heapq
import itertools
import json
import math
import os
import statistics
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from autoprune.argtypes import positive_int
from autoprune.bench import record
from autoprune.pareto import hypervolume_2d

CAP_TRIALS = 48  # the default cost cap: this many trials healed to the full budget
MAX_TRIALS_PER_CAP_TRIAL = 12  # a run stops after 12× that many trials, whatever they cost (0-step ones cost none)
FLOOR_BELOW_DENSE = 0.10  # the hypervolume's reference point: dense top-1 − this, and the dense latency (ratio 1)
OLD_STEPS_LOW = 20  # the sampled budget's lower end in the old space (the demo's was {low: 20, high: 120, log})
TARGETS = (0.90, 0.95)  # shares of the pool's hypervolume whose cost to reach is reported
BASELINES = ("random", "tpe_grouped-old")  # the arms every other is compared with, paired by seed
BOOTSTRAP = 2000
BOOTSTRAP_SEED = 0
DEFAULT_RUNGS = (1 / 9, 1 / 3)
ZERO_SHOT_RUNGS = (0.0, 1 / 9, 1 / 3)


# ---- arms --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    """A search strategy: what it is, and the function that makes its source of trials for one run."""

    text: str
    source: Callable[["_Task", int, int], "_Source"]  # (task, seed, trials the cap pays for) → where trials come from
    rungs: tuple[float, ...] | None = None  # successive halving's rungs (fractions of the full budget); None: none
    budget: str = "fixed"  # fixed: every trial heals the full budget; searched: the sampler draws its steps


def _sampler_arm(text: str, sampler: str, *, rungs: tuple[float, ...] | None = None, budget: str = "fixed") -> Arm:
    """An arm whose trials an Optuna sampler asks for, over the space with the budget fixed or searched."""

    def source(task: "_Task", seed: int, trials: int) -> "_Source":
        return _OptunaSource.make(task, seed, trials, sampler=sampler, space=budget)

    return Arm(text, source, rungs, budget)


def _registry() -> dict[str, Arm]:
    arms = {
        "random": _sampler_arm("random search over the space, full budget", "random"),
        "grid": Arm("the pool's grid, in its order, again from the start until the cap",
                    lambda task, seed, trials: _GridSource(task)),
        "tpe_grouped-old": _sampler_arm("today's default: grouped TPE over the space with the healing budget"
                                        " sampled (20 to the full budget, log), coarse start", "tpe_grouped",
                                        budget="searched"),
        "gp-old": _sampler_arm("GP over the space with the healing budget sampled, coarse start", "gp",
                               budget="searched"),
    }
    for sampler in ("tpe", "gp", "tpe_grouped"):
        coarse = ", coarse start" if sampler != "tpe" else ""  # as the live search: only the small-budget samplers
        arms[sampler] = _sampler_arm(f"{sampler} over the space, full budget{coarse}", sampler)
    for sampler in ("tpe", "gp", "random", "tpe_grouped"):
        arms[f"{sampler}+halving"] = _sampler_arm(f"{sampler}, successive halving at 1/9 and 1/3 of the budget",
                                                  sampler, rungs=DEFAULT_RUNGS)
        arms[f"{sampler}+halving0"] = _sampler_arm(f"{sampler}, successive halving at 0 (zero-shot), 1/9 and 1/3",
                                                   sampler, rungs=ZERO_SHOT_RUNGS)
    return arms


ARMS: dict[str, Arm] = _registry()


def find_arm(name: str) -> Arm:
    """A registered arm, or `SAMPLER+halving:F,F,…`: that sampler's halving arm with these rungs (fractions of the
    full budget, 0 for the zero-shot rung)."""
    if name in ARMS:
        return ARMS[name]
    base, _, rungs = name.partition(":")
    if base.endswith("+halving") and base in ARMS and rungs:
        try:
            fractions = tuple(sorted({float(value) for value in rungs.split(",")}))
        except ValueError:
            fractions = ()
        if fractions and all(0 <= value < 1 for value in fractions):
            return Arm(f"{ARMS[base].text.split(',')[0]}, successive halving at {rungs}", ARMS[base].source, fractions,
                       ARMS[base].budget)
    raise ValueError(f"unknown arm {name!r}; the arms are {', '.join(ARMS)}, or SAMPLER+halving:F,F,… (rungs as"
                     f" fractions of the full budget, each in [0, 1))")


# ---- the pool, as one process reads it ---------------------------------------------------------------------


@dataclass
class _Task:
    """A pool with what every run over it needs: both spaces, the lookup, the reference point and the caps."""

    pool: dict
    full: int  # healing steps of the full budget
    fidelities: tuple[int, ...]
    spaces: dict  # the budget "fixed" (today's space) or "searched" → SearchSpace
    lookup: "_Lookup"
    reference: tuple[float, float]
    pooled_hv: float

    @classmethod
    def of(cls, pool: dict) -> "_Task":
        full = int(pool["budget"]["steps"])
        spaces = {budget: _space(pool["spec"], pool["budget"], budget_mode=budget) for budget in ("fixed", "searched")}
        return cls(pool, full, tuple(sorted(int(f) for f in pool["fidelities"])), spaces,
                   _Lookup(pool["configs"], _dimensions(spaces["fixed"])), reference_point(pool),
                   pooled_hypervolume(pool))

    @property
    def configs(self) -> list[dict]:
        return self.pool["configs"]

    def full_seconds(self, config: dict) -> float:
        """Seconds of a trial healed to the full budget in one go."""
        seconds = config["seconds"]
        return seconds["prune"] + seconds["profile"] + self.full * seconds["heal_step"] + seconds["evaluate"]

    def ceiling(self, seed: int) -> float:
        """The share of the pool's front that the healing seed replay seed `seed` reads reaches on its own: the
        most a run of that seed can find (the pooled front takes the better of two seeds)."""
        points = [(accuracy_at(c, seed, self.full), float(c["latency_ratio"])) for c in self.configs
                  if not c.get("not_faster") and c.get("seeds")]
        area = hypervolume_2d([a for a, _ in points], [c for _, c in points], reference=self.reference)
        return area / self.pooled_hv if self.pooled_hv else 0.0

    def cap_seconds(self, trials: int) -> float:
        """The seconds cap that matches a cap of `trials` full trials: that many times a typical (median) trial's
        seconds, so that every arm, whatever its trials cost, is stopped at the same seconds as well."""
        healed = [self.full_seconds(c) for c in self.configs if c.get("trains") and not c.get("not_faster")]
        return trials * statistics.median(healed or [self.full_seconds(c) for c in self.configs])


_GROUPS: dict[str, tuple] = {}


def _groups(model) -> tuple:
    """The layer groups of the pool's model (a space needs them), built once per process."""
    import dataclasses

    from autoprune.config import plain
    from autoprune.driver.prepare import model_source
    from autoprune.models import layer_groups

    key = json.dumps(plain(dataclasses.asdict(model)), sort_keys=True, default=str)
    if key not in _GROUPS:
        _GROUPS[key] = layer_groups(model_source(model).create())
    return _GROUPS[key]


def _space(doc: Mapping, budget: Mapping, *, budget_mode: str):
    """The SearchSpace over the pool's spec: the budget fixed at the pool's full budget (today's space), or its
    steps sampled from OLD_STEPS_LOW to the full budget, log-uniformly (the space before the budget became the
    fidelity: `space.heal.budget: searched`)."""
    from autoprune.space.define import SearchSpace
    from autoprune.space.load import parse_spec

    doc = copy.deepcopy(dict(doc))
    heal_space = doc["space"]["heal"]
    full = int(budget["steps"])
    heal_space["budget"] = budget_mode
    if budget_mode == "searched":
        heal_space["steps"] = {"low": min(OLD_STEPS_LOW, full), "high": full, "log": True}
    else:
        heal_space["steps"] = full
        if "calibration_images" in budget:  # a fixed budget is one value (a spec from before it was may hold a list)
            heal_space["calibration_images"] = int(budget["calibration_images"])
    spec = parse_spec(doc, origin="pool spec")
    return SearchSpace(spec, _groups(spec.model))


def _dimensions(space) -> dict[str, tuple]:
    """Each Optuna parameter of the space → ("range", low, high, log) or ("choice",): how the lookup compares it."""
    from autoprune.config import Choice, Range

    spec = space.spec
    sparsity = spec.prune.sparsity
    dims: dict[str, tuple] = {name: ("range", sparsity.low, sparsity.high, False)
                              for name in space.sparsity_parameters()}
    dims["prune.method"] = dims["heal.method"] = ("choice",)

    def add(name: str, dimension) -> None:
        if isinstance(dimension, Range):
            dims[name] = ("range", float(dimension.low), float(dimension.high), bool(dimension.log))
        elif isinstance(dimension, Choice):
            dims[name] = ("choice",)

    for key in ("calibration_images", "lr"):
        add(f"heal.{key}", getattr(spec.heal, key))
    for stage, options in (("prune", spec.prune.options), ("heal", spec.heal.options)):
        for method, dimensions in options.items():
            for option, dimension in dimensions.items():
                add(f"{stage}.{method}.{option}", dimension)
    return dims


def _relevant(params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters that make a configuration what it is: the flat space draws every parameter in every trial
    (another method's options, a sparsity N:M ignores, a learning rate `heal: none` ignores), and two trials that
    differ only there are the same configuration. The healing budget is never part of it (a replay answers it from
    the fidelities)."""
    from autoprune import heal, prune

    prune_method, heal_method = params.get("prune.method"), params.get("heal.method")
    kept = {}
    for name, value in params.items():
        parts = name.split(".")
        if name == "heal.steps":
            continue
        if len(parts) > 2 and parts[0] == "prune" and parts[1] in prune.PRUNE_METHODS and parts[1] != prune_method:
            continue
        if len(parts) > 2 and parts[0] == "heal" and parts[1] in heal.HEAL_METHODS and parts[1] != heal_method:
            continue
        if (name.startswith("prune.sparsity") and prune_method in prune.PRUNE_METHODS
                and not prune.get(prune_method).uses_sparsity):
            continue
        if name == "heal.lr" and heal_method in heal.HEAL_METHODS and not heal.get(heal_method).trains:
            continue
        kept[name] = value
    return kept


def _exact_key(params: Mapping[str, Any]) -> tuple:
    return tuple(sorted((name, round(value, 9) if isinstance(value, float) else value)
                        for name, value in params.items()))


class _Lookup:
    """Optuna's parameters → a pool configuration: the one with the same parameters if the pool holds it, else the
    nearest (Euclidean, each numeric parameter scaled to [0, 1] over the space's range, in log where the range is
    log) among those with the same methods and the same categorical options. A parameter one side lacks counts as
    the whole range apart."""

    def __init__(self, configs: Sequence[Mapping], dims: Mapping[str, tuple]) -> None:
        self.canonical = [_relevant(config["params"]) for config in configs]
        self.dims = dict(dims)
        self.exact: dict[tuple, int] = {}
        for index, params in enumerate(self.canonical):
            self.exact.setdefault(_exact_key(params), index)
        # a numeric parameter the space does not describe is scaled over the pool's values
        for params in self.canonical:
            for name, value in params.items():
                if name not in self.dims and _is_number(value):
                    values = [p[name] for p in self.canonical if _is_number(p.get(name))]
                    self.dims[name] = ("range", float(min(values)), float(max(values)), False)
        self._candidates: dict[tuple, list[int]] = {}
        self._matrices: dict[tuple, np.ndarray] = {}

    def _numeric(self, name: str) -> bool:
        return self.dims.get(name, ("choice",))[0] == "range"

    def _scaled(self, name: str, value: Any) -> float:
        _, low, high, log = self.dims[name]
        if log:
            low, high, value = math.log(low), math.log(high), math.log(value)
        return (float(value) - low) / (high - low) if high > low else 0.0

    def _signature(self, params: Mapping[str, Any], level: int) -> tuple:
        """What a candidate must share: 0, every categorical parameter; 1, both methods; 2, the pruning method;
        3, nothing (the pool lacks the combination: the report's `relaxed` count says how often)."""
        if level == 0:
            return tuple(sorted((n, v) for n, v in params.items() if not self._numeric(n)))
        return (("prune.method", params.get("prune.method")), ("heal.method", params.get("heal.method")))[
            : 2 if level == 1 else 1 if level == 2 else 0]

    def find(self, params: Mapping[str, Any]) -> tuple[int, bool, float, int]:
        """(configuration index, exact, distance, relaxation level) for a trial's parameters."""
        params = _relevant(params)
        hit = self.exact.get(_exact_key(params))
        if hit is not None:
            return hit, True, 0.0, 0
        for level in range(4):
            signature = self._signature(params, level)
            key = (level, signature)
            if key not in self._candidates:
                self._candidates[key] = [index for index, candidate in enumerate(self.canonical)
                                         if self._signature(candidate, level) == signature]
            candidates = self._candidates[key]
            if candidates:
                break
        names = tuple(sorted(n for n in params if self._numeric(n)))
        if not names:
            return candidates[0], False, 0.0, level
        matrix_key = (key, names)
        if matrix_key not in self._matrices:
            self._matrices[matrix_key] = np.array(
                [[self._scaled(n, self.canonical[i][n]) if n in self.canonical[i] else np.nan for n in names]
                 for i in candidates], dtype=float)
        matrix = self._matrices[matrix_key]
        query = np.array([self._scaled(n, params[n]) for n in names])
        gaps = np.where(np.isnan(matrix), 1.0, (matrix - query) ** 2)
        distances = np.sqrt(gaps.sum(axis=1))
        best = int(np.argmin(distances))  # ties: the first in pool order
        return candidates[best], False, float(distances[best]), level


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _seed_entry(config: Mapping, seed: int) -> Mapping:
    """The healing seed replay seed `seed` reads: pool seed `seed` mod 2 (mod however many the pool has)."""
    entries = config.get("seeds") or []
    if not entries:
        raise ValueError("a configuration without recorded accuracies (not_faster) has no seed to read")
    wanted = seed % 2
    return next((entry for entry in entries if entry.get("seed") == wanted), entries[seed % len(entries)])


def accuracy_at(config: Mapping, seed: int, fidelity: int) -> float:
    """The accuracy the pool recorded for `config` at `fidelity` healing steps, with the seed's healing seed. A
    configuration that does not train has one accuracy, whatever the fidelity."""
    recorded = _seed_entry(config, seed)["accuracy"]
    if str(fidelity) in recorded:
        return float(recorded[str(fidelity)])
    if not config.get("trains", True) and recorded:
        return float(next(iter(recorded.values())))
    raise KeyError(f"the pool recorded no accuracy at {fidelity} steps (it has {', '.join(recorded)})")


def accuracy_after(config: Mapping, seed: int, steps: int, fidelities: Sequence[int]) -> float:
    """A sampled budget's accuracy: linear in log(steps) between the recorded fidelities (above 0) around it."""
    positive = sorted(f for f in fidelities if f > 0)
    if not config.get("trains", True) or steps >= positive[-1]:
        return accuracy_at(config, seed, positive[-1])
    if steps <= positive[0]:
        return accuracy_at(config, seed, positive[0])
    high = next(f for f in positive if f >= steps)
    low = max(f for f in positive if f <= steps)
    if high == low:
        return accuracy_at(config, seed, low)
    weight = (math.log(steps) - math.log(low)) / (math.log(high) - math.log(low))
    return (1 - weight) * accuracy_at(config, seed, low) + weight * accuracy_at(config, seed, high)


# ---- hypervolume -------------------------------------------------------------------------------------------


def reference_point(pool: Mapping) -> tuple[float, float]:
    """Fixed before any run: (dense top-1 − FLOOR_BELOW_DENSE, latency ratio 1)."""
    return float(pool["dense"]["accuracy"]) - FLOOR_BELOW_DENSE, 1.0


def pooled_points(pool: Mapping, *, seeds: Sequence[int] | None = None) -> list[tuple[float, float]]:
    """(accuracy at the full budget, latency ratio) of every configuration the pool healed, for each healing seed
    (or those `seeds`)."""
    full = int(pool["budget"]["steps"])
    points = []
    for config in pool["configs"]:
        if config.get("not_faster"):
            continue
        for entry in config.get("seeds") or []:
            if seeds is None or entry.get("seed") in seeds:
                points.append((accuracy_at({**config, "seeds": [entry]}, 0, full), float(config["latency_ratio"])))
    return points


def pooled_hypervolume(pool: Mapping) -> float:
    """The hypervolume of the pool's best front: what every run's hypervolume is a share of."""
    points = pooled_points(pool)
    return hypervolume_2d([a for a, _ in points], [c for _, c in points], reference=reference_point(pool))


def normalised_hypervolume(points: Sequence[tuple[float, float]], pool: Mapping) -> float:
    """The hypervolume of (accuracy, latency ratio) `points` as a share of the pool's."""
    pooled = pooled_hypervolume(pool)
    area = hypervolume_2d([a for a, _ in points], [c for _, c in points], reference=reference_point(pool))
    return area / pooled if pooled > 0 else 0.0


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


# ---- where trials come from --------------------------------------------------------------------------------


class _Source:
    """A run's trials: `ask` → (handle, Optuna parameters, pool index or None), `tell` its outcome."""

    def ask(self) -> tuple[Any, dict, int | None]:
        raise NotImplementedError

    def tell(self, handle: Any, values: tuple[float, float] | None) -> None:
        """`values` (accuracy, latency ratio), or None: stopped at a rung (Optuna: pruned)."""


class _OptunaSource(_Source):
    def __init__(self, study, space) -> None:
        self.study, self.space = study, space

    @classmethod
    def make(cls, task: _Task, seed: int, trials: int, *, sampler: str, space: str) -> "_OptunaSource":
        import optuna

        from autoprune.driver.sampling import COARSE_START, make_sampler

        chosen = task.spaces[space]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study = optuna.create_study(directions=["maximize", "minimize"],
                                        sampler=make_sampler(sampler, seed, trials=trials))
        if sampler in COARSE_START:  # as the live search starts them (driver/sampling.py)
            for point in chosen.coarse_start(trials):
                study.enqueue_trial(point, skip_if_exists=False)
        return cls(study, chosen)

    def ask(self):
        trial = self.study.ask()
        self.space.define(trial)
        return trial, dict(trial.params), None

    def tell(self, handle, values) -> None:
        import optuna

        if values is None:
            self.study.tell(handle, state=optuna.trial.TrialState.PRUNED)
        else:
            self.study.tell(handle, list(values))


class _GridSource(_Source):
    def __init__(self, task: _Task) -> None:
        self.indices = [index for index, config in enumerate(task.configs) if config.get("origin") == "grid"]
        if not self.indices:
            raise ValueError("the pool has no grid configurations (origin: grid): the grid arm has nothing to run")
        self.order = itertools.cycle(self.indices)

    def ask(self):
        index = next(self.order)
        return None, {}, index


# ---- one run -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stage:
    steps: int
    seconds: float
    fidelity: int  # healing steps the trial has reached when the stage ends
    rung: float | None = None  # judged here (the rung's fraction of the budget); None: the trial's last stage


def _rungs(task: _Task, fractions: Sequence[float]) -> list[tuple[float, int]]:
    """(fraction, steps) of each rung, as the live search sets them (halving.rungs_of); each must be a fidelity
    the pool recorded, or the replay could not answer it."""
    from autoprune.halving import rungs_of

    rungs = rungs_of(task.full, fractions)
    missing = [steps for _, steps in rungs if steps not in task.fidelities]
    if missing:
        raise ValueError(f"rungs at {missing} steps: the pool recorded accuracies at {list(task.fidelities)} steps"
                         f" only (a rung is round(fraction × {task.full}))")
    return rungs


def _plan(task: _Task, config: Mapping, *, rungs: Sequence[tuple[float, int]], steps: int | None) -> list[_Stage]:
    """A trial's stages and what each costs. `steps`: a sampled budget (the old space), else the full one."""
    from autoprune import heal
    from autoprune.halving import rung_decay

    seconds = config["seconds"]
    start = seconds["prune"] + seconds["profile"]
    if config.get("not_faster"):  # stopped after profiling: it cannot join the front
        return [_Stage(0, start, 0)]
    if not config.get("trains", True):
        method = config["params"].get("heal.method")
        calibrates = method in heal.HEAL_METHODS and heal.get(method).uses_calibration  # recalibrate: BatchNorm
        return [_Stage(0, start + seconds["evaluate"] + (_zero_shot_seconds(seconds) if calibrates else 0.0),
                       task.full)]
    if steps is not None or not rungs:
        steps = task.full if steps is None else steps
        return [_Stage(steps, start + steps * seconds["heal_step"] + seconds["evaluate"], steps)]
    stages, reached = [], 0
    for fraction, at in rungs:
        if at == 0:  # the zero-shot rung: BatchNorm re-estimated, no training
            spent, cost = 0, _zero_shot_seconds(seconds) + seconds["evaluate"]
        else:  # continued from the last rung, then a short decay on a branch that is put back
            spent = at - reached + rung_decay(at)
            cost = spent * seconds["heal_step"] + seconds["evaluate"]
        stages.append(_Stage(spent, cost + (start if not stages else 0.0), at, fraction))
        reached = at
    rest = task.full - reached
    stages.append(_Stage(rest, rest * seconds["heal_step"] + seconds["evaluate"], task.full))
    return stages


def _zero_shot_seconds(seconds: Mapping[str, float]) -> float:
    """Re-estimating BatchNorm's statistics: what the pool measured, or where it did not, one evaluation's seconds
    (it is a pass over the calibration images without gradients, about as long as a pass over the evaluation's)."""
    return float(seconds["zero_shot"]) if "zero_shot" in seconds else float(seconds["evaluate"])


@dataclass
class _Running:
    number: int
    handle: Any
    params: dict
    index: int
    exact: bool
    distance: float
    relaxed: int
    plan: list[_Stage]
    steps_asked: int | None
    at: int = 0
    steps: int = 0
    seconds: float = 0.0
    rungs: list = field(default_factory=list)


@contextmanager
def _sampling() -> Iterator[None]:
    """What a replay runs its samplers under: Optuna quiet (it logs every trial told at INFO: thousands of lines
    per benchmark), and torch on one thread — GPSampler's tensors are small, and on two threads it ran three times
    slower than on one (0.5 against 1.5 s a trial, on two cores)."""
    import optuna
    import torch

    verbosity, threads = optuna.logging.get_verbosity(), torch.get_num_threads()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)
        torch.set_num_threads(threads)


_TASKS: dict[int, tuple[dict, _Task]] = {}


def _task(pool: dict) -> _Task:
    """The pool's `_Task`, made once per pool object (it holds the object, so its id is not reused meanwhile)."""
    held = _TASKS.get(id(pool))
    if held is None or held[0] is not pool:
        held = _TASKS[id(pool)] = (pool, _Task.of(pool))
    return held[1]


def lookup(pool: dict, params: Mapping[str, Any]) -> tuple[int, bool, float]:
    """The pool configuration that answers a trial with these Optuna parameters: (index, exact, scaled distance)."""
    index, exact, distance, _ = _task(pool).lookup.find(params)
    return index, exact, distance


def replay(pool: dict, arm: str, seed: int, *, cap_steps: int | None = None, cap_seconds: float | None = None,
           concurrency: int = 1, rungs: Sequence[float] | None = None) -> dict:
    """One search of `arm` with `seed`, replayed against `pool`: its trials in the order they were told (parameters,
    the pool configuration that answered, the fidelity reached, the accuracy, latency ratio, healing steps and
    seconds), the hypervolume trajectory against cumulative cost, and the run's summary.

    The run asks for trials until it has spent both `cap_steps` healing steps (default CAP_TRIALS × the full
    budget) and `cap_seconds` (default: as many seconds as CAP_TRIALS typical full trials take), `concurrency` at
    a time; a trial already running when the caps are spent finishes, but what comes after a cap is not counted
    on that cap's axis. `rungs` overrides the arm's halving rungs."""
    chosen = find_arm(arm)
    task = _task(pool)
    cap_steps = int(cap_steps or CAP_TRIALS * task.full)
    trials = max(1, cap_steps // task.full)
    cap_seconds = float(cap_seconds or task.cap_seconds(trials))
    fractions = tuple(rungs) if rungs is not None else chosen.rungs
    rung_steps = _rungs(task, fractions) if fractions else []
    with _sampling():
        search = _Replay(task, chosen.source(task, seed, trials), seed, rungs=rung_steps,
                         sampled_budget=chosen.budget == "searched",
                         stop=lambda spent, started: (spent[0] >= cap_steps and spent[1] >= cap_seconds)
                         or started >= MAX_TRIALS_PER_CAP_TRIAL * trials)
        search.run(concurrency)
    run = {"arm": arm, "seed": seed, "concurrency": concurrency, "cap_steps": cap_steps, "cap_seconds": cap_seconds,
           "rungs": [list(r) for r in rung_steps], "trials": search.told, "trajectory": search.trajectory,
           "truncated": search.started >= MAX_TRIALS_PER_CAP_TRIAL * trials, "ceiling": task.ceiling(seed)}
    if isinstance(search.source, _OptunaSource):  # what Optuna was told, trial by trial (COMPLETE, PRUNED)
        run["optuna_states"] = [trial.state.name for trial in search.source.study.trials]
    run["summary"] = summarise_run(run, reference=task.reference)
    return run


class _Replay:
    """The event loop of one run: each running trial's next stage ends after the seconds the pool measured for it;
    the earliest is judged at its rung or told, and a trial that ends makes room for the next one asked for."""

    def __init__(self, task: _Task, source: _Source, seed: int, *, rungs: Sequence[tuple[float, int]],
                 sampled_budget: bool, stop: Callable[[tuple[int, float], int], bool]) -> None:
        from autoprune.config import Halving
        from autoprune.halving import LocalRungJudge

        self.task, self.source, self.seed, self.rungs = task, source, seed, list(rungs)
        self.sampled_budget, self.stop = sampled_budget, stop
        self.judge = LocalRungJudge(Halving(rungs=tuple(f for f, _ in rungs), margin=0.01, eta=3)) if rungs else None
        self.front = _Front(task.reference)
        self.told: list[dict] = []
        self.trajectory: list[list[float]] = [[0, 0.0, 0.0]]  # (steps, seconds, normalised HV) after each tell
        self.steps, self.seconds, self.started = 0, 0.0, 0
        self.events: list[tuple[float, int, _Running]] = []
        self.order = itertools.count()  # ties in time go in the order they were scheduled

    def run(self, concurrency: int) -> None:
        for _ in range(max(1, concurrency)):
            self.start(0.0)
        while self.events:
            now, _, running = heapq.heappop(self.events)
            if self.advance(now, running):
                self.start(now)

    def start(self, now: float) -> None:
        if self.stop((self.steps, self.seconds), self.started):
            return
        handle, params, index = self.source.ask()
        if index is None:
            index, exact, distance, relaxed = self.task.lookup.find(params)
        else:
            params, exact, distance, relaxed = dict(self.task.configs[index]["params"]), True, 0.0, 0
        config = self.task.configs[index]
        asked = None
        if self.sampled_budget and config.get("trains", True) and not config.get("not_faster"):
            asked = int(params.get("heal.steps", self.task.full))
        running = _Running(self.started, handle, params, index, exact, distance, relaxed,
                           _plan(self.task, config, rungs=self.rungs, steps=asked), asked)
        self.started += 1
        heapq.heappush(self.events, (now + running.plan[0].seconds, next(self.order), running))

    def advance(self, now: float, running: _Running) -> bool:
        """The end of a trial's stage: judge it at its rung (it goes on, or it is told as pruned), or tell its
        result. Whether the trial ended."""
        stage = running.plan[running.at]
        config = self.task.configs[running.index]
        for holder in (running, self):
            holder.steps += stage.steps
            holder.seconds += stage.seconds
        ratio = float(config["latency_ratio"])
        if stage.rung is not None:
            score = accuracy_at(config, self.seed, stage.fidelity)
            running.rungs.append([stage.fidelity, score])
            if self.judge.promote(stage.rung, score, ratio):
                running.at += 1
                heapq.heappush(self.events, (now + running.plan[running.at].seconds, next(self.order), running))
                return False
            self.source.tell(running.handle, None)
            state, value = "pruned", score
        elif config.get("not_faster"):
            self.source.tell(running.handle, (0.0, ratio))  # as the live search tells a trial stopped before healing
            state, value = "not_faster", None
        else:
            value = (accuracy_after(config, self.seed, running.steps_asked, self.task.fidelities)
                     if running.steps_asked is not None else accuracy_at(config, self.seed, self.task.full))
            self.source.tell(running.handle, (value, ratio))
            self.front.add(value, ratio)
            state = "complete"
        self.told.append({"number": running.number, "params": running.params, "config": running.index,
                          "exact": running.exact, "distance": running.distance, "relaxed": running.relaxed,
                          "state": state, "trains": bool(config.get("trains", True)), "fidelity": stage.fidelity,
                          "accuracy": value, "latency_ratio": ratio, "steps": running.steps,
                          "seconds": running.seconds, "rungs": running.rungs, "spent": [self.steps, self.seconds]})
        share = self.front.area / self.task.pooled_hv if self.task.pooled_hv else 0.0
        self.trajectory.append([self.steps, self.seconds, share])
        return True


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


# ---- across seeds ------------------------------------------------------------------------------------------


def _quartiles(values: Sequence[float]) -> dict:
    low, median, high = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return {"median": float(median), "q1": float(low), "q3": float(high)}


def paired_comparison(baseline: Sequence[float], candidate: Sequence[float]) -> dict:
    """The baseline's cost against the candidate's, seed by seed: Wilcoxon's signed-rank p (two-sided; 1 when
    every difference is 0), and the ratio of their medians (above 1: the candidate needs less) with a 95%
    bootstrap interval (seeds resampled with replacement, in pairs)."""
    from scipy.stats import wilcoxon

    base, cand = np.asarray(baseline, dtype=float), np.asarray(candidate, dtype=float)
    if np.allclose(base, cand):
        p = 1.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            p = float(wilcoxon(base, cand, alternative="two-sided").pvalue)
        p = 1.0 if math.isnan(p) else p

    def ratio(b: np.ndarray, c: np.ndarray) -> float:
        below = float(np.median(c))
        return float(np.median(b)) / below if below > 0 else math.nan

    rng = np.random.default_rng(BOOTSTRAP_SEED)
    picks = rng.integers(0, len(base), size=(BOOTSTRAP, len(base)))
    ratios = np.array([ratio(base[pick], cand[pick]) for pick in picks])
    ratios = ratios[~np.isnan(ratios)]
    low, high = (np.percentile(ratios, [2.5, 97.5]) if ratios.size else (math.nan, math.nan))
    return {"ratio": ratio(base, cand), "low": float(low), "high": float(high), "p": p, "n": int(len(base))}


def summarise_arm(runs: Sequence[Mapping]) -> dict:
    """One arm's runs (one per seed) → medians and quartiles across seeds, reached counts and totals."""
    summaries = [run["summary"] for run in runs]
    out = {"seeds": len(runs),
           "hv_at_steps_cap": _quartiles([s["hv_at_steps_cap"] for s in summaries]),
           "hv_at_seconds_cap": _quartiles([s["hv_at_seconds_cap"] for s in summaries])}
    for basis, suffix in (("reach", ""), ("reach_of_ceiling", "_of_ceiling")):
        for target in TARGETS:
            key = f"{target:g}"
            for unit in ("steps", "seconds"):
                cell = out[f"{unit}_to_{key}{suffix}"] = _quartiles([s[basis][key][unit] for s in summaries])
                cell["reached"] = sum(1 for s in summaries if s[basis][key][f"reached_{unit}"])
    shares = [s["healed_in_front_range"] for s in summaries if s["healed_in_front_range"] is not None]
    nearest = sum(s["nearest"] for s in summaries)
    out.update({
        "healed_in_front_range": statistics.mean(shares) if shares else None,
        "not_faster": sum(s["not_faster"] for s in summaries),
        "trials": statistics.mean(s["trials"] for s in summaries),
        "pruned": sum(s["pruned"] for s in summaries),
        "exact": sum(s["exact"] for s in summaries), "nearest": nearest,
        "relaxed": sum(s["relaxed"] for s in summaries),
        "mean_distance": sum(s["distance_sum"] for s in summaries) / nearest if nearest else 0.0,
        "truncated": sum(1 for s in summaries if s["truncated"]),
        "wall_s": statistics.mean(run.get("wall_s", 0.0) for run in runs),
        "cpu_s": statistics.mean(run.get("cpu_s", 0.0) for run in runs),
    })
    return out


def compare(runs_by_arm: Mapping[str, Sequence[Mapping]]) -> dict:
    """Every arm against each baseline that ran, paired by seed, on the healing steps and the seconds it took to
    reach 95% of the pool's hypervolume (censored at the cap); under `of_ceiling`, 95% of what the seed can reach."""
    key = f"{TARGETS[-1]:g}"
    comparisons: dict = {}
    for name, runs in runs_by_arm.items():
        for baseline in BASELINES:
            if baseline == name or baseline not in runs_by_arm:
                continue
            seeds = sorted({run["seed"] for run in runs} & {run["seed"] for run in runs_by_arm[baseline]})
            if len(seeds) < 2:
                continue
            cell: dict = {}
            for basis, into in (("reach", cell), ("reach_of_ceiling", cell.setdefault("of_ceiling", {}))):
                mine = {run["seed"]: run["summary"][basis][key] for run in runs}
                theirs = {run["seed"]: run["summary"][basis][key] for run in runs_by_arm[baseline]}
                for unit in ("steps", "seconds"):
                    into[unit] = paired_comparison([theirs[s][unit] for s in seeds], [mine[s][unit] for s in seeds])
            comparisons.setdefault(name, {})[baseline] = cell
    return comparisons


def rank_agreement(pool: Mapping) -> list[dict]:
    """How a rung ranks configurations as the full budget does: Kendall τ between the accuracy at each fidelity
    below the full budget and at the full budget (same healing seed, the mean over seeds), over the pool's
    configurations that train and were healed, per healing method and for all of them, over every latency and
    within each quartile of latency ratio (halving judges a trial against those about as fast). `seeds` is the
    τ between the two healing seeds at the full budget: the most a rung could agree."""
    from scipy.stats import kendalltau

    full = int(pool["budget"]["steps"])
    below = sorted(int(f) for f in pool["fidelities"] if int(f) < full)
    configs = [c for c in pool["configs"] if c.get("trains", True) and not c.get("not_faster") and c.get("seeds")]
    seeds = sorted({entry["seed"] for c in configs for entry in c["seeds"]})

    def tau(x: Sequence[float], y: Sequence[float]) -> float | None:
        if len(x) < 3:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = kendalltau(x, y).statistic
        return None if value is None or math.isnan(value) else float(value)

    def accuracy(config, seed, fidelity):
        entry = next((e for e in config["seeds"] if e["seed"] == seed), None)
        return None if entry is None else entry["accuracy"].get(str(fidelity))

    def row(method: str, band: str, group: list[dict]) -> dict:
        out: dict = {"heal": method, "latency": band, "n": len(group)}
        for fidelity in below:
            taus = []
            for seed in seeds:
                pairs = [(accuracy(c, seed, fidelity), accuracy(c, seed, full)) for c in group]
                pairs = [p for p in pairs if None not in p]
                taus.append(tau([a for a, _ in pairs], [b for _, b in pairs]))
            taus = [t for t in taus if t is not None]
            out[str(fidelity)] = statistics.mean(taus) if taus else None
        if len(seeds) >= 2:
            pairs = [(accuracy(c, seeds[0], full), accuracy(c, seeds[1], full)) for c in group]
            pairs = [p for p in pairs if None not in p]
            out["seeds"] = tau([a for a, _ in pairs], [b for _, b in pairs])
        else:
            out["seeds"] = None
        return out

    rows = []
    methods = sorted({c["params"].get("heal.method") for c in configs})
    for method in ["all", *methods]:
        group = configs if method == "all" else [c for c in configs if c["params"].get("heal.method") == method]
        if not group:
            continue
        rows.append(row(method, "all", group))
        ratios = np.array([float(c["latency_ratio"]) for c in group])
        edges = np.percentile(ratios, [25, 50, 75])
        bands = np.searchsorted(edges, ratios, side="right")
        for band in range(4):
            rows.append(row(method, f"Q{band + 1}", [c for c, b in zip(group, bands) if b == band]))
    return rows


def rank_agreement_markdown(pool: Mapping) -> str:
    """The pool's page (`autoprune bench pool`): what it holds, and `rank_agreement`'s table."""
    configs = pool["configs"]
    methods = sorted({f"{c['params'].get('prune.method')}+{c['params'].get('heal.method')}" for c in configs})
    full = int(pool["budget"]["steps"])
    head = (f"**{pool.get('task', 'pool')}**: {len(configs)} configurations"
            f" ({sum(1 for c in configs if c.get('origin') == 'grid')} of them the grid,"
            f" {sum(1 for c in configs if c.get('not_faster'))} not faster than the dense model,"
            f" {sum(1 for c in configs if not c.get('trains', True))} healed without training); {', '.join(methods)};"
            f" dense top-1 {pool['dense']['accuracy']:.3f}; full budget {full} steps.")
    fidelities = sorted(int(f) for f in pool["fidelities"])
    return "\n".join([head, "", *_rank_table({"pool": {"fidelities": fidelities, "full": full},
                                              "rank_agreement": rank_agreement(pool)})])


def summarise_task(pool: Mapping, runs: Sequence[Mapping]) -> dict:
    """A task's table: the pool's numbers, each arm across its seeds, the paired comparisons, rank agreement."""
    task = _task(pool)  # type: ignore[arg-type]
    by_arm: dict[str, list] = {}
    for run in runs:
        by_arm.setdefault(run["arm"], []).append(run)
    ceiling = {str(seed): normalised_hypervolume(pooled_points(pool, seeds=[seed]), pool)
               for seed in sorted({e["seed"] for c in pool["configs"] for e in c.get("seeds") or []})}
    first = runs[0] if runs else {"cap_steps": None, "cap_seconds": None, "concurrency": None}
    return {
        "pool": {"configs": len(pool["configs"]), "grid": sum(1 for c in pool["configs"] if c.get("origin") == "grid"),
                 "full": task.full, "fidelities": list(task.fidelities), "dense": pool["dense"],
                 "reference": list(task.reference), "pooled_hv": task.pooled_hv, "ceiling": ceiling},
        "cap_steps": first["cap_steps"], "cap_seconds": first["cap_seconds"], "concurrency": first["concurrency"],
        "arms": {name: summarise_arm(of_arm) for name, of_arm in by_arm.items()},
        "comparisons": compare(by_arm),
        "rank_agreement": rank_agreement(pool),
        "runs": [{key: run[key] for key in ("arm", "seed", "summary", "wall_s", "cpu_s") if key in run}
                 for run in runs],
    }


# ---- many runs ---------------------------------------------------------------------------------------------

_POOLS: list[dict] = []


def _start_worker(paths: Sequence[str]) -> None:
    _POOLS[:] = [record.read(path)[1] for path in paths]


def _one(job: tuple[int, str, int, int | None, int]) -> dict:
    pool_index, name, seed, cap_steps, concurrency = job
    started, cpu = time.perf_counter(), time.process_time()
    run = replay(_POOLS[pool_index], name, seed, cap_steps=cap_steps, concurrency=concurrency)
    return {"pool": pool_index, "arm": name, "seed": seed, "summary": run["summary"], "cap_steps": run["cap_steps"],
            "cap_seconds": run["cap_seconds"], "concurrency": concurrency,
            "wall_s": round(time.perf_counter() - started, 3), "cpu_s": round(time.process_time() - cpu, 3)}


def run(pool_paths: list[Path], *, arms: Sequence[str], seeds: int, concurrency: int, out: Path,
        cap_steps: int | None = None, workers: int | None = None,
        echo: Callable[[str], None] | None = None) -> dict:
    """Every arm × seed (0 … seeds − 1) on every pool, in `workers` processes (default: one per core), summarised
    per task and written to `out` with the provenance; `echo` hears of each run as it ends.

    GPSampler is the slow part: Optuna's log-EHVI acquisition, searched exhaustively over the sparsity's grid
    steps, takes about half a second per trial it proposes and more as trials accrue, where TPE takes
    milliseconds; its halving arms run two to three times the trials of a full-budget arm."""
    # named as the table is registered (bench/commands.py): the docs render a file by its provenance's bench
    provenance = record.Provenance("replay")
    for name in arms:
        find_arm(name)  # an unknown arm fails before anything runs
    paths = [str(Path(p).resolve()) for p in pool_paths]
    jobs = [(index, name, seed, cap_steps, concurrency) for index in range(len(paths)) for name in arms
            for seed in range(seeds)]
    jobs.sort(key=lambda job: not job[1].startswith("gp"))  # the slow ones first, so the processes end together
    workers = workers or os.cpu_count() or 1
    runs = []

    def done(one: dict) -> None:
        runs.append(one)
        if echo:
            echo(f"bench replay: {len(runs)}/{len(jobs)} {Path(paths[one['pool']]).name} {one['arm']} seed"
                 f" {one['seed']}: {one['summary']['trials']} trials, HV {one['summary']['hv_at_steps_cap']:.3f}"
                 f" at the cap ({one['wall_s']:.1f} s)")

    if workers == 1:
        _start_worker(paths)
        for job in jobs:
            done(_one(job))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn: the parent has imported torch (and maybe started its threads), which fork does not carry safely
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_start_worker, initargs=(paths,)) as pool:
            for future in as_completed([pool.submit(_one, job) for job in jobs]):
                done(future.result())
        _POOLS[:] = [record.read(path)[1] for path in paths]
    position = {name: index for index, name in enumerate(arms)}
    runs.sort(key=lambda one: (one["pool"], position[one["arm"]], one["seed"]))  # as asked, whatever ended first
    results: dict = {"arms": list(arms), "seeds": seeds, "concurrency": concurrency, "tasks": {}}
    for index, pool in enumerate(_POOLS):
        name = str(pool.get("task", f"pool {index}"))
        while name in results["tasks"]:
            name += "'"
        results["tasks"][name] = summarise_task(pool, [r for r in runs if r["pool"] == index])
        results["tasks"][name]["file"] = Path(paths[index]).name
    record.write(out, provenance, results)
    return results


# ---- the page ----------------------------------------------------------------------------------------------


def _iqr(cell: Mapping, digits: int = 0, scale: float = 1.0) -> str:
    form = f"{{:.{digits}f}}"
    return (f"{form.format(cell['median'] * scale)} ({form.format(cell['q1'] * scale)}–"
            f"{form.format(cell['q3'] * scale)})")


def _versus(comparison: Mapping | None, unit: str = "steps") -> str:
    if not comparison:
        return "—"
    cell = comparison[unit]
    return f"{cell['ratio']:.2f}× [{cell['low']:.2f}, {cell['high']:.2f}], p {cell['p']:.2g}"


def _tau(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def page(results: Mapping) -> str:
    """The markdown tables: per task, every arm at equal cost, and how well the rungs rank."""
    lines: list[str] = []
    for name, task in results["tasks"].items():
        lines += _arms_table(name, task)
        lines += _equal_cost_table(task)
        lines += _rank_table(task)
    named = [arm_name for task in results["tasks"].values() for arm_name in task["arms"]]
    lines += ["Arms:", ""] + [f"- `{arm_name}`: {_arm_text(arm_name)}" for arm_name in dict.fromkeys(named)] + [""]
    return "\n".join(lines)


def _equal_cost_table(task: Mapping) -> list[str]:
    """The hypervolume every arm reached for the same healing steps (the cap), against each baseline's at the same
    seeds: the median of the paired differences and Wilcoxon's p. Where no arm reaches a target share of the
    pool's front within the cap, the cost to reach it is censored for all of them, and this is the comparison left
    that can decide."""
    from scipy.stats import wilcoxon

    by_arm: dict[str, dict[int, float]] = {}
    for run in task["runs"]:
        by_arm.setdefault(run["arm"], {})[run["seed"]] = run["summary"]["hv_at_steps_cap"]
    baselines = [b for b in (*BASELINES, "grid") if b in by_arm]
    lines = ["Hypervolume at equal cost (the steps cap), paired by seed: the median difference from each baseline"
             " (above 0: this arm's front is better) and Wilcoxon's p.", "",
             "| arm | " + " | ".join(f"vs {b}" for b in baselines) + " |", "|---" * (len(baselines) + 1) + "|"]
    for arm, values in by_arm.items():
        cells = []
        for baseline in baselines:
            seeds = sorted(set(values) & set(by_arm[baseline]))
            differences = [values[seed] - by_arm[baseline][seed] for seed in seeds]
            if arm == baseline or len(seeds) < 2:
                cells.append("—")
                continue
            p = float(wilcoxon(differences).pvalue) if any(differences) else 1.0
            cells.append(f"{statistics.median(differences):+.3f}, p {p:.2g}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines + [""]


def _arm_text(name: str) -> str:
    try:
        return find_arm(name).text
    except ValueError:  # a file written by a version with other arms
        return "—"


def _arms_table(name: str, task: Mapping) -> list[str]:
    pool = task["pool"]
    ceiling = ", ".join(f"{v:.3f}" for v in pool["ceiling"].values())
    lines = [f"**{name}** ({pool['configs']} configurations, {pool['grid']} of them the grid; full budget"
             f" {pool['full']} steps, fidelities {', '.join(map(str, pool['fidelities']))}; dense top-1"
             f" {pool['dense']['accuracy']:.3f}; hypervolume reference: top-1 {pool['reference'][0]:.3f}, latency"
             f" ratio 1, as a share of the pool's front, of which each healing seed alone reaches {ceiling}; cap"
             f" {task['cap_steps']} healing steps and {record.duration(task['cap_seconds'])}; {task['concurrency']}"
             f" at a time; median (IQR) over seeds)", ""]
    lines.append("| arm | trials | HV at the steps cap | HV at the seconds cap | steps to 90% | steps to 95%"
                 " | seconds to 95% | vs random (steps) | vs tpe_grouped-old (steps)"
                 " | healed in the front's latency range | not faster |")
    lines.append("|---" * 11 + "|")
    for arm_name, cell in task["arms"].items():
        n = cell["seeds"]
        versus = task["comparisons"].get(arm_name, {})
        share = "—" if cell["healed_in_front_range"] is None else f"{cell['healed_in_front_range']:.0%}"
        lines.append(
            f"| {arm_name} | {cell['trials']:.0f} | {_iqr(cell['hv_at_steps_cap'], 3)}"
            f" | {_iqr(cell['hv_at_seconds_cap'], 3)}"
            f" | {_iqr(cell['steps_to_0.9'])} ({cell['steps_to_0.9']['reached']}/{n})"
            f" | {_iqr(cell['steps_to_0.95'])} ({cell['steps_to_0.95']['reached']}/{n})"
            f" | {_iqr(cell['seconds_to_0.95'])} ({cell['seconds_to_0.95']['reached']}/{n})"
            f" | {_versus(versus.get('random'))} | {_versus(versus.get('tpe_grouped-old'))}"
            f" | {share} | {cell['not_faster']} |")
    exact = sum(c["exact"] for c in task["arms"].values())
    nearest = sum(c["nearest"] for c in task["arms"].values())
    distance = sum(c["mean_distance"] * c["nearest"] for c in task["arms"].values()) / nearest if nearest else 0.0
    relaxed = sum(c["relaxed"] for c in task["arms"].values())
    truncated = sum(c["truncated"] for c in task["arms"].values())
    notes = [f"Ratios: the baseline's median cost to 95% over this arm's (above 1: this arm needs less), a 95% paired"
             f" bootstrap interval, Wilcoxon's p; a run that never reaches 95% counts the cap."
             f" Lookups: {exact} trials the pool held exactly, {nearest} answered by the nearest configuration (mean"
             f" scaled distance {distance:.3f}"
             + (f"; {relaxed} with no configuration of the same options" if relaxed else "") + ")."]
    short = [seed for seed, share in pool["ceiling"].items() if share < TARGETS[-1]]
    if short:  # then those seeds are censored whatever the arm: the test can only tell the others apart
        notes.append(f"Pool seed {' and '.join(short)} alone reaches less than {TARGETS[-1]:.0%} of the pool's front:"
                     f" a replay seed that reads it cannot reach 95%.")
    if truncated:
        notes.append(f"{truncated} runs stopped at {MAX_TRIALS_PER_CAP_TRIAL}× the cap's trials before spending it.")
    lines += ["", " ".join(notes), "",
              "The same against what each seed can reach (95% of its pool seed's own front), in steps and seconds:",
              "", "| arm | steps to 95% | seconds to 95% | vs random (steps) | vs tpe_grouped-old (steps)"
                  " | vs random (seconds) | vs tpe_grouped-old (seconds) |", "|---" * 7 + "|"]
    for arm_name, cell in task["arms"].items():
        n = cell["seeds"]
        versus = {base: c.get("of_ceiling") for base, c in task["comparisons"].get(arm_name, {}).items()}
        steps, seconds = cell["steps_to_0.95_of_ceiling"], cell["seconds_to_0.95_of_ceiling"]
        lines.append(f"| {arm_name} | {_iqr(steps)} ({steps['reached']}/{n}) | {_iqr(seconds)}"
                     f" ({seconds['reached']}/{n}) | {_versus(versus.get('random'))}"
                     f" | {_versus(versus.get('tpe_grouped-old'))} | {_versus(versus.get('random'), 'seconds')}"
                     f" | {_versus(versus.get('tpe_grouped-old'), 'seconds')} |")
    return lines + [""]


def _rank_table(task: Mapping) -> list[str]:
    pool = task["pool"]
    fidelities = [f for f in pool["fidelities"] if f < pool["full"]]
    lines = [f"Rank agreement with the full budget (Kendall τ; {pool['full']} steps), over the configurations that"
             f" train, within each quartile of latency ratio as well:", "",
             "| heal | latency quartile | configurations | " + " | ".join(f"τ {f} steps" for f in fidelities)
             + " | τ seed 0 vs 1 (full) |", "|---" * (len(fidelities) + 4) + "|"]
    for row in task["rank_agreement"]:
        lines.append(f"| {row['heal']} | {row['latency']} | {row['n']} | "
                     + " | ".join(_tau(row.get(str(f))) for f in fidelities) + f" | {_tau(row['seeds'])} |")
    return lines + [""]


# ---- the command -------------------------------------------------------------------------------------------


def _arm_name(text: str) -> str:
    try:
        find_arm(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pool", nargs="+", required=True, metavar="FILE",
                        help="pool files (`autoprune bench pool` writes them), one per task")
    parser.add_argument("--arms", nargs="+", type=_arm_name, default=list(ARMS), metavar="ARM",
                        help=f"default: all ({', '.join(ARMS)}); also SAMPLER+halving:F,F,… for other rungs")
    parser.add_argument("--seeds", type=positive_int, default=20, help="seeds per arm (default 20)")
    parser.add_argument("--concurrency", type=positive_int, default=1, help="trials at once (default 1)")
    parser.add_argument("--cap-steps", type=positive_int, default=None,
                        help=f"each run's healing steps (default {CAP_TRIALS} × the pool's full budget)")
    parser.add_argument("--workers", type=positive_int, default=None, help="processes (default: one per core)")
    parser.add_argument("--json", dest="json_path", required=True, help="where the results go")


def main_replay(args) -> int:
    results = run([Path(p) for p in args.pool], arms=args.arms, seeds=args.seeds, concurrency=args.concurrency,
                  out=Path(args.json_path), cap_steps=args.cap_steps, workers=args.workers, echo=print)
    print()
    print(page(results))
    return 0
