"""A Ray cluster of several nodes, an MLflow tracking server (on sqlite, or a team's: PostgreSQL, S3, basic-auth),
PostgreSQL and an S3-compatible store, as real processes on loopback.

What a team runs on many machines, started on one: the cluster tests and `autoprune bench cluster` use it to prove
that a search runs unchanged through `--address` and `--tracking-uri http://…`. Every process is started in
its own process group and stopped (with its children) when the context ends, also when the body fails.
The servers bind to 127.0.0.1 only; the Ray nodes take 127.0.0.2 as their address, and every client and node talks
to them there (Ray's GCS itself listens on every interface, as Ray does); the Ray dashboard is not started.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

LOOPBACK = "127.0.0.1"
# Ray nodes' address: loopback, but not 127.0.0.1, which Ray takes for "this machine" and replaces by the machine's
# own address (nodes and clients would then talk over it). 127.0.0.2 is loopback as well and stays as given.
RAY_NODE_IP = "127.0.0.2"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class RayCluster:
    address: str  # what `ray.init(address=…)` and `autoprune search --address` take
    nodes: int
    env: Mapping[str, str]  # what a client process needs in its environment: the cluster's own auth token


@dataclass(frozen=True)
class MlflowServer:
    url: str  # the tracking URI
    artifacts: Path  # where the server stores artifacts (it serves them: clients never write there directly)


def _ray_executable() -> str:
    return str(Path(sys.executable).with_name("ray"))


@contextlib.contextmanager
def ray_cluster(
    workdir: Path, *, nodes: Mapping[str, Mapping] = ({"head": {"num_cpus": 1}, "worker": {"num_cpus": 1}}),
    env: Mapping[str, str] | None = None, timeout_s: float = 90,
) -> Iterator[RayCluster]:
    """A head node and the other `nodes` (name → {num_cpus, resources}) joined to it, each a `ray start --block`;
    `env` reaches every node's processes (say, the object store's credentials for the trials' checkpoints)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    address = f"{RAY_NODE_IP}:{port}"
    # Token authentication with a token of this cluster's own (Ray's default would share ~/.ray/auth_token).
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {}), **auth}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    # A private temp dir: Ray records "the latest cluster" in its temp dir, and a plain `ray.init()` elsewhere on
    # this machine must not join this cluster by finding it there. Short, as Ray's socket paths have a length limit.
    temp_dir = tempfile.mkdtemp(prefix="autoprune-ray-", dir="/tmp")
    processes: list[subprocess.Popen] = []
    try:
        for index, (name, node) in enumerate(nodes.items()):
            command = [_ray_executable(), "start", "--block", f"--node-ip-address={RAY_NODE_IP}",
                       f"--num-cpus={node.get('num_cpus', 1)}", "--num-gpus=0", "--disable-usage-stats",
                       f"--temp-dir={temp_dir}"]
            if node.get("resources"):
                command.append(f"--resources={json.dumps(dict(node['resources']))}")
            if index == 0:
                command += [f"--port={port}", "--head", "--include-dashboard=false"]
            else:
                command.append(f"--address={address}")
            log = open(workdir / f"ray-{name}.log", "w")
            processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True))
            _wait_for_nodes(address, index + 1, processes, timeout_s, workdir / f"ray-{name}.log", env)
        yield RayCluster(address, len(processes), auth)
    finally:
        # a node's graceful stop takes 30 s and more here (its processes, all in its group, are killed anyway):
        # a few seconds' grace, then SIGKILL
        stop_processes(*reversed(processes), grace_s=3)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_nodes(address: str, count: int, processes, timeout_s: float, log: Path, env) -> None:
    probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR');"
             "print(sum(n['Alive'] for n in ray.nodes()))")

    def ready() -> bool:
        try:
            result = subprocess.run([sys.executable, "-c", probe, address], capture_output=True, text=True,
                                    timeout=30, env=env)
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0 and result.stdout.strip().splitlines()[-1:] == [str(count)]

    wait_until(ready, processes, f"the Ray cluster at {address} ({count} nodes)", log, timeout_s)


def _answers(url: str, method: str = "GET") -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_until(ready, processes, what: str, log: Path, timeout_s: float) -> None:
    """Poll `ready()` until it holds; fail at once, with the log's tail, if a process exits while starting."""
    deadline = time.monotonic() + timeout_s
    while True:
        if any(process.poll() is not None for process in processes):
            raise RuntimeError(f"{what}: a process exited while starting ({log}):\n{log_tail(log)}")
        if ready():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} was not ready in {timeout_s:.0f} s ({log}):\n{log_tail(log)}")
        time.sleep(0.5)


@dataclass(frozen=True)
class MlflowAuth:
    """MLflow's basic-auth app: its admin, and the permission every other user has on what others created."""

    admin_password: str
    default_permission: str = "READ"


