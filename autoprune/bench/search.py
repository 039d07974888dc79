"""`autoprune bench search`: how many trials a search needs to find the front, sampler by sampler.

Each *arm* is a real search (local Ray, Optuna, MLflow in a scratch folder) on the demo's space: Optuna's samplers
(random search, TPE as Optuna sets it up, TPE for small budgets, the GP sampler) and a grid over uniform sparsity ×
method (one healing configuration). Every arm runs on every task for several seeds; a seed changes the sampler, the
data subsets, the dense model and the trials' own seeds, so an arm is compared with the others of the same seed.

What is measured per run, in the order Tune created its trials: the hypervolume of the first n trials, with one
reference point per task (its accuracy floor, and the dense model's latency: the median over the task's runs), so
that runs compare; the trials and healing steps it took to reach 95% of the best hypervolume any run of that seed
found; and how many trials were spent on configurations that could not join the front (not faster than the dense
model: masks, or 2:4 without sparse kernels, on this device). Runs are kept in the JSON file as they finish, and a
second call with the same file runs only the cells missing from it.

Tasks: the demo's (digits) and real Fashion-MNIST through `data.source: torchvision`, read from Debian's
`dataset-fashion-mnist` files; without them the benchmark says how to get them and runs the reference task only.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

from autoprune.argtypes import non_negative_int, positive_int
from autoprune.bench import FASHION_HOWTO, demo_spec, fashion_mnist_data, fashion_mnist_present, record
from autoprune.pareto import hypervolume_2d

# task → (what it changes in the demo's spec, the accuracy floor of its hypervolume's reference point)
TASKS: dict[str, tuple[dict, float]] = {
    "reference": ({}, 0.85),
    # 4,096 training images (the calibration budget is what a search reads), 2,000 test images
    "fashion-mnist": ({"data": fashion_mnist_data(), "heal": {"calibration_images": 4096}}, 0.65),
}
SAMPLERS = ("random", "tpe", "tpe_grouped", "gp")
HALVING = "+halving"  # an arm `SAMPLER+halving` heals its trials in rungs (search.halving: true)
OLD = "-old"  # an arm `SAMPLER-old` samples the healing budget as a dimension (space.heal.budget: searched)
ARMS = (*SAMPLERS, "grid", *(f"{sampler}{HALVING}" for sampler in SAMPLERS[1:]), "tpe_grouped-old", "gp-old")
DEFAULT_ARMS = (*SAMPLERS, "grid")
TRIALS = 24  # the budget every arm is held to…
RANDOM_TRIALS = 72  # …and random search's long run (its first 24 trials are its 24-trial run: it samples blindly)
CHECKPOINTS = (8, 12, 16, 24, 48, 72)
GRID_HEAL = "distill"  # the grid heals every point alike: this method, at the middle of the spec's budget
NEAR_BEST = 0.95


def arm_spec(task: str, arm: str, seed: int, trials: int, concurrency: int | None = None) -> dict:
    """The demo's spec as this arm runs it on `task` (`concurrency` trials at once; default: the demo's)."""
    raw = demo_spec()
    changes, _ = TASKS[task]
    raw["name"] = f"bench-search-{task}-{arm}-{seed}"
    raw["data"] = {**raw["data"], **changes.get("data", {})}
    raw["space"]["heal"] = {**raw["space"]["heal"], **changes.get("heal", {})}
    if arm.endswith(OLD):  # the space before the budget was a fidelity: steps and images sampled
        full = raw["space"]["heal"]
        raw["space"]["heal"] = {**full, "budget": "searched", "steps": {"low": 20, "high": full["steps"], "log": True},
                                "calibration_images": [full["calibration_images"] // 4, full["calibration_images"]]}
    sampler = arm.removesuffix(HALVING).removesuffix(OLD)
    raw["search"] = {**raw["search"], "trials": trials, "seed": seed, "halving": arm.endswith(HALVING),
                     "sampler": "random" if arm == "grid" else sampler,
                     **({"concurrency": concurrency} if concurrency else {})}
    raw["mlflow"] = {"experiment": f"bench-search-{task}", "registered_model": f"bench-search-{task}"}
    return raw


def grid_points(space, trials: int) -> list[dict]:
    """Uniform sparsity × method, about `trials` points: every method that removes structure (on a CPU the search
    leaves the others out: they cannot be faster than the dense model) at evenly spaced values of the spec's
    range, on its step; each healed by GRID_HEAL with the full budget, at the middle of the learning rates."""
    from autoprune import prune
    from autoprune.config import Choice, Fixed, Range

    spec = space.spec
    methods = [m for m in spec.prune.methods if prune.get(m).structured and prune.get(m).uses_sparsity]
    count = max(2, trials // max(1, len(methods)))
    low, high, step = spec.prune.sparsity.low, spec.prune.sparsity.high, spec.prune.sparsity.step or 0.0
    values = [low + (high - low) * k / (count - 1) for k in range(count)]
    values = list(dict.fromkeys(round(low + round((v - low) / step) * step, 6) if step else v for v in values))

    def middle(dimension):
        if isinstance(dimension, Choice):
            return max(dimension.values)
        if isinstance(dimension, Range):
            value = math.sqrt(dimension.low * dimension.high) if dimension.log else (dimension.low + dimension.high) / 2
            return int(round(value)) if isinstance(dimension.low, int) else value
        return dimension.value

    heal = {"heal.method": GRID_HEAL, **{f"heal.{key}": middle(getattr(spec.heal, key))
                                         for key in ("calibration_images", "steps", "lr")
                                         if not isinstance(getattr(spec.heal, key), Fixed)}}
    return [{"prune.method": m, **dict.fromkeys(space.sparsity_parameters(), s), **heal}
            for m in methods for s in values]


def run_arm(task: str, arm: str, seed: int, trials: int, workdir: Path, concurrency: int | None = None) -> dict:
    """One search; the trials as the benchmark reads them, in the order Tune created them."""
    from autoprune.driver.search import search
    from autoprune.models import layer_groups
    from autoprune.space.define import SearchSpace
    from autoprune.space.load import parse_spec

    spec = parse_spec(arm_spec(task, arm, seed, trials, concurrency))
    points = []
    if arm == "grid":
        from autoprune.driver.prepare import model_source

        points = grid_points(SearchSpace(spec, layer_groups(model_source(spec.model).create())), trials)
        spec = parse_spec(arm_spec(task, arm, seed, len(points), concurrency))
    started = time.perf_counter()
    outcome = search(spec, workdir=workdir, echo=None, first_points=points)
    rows = []
    for trial in outcome.records:
        result = trial.result
        if result is None:
            rows.append({"failed": True})
            continue
        config = result.config
        rows.append({"method": config.prune.method, "heal": config.heal.method, "sparsity": result.sparsity,
                     "accuracy": result.accuracy, "latency_ms": result.latency.median_ms, "stopped": result.stopped,
                     "steps": result.healing_steps, "rungs": [list(rung) for rung in result.rungs]})
    return {"task": task, "arm": arm, "seed": seed, "concurrency": spec.search.concurrency,
            "wall_s": time.perf_counter() - started,
            "dense_accuracy": outcome.dense.accuracy, "dense_latency_ms": outcome.dense.latency.median_ms,
            "device": outcome.dense.latency.device, "trials": rows}


def hypervolume(rows: list[dict], reference: tuple[float, float]) -> float:
    done = [r for r in rows if r.get("accuracy") is not None]
    return hypervolume_2d([r["accuracy"] for r in done], [r["latency_ms"] for r in done], reference=reference)


def summarise(runs: list[dict]) -> dict:
    """Per task: the reference point, and per arm the hypervolume curve (mean, std over seeds), the trials and
    healing steps to reach 95% of the seed's best hypervolume, and the trials that could not join the front."""
    tasks: dict = {}
    for key in dict.fromkeys((run["task"], run.get("concurrency")) for run in runs):
        task, concurrency = key
        of_task = [run for run in runs if (run["task"], run.get("concurrency")) == key]
        reference = (TASKS[task][1], statistics.median(run["dense_latency_ms"] for run in of_task))
        best = {seed: max(hypervolume(run["trials"], reference) for run in of_task if run["seed"] == seed)
                for seed in {run["seed"] for run in of_task}}
        arms = {}
        for arm in [a for a in ARMS if any(run["arm"] == a for run in of_task)]:
            of_arm = [run for run in of_task if run["arm"] == arm]
            curve = {}
            for n in CHECKPOINTS:
                values = [hypervolume(run["trials"][:n], reference) for run in of_arm if len(run["trials"]) >= n]
                if len(values) == len(of_arm):
                    curve[n] = (statistics.mean(values), statistics.pstdev(values))
            reached = [_to_reach(run["trials"], NEAR_BEST * best[run["seed"]], reference) for run in of_arm]
            trials = [len(run["trials"]) for run in of_arm]
            cannot = sum(sum(1 for r in run["trials"] if "not faster" in r.get("stopped", "")) for run in of_arm)
            arms[arm] = {
                "seeds": len(of_arm), "trials": statistics.mean(trials), "curve": curve,
                "final": statistics.mean(hypervolume(run["trials"], reference) for run in of_arm),
                "reached": sum(1 for r in reached if r is not None),
                "trials_to_95": _mean_of([r[0] for r in reached if r is not None]),
                "steps_to_95": _mean_of([r[1] for r in reached if r is not None]),
                "cannot_join_share": cannot / max(1, sum(trials)),
                "steps": statistics.mean(sum(r.get("steps", 0) for r in run["trials"]) for run in of_arm),
                "failed": sum(sum(1 for r in run["trials"] if r.get("failed")) for run in of_arm),
                "wall_s": statistics.mean(run["wall_s"] for run in of_arm),
                # the end's hypervolume against each baseline of the same seed: (median difference, wins, pairs)
                "paired": {baseline: _paired(of_arm, [run for run in of_task if run["arm"] == baseline], reference)
                           for baseline in PAIRED_WITH if baseline != arm},
            }
        label = task if concurrency is None else f"{task}, {concurrency} at once"
        tasks[label] = {"reference": reference, "dense_accuracy": statistics.mean(r["dense_accuracy"] for r in of_task),
                        "device": of_task[0]["device"], "arms": arms}
    return tasks


