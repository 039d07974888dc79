"""The CLI's contract: usage errors exit 2, a broken spec fails before Ray starts with the key named."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from autoprune.cli import main


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["best", "--model", "m"])  # --max-latency-ms missing
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2


def test_a_broken_spec_fails_fast_naming_the_key(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text((open(os.path.join(os.path.dirname(__file__), "..", "search_spaces", "demo.yaml")).read())
                    .replace("sampler: gp", "sampler: grid"))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "autoprune.cli", "search", str(spec), "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "search.sampler" in done.stderr and "'grid'" in done.stderr and "tpe, nsga2, random" in done.stderr
    assert "Traceback" not in done.stderr and "ray" not in done.stderr.lower()
    assert not (tmp_path / "ray").exists()  # Ray never started a run
    assert time.perf_counter() - started < 60


def test_best_without_a_store_says_what_to_do_and_creates_none(tmp_path, capsys):
    code = main(["best", "--model", "nothing", "--max-latency-ms", "1", "--workdir", str(tmp_path)])
    assert code == 1
    assert "no MLflow store at" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # MLflow would have created an empty store there


def test_retarget_and_publish_of_an_unknown_run_are_one_line_errors(tmp_path, capsys):
    from autoprune.tracking.store import Tracker, resolve_tracking_uri

    Tracker(resolve_tracking_uri(None, None, tmp_path), "some-experiment")  # a store, without that run
    capsys.readouterr()  # (MLflow's lines as it created the store)
    for command in ("retarget", "publish"):
        assert main([command, "nope", "--workdir", str(tmp_path)]) == 1
        err = capsys.readouterr().err
        assert "no MLflow run 'nope'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_methods_lists_the_registries(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "magnitude" in out and "distill" in out


@pytest.mark.faults
def test_an_unreachable_tracking_server_stops_the_search_before_anything_runs(tmp_path):
    """With MLflow's own retries (minutes of silence before its error): autoprune asks first, and says it in a line."""
    from autoprune.testing.loopback import free_port

    demo = os.path.join(os.path.dirname(__file__), "..", "search_spaces", "demo.yaml")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "autoprune.cli", "search", demo, "--workdir", str(tmp_path),
                           "--tracking-uri", url], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"autoprune: error: the MLflow tracking server at '{url}' does not"
                                                 " answer (Connection refused): start it, or check --tracking-uri /"
                                                 " $MLFLOW_TRACKING_URI / the spec's mlflow.tracking_uri"]
    assert not list(tmp_path.iterdir())  # no store, no Ray run, no training
    assert time.perf_counter() - started < 60  # (about 10 s here, most of it Python's imports; MLflow alone: 263 s)


def test_an_address_where_nothing_listens_is_a_one_line_error_at_once():
    """Ray itself would retry for 40 s, then raise a traceback; the check says it in a line, before ray.init."""
    from autoprune.driver.connect import start_ray
    from autoprune.errors import AutopruneError
    from autoprune.testing.loopback import free_port

    address = f"127.0.0.1:{free_port()}"
    started = time.perf_counter()
    with pytest.raises(AutopruneError, match=f"nothing answers at {address}.*is the Ray cluster up"):
        start_ray(address)
    assert time.perf_counter() - started < 10


def test_an_address_where_something_else_listens_is_a_one_line_error(monkeypatch):
    """A port that accepts connections but is no Ray cluster's (Ray's client would wait 40 s there)."""
    import socket

    from autoprune.driver import connect
    from autoprune.errors import AutopruneError

    monkeypatch.setattr(connect, "GCS_ANSWER_S", 1.0)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = "127.0.0.1:%d" % listener.getsockname()[1]
        started = time.perf_counter()
        with pytest.raises(AutopruneError, match=f"something answers at {address}, but no Ray cluster"):
            connect.start_ray(address)
    assert time.perf_counter() - started < 10
