"""`autoprune bench schedule`: does healing on the warm-up–stable–decay schedule (which lets rungs continue) lose
accuracy against the warm-up–cosine schedule it replaced, at the full budget?

The same configurations of the demo's space (structured and VBP at two sparsities, each healing method that
trains, one learning rate), each healed both ways at the same trial seeds, so every difference is paired: the
table gives the differences' mean and median, how often each schedule won, and a Wilcoxon signed-rank test.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

from autoprune.bench import record

SPARSITIES = (0.5, 0.8)
HEALS = ("finetune", "distill", "align")
SEEDS = (0, 1)
LR = 1e-3


def measure(workdir: Path, *, decay: float, say=print) -> list[dict]:
    """Each configuration healed on both schedules, paired by seed; a row each."""
    from autoprune.bench import pool
    from autoprune.heal import base
    from autoprune.train.loop import WarmupStableDecay, warmup_cosine
    from autoprune.trial import run_trial

    _, spec, space, context, _ = pool.prepare("reference", workdir, say)
    schedules = {"wsd": lambda steps: WarmupStableDecay(steps, decay=decay), "cosine": warmup_cosine}
    original, rows = base.schedule, []
    try:
        for method in spec.prune.methods:
            for heal in HEALS:
                for sparsity in SPARSITIES:
                    params = {**pool.design(space, 1)[0], "prune.method": method, "heal.method": heal,
                              "heal.lr": LR, **dict.fromkeys(space.sparsity_parameters(), sparsity)}
                    for seed in SEEDS:
                        config = replace(space.to_config(params), seed=seed)
                        top1 = {}
                        for name, schedule in schedules.items():
                            base.schedule = schedule
                            top1[name] = run_trial(config, context, threads=1).accuracy
                        rows.append({"method": method, "heal": heal, "sparsity": sparsity, "seed": seed, **top1})
                        say(f"bench schedule: {method}+{heal} {sparsity}: wsd {top1['wsd']:.4f},"
                            f" cosine {top1['cosine']:.4f}")
    finally:
        base.schedule = original
    return rows


def markdown(results: dict) -> str:
    from scipy.stats import wilcoxon

    rows, decay = results["rows"], results["decay"]
    differences = [row["wsd"] - row["cosine"] for row in rows]
    test = wilcoxon(differences) if any(differences) else None
    return "\n".join([
        "| decay | pairs | WSD − cosine, mean | median | WSD better | cosine better | Wilcoxon p |",
        "|---|---|---|---|---|---|---|",
        f"| last {decay:.0%} of the steps | {len(rows)} | {statistics.mean(differences):+.4f} |"
        f" {statistics.median(differences):+.4f} | {sum(d > 0 for d in differences)} |"
        f" {sum(d < 0 for d in differences)} | {test.pvalue:.3f} |" if test else "| – |",
    ])


def page(results) -> str:
    return markdown(results)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decay", type=float, default=0.2,
                        help="the share of the steps the stable–decay schedule decays over (default 0.2)")
    parser.add_argument("--json", dest="json_path", help="keep the rows (and where they came from) in this file")
    parser.add_argument("--workdir", help="where the dense model and data are cached (default: a temporary folder)")


def main_schedule(args) -> int:
    provenance = record.Provenance("schedule")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with tempfile.TemporaryDirectory(prefix="autoprune-bench-schedule-") as scratch:
            rows = measure(Path(args.workdir or scratch), decay=args.decay)
    results = {"decay": args.decay, "rows": rows}
    if args.json_path:
        record.write(Path(args.json_path), provenance, results)
    print(markdown(results))
    return 0