PAIRED_WITH = ("random", "grid")


def _paired(runs: list[dict], baselines: list[dict], reference) -> tuple[float, int, int] | None:
    """The median of this arm's end hypervolume minus the baseline's at the same seed, how many seeds it is above,
    and how many seeds both ran (None: none)."""
    theirs = {run["seed"]: hypervolume(run["trials"], reference) for run in baselines}
    differences = [hypervolume(run["trials"], reference) - theirs[run["seed"]] for run in runs if run["seed"] in theirs]
    if not differences:
        return None
    return statistics.median(differences), sum(1 for d in differences if d > 0), len(differences)


def _to_reach(rows: list[dict], target: float, reference) -> tuple[int, int] | None:
    """(trials, healing steps) until the first n trials' hypervolume reaches `target`; None if it never does."""
    steps = 0
    for n, row in enumerate(rows, start=1):
        steps += row.get("steps", 0)
        if hypervolume(rows[:n], reference) >= target:
            return n, steps
    return None


def _mean_of(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def markdown(summary: dict) -> str:
    lines = []
    for task, found in summary.items():
        floor, latency = found["reference"]
        lines += [f"**{task}** (dense top-1 {found['dense_accuracy']:.3f}; hypervolume reference: accuracy {floor:g},"
                  f" latency {latency:.3f} ms, {found['device']}; mean ± std over seeds)", ""]
        shown = [n for n in CHECKPOINTS if any(n in arm["curve"] for arm in found["arms"].values())]
        lines.append("| arm | seeds | " + " | ".join(f"HV @ {n}" for n in shown)
                     + " | HV at the end | trials to 95% of best | healing steps to 95% | healing steps, all"
                     + " | cannot join the front | failed | wall s | vs random, paired | vs grid, paired |")
        lines.append("|---" * (len(shown) + 11) + "|")
        for name, arm in found["arms"].items():
            cells = [f"{arm['curve'][n][0]:.4f} ± {arm['curve'][n][1]:.4f}" if n in arm["curve"] else "–"
                     for n in shown]
            label = f"grid ({arm['trials']:.0f} points)" if name == "grid" else name
            lines.append(f"| {label} | {arm['seeds']} | " + " | ".join(cells)
                         + f" | {arm['final']:.4f} | {arm['trials_to_95']:.1f} ({arm['reached']}/{arm['seeds']} reach it)"
                         + f" | {arm['steps_to_95']:.0f} | {arm['steps']:.0f} | {arm['cannot_join_share']:.0%}"
                         + f" | {arm['failed']}"
                         + f" | {arm['wall_s']:.0f} | " + " | ".join(_paired_cell(arm.get("paired", {}).get(b))
                                                                   for b in PAIRED_WITH) + " |")
        lines.append("")
    return "\n".join(lines)


def _paired_cell(paired) -> str:
    if not paired:
        return "—"
    median, wins, pairs = paired
    return f"{median:+.4f} (above on {wins}/{pairs} seeds)"


def page(runs: list[dict]) -> str:
    """The documentation page's tables, from the file `--json` keeps."""
    return markdown(summarise(runs))


def run(path: Path, *, tasks: list[str], arms: list[str], seeds: int, workdir: Path, trials: int = TRIALS,
        random_trials: int = RANDOM_TRIALS, busy: int = 0, concurrency: int | None = None,
        echo=print) -> list[dict]:
    """Every (task, arm, seed) missing from the JSON file at `path`, added to it as each finishes; with `busy`,
    beside that many CPU-bound processes (a shared node)."""
    import logging

    import ray

    from autoprune.testing.load import busy_processes

    concurrency = concurrency or demo_spec()["search"]["concurrency"]
    provenance = record.Provenance("search")
    earlier, runs = record.read(path) if path.exists() else (None, [])
    done = {(run["task"], run["arm"], run["seed"], run.get("concurrency")) for run in runs}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)  # a line per search about Tune's files is noise here
    try:
        for task in tasks:
            for seed in range(seeds):
                for arm in arms:
                    if (task, arm, seed, concurrency) in done:
                        continue
                    with busy_processes(busy):
                        run_ = run_arm(task, arm, seed, random_trials if arm == "random" else trials, workdir / task,
                                       concurrency)
                    run_["busy"] = busy
                    runs.append(run_)
                    record.write(path, provenance, runs, earlier=earlier)
                    hv = hypervolume(run_["trials"], (TASKS[task][1], run_["dense_latency_ms"]))
                    echo(f"bench search: {task} {arm} seed {seed}: {len(run_['trials'])} trials in"
                         f" {run_['wall_s']:.0f} s, hypervolume {hv:.4f}")
    finally:
        ray.shutdown()
    return runs


