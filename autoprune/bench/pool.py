"""`autoprune bench pool`: a table of configurations of a search's space, each evaluated once and for all at every
rung, so that search strategies can be replayed against it for many seeds in minutes (`autoprune bench replay`).

A live search is one sample of a strategy: comparing strategies on live searches needs tens of paired seeds per
strategy, hours each. Most of what a strategy decides is *which* configurations to evaluate and *how far* to heal
each; the evaluations themselves can be made once. So this bench evaluates a pool of configurations spread over
the space — a scrambled Halton design (quasi-random: it covers the space evenly at any size) plus the grid of
uniform sparsities a user would try first — each with the real trial pipeline (`run_trial`: prune, time paired
with the dense model, heal, evaluate), at two healing seeds, recording:

- the paired latency ratio (the trial's latency ÷ the dense model's, on the same worker) and whether the search's
  stop rule would stop it unhealed (not faster than the dense model);
- its top-1 at every fidelity: 0 steps (BatchNorm re-estimated, no training), the rungs at 1/27, 1/9 and 1/3 of the
  full healing budget, and the full budget — each rung on a branch decayed from the continued heal, exactly as
  a search with `search.halving` sees it (a judge that promotes every trial records them all);
- what each stage cost, in seconds (profiling, pruning, an evaluation, a healing step).

Rows are written as they finish, so a stopped run goes on where it was with the same command.
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

from autoprune.argtypes import positive_int
from autoprune.bench import FASHION_HOWTO, demo_spec, fashion_mnist_data, fashion_mnist_present, record
from autoprune.config import Halving

# The fidelities recorded, as fractions of the full budget: the zero-shot rung, three rungs, and the end.
FRACTIONS = (0.0, 1 / 27, 1 / 9, 1 / 3)
SEEDS = (0, 1)  # healing seeds (each a trial seed: its calibration subset and batches)
DESIGN_POINTS = 300
GRID_SPARSITIES = 12
GRID_HEAL = "distill"


def task_spec(task: str) -> dict:
    """The demo's spec as the pool evaluates it on `task` (a raw document, as YAML gives)."""
    raw = demo_spec()
    raw["name"] = f"bench-pool-{task}"
    if task == "fashion-mnist":
        raw["data"] = fashion_mnist_data()
        # Fashion-MNIST's budget reads 4,096 training images (the reference task has 1,437 in all)
        raw["space"]["heal"]["calibration_images"] = 4096
    return raw


TASKS = ("reference", "fashion-mnist")


class _Everyone:
    """A rung judge that records and promotes every trial: the pool wants every rung of every configuration."""

    def __init__(self, halving: Halving) -> None:
        self.halving = halving

    def promote(self, fraction: float, accuracy: float, latency_ms: float) -> bool:
        return True


def design(space, count: int, *, seed: int = 0) -> list[dict]:
    """`count` points of a scrambled Halton sequence over the space's parameters (as Optuna's distributions
    define them: categorical, float on a step or log-scaled), as Optuna parameters."""
    import optuna
    from scipy.stats import qmc

    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    probe = study.ask()
    space.define(probe)
    distributions = dict(sorted(probe.distributions.items()))
    sequence = qmc.Halton(d=len(distributions), scramble=True, seed=seed).random(count)
    return [{name: _value(distribution, float(u)) for (name, distribution), u in zip(distributions.items(), row)}
            for row in sequence]


def _value(distribution, u: float):
    from optuna.distributions import CategoricalDistribution

    if isinstance(distribution, CategoricalDistribution):
        return distribution.choices[min(int(u * len(distribution.choices)), len(distribution.choices) - 1)]
    low, high = distribution.low, distribution.high
    value = math.exp(math.log(low) + u * (math.log(high) - math.log(low))) if distribution.log else low + u * (high - low)
    if distribution.step:
        value = low + round((value - low) / distribution.step) * distribution.step
    value = min(max(value, low), high)
    return int(round(value)) if isinstance(low, int) and not isinstance(low, bool) else round(value, 10)


