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
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence


from autoprune.argtypes import positive_int
from autoprune.bench import record
from autoprune.bench.replay_pool import BASELINES, CAP_TRIALS, MAX_TRIALS_PER_CAP_TRIAL, TARGETS
from autoprune.bench.replay_run import ARMS, find_arm, replay
from autoprune.bench.replay_stats import summarise_task
# the replay's public names, in one place (tests and notebooks read them from here)
from autoprune.bench.replay_measure import cost_to_reach  # noqa: F401
from autoprune.bench.replay_pool import accuracy_after, normalised_hypervolume, pooled_points  # noqa: F401
from autoprune.bench.replay_run import lookup  # noqa: F401
from autoprune.bench.replay_stats import paired_comparison, rank_agreement  # noqa: F401


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
                 f" at the cap ({one['wall_s']:.1f} s, {one['cpu_s']:.1f} s of CPU)")

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
    by_arm: dict[str, dict[int, float]] = {}
    for run in task["runs"]:
        by_arm.setdefault(run["arm"], {})[run["seed"]] = run["summary"]["hv_at_steps_cap"]
    baselines = [b for b in (*BASELINES, "tpe_grouped", "grid") if b in by_arm]  # and today's default
    variants = any("+" in arm and arm.split("+")[0] in by_arm for arm in by_arm)
    lines = ["Hypervolume at equal cost (the steps cap), paired by seed: the median difference from each baseline"
             " (above 0: this arm's front is better) and Wilcoxon's p"
             + ("; an arm `X+…` also against `X`, the same sampler without what it adds" if variants else "") + ".", "",
             "| " + " | ".join(["arm", *(f"vs {b}" for b in baselines), *(["vs X"] if variants else [])]) + " |",
             "|---" * (len(baselines) + 1 + variants) + "|"]
    for arm, values in by_arm.items():
        cells = ["—" if arm == baseline else _paired(values, by_arm[baseline]) for baseline in baselines]
        if variants:
            base = arm.split("+")[0] if "+" in arm else ""
            cells.append(f"{_paired(values, by_arm[base])} ({base})" if base in by_arm else "—")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines + [""]


def _paired(values: Mapping[int, float], baseline: Mapping[int, float]) -> str:
    """The median paired difference and Wilcoxon's p over the seeds both have ("—" with fewer than two)."""
    from scipy.stats import wilcoxon

    seeds = sorted(set(values) & set(baseline))
    differences = [values[seed] - baseline[seed] for seed in seeds]
    if len(seeds) < 2:
        return "—"
    p = float(wilcoxon(differences).pvalue) if any(differences) else 1.0
    return f"{statistics.median(differences):+.3f}, p {p:.2g}"


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

