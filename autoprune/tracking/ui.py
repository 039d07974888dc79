"""`autoprune ui`: MLflow's UI on a search's store, and the address that opens its front.

A local store (sqlite, the default) has no server: this starts MLflow's own (`mlflow server`, bound to 127.0.0.1
unless told otherwise) on it and prints the front's address once the server answers. A tracking server already
serves the UI: the address is printed and nothing is started.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Callable

from autoprune.errors import AutopruneError
from autoprune.ports import check_port_free
from autoprune.tracking import view
from autoprune.tracking.schema import ROLE_SEARCH, ROLE_TAG, VIEW_TAG_PREFIX
from autoprune.tracking.store import client, is_tracking_server, local_artifacts

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 5000


def local_ui(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    return f"http://{host}:{port}"


def ui_hint(tracking_uri: str, view_path: str) -> str:
    """What the end of a search prints: the front's address, and for a local store the command that serves it
    (at its default port; `autoprune ui` prints the address again)."""
    if is_tracking_server(tracking_uri):
        return view.ui_address(tracking_uri, view_path)
    return (f"autoprune ui --tracking-uri {shlex.quote(tracking_uri)}   (then open"
            f" {view.ui_address(local_ui(), view_path)})")


@dataclass(frozen=True)
class SearchView:
    experiment: str
    run_id: str  # the search's parent run
    path: str  # its front's address below the UI's root


def find_search(tracking_uri: str, *, experiment: str | None = None, run_id: str | None = None,
                with_view: bool = True) -> SearchView:
    """The search to show: `run_id`, else the newest finished search (in `experiment`, if given) — with
    `with_view`, the newest whose front has a view in the UI (published by this version of autoprune or later:
    `autoprune publish RUN` adds one)."""
    mlflow = client(tracking_uri)  # (a local store that does not exist is an error there)
    try:
        if run_id is not None:
            try:
                run = mlflow.get_run(run_id)
            except Exception as error:
                raise AutopruneError(f"no MLflow run {run_id!r} at {tracking_uri!r} ({str(error)[:200]})") from None
            if run.data.tags.get(ROLE_TAG) != ROLE_SEARCH:
                raise AutopruneError(f"MLflow run {run_id!r} is not a search's parent run")
            runs = [run]
        else:
            if experiment:
                experiments = [found for found in [mlflow.get_experiment_by_name(experiment)] if found]
                if not experiments:
                    raise AutopruneError(f"no MLflow experiment named {experiment!r} at {tracking_uri!r}")
            else:
                experiments = mlflow.search_experiments()
            runs = mlflow.search_runs([e.experiment_id for e in experiments],
                                      f"tags.`{ROLE_TAG}` = '{ROLE_SEARCH}' and attributes.status = 'FINISHED'",
                                      order_by=["attributes.start_time DESC"], max_results=200)
    except AutopruneError:
        raise
    except Exception as error:
        raise AutopruneError(f"MLflow at {tracking_uri!r} is not usable ({type(error).__name__}:"
                             f" {str(error)[:200]})") from None
    for run in runs:
        found = mlflow.get_experiment(run.info.experiment_id)
        if not with_view or VIEW_TAG_PREFIX + run.info.run_id in found.tags:
            return SearchView(found.name, run.info.run_id, view.front_path(found.experiment_id, run.info.run_id))
    where = f"run {run_id!r}" if run_id else f"experiment {experiment!r}" if experiment else tracking_uri
    if not with_view:
        raise AutopruneError(f"{where}: no finished search yet (`autoprune search SPEC` runs one)")
    raise AutopruneError(f"{where}: no finished search with a front view (a search published by an older autoprune"
                         " gets one from `autoprune publish RUN`)")


def serve_ui(tracking_uri: str, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
             ready: Callable[[str], None], timeout_s: float = 120) -> int:
    """Run MLflow's server on the local store `tracking_uri` until it stops (Ctrl-C, SIGTERM, the terminal closed);
    `ready(base_url)` once it answers. Returns the server's exit status."""
    check_port_free(host, port, holder="another server (an MLflow UI?)")  # else the address printed could be another server's
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri, "--host", host,
               "--port", str(port), "--workers", "1",  # one person's browser: one worker
               "--uvicorn-opts=--no-access-log"]  # a line per request would bury the address
    artifacts = local_artifacts(tracking_uri)
    if artifacts:  # runs logged by autoprune name their artifacts' folder; new ones (from the UI) go there too
        command += ["--default-artifact-root", artifacts]
    base = local_ui(host, port)
    stopping = (signal.SIGTERM, signal.SIGHUP)  # stopped like Ctrl-C: the server goes down with it
    previous = {sig: signal.signal(sig, _interrupt) for sig in stopping}
    server = None
    try:
        # its own process group (the server's workers stop with it); its output goes to our stderr, so that what
        # is read from our stdout is the address
        server = subprocess.Popen(command, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
                                  stdout=sys.stderr.fileno(), start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not (_answers(base) and server.poll() is None):
            if server.poll() is not None:
                raise AutopruneError(f"MLflow's server stopped at once (exit {server.returncode}); see its output"
                                     " above")
            if time.monotonic() > deadline:
                raise AutopruneError(f"MLflow's server did not answer at {base} within {timeout_s:.0f} s")
            time.sleep(0.5)
        ready(base)
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for sig in (signal.SIGINT, *stopping):  # a second Ctrl-C must not cut the server's stop short
            signal.signal(sig, signal.SIG_IGN)
        if server is not None:
            _stop(server)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _stop(server: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _answers(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