@contextlib.contextmanager
def mlflow_server(workdir: Path, *, backend: str | None = None, artifacts_destination: str | None = None,
                  auth: MlflowAuth | None = None, port: int | None = None, env: Mapping[str, str] | None = None,
                  timeout_s: float = 60) -> Iterator[MlflowServer]:
    """`mlflow server` serving artifacts: by default an sqlite backend store and artifacts in a folder of `workdir`;
    `backend` (a database URI), `artifacts_destination` (s3://…, with its credentials in `env`) and `auth` make it
    a team's server (deploy/docker-compose.yml). The same `workdir` and `port` start the same server again."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    artifacts = workdir / "mlflow-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mlflow", "server", "--host", LOOPBACK, "--port", str(port), "--workers", "1",
               "--backend-store-uri", backend or f"sqlite:///{workdir / 'mlflow.db'}",
               "--artifacts-destination", artifacts_destination or artifacts.as_uri(), "--serve-artifacts"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
    if auth is not None:
        config = workdir / "basic_auth.ini"
        config.write_text("[mlflow]\n"
                          f"default_permission = {auth.default_permission}\n"
                          f"database_uri = sqlite:///{workdir / 'basic_auth.db'}\n"
                          "admin_username = admin\n"
                          f"admin_password = {auth.admin_password}\n"
                          "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        command += ["--app-name", "basic-auth"]
        env.update({"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)})
    log = workdir / "mlflow-server.log"
    process = subprocess.Popen(command, stdout=open(log, "a"), stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    url = f"http://{LOOPBACK}:{port}"
    try:
        wait_until(lambda: _answers(f"{url}/health"), [process], f"mlflow server at {url}", log, timeout_s)
        yield MlflowServer(url, artifacts)
    finally:
        stop_processes(process)


@dataclass(frozen=True)
class PostgresServer:
    uri: str  # postgresql+psycopg2://USER:PASSWORD@127.0.0.1:PORT/DATABASE: what `mlflow server --backend-store-uri`
    # takes (the driver named: SQLAlchemy 2.1 would pick psycopg 3 for a bare postgresql://)
    env: Mapping[str, str]  # what psql and pg_* need to reach it (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE)


def postgres_programs() -> Path | None:
    """The folder of PostgreSQL's server programs (Debian's `postgresql`: /usr/lib/postgresql/N/bin), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    initdb = str(found[-1]) if found else shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@contextlib.contextmanager
def postgres_server(*, database: str = "mlflow", user: str = "mlflow",
                    timeout_s: float = 60) -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of its own (initdb in a new temp folder) on 127.0.0.1 only, with password
    authentication over TCP. PostgreSQL refuses to run as root: run by root, its files and processes belong to the
    `postgres` user (which Debian's package creates)."""
    programs = postgres_programs()
    if programs is None:
        raise RuntimeError("no PostgreSQL server programs here (apt-get install postgresql)")
    home = Path(tempfile.mkdtemp(prefix="autoprune-pg-", dir="/tmp"))  # reachable by the postgres user
    password, port = secrets.token_hex(12), free_port()
    (home / "password").write_text(password)
    as_owner: list[str] = []
    if os.geteuid() == 0:
        import pwd

        owner = pwd.getpwnam("postgres")
        for path in (home, home / "password"):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        as_owner = ["runuser", "-u", "postgres", "--"]
    log = home / "postgres.log"
    subprocess.run([*as_owner, str(programs / "initdb"), "-D", str(home / "data"), "-U", user, "-E", "UTF8",
                    f"--pwfile={home / 'password'}", "--auth-host=scram-sha-256", "--auth-local=peer"],
                   check=True, capture_output=True, timeout=120)
    process = subprocess.Popen([*as_owner, str(programs / "postgres"), "-D", str(home / "data"), "-p", str(port),
                                "-h", LOOPBACK, "-k", str(home)], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    env = {"PGHOST": LOOPBACK, "PGPORT": str(port), "PGUSER": user, "PGPASSWORD": password, "PGDATABASE": database}
    try:
        ready = [str(programs / "pg_isready"), "-h", LOOPBACK, "-p", str(port)]
        wait_until(lambda: subprocess.run(ready, capture_output=True).returncode == 0, [process],
                    f"PostgreSQL on port {port}", log, timeout_s)
        subprocess.run([str(programs / "createdb"), database], check=True, capture_output=True, timeout=60,
                       env={**os.environ, **env})
        yield PostgresServer(f"postgresql+psycopg2://{user}:{password}@{LOOPBACK}:{port}/{database}", env)
    finally:
        stop_processes(process, signal_=signal.SIGINT)  # PostgreSQL's fast shutdown (SIGTERM waits for every client)
        shutil.rmtree(home, ignore_errors=True)


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # host:port
    env: Mapping[str, str]  # the credentials and endpoint a client process needs

    def uri(self, bucket: str, prefix: str) -> str:
        """A storage URI for Ray Tune (pyarrow reads the endpoint from its query)."""
        return f"s3://{bucket}/{prefix}?endpoint_override={self.endpoint}&scheme=http&region=us-east-1"


@contextlib.contextmanager
def s3_server(workdir: Path, *, buckets: tuple[str, ...] = ("autoprune",), timeout_s: float = 60) -> Iterator[S3Server]:
    """An S3-compatible object store (moto's server, in memory) on loopback, with `buckets` created."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = workdir / "s3-server.log"
    process = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", LOOPBACK, "-p", str(port)],
                               stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"{LOOPBACK}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "loopback", "AWS_SECRET_ACCESS_KEY": "loopback", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        # creating the buckets is the readiness probe: PUT /bucket answers 200 once the server is up
        wait_until(lambda: all(_answers(f"http://{endpoint}/{bucket}", "PUT") for bucket in buckets), [process],
                    f"the S3 server at {endpoint}", log, timeout_s)
        yield S3Server(endpoint, env)
    finally:
        stop_processes(process)


def stop_processes(*processes: subprocess.Popen, grace_s: float = 15, signal_: int = signal.SIGTERM) -> None:
    """`signal_` to each process group at once (SIGTERM: a `ray start --block` stops its node's processes), then
    SIGKILL to those still there after `grace_s`: nodes stop side by side, not one after the other."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal_)
    deadline = time.monotonic() + grace_s
    for process in running:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
