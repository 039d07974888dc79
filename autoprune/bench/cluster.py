"""`autoprune bench cluster`: what a remote tracking server and a multi-node cluster cost, on one small search.

The same search (a tiny ViT on the reference task, 2 CPUs in all, 2 trials at a time) runs three times as the CLI
would run it, each in a fresh process:

- embedded: a local Ray started by the search, MLflow in an sqlite file (the laptop defaults);
- server: the same, with `--tracking-uri` pointing at a real `mlflow server` on loopback (artifacts through it);
- cluster: a two-node Ray cluster on loopback (1 CPU per node) through `--address`, the tracking server, and
  `--storage` on a folder both nodes reach.

It reports each run's wall time (process start to exit, so the imports, Ray's start or connection, the dense
model, the trials and the registration are all in it) and the difference to the embedded run. The dense model is
trained once beforehand and its cache shared, so that no run pays for it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from autoprune.bench import record
from autoprune.testing.loopback import mlflow_server, ray_cluster

SPEC = {
    "name": "bench-cluster",
    "model": {"name": "vit_tiny_patch16_224", "num_classes": 10, "train_steps": 300,
              "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2,
                         "global_pool": "avg", "class_token": False}},
    "data": {"source": "reference", "eval_images": 200},
    "profile": {"batch_size": 16, "warmup": 5, "repeats": 15},
    "search": {"trials": 8, "concurrency": 2, "sampler": "random", "seed": 0, "resources": {"cpu": 1}},
    "mlflow": {"experiment": "bench-cluster", "registered_model": "bench-cluster-model"},
    "space": {"prune": {"methods": ["magnitude", "structured"], "sparsity": {"low": 0.3, "high": 0.7}},
              "heal": {"methods": ["none", "distill"], "calibration_images": 64, "steps": 20, "lr": 1e-3,
                       "batch_size": 16}},
}


def _search(spec_path: Path, workdir: Path, *extra: str, env: dict | None = None) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "autoprune.cli", "search", str(spec_path), "--workdir",
                             str(workdir), *extra], capture_output=True, text=True,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})})
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"search failed ({' '.join(extra) or 'embedded'}):\n{result.stdout[-2000:]}"
                           f"\n{result.stderr[-2000:]}")
    return seconds


def run(root: Path, echo=print) -> list[dict]:
    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC))
    warm = root / "warm"
    echo("bench cluster: training the dense model once (shared by the three runs)")
    _search_dense_only(spec_path, warm)
    rows = []

    def measured(setup: str, seconds: float, started_s: float = 0.0) -> None:
        """`started_s`: starting the servers this setup runs against, before the search (not in `seconds`)."""
        rows.append({"setup": setup, "wall_s": seconds, "servers_start_s": started_s,
                     "trials": SPEC["search"]["trials"]})
        echo(f"  {setup}: {seconds:.1f} s (servers started in {started_s:.1f} s before)")

    def workdir(name: str) -> Path:
        folder = root / name
        shutil.copytree(warm / "cache", folder / "cache")
        return folder

    measured("embedded (local Ray, sqlite)", _search(spec_path, workdir("embedded")))
    started = time.perf_counter()
    with mlflow_server(root / "server") as server:
        server_start = time.perf_counter() - started
        measured("local Ray + mlflow server", _search(spec_path, workdir("server"), "--tracking-uri", server.url),
                 server_start)
        started = time.perf_counter()
        with ray_cluster(root / "cluster") as cluster:
            cluster_start = time.perf_counter() - started
            measured("2-node cluster + mlflow server + shared storage",
                     _search(spec_path, workdir("cluster"), "--address", cluster.address, "--tracking-uri",
                             server.url, "--storage", str(root / "shared"), env=dict(cluster.env)),
                     server_start + cluster_start)
    base = rows[0]["wall_s"]
    for row in rows:
        row["extra_s"] = row["wall_s"] - base
    return rows


def _search_dense_only(spec_path: Path, workdir: Path) -> None:
    """Fill the dense-weights cache (what `search` would train first) without running a search."""
    from autoprune.driver.prepare import dense_weights, load_data
    from autoprune.space.load import load_spec

    spec = load_spec(spec_path)
    dense_weights(spec.model, spec.data, load_data(spec), cache_dir=workdir / "cache", seed=spec.search.seed)


def markdown(rows: list[dict]) -> str:
    out = [f"Same search ({rows[0]['trials']} trials, 2 at a time, 2 CPUs in all), each run a fresh `autoprune search`"
           " process; wall time from start to exit. The embedded run starts its own Ray inside; the others connect"
           " to servers started before (their start-up in the last column).\n",
           "| setup | search wall s | vs embedded | servers' start-up s |", "|---|---|---|---|"]
    out += [f"| {r['setup']} | {r['wall_s']:.1f} | {r['extra_s']:+.1f} s | {r['servers_start_s']:.1f} |" for r in rows]
    return "\n".join(out)


def main_cluster(args) -> int:
    provenance = record.Provenance("cluster")
    with tempfile.TemporaryDirectory(prefix="autoprune-bench-cluster-") as folder:
        rows = run(Path(folder))
    if args.json_path:
        record.write(args.json_path, provenance, rows)
    print()
    print(markdown(rows))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", dest="json_path", default=None, help="also write the rows here")
