"""`autoprune bench replay` across seeds: medians and quartiles, paired Wilcoxon tests and bootstrap ratios
against the baselines, and how well each rung ranks configurations as the full budget does."""

from __future__ import annotations


import math
import statistics
import warnings
from typing import Mapping, Sequence

import numpy as np

from autoprune.bench.replay_pool import (BASELINES, BOOTSTRAP, BOOTSTRAP_SEED, TARGETS, normalised_hypervolume,
                                         pooled_points)
from autoprune.bench.replay_run import _task


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


