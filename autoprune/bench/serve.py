"""`autoprune bench serve`: does a registered model run as fast as its registered latency?

A user asks `best` for the most accurate model under X ms and serves what it loads. That model must run at the
latency it was registered with, so it is loaded in the recipe it was timed in (dtype, memory format, kernels,
compile: `measure/prepared.py`). This benchmark checks it end to end on this machine: it runs searches (the demo's ViT
and a small ResNet, whose profile may keep channels-last), and for every registered version of their fronts starts
a fresh Python process that loads the version from the registry (`autoprune.load_model`, as `best(load=True)` and
`autoprune serve` do) and times it on float32 inputs, as a caller would pass them, with the registered batch size
and thread count. It also times the same version loaded without its recipe (eager float32, contiguous), to show
what the recipe is worth here. Each is measured in `ROUNDS` fresh processes, alternately with and without the
recipe, and the median kept: a shared machine's speed drifts between processes, and would otherwise be read as the
recipe's doing. The target: every served latency within 10% of the registered one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from autoprune.argtypes import positive_int
from autoprune.bench import demo_spec, record

CNN_SPEC = {
    "name": "bench-serve-cnn",
    "model": {"name": "resnet18", "num_classes": 10, "train_steps": 300,
              "kwargs": {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]}},
    "data": {"source": "reference"},
    "profile": {"batch_size": 32, "warmup": 20, "repeats": 50},  # memory_format: auto (both timed, faster kept)
    "search": {"trials": 8, "concurrency": 2, "sampler": "tpe", "seed": 0, "resources": {"cpu": 1}},
    "mlflow": {"experiment": "bench-serve-cnn", "registered_model": "bench-serve-cnn-pruned"},
    "space": {"prune": {"methods": ["structured", "vbp"], "sparsity": {"low": 0.3, "high": 0.9}},
              "heal": {"methods": ["distill", "finetune"], "calibration_images": 256, "steps": [40, 80],
                       "lr": 1e-3, "batch_size": 32, "budget": "searched"}},  # as serve.json was measured
}
TARGET = 0.10  # served latency within 10% of the registered one
ROUNDS = 3  # fresh processes per version and way of loading it


def run(workdir: Path, *, trials: int | None, echo=print) -> list[dict]:
    import ray

    from autoprune.driver.search import search
    from autoprune.space.load import parse_spec
    from autoprune.tracking.select import registered_versions
    from autoprune.tracking.store import Tracker

    plans = []
    for key, raw in (("vit (demo)", demo_spec()), ("resnet", CNN_SPEC)):
        echo(f"bench serve: searching {key}")
        outcome = search(parse_spec(raw), workdir=workdir / raw["name"], trials=trials, echo=None)
        tracker = Tracker(outcome.tracking_uri, outcome.spec.mlflow.experiment)
        trial_of = {run.info.run_id: run.data.tags.get("autoprune.trial_id") for run in
                    tracker.child_runs(outcome.parent_run_id)}
        results = {record.trial_id: record.result for record in outcome.front}
        for version in registered_versions(outcome.spec.mlflow.registered_model, tracking_uri=outcome.tracking_uri):
            result = results.get(trial_of.get(version.run_id))
            if result is not None:  # a version of this search's front
                plans.append((key, version, result, outcome.tracking_uri))
    ray.shutdown()  # the measurements below have the machine to themselves, as the trials had their cores
    rows = []
    for key, version, result, tracking_uri in plans:
        latency = result.latency
        rounds = [(_measure_fresh(version.model_uri, tracking_uri, latency, recipe=True),
                   _measure_fresh(version.model_uri, tracking_uri, latency, recipe=False)) for _ in range(ROUNDS)]
        served = {**rounds[0][0], "median_ms": statistics.median(r[0]["median_ms"] for r in rounds),
                  "spread": max(r[0]["spread"] for r in rounds),
                  "range": [min(r[0]["median_ms"] for r in rounds), max(r[0]["median_ms"] for r in rounds)]}
        plain = {"median_ms": statistics.median(r[1]["median_ms"] for r in rounds)}
        row = {"model": key, "version": version.version, "method": f"{result.config.prune.method}/"
               f"{result.config.heal.method}", "sparsity": result.sparsity, "accuracy": result.accuracy,
               "registered_ms": version.latency_ms, "served_ms": served["median_ms"],
               "ratio": served["median_ms"] / version.latency_ms, "without_recipe_ms": plain["median_ms"],
               "recipe": f"{latency.dtype}, {latency.memory_format}, {latency.format} kernels"
                         + (", compiled" if latency.compiled else ""),
               "served_as": served["ran_as"], "batch_size": latency.batch_size, "threads": latency.threads,
               "device": latency.device, "spread": served["spread"], "served_range_ms": served["range"]}
        rows.append(row)
        echo(f"  {key} v{row['version']} {row['method']}: registered {row['registered_ms']:.3f} ms, served"
             f" {row['served_ms']:.3f} ms ({row['ratio']:.2f}×), without its recipe {row['without_recipe_ms']:.3f} ms")
    return rows


def _measure_fresh(model_uri: str, tracking_uri: str, latency, *, recipe: bool) -> dict:
    """Time the registered model in a new Python process, loaded as a user loads it."""
    command = [sys.executable, "-m", "autoprune.bench.serve", "measure", model_uri, "--tracking-uri", tracking_uri,
               "--batch-size", str(latency.batch_size), "--input-size", *map(str, latency.input_size),
               "--threads", str(latency.threads), "--repeats", str(latency.repeats)]
    if not recipe:
        command.append("--no-recipe")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    if done.returncode != 0:
        raise RuntimeError(f"measuring {model_uri} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args) -> int:
    """In the fresh process: load the version (with or without its recipe) and time it on float32 inputs."""
    import torch

    from autoprune.measure.timing import percentile, time_model
    from autoprune.tracking.select import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model_uri, tracking_uri=args.tracking_uri, recipe=not args.no_recipe)
    parameter = next(model.parameters())
    inputs = torch.randn(args.batch_size, *args.input_size, device=parameter.device)  # float32, as callers pass
    timings = time_model(model, inputs, warmup=10, repeats=args.repeats)
    median = statistics.median(timings)
    conv = next((m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.dim() == 4), None)
    layout = "channels_last" if conv is not None and conv.is_contiguous(memory_format=torch.channels_last) \
        and not conv.is_contiguous() else "contiguous"
    print(json.dumps({"median_ms": median, "spread": (percentile(timings, 0.9) - percentile(timings, 0.1)) / median,
                      "ran_as": f"{str(parameter.dtype).removeprefix('torch.')}, {layout}"}))
    return 0


def markdown(rows: list[dict]) -> str:
    lines = [f"| model | version | method | sparsity | top-1 | recipe | registered ms | served ms (median of {ROUNDS}"
             " fresh processes, range) | served ÷ registered | without recipe ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        low, high = r["served_range_ms"]
        lines.append(f"| {r['model']} | {r['version']} | {r['method']} | {r['sparsity']:.2f} | {r['accuracy']:.3f} |"
                     f" {r['recipe']} | {r['registered_ms']:.3f} | {r['served_ms']:.3f} ({low:.3f}–{high:.3f}) |"
                     f" {r['ratio']:.2f} | {r['without_recipe_ms']:.3f} |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    worst = max(rows, key=lambda r: abs(r["ratio"] - 1))
    within = sum(abs(r["ratio"] - 1) <= TARGET for r in rows)
    return (f"{within} of {len(rows)} served models within {TARGET:.0%} of their registered latency; the furthest:"
            f" {worst['model']} v{worst['version']} at {worst['ratio']:.2f}×"
            f" ({rows[0]['device']}, batch {rows[0]['batch_size']}, {rows[0]['threads']} thread(s))")


def page(rows: list[dict]) -> str:
    """The documentation page's table and verdict, from the file `--json` wrote."""
    return markdown(rows) + "\n\n" + verdict(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", dest="json_path", help="also write every row as JSON here")
    parser.add_argument("--trials", type=positive_int, help="override each search's trials (demo: 12, resnet: 8)")
    parser.add_argument("--workdir", help="where the searches keep their stores (default: a temporary folder)")


def main_serve(args) -> int:
    provenance = record.Provenance("serve")
    with tempfile.TemporaryDirectory(prefix="autoprune-bench-serve-") as scratch:
        rows = run(Path(args.workdir or scratch).resolve(), trials=args.trials)
    if args.json_path:
        record.write(args.json_path, provenance, rows)
    print()
    print(markdown(rows))
    print()
    print(verdict(rows))
    return 0 if rows else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autoprune.bench.serve")
    commands = parser.add_subparsers(dest="command", required=True)
    add_arguments(commands.add_parser("run", help="the whole benchmark"))
    timing = commands.add_parser("measure", help="(internal) time one registered model in this process")
    timing.add_argument("model_uri")
    timing.add_argument("--tracking-uri", required=True)
    timing.add_argument("--batch-size", type=positive_int, required=True)
    timing.add_argument("--input-size", type=positive_int, nargs=3, required=True)
    timing.add_argument("--threads", type=positive_int, required=True)
    timing.add_argument("--repeats", type=positive_int, default=50)
    timing.add_argument("--no-recipe", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return measure(args) if args.command == "measure" else main_serve(args)


if __name__ == "__main__":
    sys.exit(main())
