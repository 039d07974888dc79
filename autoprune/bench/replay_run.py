"""`autoprune bench replay`'s arms and one replayed search: where trials come from (an Optuna sampler, the grid),
what each costs stage by stage, halving's rungs, and concurrency simulated in time."""

from __future__ import annotations


import heapq
import itertools
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence


from autoprune.bench.replay_pool import (CAP_TRIALS, DEFAULT_RUNGS, MAX_TRIALS_PER_CAP_TRIAL, ZERO_SHOT_RUNGS, _Task,
                                         accuracy_after, accuracy_at)
from autoprune.bench.replay_measure import _Front, summarise_run


# ---- arms --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    """A search strategy: what it is, and the function that makes its source of trials for one run."""

    text: str
    source: Callable[["_Task", int, int], "_Source"]  # (task, seed, trials the cap pays for) → where trials come from
    rungs: tuple[float, ...] | None = None  # successive halving's rungs (fractions of the full budget); None: none
    # fixed: every trial heals the full budget; searched: the sampler draws its steps; macs: fixed, and the sparsity
    # chosen by cost (replay_macs.py)
    budget: str = "fixed"


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
    for sampler in ("random", "tpe", "tpe_grouped", "gp"):
        arms[f"{sampler}+macs"] = _sampler_arm(f"{sampler}, sparsity chosen by cost (a MACs reduction and a shape"
                                               " over depth; the scale solved)", sampler, budget="macs")
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


# ---- where trials come from --------------------------------------------------------------------------------


class _Source:
    """A run's trials: `ask` → (handle, Optuna parameters, pool index or None), `tell` its outcome."""

    def ask(self) -> tuple[Any, dict, int | None]:
        raise NotImplementedError

    def tell(self, handle: Any, values: tuple[float, float] | None) -> None:
        """`values` (accuracy, latency ratio), or None: stopped at a rung (Optuna: pruned)."""


class _OptunaSource(_Source):
    def __init__(self, study, space, translate: Callable[[dict], dict] | None = None) -> None:
        self.study, self.space, self.translate = study, space, translate

    @classmethod
    def make(cls, task: _Task, seed: int, trials: int, *, sampler: str, space: str) -> "_OptunaSource":
        import optuna

        from autoprune.driver.sampling import COARSE_START, make_sampler

        if space not in task.spaces:
            raise ValueError(f"the pool's space has no {space!r} form (a `macs` arm needs a pool over depth knots)")
        chosen = task.spaces[space]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study = optuna.create_study(directions=["maximize", "minimize"],
                                        sampler=make_sampler(sampler, seed, trials=trials))
        if sampler in COARSE_START:  # as the live search starts them (driver/sampling.py)
            for point in chosen.coarse_start(trials):
                study.enqueue_trial(point, skip_if_exists=False)
        return cls(study, chosen, task.solver.to_knots if space == "macs" else None)

    def ask(self):
        trial = self.study.ask()
        self.space.define(trial)
        params = dict(trial.params)
        return trial, self.translate(params) if self.translate else params, None

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


