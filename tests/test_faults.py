"""A search survives its driver being killed: real processes, no mocks.

The search runs as the CLI in its own process with its own local Ray (as a user runs it); the test kills that
process with SIGKILL, reading the progress lines to choose the moment. (Failing trials and killed trial workers are
in test_e2e.py, next to the search they disturb; the MLflow server going away mid-search, and `autoprune publish`
completing the search, twice without a change, in test_team_server.py, on the team's server.)
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from autoprune.bench import faults as bench_faults
from autoprune.tracking.store import Tracker, resolve_tracking_uri

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

TRIALS = 4
# The chaos benchmark's search, smaller and without its deliberate failures: these tests disturb it from outside.
SPEC = copy.deepcopy(bench_faults.SPEC)
SPEC["name"] = "faults"
SPEC["search"]["trials"] = TRIALS
# healed in rungs (10 of its 25 steps, then the rest), so that the kill finds trials between rungs and the resumed
# search's judge must start from what the finished trials showed at their rung
SPEC["search"]["halving"] = {"rungs": [0.4]}
SPEC["search"]["sampler"] = "gp"  # the default, with its coarse start: a resumed search must not enqueue it again
SPEC["mlflow"] = {"experiment": "faults", "registered_model": "faults-model"}
# structured at high sparsity: faster than dense, so the front (and the registry) is never empty by chance
SPEC["space"] = {"prune": {"methods": ["structured", "magnitude"], "sparsity": {"low": 0.6, "high": 0.8}},
                 "heal": {"methods": ["distill"], "calibration_images": 32, "steps": 25, "batch_size": 16}}


def _cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "autoprune.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})})


def _read_until(process: subprocess.Popen, marker: str, timeout_s: float = 300) -> list[str]:
    """The process's output lines up to the first one containing `marker`."""
    lines, deadline = [], time.monotonic() + timeout_s
    for line in process.stdout:
        lines.append(line)
        if marker in line or time.monotonic() > deadline:
            break
    assert any(marker in line for line in lines), "".join(lines[-30:])
    return lines


def _finish(process: subprocess.Popen, timeout_s: float = 300) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout_s)
    return process.returncode, output


def _search_state(tracker: Tracker) -> tuple[object, dict[str, str]]:
    """The one parent run of the experiment, and its children as trial id → MLflow run id."""
    parents = tracker.client.search_runs([tracker.experiment_id], "tags.`autoprune.role` = 'search'")
    assert len(parents) == 1
    children = tracker.child_runs(parents[0].info.run_id)
    ids = [run.data.tags["autoprune.trial_id"] for run in children]
    assert len(ids) == len(set(ids)), f"a trial was logged twice: {sorted(ids)}"
    return parents[0], {run.data.tags["autoprune.trial_id"]: run.info.run_id for run in children}


def _registry_matches_front(tracker: Tracker, parent) -> None:
    versions = tracker.client.search_model_versions("name='faults-model'")
    keys = [version.tags["autoprune.trial_key"] for version in versions]
    assert len(keys) == len(set(keys)) == parent.data.metrics["front_size"] >= 1


def test_a_killed_driver_is_resumed_with_its_finished_trials_and_sampler_history(tmp_path):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    workdir = str(tmp_path / "runs")
    driver = _cli("search", "spec.yaml", "--workdir", workdir, cwd=tmp_path)
    _read_until(driver, f"[  2/{TRIALS} done")
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and whatever it started, with no chance to clean up
    driver.wait()

    tracker = Tracker(resolve_tracking_uri(None, None, workdir), "faults")
    parent, before = _search_state(tracker)
    assert parent.info.status == "RUNNING" and 2 <= len(before) < TRIALS

    resumed = _cli("search", "spec.yaml", "--workdir", workdir, "--resume", cwd=tmp_path)
    code, output = _finish(resumed)
    assert code == 0, output[-3000:]
    assert f"resuming search run {parent.info.run_id}" in output
    assert "successive halving: a trial that trains is judged at 10 steps of its 25" in output

    parent, after = _search_state(tracker)
    assert parent.info.status == "FINISHED" and len(after) == TRIALS
    assert all(after[trial] == run for trial, run in before.items())  # kept, not logged again
    _registry_matches_front(tracker, parent)

    # Tune's record: every trial ended once, those ended before the kill were not run again (one checkpoint each)
    from ray.tune import ExperimentAnalysis
    from ray.tune.search.optuna import OptunaSearch

    experiment = tmp_path / "runs" / "ray" / parent.info.run_id
    trials = ExperimentAnalysis(str(experiment)).trials
    assert len(trials) == TRIALS and all(trial.status == "TERMINATED" for trial in trials)
    assert all(len(list(Path(trial.storage.trial_fs_path).glob("checkpoint_*"))) == 1 for trial in trials)
    # The sampler kept its history: a fresh sampler with the same seed would propose the first configurations again
    sparsities = {run.data.params["prune.sparsity.all"] for run in tracker.child_runs(parent.info.run_id)}
    assert len(sparsities) == TRIALS
    searcher = OptunaSearch()
    searcher.restore_from_dir(str(experiment))
    # each trial told once: completed, or pruned where the judge stopped it at its rung (never as completed)
    states = [t.state.name for t in searcher._ot_study.trials]
    stopped = [run for run in tracker.child_runs(parent.info.run_id)
               if run.data.tags.get("stopped", "").startswith("outdone")]
    assert len(states) == TRIALS and states.count("PRUNED") == len(stopped)
    assert states.count("COMPLETE") + states.count("PRUNED") == TRIALS
