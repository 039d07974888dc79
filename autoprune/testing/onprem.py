"""An on-prem Ray cluster started by Ray's own launcher (`ray up` with the `local` provider) over SSH, on loopback.

What a team does with its machines, done on one: an SSH server (Debian's openssh-server) of its own listening on
127.0.0.2:22 only, a login with a key, and `cluster/onprem.yaml` with the fields a team edits pointed at them. Ray
then does the rest as on real machines: it copies the cluster's token, runs the set-up commands and `ray start` over
SSH, `ray exec` runs the search on the head, and `ray down` stops it over SSH.

It needs root (to add the login, to listen on port 22, for a PID namespace: see `ssh_login`); `why_no_ssh` says
what is missing where it cannot run. Everything made here is removed when the contexts end, also when their bodies
fail: the cluster's processes (with the SSH server's namespace), the login, its home.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import yaml

from autoprune.testing.loopback import RAY_NODE_IP, log_tail, stop_processes, wait_until

HEAD_IP = RAY_NODE_IP  # loopback (127.0.0.2), an address Ray keeps as given
SSH_PORT = 22  # the port Ray's launcher connects to (its configs have no port field)
HEAD_PORT = 6379  # cluster/onprem.yaml's `ray start --head --port`
LOGIN = "autoprune-node"  # the nodes' SSH account (cluster/onprem.yaml's ssh_user)
ENVIRONMENT = "autoprune-env"  # cluster/onprem.yaml installs autoprune in ~/autoprune-env on every node


@dataclass(frozen=True)
class SshLogin:
    user: str
    key: Path  # the private key that logs in as `user` on HEAD_IP
    home: Path


@dataclass(frozen=True)
class OnpremCluster:
    config: Path  # the launcher config `ray up` ran with
    address: str  # the head's GCS, for `--address` from this machine
    env: Mapping[str, str]  # what `ray` commands and Ray clients here need: the cluster's token, the launcher's state
    started_s: float  # how long `ray up` took


def listening(address: str) -> bool:
    """Whether something accepts connections at `address` (HOST:PORT)."""
    host, port = address.rsplit(":", 1)
    with socket.socket() as probe:
        return probe.connect_ex((host, int(port))) == 0


def why_no_ssh() -> str | None:
    """Why an SSH login on loopback cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (to add the nodes' login and to listen on port 22)"
    for program, package in (("/usr/sbin/sshd", "openssh-server"), ("ssh", "openssh-client"), ("rsync", "rsync"),
                             ("useradd", "passwd"), ("unshare", "util-linux")):
        if shutil.which(program) is None:
            return f"no {program} (apt-get install {package})"
    if subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode != 0:
        return "cannot make a PID namespace here (unshare --pid: a container without CAP_SYS_ADMIN?)"
    for port, what in ((SSH_PORT, "an SSH server"), (HEAD_PORT, "a Ray head")):
        if listening(f"{HEAD_IP}:{port}"):
            return f"{HEAD_IP}:{port} is in use ({what} already runs here?)"
    return None


# PID 1 of the SSH server's PID namespace: starts sshd, reaps the processes Ray's daemons leave to it (else they
# linger as zombies that `ray stop` waits for), and exits on SIGTERM — which ends every process in the namespace.
_INIT = ("import os, signal, subprocess, sys\n"
         "signal.signal(signal.SIGTERM, lambda *_: os._exit(0))\n"
         "server = subprocess.Popen(sys.argv[1:])\n"
         "while os.wait()[0] != server.pid: pass\n")


@contextlib.contextmanager
def ssh_login(workdir: Path, *, environment: str | None = None, timeout_s: float = 30) -> Iterator[SshLogin]:
    """An SSH server on 127.0.0.2:22 that lets one new login in with a new key, its home in a temp folder; the
    server's log goes to `workdir`.

    The server and everything started through it live in a PID namespace of their own: the launcher's `ray stop`
    stops every Ray process it can see, and the tests' own Ray, outside, must survive it. The login is an alias of
    root (uid 0) with a home of its own, so that it can run this test's Python wherever it is installed
    (`environment`, linked as its ~/autoprune-env: the machine as an admin prepared it, so that the config's
    install step finds autoprune there). TMPDIR in its ~/.bashrc keeps its Ray's files out of /tmp/ray, which the
    tests' own Ray uses."""
    root = Path(tempfile.mkdtemp(prefix="autoprune-ssh-", dir="/tmp"))
    home, key, host_key = root / "home", root / "client_key", root / "host_key"
    for path in (key, host_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    _remove_user(LOGIN)  # left by an interrupted run
    process = None
    try:
        # password "*": none, but not a locked account, which sshd would refuse even with a key
        subprocess.run(["useradd", "--non-unique", "--uid", "0", "--gid", "0", "--no-create-home", "--home-dir",
                        str(home), "--shell", "/bin/bash", "--password", "*", LOGIN], check=True, capture_output=True)
        shutil.copytree("/etc/skel", home)
        (home / "tmp").mkdir()
        with open(home / ".bashrc", "a") as bashrc:
            bashrc.write(f"export TMPDIR={home / 'tmp'}\n")
        (home / ".ssh").mkdir(mode=0o700)
        (home / ".ssh" / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
        if environment:
            (home / ENVIRONMENT).symlink_to(environment)
        config = root / "sshd_config"
        config.write_text(f"ListenAddress {HEAD_IP}\nPort {SSH_PORT}\nHostKey {host_key}\nPidFile {root}/sshd.pid\n"
                          f"AllowUsers {LOGIN}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                          "KbdInteractiveAuthentication no\nUsePAM no\nX11Forwarding no\nPrintMotd no\n")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        workdir.mkdir(parents=True, exist_ok=True)
        log = workdir / "sshd.log"
        process = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, "-c", _INIT,
             "/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        login = SshLogin(LOGIN, key, home)
        wait_until(lambda: _can_log_in(login), [process], f"sshd on {HEAD_IP}:{SSH_PORT}", log, timeout_s)
        yield login
    finally:
        if process is not None:
            stop_processes(process, grace_s=5)
        _remove_user(LOGIN)
        shutil.rmtree(root, ignore_errors=True)


def _can_log_in(login: SshLogin) -> bool:
    done = subprocess.run(["ssh", *_ssh_options(login.key), f"{login.user}@{HEAD_IP}", "true"], capture_output=True,
                          timeout=30)
    return done.returncode == 0


def _ssh_options(key: Path) -> list[str]:
    return ["-i", str(key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o",
            "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5"]


def _remove_user(user: str) -> None:
    """The login's entry removed, if there is one (its uid is root's: --force, as root's processes run)."""
    if subprocess.run(["id", "-u", user], capture_output=True).returncode == 0:
        subprocess.run(["userdel", "--force", user], capture_output=True)


def onprem_config(template: Path, login: SshLogin, *, head_ip_in_template: str, token: Path) -> dict:
    """`template` (cluster/onprem.yaml) with the fields its README tells a team to edit pointed at this machine:
    the head's address (also in its `ray start`), no other nodes, the SSH user and key, the token's file."""
    config = yaml.safe_load(template.read_text().replace(head_ip_in_template, HEAD_IP))
    config["provider"].update(head_ip=HEAD_IP, worker_ips=[])
    config["auth"] = {"ssh_user": login.user, "ssh_private_key": str(login.key)}
    config["file_mounts"] = {remote: str(token) for remote, local in config["file_mounts"].items()
                             if local.endswith("auth_token")}
    return config


@contextlib.contextmanager
def ray_up(config: dict, workdir: Path, *, timeout_s: float = 300) -> Iterator[OnpremCluster]:
    """`ray up -y` of `config` (its token file named in its file_mounts), `ray down -y` at the end. The launcher's
    state goes to a temp folder of its own (TMPDIR), not to /tmp/ray, which the tests' own Ray uses."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "onprem.yaml"
    path.write_text(yaml.safe_dump(config))
    [token] = [Path(local) for local in config["file_mounts"].values()]
    state = Path(tempfile.mkdtemp(prefix="autoprune-up-", dir="/tmp"))
    env = {**os.environ, "TMPDIR": str(state), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": token.read_text().strip()}
    env.pop("RAY_ADDRESS", None)
    log = workdir / "ray-up.log"
    # The launcher's SSH connection sockets go to /tmp/ray_ssh_* whatever TMPDIR says: those it makes are removed
    ssh_sockets = set(Path("/tmp").glob("ray_ssh_*"))
    started = time.monotonic()
    try:
        up = subprocess.run([_ray(), "up", "-y", "--no-config-cache", str(path)], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env=env, timeout=timeout_s, cwd=workdir)
        if up.returncode != 0:
            raise RuntimeError(f"`ray up` failed ({log}):\n{log_tail(log, 40)}")
        yield OnpremCluster(path, f"{HEAD_IP}:{HEAD_PORT}", env, time.monotonic() - started)
    finally:
        subprocess.run([_ray(), "down", "-y", str(path)], stdout=open(workdir / "ray-down.log", "w"),
                       stderr=subprocess.STDOUT, env=env, timeout=120, cwd=workdir)
        for path in [state, *(set(Path("/tmp").glob("ray_ssh_*")) - ssh_sockets)]:
            shutil.rmtree(path, ignore_errors=True)


def ray_command(cluster: OnpremCluster, *args: str, **popen) -> subprocess.Popen:
    """`ray ARGS… CONFIG`'s process (`exec`, `rsync-up`, …), as the launcher's user runs it."""
    command, rest = args[0], args[1:]
    return subprocess.Popen([_ray(), command, str(cluster.config), *rest], env=dict(cluster.env), **popen)


def new_token(path: Path) -> Path:
    """A new cluster token in a file, as `ray get-auth-token --generate` makes one (kept out of ~/.ray here)."""
    path.write_text(secrets.token_hex(32))
    path.chmod(0o600)
    return path


def _ray() -> str:
    return str(Path(sys.executable).with_name("ray"))
