"""A team's MLflow server as deploy/docker-compose.yml describes it, started as processes on loopback: PostgreSQL as
the backend store, an S3-compatible bucket (moto's server) for artifacts, `mlflow server --app-name basic-auth
--serve-artifacts`. A search runs through it with credentials from the environment while the server is restarted;
`best` reads back; a wrong password stops a search before Ray starts; a user without permission cannot register
versions.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from autoprune.bench import cluster as bench_cluster
from autoprune.testing.loopback import (
    MlflowAuth,
    free_port,
    mlflow_server,
    postgres_programs,
    postgres_server,
    s3_server,
)

pytestmark = pytest.mark.cluster

SPEC = copy.deepcopy(bench_cluster.SPEC)
SPEC["name"] = "team"
TRIALS = SPEC["search"]["trials"] = 4
SPEC["space"]["heal"]["steps"] = 3
SPEC["space"]["prune"] = {"methods": ["structured"], "sparsity": {"low": 0.7, "high": 0.8}}
SPEC["mlflow"] = {"experiment": "team-exp", "registered_model": "team-model"}
ADMIN_PASSWORD = "loopback-admin-7f3c"
ALICE, BOB = ("alice", "alice-password-1"), ("bob", "bob-password-22")  # MLflow wants 12 characters at least


def why_not_here() -> str | None:
    if postgres_programs() is None:
        return "no PostgreSQL server programs (apt-get install postgresql)"
    for module, package in (("psycopg2", "psycopg2-binary"), ("flask_wtf", "mlflow[auth]")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[test]' brings {package})"
    return None


def _as(user: str, password: str) -> dict[str, str]:
    return {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": password, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}


def _cli(*args: str, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoprune.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """The servers up, users made, one search as alice, during which the MLflow server is stopped after the first
    trial and started again on the same address (the same PostgreSQL, bucket and users)."""
    missing = why_not_here()
    if missing:
        pytest.skip(f"cannot start a team's MLflow server here: {missing}")
    workdir = tmp_path_factory.mktemp("team")
    spec_path = workdir / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC))
    with postgres_server() as database, s3_server(workdir, buckets=("mlflow-artifacts",)) as s3:
        bucket = {**s3.env, "MLFLOW_S3_ENDPOINT_URL": f"http://{s3.endpoint}"}
        settings = dict(backend=database.uri, artifacts_destination="s3://mlflow-artifacts",
                        auth=MlflowAuth(ADMIN_PASSWORD), port=free_port(), env=bucket)
        with mlflow_server(workdir / "server", **settings) as server:
            _make_users(server.url)
            driver = subprocess.Popen(
                [sys.executable, "-m", "autoprune.cli", "search", str(spec_path), "--tracking-uri", server.url,
                 "--workdir", str(workdir / "driver")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                env={**_as(*ALICE), "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
            said = []
            for line in driver.stdout:
                said.append(line)
                if f"[  1/{TRIALS} done" in line:
                    break
        with mlflow_server(workdir / "server", **settings) as server:  # back, on the same address
            restarted = time.monotonic()
            rest, _ = driver.communicate(timeout=600)
            output = "".join(said) + rest
            run_id = output.split("autoprune: search run ")[1].split()[0]
            published = None
            if driver.returncode != 0:  # it ended while the server was down: its results wait in Tune's storage
                published = _cli("publish", run_id, "--workdir", str(workdir / "driver"), "--tracking-uri",
                                 server.url, env=_as(*ALICE), timeout=300)
            print(f"from the server answering again to a completed publish: {time.monotonic() - restarted:.0f} s")
            yield {"output": output, "code": driver.returncode, "published": published, "run_id": run_id,
                   "server": server, "database": database, "spec": spec_path}


def _make_users(url: str) -> None:
    from mlflow.server import get_app_client

    os.environ.update({"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD})
    try:
        users = get_app_client("basic-auth", tracking_uri=url)
        for user, password in (ALICE, BOB):
            users.create_user(user, password)
    finally:
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(key)


def _psql(database, query: str) -> list[str]:
    return subprocess.run(["psql", "-At", "-c", query], capture_output=True, text=True, check=True,
                          env={**os.environ, **database.env}).stdout.split()


def test_a_search_through_a_server_restart_loses_nothing_on_postgresql(team):
    """Credentials from the environment only; the server's restart mid-search costs nothing: the trials' results
    wait in Ray Tune's storage, and the search's end (or `autoprune publish`, which it prints, when the search ended
    first) writes every trial once, the dense model's run, the front and its versions — all in PostgreSQL."""
    if team["code"] != 0:
        assert "Nothing is lost" in team["output"] and f"autoprune publish {team['run_id']}" in team["output"]
        assert team["published"].returncode == 0, team["published"].stderr[-2000:]
    run = team["run_id"]
    trials, status, versions, front = _psql(team["database"], (
        "select count(*) from tags where key = 'mlflow.parentRunId' and value = '{run}' and run_uuid in"
        " (select run_uuid from tags where key = 'autoprune.role' and value = 'trial');"
        " select status from runs where run_uuid = '{run}';"
        " select count(*) from model_versions where run_id in"
        " (select run_uuid from tags where key = 'mlflow.parentRunId' and value = '{run}');"
        " select value from latest_metrics where run_uuid = '{run}' and key = 'front_size';").format(run=run))
    assert (int(trials), status) == (TRIALS, "FINISHED")  # every trial, once, and the search ended
    assert int(versions) == float(front) >= 1  # the front, registered
    best = _cli("best", "--model", "team-model", "--max-latency-ms", "1e6", "--json", "--tracking-uri",
                team["server"].url, env=_as(*ALICE), timeout=120)
    assert best.returncode == 0, best.stderr[-2000:]
    assert json.loads(best.stdout)["name"] == "team-model"


def test_a_wrong_password_is_one_line_before_ray_starts(team, tmp_path):
    done = _cli("search", str(team["spec"]), "--tracking-uri", team["server"].url, "--workdir", str(tmp_path),
                env=_as(ALICE[0], "not-her-password"), timeout=120)
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert "refused the credentials" in line and "MLFLOW_TRACKING_PASSWORD" in line
    assert not (tmp_path / "ray").exists() and not (tmp_path / "cache").exists()


def test_a_user_without_permission_cannot_register_versions(team):
    from mlflow.exceptions import MlflowException

    from autoprune.tracking.store import client

    os.environ.update({"MLFLOW_TRACKING_USERNAME": BOB[0], "MLFLOW_TRACKING_PASSWORD": BOB[1]})
    try:
        bob = client(team["server"].url)
        [version] = bob.search_model_versions("name='team-model'", max_results=1)  # READ: bob sees it …
        with pytest.raises(MlflowException, match="PERMISSION_DENIED|Permission denied"):
            bob.create_model_version("team-model", version.source, run_id=version.run_id)  # … and cannot add to it
    finally:
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(key)

