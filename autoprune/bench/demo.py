"""`autoprune bench demo`: the embedded demo as a first-time user meets it — its search run in a fresh work
directory (the dense model not yet cached: it is trained once), then again in the same directory (cached) — and
where each run's time went, what it timed and stopped, and the front it registered."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from autoprune.argtypes import positive_int
from autoprune.bench import record


def _model(result) -> dict:
    latency = result.latency
    return {"method": result.config.prune.method, "heal": result.config.heal.method, "sparsity": result.sparsity,
            "accuracy": result.accuracy, "latency_ms": latency.median_ms, "speedup": latency.speedup,
            "speedup_low": latency.speedup_low, "speedup_high": latency.speedup_high}


def run_once(workdir: Path, index: int) -> dict:
    from importlib import resources

    from autoprune.driver.search import search

    with resources.as_file(resources.files("autoprune.search_spaces") / "demo.yaml") as path:
        return summarise(search(path, workdir=workdir), index)


def summarise(outcome, index: int) -> dict:
    """A finished search (`SearchOutcome`) as one row: the `index`-th in its work directory."""
    done = [r.result for r in outcome.records if r.result is not None]
    a = outcome.accounting
    return {
        "run": index + 1, "dense_cached": index > 0, "wall_s": outcome.wall_seconds, "setup_s": a["setup_s"],
        "trials_s": a["tune_wall_s"], "work_share": 1 - a["overhead_share"], "trials": len(outcome.records),
        "failed": len(outcome.failed), "stopped_not_faster": sum(r.stopped.startswith("not faster") for r in done),
        "stopped_other": sum(bool(r.stopped) and not r.stopped.startswith("not faster") for r in done),
        "structures_timed": int(a["latency_measured"]), "latency_reused": int(a["latency_reused"]),
        "methods": sorted({r.config.prune.method for r in done}),
        "sampler": outcome.spec.search.sampler,
        "dense": {"accuracy": outcome.dense.accuracy, "latency_ms": outcome.dense.latency.median_ms,
                  "device": outcome.dense.latency.device, "batch_size": outcome.dense.latency.batch_size,
                  "dtype": outcome.dense.latency.dtype, "eval_images": outcome.spec.data.eval_images},
        "front": [_model(r.result) for r in outcome.front],  # fastest first
    }


def run(root: Path, *, runs: int, echo=print) -> list[dict]:
    rows = []
    for index in range(runs):
        echo(f"bench demo: search {index + 1} of {runs}" + (" (the dense model is cached now)" if index else
                                                          " (a fresh work directory: the dense model is trained)"))
        rows.append(run_once(root, index))
    return rows


def _model_text(model: dict) -> str:
    return (f"{model['method']} + {model['heal']} ({model['sparsity']:.0%}) **{model['accuracy']:.3f} @"
            f" {model['latency_ms']:.2f} ms** ({model['speedup']:.2f}×, {model['speedup_low']:.2f}–"
            f"{model['speedup_high']:.2f})")


def markdown(rows: list[dict]) -> str:
    first = rows[0]
    dense = first["dense"]
    held_out = f"{dense['eval_images']} held-out images" if dense["eval_images"] else "the held-out images"
    lines = [f"Dense model: top-1 on {held_out}; latency per batch of"
             f" {dense['batch_size']}, {dense['dtype']}, {dense['device']}, in each search's final pass (the"
             f" registered numbers). Sampler: `{first['sampler']}`. A front model reads: method + healing (share of"
             " the prunable weights removed) top-1 @ latency (speedup against the dense model, 95% interval).", "",
             "| search | dense model | wall s | setup s | trials s | trial slots working | trials (failed, stopped as"
             " not faster, stopped at a rung) | structures timed (reused) | dense top-1 @ ms | front | fastest on"
             " the front | most accurate on the front |", "|---|---|---:|---:|---:|---:|---|---|---|---:|---|---|"]
    for row in rows:
        front = row["front"]
        fastest = _model_text(front[0]) if front else "—"
        accurate = _model_text(max(front, key=lambda m: m["accuracy"])) if front else "—"
        lines.append(
            f"| {row['run']} | {'cached' if row['dense_cached'] else 'trained'} | {row['wall_s']:.0f} |"
            f" {row['setup_s']:.0f} | {row['trials_s']:.0f} | {row['work_share']:.0%} | {row['trials']}"
            f" ({row['failed']}, {row['stopped_not_faster']}, {row['stopped_other']}) | {row['structures_timed']}"
            f" ({row['latency_reused']}) | {row['dense']['accuracy']:.3f} @ {row['dense']['latency_ms']:.2f} |"
            f" {len(front)} | {fastest} | {accurate} |")
    dense_ms = [row["dense"]["latency_ms"] for row in rows]
    if len(rows) > 1:
        lines += ["", f"The dense latency registered by the {len(rows)} searches: {min(dense_ms):.2f}–"
                      f"{max(dense_ms):.2f} ms ({max(dense_ms) / min(dense_ms) - 1:.0%} apart)."]
    methods = sorted({m for row in rows for m in row["methods"]})
    lines += ["", f"Methods the trials ran: {', '.join(methods)}."]
    return "\n".join(lines)


page = markdown


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=positive_int, default=3,
                        help="searches in one work directory: the first trains the dense model (default 3)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write every run here")


def main_demo(args) -> int:
    provenance = record.Provenance("demo")
    with tempfile.TemporaryDirectory(prefix="autoprune-bench-demo-") as folder:
        rows = run(Path(folder), runs=args.runs)
    if args.json_path:
        record.write(args.json_path, provenance, rows)
    print()
    print(markdown(rows))
    return 0