def grid(space) -> list[dict]:
    """Uniform sparsity × every method that takes one, healed by GRID_HEAL at the learning rate's geometric middle:
    the configurations a user would try first."""
    from autoprune import prune
    from autoprune.config import Range

    spec = space.spec
    low, high, step = spec.prune.sparsity.low, spec.prune.sparsity.high, spec.prune.sparsity.step
    values = [low + (high - low) * k / (GRID_SPARSITIES - 1) for k in range(GRID_SPARSITIES)]
    values = list(dict.fromkeys(round(low + round((v - low) / step) * step, 6) if step else v for v in values))
    lr = spec.heal.lr
    middle = math.sqrt(lr.low * lr.high) if isinstance(lr, Range) else getattr(lr, "value", None)
    rest = design(space, 1)[0]  # every other parameter (a flat space has them all): a fixed, harmless value
    return [{**rest, "prune.method": method, **dict.fromkeys(space.sparsity_parameters(), s),
             "heal.method": GRID_HEAL, **({"heal.lr": middle} if "heal.lr" in rest else {})}
            for method in spec.prune.methods if prune.get(method).uses_sparsity for s in values]


def prepare(task: str, workdir: Path, say=print):
    """The task's spec (the methods a CPU search would keep), its space, and a trial context with the dense model
    measured as a search measures it."""
    from autoprune.config import HealConfig, PruneConfig, TrialConfig
    from autoprune.driver.prepare import dense_weights, load_data, model_source
    from autoprune.driver.search import _methods_that_can_be_faster, dense_references
    from autoprune.measure.cache import LocalLatencyCache
    from autoprune.models import layer_groups
    from autoprune.space.define import SearchSpace, full_budget
    from autoprune.space.load import parse_spec
    from autoprune.trial import TrialContext, run_trial

    raw = task_spec(task)
    spec = _methods_that_can_be_faster(parse_spec(raw), say)
    raw["space"]["prune"]["methods"] = list(spec.prune.methods)
    source = model_source(spec.model)
    bundle = load_data(spec, cache_dir=workdir / "cache")
    state = dense_weights(spec.model, spec.data, bundle, cache_dir=workdir / "cache", seed=spec.search.seed)
    context = TrialContext(source, state, bundle, spec.profile, latency_cache=LocalLatencyCache(),
                           heal_budget=full_budget(spec), stop_unless_faster=True)
    dense = run_trial(TrialConfig(PruneConfig("none"), HealConfig("none")), context, threads=1)
    context = replace(context, references=dense_references(dense))
    space = SearchSpace(spec, layer_groups(source.create()))
    return raw, spec, space, context, dense


def evaluate(params: dict, space, context, *, seed: int) -> dict:
    """One configuration at one healing seed, through the real trial pipeline with every rung recorded."""
    from autoprune.trial import run_trial

    config = replace(space.to_config(params), seed=seed)
    judge = _Everyone(Halving(rungs=FRACTIONS))
    result = run_trial(config, replace(context, judge=judge), threads=1)
    return {"seed": seed, "result": result}


def row(params: dict, origin: str, space, context, dense, budget: int) -> dict:
    """A pool row: the configuration at every healing seed."""
    from autoprune import heal

    runs = [evaluate(params, space, context, seed=SEEDS[0])]
    first = runs[0]["result"]
    if "not faster" not in first.stopped:  # stopped unhealed, it has no accuracy at any seed
        runs += [evaluate(params, space, context, seed=seed) for seed in SEEDS[1:]]
    not_faster = "not faster" in first.stopped
    trains = heal.get(first.config.heal.method).trains
    fidelities = [steps for _, steps in _rungs(budget)] + [budget]
    seeds = []
    for run in runs:
        result = run["result"]
        if result.accuracy is None:
            continue
        rungs = dict(result.rungs)
        accuracy = {str(f): (rungs.get(f, result.accuracy_fp32) if trains else result.accuracy) for f in fidelities}
        accuracy[str(budget)] = result.accuracy
        seeds.append({"seed": run["seed"], "accuracy": accuracy, "steps_spent": result.healing_steps,
                      "timings": dict(result.timings)})
    timings = first.timings
    evaluations = (len(first.rungs) + 1) if first.accuracy is not None else 0
    heal_seconds = sum(s["timings"].get("heal", 0.0) for s in seeds)
    steps = sum(s["steps_spent"] for s in seeds)
    return {
        "params": params, "origin": origin, "method": first.config.prune.method, "heal": first.config.heal.method,
        "trains": trains, "not_faster": not_faster, "stopped": first.stopped,
        "latency_ms": first.latency.median_ms, "latency_ratio": first.latency.median_ms / dense.latency.median_ms,
        "speedup": first.latency.speedup, "speedup_low": first.latency.speedup_low,
        "speedup_high": first.latency.speedup_high, "sparsity": first.sparsity, "macs": first.macs,
        "seconds": {"prune": timings.get("prune", 0.0), "profile": timings.get("profile", 0.0),
                    "evaluate": timings.get("evaluate", 0.0) / evaluations if evaluations else 0.0,
                    "heal_step": heal_seconds / steps if steps else 0.0},
        "seeds": seeds,
    }


