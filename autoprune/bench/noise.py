"""`autoprune bench noise`: does a latency survive a neighbour? The old way against the paired one, quiet and loaded.

Part 1, structures. The demo's ViT and a BatchNorm ResNet, dense and with 25/50/75% of their block-internal
channels and heads removed (the shapes `structured` and `vbp` leave: bench/latency.py's `shrink`), each timed
- the old way: the dense model alone at the start, on a quiet node (as a search's baseline was), then each
  structure alone (settled warm-up, fixed repeats), its speedup = dense ÷ structure, "not faster" when its
  median is not below the dense one;
- the paired way (measure/timing.py): each structure interleaved with the dense model, its speedup with a 95%
  interval, "not faster" only when the whole interval is below 1;
on a quiet node and again beside `--busy` CPU-bound processes the benchmark starts (one per two cores by default).
Reported per method: Spearman's rank correlation of the structures' latencies quiet vs loaded, the speedups'
error against the same method's quiet ones, the stop decisions that flipped, the dense model's spread over
repeated measurements, and the seconds spent timing.

Part 2, searches (`--searches N`): the demo search N times on a quiet node and once loaded: the dense latency it
registers, the trials stopped as not faster, the front's size, and how far the loaded front's members agree with
the quiet run's (same configuration: the searches share a seed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from autoprune.argtypes import non_negative_int, positive_int
from autoprune.bench import record

SPARSITIES = (0.25, 0.5, 0.75)
DEMO_VIT = ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2,
                                     "global_pool": "avg", "class_token": False}, 32)
BN_CNN = ("resnet18", {"layers": (1, 1, 1, 1), "channels": (32, 64, 128, 256)}, 8)
MODELS = {"demo-vit": DEMO_VIT, "bn-resnet": BN_CNN}
DENSE_REPEATS = 5  # the dense model timed alone this many times per condition: its run-to-run spread


def structures(name: str):
    """The dense model and its shrunk copies, with the batch they are timed at."""
    import timm

    from autoprune.bench.latency import shrink

    model, kwargs, batch = MODELS[name]
    torch.manual_seed(0)
    dense = timm.create_model(model, num_classes=10, **kwargs).eval()
    return dense, {f"{ratio:.0%}": shrink(dense, ratio, 8).eval() for ratio in SPARSITIES}, batch


def old_way(model, batch: int, *, warmup: int = 20, repeats: int = 50) -> float:
    """The median of a model timed alone, as profiles were before pairing: settled warm-up, then fixed repeats."""
    from autoprune.measure.formats import ExecutionRecipe
    from autoprune.measure.prepared import PreparedModel
    from autoprune.measure.runners import time_runs_on, timing_inputs, warm_up

    device = torch.device("cpu")
    shape = (batch, 3, 32, 32)
    prepared = PreparedModel.build(model, ExecutionRecipe(), device, shape)
    inputs = timing_inputs(shape, prepared.recipe, device)
    time_runs = time_runs_on(device)
    with torch.inference_mode():
        warm_up(prepared.module, inputs, minimum=warmup, time_runs=time_runs)
        return statistics.median(time_runs(prepared.module, inputs, repeats))


def measure(name: str, *, dense_quiet_ms: float | None) -> dict:
    """Both ways on the node as it is now. `dense_quiet_ms`: the old way's baseline from the quiet node (None: this
    is the quiet node, and it is measured here)."""
    from autoprune.measure.conditions import sample
    from autoprune.measure.timing import profile_latency

    torch.set_num_threads(1)
    dense, shrunk, batch = structures(name)
    conditions = sample(0.5).as_dict()
    dense_alone = [old_way(dense, batch) for _ in range(DENSE_REPEATS)]
    baseline = dense_quiet_ms if dense_quiet_ms is not None else statistics.median(dense_alone)
    started = time.perf_counter()  # what a trial's profiling costs: its structure, the dense model already timed
    old = {label: old_way(model, batch) for label, model in shrunk.items()}
    old_seconds = time.perf_counter() - started
    started = time.perf_counter()
    paired = {label: profile_latency(model, input_size=(3, 32, 32), batch_size=batch, warmup=20, repeats=50,
                                     threads=1, reference=dense, scale_ms=baseline)
              for label, model in shrunk.items()}
    paired_seconds = time.perf_counter() - started
    return {
        "model": name, "conditions": conditions, "dense_alone_ms": dense_alone, "baseline_ms": baseline,
        "old": {label: {"ms": ms, "speedup": baseline / ms, "not_faster": ms >= baseline} for label, ms in old.items()},
        "paired": {label: {"ms": p.median_ms, "speedup": p.speedup, "low": p.speedup_low, "high": p.speedup_high,
                           "not_faster": p.confidently_slower} for label, p in paired.items()},
        "old_seconds": old_seconds, "paired_seconds": paired_seconds,
    }


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic) if len(a) > 2 else float("nan")


def compare(quiet: dict, loaded: dict) -> dict:
    """Per method: rank agreement, speedup error and flipped decisions, loaded against quiet."""
    rows = {}
    labels = list(quiet["old"])
    for method in ("old", "paired"):
        q, l = quiet[method], loaded[method]
        errors = [abs(l[x]["speedup"] / q[x]["speedup"] - 1) for x in labels]
        # The dense model among the structures, on each method's own scale: the old way compares every structure
        # with the dense model timed alone at the start (quiet); paired latencies are a scale ÷ speedup, the dense
        # model's speedup being 1.
        rows[method] = {
            "spearman": spearman([quiet["baseline_ms"], *(q[x]["ms"] for x in labels)],
                                 [quiet["baseline_ms"] if method == "old" else loaded["baseline_ms"],
                                  *(l[x]["ms"] for x in labels)]),
            "speedup_error_median": statistics.median(errors), "speedup_error_max": max(errors),
            "flipped": sum(q[x]["not_faster"] != l[x]["not_faster"] for x in labels),
            "not_faster_loaded": sum(l[x]["not_faster"] for x in labels),
            "seconds": loaded[f"{method}_seconds"],
        }
    return rows


def run_structures(busy: int, echo=print) -> dict:
    from autoprune.testing.load import busy_processes

    found = {}
    for name in MODELS:
        echo(f"bench noise: {name}, quiet")
        quiet = measure(name, dense_quiet_ms=None)
        echo(f"bench noise: {name}, beside {busy} busy processes")
        with busy_processes(busy):
            loaded = measure(name, dense_quiet_ms=quiet["baseline_ms"])
        found[name] = {"quiet": quiet, "loaded": loaded, "compare": compare(quiet, loaded)}
    return found


def run_search(workdir: Path, *, busy: int, trials: int | None) -> dict:
    """One demo search (beside `busy` processes): what it registered and what it stopped."""
    from autoprune.bench import demo_spec
    from autoprune.driver.search import search
    from autoprune.space.load import parse_spec
    from autoprune.testing.load import busy_processes

    spec = demo_spec()
    if trials:
        spec["search"]["trials"] = trials
    started = time.perf_counter()
    with busy_processes(busy):
        outcome = search(parse_spec(spec), workdir=workdir, echo=None)
    records = [r for r in outcome.records if r.result is not None]
    return {
        "busy": busy, "wall_s": time.perf_counter() - started,
        "dense_ms": outcome.dense.latency.median_ms,
        "dense_ms_at_start": next((r.result.latency.reference_ms for r in records if r.result.latency.paired), None),
        "not_faster": sorted(_key(r) for r in records if "not faster" in r.result.stopped),
        "kept": sorted(_key(r) for r in records if "not faster" not in r.result.stopped),
        "front": sorted(_key(r) for r in outcome.front),
        "front_latency_ms": {_key(r): r.result.latency.median_ms for r in outcome.front},
        "speedups": {_key(r): r.result.latency.speedup for r in records if r.result.latency.paired},
        "imprecise": sum(r.result.latency.wide for r in records),
        "profile_s": statistics.mean(r.result.timings.get("profile", 0.0) for r in records) if records else 0.0,
    }


def _key(record) -> str:
    """A trial by its configuration (the searches share a seed, so the same configuration is the same trial)."""
    return record.result.config.to_json()


def summarise_searches(quiet: list[dict], loaded: list[dict]) -> dict:
    dense = [run["dense_ms"] for run in quiet]
    summary = {
        "quiet_runs": len(quiet),
        "dense_spread": (max(dense) - min(dense)) / statistics.median(dense) if dense else float("nan"),
        "not_faster_quiet": [len(run["not_faster"]) for run in quiet],
        "front_quiet": [len(run["front"]) for run in quiet],
    }
    if quiet and loaded:
        base, load = quiet[0], loaded[0]
        kept_then_stopped = set(base["kept"]) & set(load["not_faster"])
        shared = set(base["speedups"]) & set(load["speedups"])
        # The sampler adapts to what it is told, so after the coarse start the two runs try other configurations:
        # front membership is compared on the trials both ran.
        both = (set(base["kept"]) | set(base["not_faster"])) & (set(load["kept"]) | set(load["not_faster"]))
        agree = sum((key in base["front"]) == (key in load["front"]) for key in both)
        summary.update({
            "loaded_kept_then_stopped": len(kept_then_stopped), "front_loaded": len(load["front"]),
            "trials_in_both": len(both), "front_agreement": agree / len(both) if both else float("nan"),
            "speedup_error_median": statistics.median(abs(load["speedups"][k] / base["speedups"][k] - 1)
                                                      for k in shared) if shared else float("nan"),
            "spearman": spearman([base["speedups"][k] for k in shared], [load["speedups"][k] for k in shared]),
            "profile_s_quiet": base["profile_s"], "profile_s_loaded": load["profile_s"],
        })
    return summary


def markdown(found: dict, searches: dict | None) -> str:
    lines = ["| model | method | Spearman quiet vs loaded | speedup error, median (max) | stop decisions flipped"
             " | not faster when loaded | dense spread, quiet (loaded) | seconds timing, loaded |",
             "|---|---|---|---|---|---|---|---|"]
    for name, result in found.items():
        spreads = []
        for condition in ("quiet", "loaded"):
            alone = result[condition]["dense_alone_ms"]
            spreads.append((max(alone) - min(alone)) / statistics.median(alone))
        for method, row in result["compare"].items():
            lines.append(f"| {name} | {method} | {row['spearman']:.2f} | {row['speedup_error_median']:.1%}"
                         f" ({row['speedup_error_max']:.1%}) | {row['flipped']} of {len(SPARSITIES)}"
                         f" | {row['not_faster_loaded']} | {spreads[0]:.1%} ({spreads[1]:.1%}) | {row['seconds']:.1f} |")
    if searches:
        s = searches["summary"]
        lines += ["", f"Demo searches: {s['quiet_runs']} quiet, dense latency registered spread {s['dense_spread']:.1%};"
                      f" stopped as not faster: {s['not_faster_quiet']}; front sizes {s['front_quiet']}."]
        if "front_loaded" in s:
            lines.append(f"Loaded: {s['loaded_kept_then_stopped']} trial(s) the quiet run kept were stopped; front"
                         f" {s['front_loaded']} models; front membership agrees on {s['front_agreement']:.0%} of the"
                         f" {s['trials_in_both']} configurations both runs tried; speedup error"
                         f" median {s['speedup_error_median']:.1%}; Spearman {s['spearman']:.2f}; profiling"
                         f" {s['profile_s_quiet']:.2f} s per trial quiet, {s['profile_s_loaded']:.2f} s loaded.")
    return "\n".join(lines)


def page(results: dict) -> str:
    """The documentation page's tables, from the file `--json` wrote."""
    return markdown(results["structures"], results["searches"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--busy", type=non_negative_int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="CPU-bound processes beside the loaded measurements (default: one per two cores)")
    parser.add_argument("--searches", type=non_negative_int, default=0,
                        help="also run the demo search this many times quiet, and once loaded (default: 0)")
    parser.add_argument("--trials", type=positive_int, default=None, help="override the demo's 12 trials")
    parser.add_argument("--json", dest="json_path", default=None, help="write every measurement here")
    parser.add_argument("--workdir", default=None, help="where the searches run (default: a scratch folder)")


def main_noise(args) -> int:
    provenance = record.Provenance("noise")
    found = run_structures(args.busy)
    searches = None
    if args.searches:
        with tempfile.TemporaryDirectory() as scratch:
            workdir = Path(args.workdir or scratch)
            quiet = []
            for index in range(args.searches):
                print(f"bench noise: demo search {index + 1}/{args.searches}, quiet", flush=True)
                quiet.append(run_search(workdir, busy=0, trials=args.trials))
            print(f"bench noise: demo search beside {args.busy} busy processes", flush=True)
            loaded = [run_search(workdir, busy=args.busy, trials=args.trials)]
        searches = {"quiet": quiet, "loaded": loaded, "summary": summarise_searches(quiet, loaded)}
    if args.json_path:
        record.write(args.json_path, provenance, json.loads(json.dumps({"structures": found, "searches": searches},
                                                                     default=str)))
    print()
    print(markdown(found, searches))
    return 0