def available_tasks(wanted: list[str], echo=print) -> list[str]:
    if "fashion-mnist" in wanted and not fashion_mnist_present():
        echo(f"bench search: Fashion-MNIST is not here; {FASHION_HOWTO}. Running the reference task only.")
        wanted = [task for task in wanted if task != "fashion-mnist"]
    return wanted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", dest="json_path", required=True,
                        help="the runs, kept as they finish; a second call with the same file adds what is missing")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(DEFAULT_ARMS),
                        help=f"default: {' '.join(DEFAULT_ARMS)}; SAMPLER{HALVING} heals in rungs")
    parser.add_argument("--seeds", type=positive_int, default=5)
    parser.add_argument("--trials", type=positive_int, default=TRIALS, help=f"each arm's budget (default {TRIALS})")
    parser.add_argument("--random-trials", type=non_negative_int, default=RANDOM_TRIALS,
                        help=f"random search's longer run (default {RANDOM_TRIALS})")
    parser.add_argument("--workdir", help="where the searches keep their stores (default: a temporary folder)")
    parser.add_argument("--concurrency", type=positive_int,
                        help="trials at once (default: the demo's; Ray runs as many as the machine's CPUs allow)")
    parser.add_argument("--busy", type=non_negative_int, default=0,
                        help="run every search beside this many CPU-bound processes (a shared node; default 0)")


def main_search(args) -> int:
    path = Path(args.json_path).resolve()
    tasks = available_tasks(args.tasks)
    with tempfile.TemporaryDirectory(prefix="autoprune-bench-search-") as scratch:
        runs = run(path, tasks=tasks, arms=args.arms, seeds=args.seeds, workdir=Path(args.workdir or scratch),
                   trials=args.trials, random_trials=args.random_trials, busy=args.busy,
                   concurrency=args.concurrency)
    print()
    print(markdown(summarise([r for r in runs if r["task"] in tasks])))
    return 0