def _rungs(budget: int) -> list[tuple[float, int]]:
    from autoprune.halving import rungs_of

    return rungs_of(budget, FRACTIONS)


def build(path: Path, *, task: str, points: int, workdir: Path, say=print) -> dict:
    """The pool of `task` at `path`, its missing rows evaluated and written one by one."""
    from autoprune.space.define import full_budget

    provenance = record.Provenance("pool")
    earlier, pool = record.read(path) if path.exists() else (None, None)
    raw, spec, space, context, dense = prepare(task, workdir, say)
    budget = full_budget(spec)
    configs = [(p, "grid") for p in grid(space)] + [(p, "design") for p in design(space, points)]
    if pool is None:
        pool = {"task": task, "spec": raw, "budget": {"steps": budget}, "configs": [],
                "fidelities": [steps for _, steps in _rungs(budget)] + [budget]}
    pool["dense"] = {"accuracy": dense.accuracy, "latency_ms": dense.latency.median_ms,
                     "device": dense.latency.device}
    done = len(pool["configs"])
    started = time.perf_counter()
    for index, (params, origin) in enumerate(configs[done:], start=done):
        pool["configs"].append(row(params, origin, space, context, dense, budget))
        record.write(path, provenance, pool, earlier=earlier)
        elapsed = time.perf_counter() - started
        left = elapsed / (index + 1 - done) * (len(configs) - index - 1)
        last = pool["configs"][-1]
        top1 = last["seeds"][0]["accuracy"][str(budget)] if last["seeds"] else None
        say(f"bench pool: {task} {index + 1}/{len(configs)} {last['method']}+{last['heal']}"
            f" ratio {last['latency_ratio']:.2f} top-1 {top1 if top1 is None else round(top1, 4)}"
            f" ({record.duration(elapsed)}, ~{record.duration(left)} left)")
    return pool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=TASKS, default="reference")
    parser.add_argument("--points", type=positive_int, default=DESIGN_POINTS,
                        help=f"configurations of the quasi-random design, besides the grid (default {DESIGN_POINTS})")
    parser.add_argument("--json", dest="json_path", required=True,
                        help="the pool, kept as rows finish; the same command again goes on where it stopped")
    parser.add_argument("--workdir", help="where the dense model and data are cached (default: a temporary folder)")


def main_pool(args) -> int:
    if args.task == "fashion-mnist" and not fashion_mnist_present():
        print(f"bench pool: Fashion-MNIST is not here; {FASHION_HOWTO}.")
        return 2
    random.seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with tempfile.TemporaryDirectory(prefix="autoprune-bench-pool-") as scratch:
            build(Path(args.json_path).resolve(), task=args.task, points=args.points,
                  workdir=Path(args.workdir or scratch))
    return 0


def page(pool) -> str:
    """What a pool holds: its configurations by method pair, how many the stop rule stopped unhealed, and each
    pair's best top-1 at the full budget (the replay's page says what strategies make of it)."""
    budget = str(pool["fidelities"][-1])
    pairs: dict[tuple[str, str], list[dict]] = {}
    for config in pool["configs"]:
        pairs.setdefault((config["method"], config["heal"]), []).append(config)
    lines = [f"**{pool['task']}**: {len(pool['configs'])} configurations, dense top-1"
             f" {pool['dense']['accuracy']:.3f}, full budget {budget} steps", "",
             "| pruning | healing | configurations | not faster | best top-1 (either seed) | latency ratio of the best |",
             "|---|---|---|---|---|---|"]
    for (method, healing), configs in sorted(pairs.items()):
        scored = [(max(s["accuracy"][budget] for s in c["seeds"]), c["latency_ratio"]) for c in configs if c["seeds"]]
        best = max(scored, default=None)
        lines.append(f"| {method} | {healing} | {len(configs)} | {sum(c['not_faster'] for c in configs)} |"
                     f" {'–' if best is None else f'{best[0]:.4f}'} | {'–' if best is None else f'{best[1]:.2f}'} |")
    return "\n".join(lines) + "\n"
