"""A real search beside a busy process the test starts and stops: local Ray (2 CPUs), Optuna, MLflow on sqlite.

What broke before: the dense model was timed alone at the start and every trial later under whatever load there
was, so a neighbour made pruned models look slower than dense and the search threw them away unhealed. Paired with
the dense model, a trial's speedup survives the neighbour; the stop rule reads its interval; the front is timed
again at the end and those are the numbers registered, with what else was running recorded beside them.
"""

from __future__ import annotations

import json

import pytest

from autoprune.driver.search import search
from autoprune.space.load import parse_spec
from autoprune.testing.load import busy_processes
from autoprune.tracking.final import FINAL_FILE
from autoprune.tracking.publish import experiment_path, publish_run
from autoprune.tracking.select import registered_versions
from autoprune.tracking.store import Tracker

pytestmark = pytest.mark.e2e

# A BatchNorm ResNet wide enough that removing most of its block-internal channels shows in its latency at batch 8
# on one thread (a narrower one is all per-layer overhead, and no faster pruned than dense).
BUSY_SPEC = {
    "name": "e2e-busy",
    "model": {"name": "resnet18", "num_classes": 10, "train_steps": 60,
              "kwargs": {"layers": [1, 1, 1, 1], "channels": [32, 64, 128, 256]}},
    "data": {"source": "reference", "eval_images": 200},
    "profile": {"batch_size": 8, "warmup": 3, "repeats": 10, "max_seconds": 10},  # memory_format: auto
    "search": {"trials": 4, "concurrency": 2, "sampler": "random", "seed": 2, "resources": {"cpu": 1}},
    # stop_unless_faster: true, the default — the rule under test
    "mlflow": {"experiment": "e2e-busy", "registered_model": "e2e-busy-model"},
    "space": {
        "prune": {"methods": ["structured", "vbp"], "sparsity": {"mode": "global", "low": 0.6, "high": 0.8}},
        "heal": {"methods": ["finetune"], "calibration_images": 32, "steps": 3, "lr": 1e-3, "batch_size": 8},
    },
}


@pytest.fixture(scope="module")
def busy(local_ray, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("busy")
    said: list[str] = []
    with busy_processes(1) as pids:  # one busy process per two cores, for the whole search
        outcome = search(parse_spec(BUSY_SPEC), workdir=workdir, echo=said.append)
    assert len(pids) == 1
    return outcome, workdir, said


def test_a_busy_neighbour_stops_no_faster_model(busy):
    outcome, _, said = busy
    assert len(outcome.records) == 4 and not outcome.failed, outcome.failed[:1]
    for record in outcome.records:
        latency = record.result.latency
        assert latency.paired and latency.speedup_low <= latency.speedup <= latency.speedup_high
        assert not record.result.stopped, (record.result.stopped, latency)  # 60–80% of the channels gone: faster
        assert latency.conditions["busy_processes"] >= 1  # the neighbour (and the other trial) were seen
    assert outcome.front, "\n".join(said)
    assert any("timing the front again" in line for line in said)


def test_the_registered_latencies_are_the_final_passs(busy):
    outcome, workdir, _ = busy
    path = experiment_path(str(workdir / "ray"), outcome.parent_run_id)
    final = json.loads((workdir / "ray" / outcome.parent_run_id / FINAL_FILE).read_text())
    assert outcome.dense.latency.median_ms == pytest.approx(final["dense"]["median_ms"])
    tracker = Tracker(outcome.tracking_uri, "e2e-busy")
    versions = {v.run_id: v for v in registered_versions("e2e-busy-model", tracking_uri=outcome.tracking_uri)}
    for record in outcome.front:
        timed = final["trials"][record.trial_id]
        assert record.result.latency.median_ms == pytest.approx(timed["median_ms"])
        assert record.result.searched_latency_ms is not None  # the trial's own measurement is kept beside it
        run = tracker.child_runs(outcome.parent_run_id, trial_id=record.trial_id)[0]
        assert versions[run.info.run_id].latency_ms == pytest.approx(timed["median_ms"])
        assert run.data.metrics["latency_ms"] == pytest.approx(timed["median_ms"])  # what the UI's charts read
    # publishing again (as after MLflow failed) reads the saved pass: the same numbers, nothing timed
    published = publish_run(outcome.parent_run_id, tracking_uri=outcome.tracking_uri, workdir=workdir, echo=print)
    assert [r.result.latency.median_ms for r in published.front] == [r.result.latency.median_ms
                                                                     for r in outcome.front]
    assert path.endswith(outcome.parent_run_id)


def test_what_else_ran_is_on_each_trials_run(busy):
    outcome, _, _ = busy
    tracker = Tracker(outcome.tracking_uri, "e2e-busy")
    for run in tracker.child_runs(outcome.parent_run_id):
        tags, metrics = run.data.tags, run.data.metrics
        assert int(tags["node.busy_processes"]) >= 1 and float(tags["node.load_1m"]) >= 0
        assert metrics["speedup_low"] <= metrics["speedup"] <= metrics["speedup_high"]
        assert metrics["reference_ms"] > 0 and metrics["latency_wide"] in (0, 1)
