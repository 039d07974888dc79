"""The search unchanged on a real two-node Ray cluster, a real MLflow tracking server and S3 storage, on loopback.

`ray start` twice (a head and a worker node, 1 CPU each), `mlflow server` (sqlite backend, artifacts served by the
server) and an S3-compatible object store (moto's server) run as separate processes; the search runs as the CLI,
in its own process, through `--address`, `--tracking-uri http://…` and `--storage s3://…`. Everything binds to
127.0.0.1 and is stopped when the module ends, also on failure.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from autoprune.bench import cluster as bench_cluster
from autoprune.testing.browser import read_front, why_no_browser
from autoprune.testing.loopback import mlflow_server, ray_cluster, s3_server
from autoprune.tracking import view
from autoprune.tracking.store import Tracker

pytestmark = pytest.mark.cluster

# The cost benchmark's search, smaller: the test proves the path, the benchmark measures it.
SPEC = copy.deepcopy(bench_cluster.SPEC)
SPEC["name"] = "cluster"
SPEC["model"]["train_steps"] = 100
SPEC["search"]["trials"] = 4
SPEC["space"]["heal"]["steps"] = 3
# Structured at high sparsity only: ~1.6x faster than dense on this ViT, a margin that CPU contention between the two
# nodes' trials does not close, so the front (and the registry the tests read) is never empty by chance.
SPEC["space"]["prune"] = {"methods": ["structured"], "sparsity": {"low": 0.7, "high": 0.8}}
SPEC["mlflow"] = {"experiment": "cluster-exp", "registered_model": "cluster-model"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Both servers up, one search through them; yields what the test reads back."""
    workdir = tmp_path_factory.mktemp("cluster")
    spec_path = workdir / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC))
    with s3_server(workdir) as s3, ray_cluster(workdir, env=s3.env) as cluster, mlflow_server(workdir) as server:
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **cluster.env, **s3.env}
        env.pop("RAY_ADDRESS", None)
        search = subprocess.run(
            [sys.executable, "-m", "autoprune.cli", "search", str(spec_path), "--address", cluster.address,
             "--tracking-uri", server.url, "--workdir", str(workdir / "driver"),
             "--storage", s3.uri("autoprune", "runs")],
            capture_output=True, text=True, env=env, timeout=600,
        )
        best = subprocess.run(
            [sys.executable, "-m", "autoprune.cli", "best", "--model", "cluster-model", "--max-latency-ms", "1e6",
             "--json", "--tracking-uri", server.url],
            capture_output=True, text=True, env=env, timeout=120,
        )
        ui = subprocess.run([sys.executable, "-m", "autoprune.cli", "ui", "--tracking-uri", server.url],
                            capture_output=True, text=True, env=env, timeout=120)
        import pyarrow.fs

        bucket = pyarrow.fs.S3FileSystem(access_key=s3.env["AWS_ACCESS_KEY_ID"],
                                         secret_key=s3.env["AWS_SECRET_ACCESS_KEY"], endpoint_override=s3.endpoint,
                                         scheme="http", region="us-east-1")
        stored = [info.path for info in bucket.get_file_info(pyarrow.fs.FileSelector("autoprune/runs", recursive=True))]
        yield {"search": search, "best": best, "ui": ui, "server": server, "workdir": workdir, "cluster": cluster,
               "stored": stored}


def test_the_search_uses_both_nodes_and_lands_in_the_tracking_server(run):
    search = run["search"]
    assert search.returncode == 0, search.stdout[-3000:] + search.stderr[-3000:]
    assert run["cluster"].nodes == 2
    tracker = Tracker(run["server"].url, "cluster-exp")
    parents = tracker.client.search_runs([tracker.experiment_id], "tags.`autoprune.role` = 'search'")
    assert len(parents) == 1
    children = tracker.child_runs(parents[0].info.run_id)
    assert len(children) == 4 and all(run.info.status == "FINISHED" for run in children)
    # 2 trials at a time, 1 CPU per trial, 1 CPU per node: the trials ran on both nodes
    assert len({child.data.tags["ray_node"] for child in children}) == 2


def test_artifacts_go_through_the_server_and_checkpoints_to_s3(run):
    artifacts = run["server"].artifacts
    assert any(path.name == "pareto.html" for path in artifacts.rglob("*"))
    # the front's models, downloaded by the driver from S3 and registered through the server
    assert any(path.name == "weights.safetensors" for path in artifacts.rglob("*"))
    assert not (run["workdir"] / "driver" / "mlartifacts").exists()  # nothing written beside the server
    checkpoints = [path for path in run["stored"] if path.endswith("weights.safetensors")]
    assert len(checkpoints) == 4  # every trial's pruned model is in the bucket


def test_best_answers_from_the_tracking_server(run):
    best = run["best"]
    assert best.returncode == 0, best.stderr[-2000:]
    answer = json.loads(best.stdout)
    assert answer["name"] == "cluster-model" and answer["latency_ms"] > 0


@pytest.mark.browser
def test_the_front_opens_from_the_tracking_server_in_a_browser(run, tmp_path):
    """Through a tracking server, the address is the server's: `search` prints it, `ui` prints it and starts
    nothing, and the page shows the front."""
    address = re.search(r"The front in MLflow's UI: (http://\S+)", run["search"].stdout).group(1)
    assert address.startswith(run["server"].url + "/#/experiments/")
    assert run["ui"].returncode == 0 and run["ui"].stdout.strip().endswith(address)
    missing = why_no_browser()
    if missing:
        pytest.skip(f"cannot look at the front in a browser here: {missing}")
    page = read_front(address, screenshot=tmp_path / "front.png")
    assert page.sections[0] == view.FRONT_SECTION and page.points[view.DENSE_COLOR] == 1
    assert page.points[view.FRONT_COLOR] >= 1 and page.point_link


def test_a_client_without_the_clusters_token_is_refused_in_one_line_at_once(run):
    """The cluster uses token authentication: a search from a shell without its token stops at once, naming the
    two variables, not after Ray's 20 s of retries and a traceback."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("RAY_AUTH")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    refused = subprocess.run(
        [sys.executable, "-m", "autoprune.cli", "search", str(run["workdir"] / "spec.yaml"), "--address",
         run["cluster"].address, "--tracking-uri", run["server"].url, "--workdir", str(run["workdir"] / "no-token")],
        capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    [line] = refused.stderr.strip().splitlines()
    assert "refused this client" in line and "RAY_AUTH_MODE=token" in line and "RAY_AUTH_TOKEN" in line
