"""The team set-up, launched for real on loopback: an on-prem Ray cluster started by `ray up cluster/onprem.yaml` over
SSH, and a team's MLflow server as deploy/docker-compose.yml describes it (PostgreSQL as the backend store, an
S3-compatible bucket for artifacts, `mlflow server --app-name basic-auth --serve-artifacts`).

One search runs on the cluster's head (`ray exec … autoprune search --address auto`) as alice, with her credentials
in the environment only, while the MLflow server is stopped and started again; `autoprune publish` completes it;
`best` and `serve` (a Ray Serve replica on the cluster) read the model back; `ray down` stops the cluster. A wrong
password stops a search before Ray starts; a user without permission cannot register versions. (A client without the
cluster's token: test_cluster.py, on a cluster that runs everywhere.) Where SSH cannot run here (see `why_no_ssh`),
the search runs on a local Ray and the cluster's tests are skipped, saying why.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
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
from autoprune.testing.onprem import (
    HEAD_IP,
    OnpremCluster,
    listening,
    new_token,
    onprem_config,
    ray_command,
    ray_up,
    ssh_login,
    why_no_ssh,
)
from autoprune.tracking.publish import publish_run

pytestmark = pytest.mark.cluster

SPEC = copy.deepcopy(bench_cluster.SPEC)
SPEC["name"] = "team"
SPEC["model"]["train_steps"] = 100
TRIALS = SPEC["search"]["trials"] = 4
SPEC["space"]["heal"]["steps"] = 3
SPEC["space"]["prune"] = {"methods": ["structured"], "sparsity": {"low": 0.7, "high": 0.8}}
SPEC["mlflow"] = {"experiment": "team-exp", "registered_model": "team-model"}
ADMIN_PASSWORD = "loopback-admin-7f3c"
ONPREM = Path(__file__).parents[1] / "cluster" / "onprem.yaml"
TEMPLATE_HEAD_IP = "10.0.0.1"  # the head's address in onprem.yaml, which a team replaces by their head's
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
    """The servers up, users made, the cluster up (when SSH runs here), one search as alice, during which the MLflow
    server is stopped after the first trial and started again on the same address (the same PostgreSQL, bucket and
    users); then the model served from the cluster, and the cluster taken down."""
    missing = why_not_here()
    if missing:
        pytest.skip(f"cannot start a team's MLflow server here: {missing}")
    workdir = tmp_path_factory.mktemp("team")
    spec_path = workdir / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC))
    found: dict = {"no_cluster": why_no_ssh()}
    with contextlib.ExitStack() as servers:
        database = servers.enter_context(postgres_server())
        s3 = servers.enter_context(s3_server(workdir, buckets=("mlflow-artifacts",)))
        bucket = {**s3.env, "MLFLOW_S3_ENDPOINT_URL": f"http://{s3.endpoint}"}
        settings = dict(backend=database.uri, artifacts_destination="s3://mlflow-artifacts",
                        auth=MlflowAuth(ADMIN_PASSWORD), port=free_port(), env=bucket)
        with contextlib.ExitStack() as machines:
            cluster, login, started = None, None, time.monotonic()  # from `ray up` (else: the search's start)
            if found["no_cluster"] is None:
                login = machines.enter_context(ssh_login(workdir, environment=sys.prefix))
                config = onprem_config(ONPREM, login, head_ip_in_template=TEMPLATE_HEAD_IP,
                                       token=new_token(workdir / "ray_token"))
                cluster = found["cluster"] = machines.enter_context(ray_up(config, workdir / "onprem"))
            head = Head(cluster, spec_path, workdir, home=login.home if login else None)
            with mlflow_server(workdir / "server", **settings) as server:
                _make_users(server.url)
                started = started if cluster else time.monotonic()
                driver = head.run("search", head.spec, "--tracking-uri", server.url, "--workdir", head.workdir,
                                  *(("--address", "auto") if cluster else ()),
                                  # while the server is down its calls are refused at once; while it is up, a
                                  # busy machine may make one take seconds, which must not end the search
                                  env={**_as(*ALICE), "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"})
                said = []
                for line in driver.stdout:
                    said.append(line)
                    if f"[  1/{TRIALS} done" in line:
                        break
                found["first_trial_s"] = time.monotonic() - started
            with mlflow_server(workdir / "server", **settings) as server:  # back, on the same address
                restarted = time.monotonic()
                rest, _ = driver.communicate(timeout=600)
                output = "".join(said) + rest
                if "autoprune: search run " not in output:  # it stopped before its MLflow run: its output says why
                    pytest.fail(f"the search printed no run id (exit {driver.returncode}); its output:\n{output}")
                run_id = output.split("autoprune: search run ")[1].split()[0]
                found.update(output=output, code=driver.returncode, run_id=run_id, server=server,
                             database=database, spec=spec_path, published=None)
                found["before_publish"] = _search_state(database, run_id)
                if driver.returncode != 0:  # it ended while the server was down: its results wait in Tune's storage
                    found["published"] = head.wait("publish", run_id, "--workdir", head.workdir, "--tracking-uri",
                                                   server.url, env=_as(*ALICE))
                found["publish_s"] = time.monotonic() - restarted
                found["after_publish"] = _search_state(database, run_id)
                with logged_in(*ALICE):  # publishing again (in this process: a CLI would only add its start-up)
                    publish_run(run_id, tracking_uri=server.url, workdir=head.local_workdir, echo=lambda _: None)
                found["after_republish"] = _search_state(database, run_id)
                print(f"from `ray up` to the first trial's result: {found['first_trial_s']:.0f} s"
                      f" (`ray up` {cluster.started_s:.0f} s)" if cluster else "no on-prem cluster here")
                print(f"from the server answering again to a completed publish: {found['publish_s']:.0f} s")
                if cluster:
                    found.update(_on_the_cluster(cluster, server.url))
                    machines.close()  # `ray down`, then the SSH server
                    found["after_down"] = listening(cluster.address)
                yield found


class Head:
    """Runs autoprune's commands where the search's driver runs: on the cluster's head through `ray exec` (the spec
    copied there first with `ray rsync-up`), or here, on a local Ray, when there is no cluster."""

    def __init__(self, cluster: OnpremCluster | None, spec: Path, workdir: Path, home: Path | None = None):
        self.cluster = cluster
        if cluster:
            ray_command(cluster, "rsync-up", str(spec), "spec.yaml", stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL).wait(timeout=120)
        self.spec = "spec.yaml" if cluster else str(spec)
        self.workdir = "team" if cluster else str(workdir / "driver")  # on the head: in the login's home
        self.local_workdir = home / self.workdir if cluster else Path(self.workdir)  # the same folder, from here

    def run(self, *args: str, env: dict[str, str]) -> subprocess.Popen:
        """`autoprune ARGS…` with `env`'s MLflow settings, its output (stdout and stderr) read line by line."""
        pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if self.cluster is None:
            return subprocess.Popen([sys.executable, "-m", "autoprune.cli", *args], env=env, **pipes)
        exported = " ".join(f"{name}={shlex.quote(value)}" for name, value in env.items() if name.startswith("MLFLOW"))
        return ray_command(self.cluster, "exec", f"{exported} autoprune {shlex.join(args)}", **pipes)

    def wait(self, *args: str, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
        process = self.run(*args, env=env)
        output, _ = process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(process.args, process.returncode, output, "")


def _on_the_cluster(cluster: OnpremCluster, url: str) -> dict:
    """What a client on this machine sees of the on-prem cluster with its token (a client without it is refused:
    test_cluster.py): its nodes, and the best model served by a Ray Serve replica on the cluster."""
    probe = ("import json, ray; ray.init(address=%r, logging_level='ERROR');"
             "print(json.dumps([[n['NodeID'], n['NodeManagerAddress']] for n in ray.nodes() if n['Alive']]))")
    nodes = subprocess.run([sys.executable, "-c", probe % cluster.address], env=dict(cluster.env),
                           capture_output=True, text=True, timeout=120)
    return {"nodes": nodes, "served": _serve(cluster, url)}


def _serve(cluster: OnpremCluster, url: str) -> dict:
    """`autoprune serve` from this machine onto the cluster (alice's credentials reach the replica), asked to
    predict a few images; what it answered, and what the same version loaded here predicts."""
    from autoprune.driver.prepare import load_data
    from autoprune.space.load import parse_spec
    from autoprune.tracking.select import best

    port, started = free_port(), time.monotonic()
    env = {**_as(*ALICE), **cluster.env}
    server = subprocess.Popen([sys.executable, "-m", "autoprune.cli", "serve", "--model", "team-model",
                               "--max-latency-ms", "1e6", "--tracking-uri", url, "--address", cluster.address,
                               "--host", HEAD_IP, "--port", str(port)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        said = []
        for line in server.stdout:
            said.append(line)
            if "serving the best version" in line:
                break
        bundle = load_data(parse_spec(SPEC))
        images = bundle.normalize(bundle.eval.images[:4])
        answer = _post(f"http://{HEAD_IP}:{port}/", {"images": images.tolist()}, timeout_s=120)
        print(f"from `autoprune serve` on the cluster to its first answer: {time.monotonic() - started:.0f} s")
    finally:
        server.send_signal(signal.SIGINT)  # its Ctrl-C: Ray Serve shut down
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    with logged_in(*ALICE):
        choice, model = best(model="team-model", max_latency_ms=1e6, tracking_uri=url, load=True)
    with torch.no_grad():
        expected = model(images).argmax(-1).tolist()
    return {"answer": answer, "expected": expected, "version": choice.version, "said": "".join(said)}


def _post(url: str, body: dict, *, timeout_s: float) -> dict | str:
    """The JSON answer to a POST, retried until the replica answers (it loads its model first) or `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except OSError as error:
            if time.monotonic() > deadline:
                return f"no answer: {error}"
            time.sleep(1)


@contextlib.contextmanager
def logged_in(user: str, password: str):
    """MLflow's client in this process as `user` (its credentials in the environment, removed afterwards)."""
    os.environ.update({"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password})
    try:
        yield
    finally:
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(key)


def _make_users(url: str) -> None:
    from mlflow.server import get_app_client

    with logged_in("admin", ADMIN_PASSWORD):
        users = get_app_client("basic-auth", tracking_uri=url)
        for user, password in (ALICE, BOB):
            users.create_user(user, password)


def _psql(database, query: str) -> list[str]:
    return subprocess.run(["psql", "-At", "-c", query], capture_output=True, text=True, check=True,
                          env={**os.environ, **database.env}).stdout.split()


def _search_state(database, run: str) -> tuple[int, str, int, float]:
    """From PostgreSQL's tables: the search's trial runs, its status, its registered versions, its front's size."""
    trials, status, versions, *front = _psql(database, (
        "select count(*) from tags where key = 'mlflow.parentRunId' and value = '{run}' and run_uuid in"
        " (select run_uuid from tags where key = 'autoprune.role' and value = 'trial');"
        " select status from runs where run_uuid = '{run}';"
        " select count(*) from model_versions where run_id in"
        " (select run_uuid from tags where key = 'mlflow.parentRunId' and value = '{run}');"
        " select value from latest_metrics where run_uuid = '{run}' and key = 'front_size';").format(run=run))
    return int(trials), status, int(versions), float(front[0]) if front else 0.0


def test_a_search_through_a_server_restart_loses_nothing_on_postgresql(team):
    """Credentials from the environment only; the server's restart mid-search costs nothing: the trials' results
    wait in Ray Tune's storage, and the search's end (or `autoprune publish`, which it prints, when the search ended
    first) writes every trial once, the dense model's run, the front and its versions — all in PostgreSQL.
    Publishing again changes nothing."""
    if team["code"] != 0:
        assert "MLflow failed" in team["output"] and "the search goes on" in team["output"]
        assert "Nothing is lost" in team["output"] and f"autoprune publish {team['run_id']}" in team["output"]
        trials, status, _, _ = team["before_publish"]
        assert status == "RUNNING" and trials < TRIALS  # the trials ended while the server was down: not logged
        assert team["published"].returncode == 0, team["published"].stdout[-3000:]
    trials, status, versions, front = team["after_publish"]
    assert (trials, status) == (TRIALS, "FINISHED")  # every trial, once, and the search ended
    assert versions == front >= 1  # the front, registered
    assert team["after_republish"] == team["after_publish"]
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

    with logged_in(*BOB):
        bob = client(team["server"].url)
        [version] = bob.search_model_versions("name='team-model'", max_results=1)  # READ: bob sees it …
        with pytest.raises(MlflowException, match="PERMISSION_DENIED|Permission denied"):
            bob.create_model_version("team-model", version.source, run_id=version.run_id)  # … and cannot add to it



def _cluster(team) -> OnpremCluster:
    if team["no_cluster"]:
        pytest.skip(f"no on-prem cluster here: {team['no_cluster']}")
    return team["cluster"]


def test_ray_up_of_the_onprem_config_runs_the_search_on_its_head(team):
    """`ray up cluster/onprem.yaml` (over SSH: the token copied, the set-up commands, `ray start`) makes a cluster
    whose only node advertises the head's loopback address, and every trial of the search ran on that node."""
    from autoprune.tracking.store import Tracker

    _cluster(team)
    assert team["nodes"].returncode == 0, team["nodes"].stderr[-2000:]
    [[node_id, address]] = json.loads(team["nodes"].stdout.strip().splitlines()[-1])
    assert address == HEAD_IP  # nothing outside 127.0.0.0/8
    with logged_in(*ALICE):
        children = Tracker(team["server"].url, "team-exp").child_runs(team["run_id"])
    assert len(children) == TRIALS and {child.data.tags["ray_node"] for child in children} == {node_id}


def test_the_model_served_on_the_cluster_is_the_registered_one(team):
    """`autoprune serve --address` puts a replica on the cluster; it reads the version from the team's server with
    the credentials of the user who started it, and predicts what that version predicts here."""
    served = _cluster(team) and team["served"]
    assert isinstance(served["answer"], dict), f"{served['answer']}\n{served['said'][-3000:]}"
    assert served["answer"]["top1"] == served["expected"] and served["answer"]["version"] == served["version"]


def test_ray_down_stops_the_cluster(team):
    _cluster(team)
    assert team["after_down"] is False  # the head's GCS no longer answers
