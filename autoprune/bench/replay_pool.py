"""`autoprune bench replay`'s pool as one process reads it: its space, the lookup of a sampler's point, the
accuracy of a configuration at a fidelity. The constants every part of the replay shares live here, at the bottom
of its imports."""

from __future__ import annotations


import copy
import json
import math
import statistics
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

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


# ---- the pool, as one process reads it ---------------------------------------------------------------------


@dataclass
class _Task:
    """A pool with what every run over it needs: both spaces, the lookup, the reference point and the caps."""

    pool: dict
    full: int  # healing steps of the full budget
    fidelities: tuple[int, ...]
    # the budget "fixed" (today's space) or "searched", or "macs" (fixed, sparsity chosen by cost) → SearchSpace
    spaces: dict
    lookup: "_Lookup"
    reference: tuple[float, float]
    pooled_hv: float
    solver: Any = None  # the "macs" space's reduction and shape → the pool's knots (replay_macs.py); None: no such space

    @classmethod
    def of(cls, pool: dict) -> "_Task":
        from autoprune.bench.replay_macs import KnotSolver

        full = int(pool["budget"]["steps"])
        spaces = {budget: _space(pool["spec"], pool["budget"], budget_mode=budget) for budget in ("fixed", "searched")}
        sparsity = spaces["fixed"].spec.prune.sparsity
        solver = None
        if sparsity.mode == "depth":  # a pool over knots can answer a shape over the same knots
            spaces["macs"] = _space(pool["spec"], pool["budget"], budget_mode="fixed", sparsity_mode="macs")
            solver = KnotSolver(pool["configs"], sparsity.knots, sparsity.low, sparsity.high)
        return cls(pool, full, tuple(sorted(int(f) for f in pool["fidelities"])), spaces,
                   _Lookup(pool["configs"], _dimensions(spaces["fixed"])), reference_point(pool),
                   pooled_hypervolume(pool), solver)

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


def _space(doc: Mapping, budget: Mapping, *, budget_mode: str, sparsity_mode: str | None = None):
    """The SearchSpace over the pool's spec: the budget fixed at the pool's full budget (today's space), or its
    steps sampled from OLD_STEPS_LOW to the full budget, log-uniformly (the space before the budget became the
    fidelity: `space.heal.budget: searched`); `sparsity_mode` replaces the spec's (macs: chosen by cost)."""
    from autoprune.space.define import SearchSpace
    from autoprune.space.load import parse_spec

    doc = copy.deepcopy(dict(doc))
    heal_space = doc["space"]["heal"]
    full = int(budget["steps"])
    heal_space["budget"] = budget_mode
    if sparsity_mode is not None:
        doc["space"]["prune"]["sparsity"]["mode"] = sparsity_mode
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


# ---- the pool's front ---------------------------------------------------------------------------------


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
