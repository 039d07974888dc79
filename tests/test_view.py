"""What MLflow's UI is given to show a search: the saved view of its front, run colours, descriptions, the dense
model's run. Real MLflow (sqlite in a temp dir), a search published from records without Ray; the page itself is
read in a real browser in test_e2e.py."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from autoprune.cli import main
from autoprune.config import HealConfig, PruneConfig, TrialConfig
from autoprune.measure.timing import LatencyProfile
from autoprune.result import TrialRecord, TrialResult
from autoprune.tracking import schema, view
from autoprune.tracking.publish import publish_search
from autoprune.tracking.store import Tracker, resolve_tracking_uri
from autoprune.tracking.ui import find_search, ui_hint


def saved_model(folder: Path) -> None:
    """A real saved model in `folder` (a tiny ResNet): a registered version is an MLflow model made from one."""
    from conftest import TINY_RESNET

    from autoprune.saved import save_model

    save_model(TINY_RESNET.create().eval(), TINY_RESNET, folder, example_shape=(1, 3, 32, 32))


def _result(method: str, sparsity: float, accuracy: float, ms: float, heal: str = "distill") -> TrialResult:
    latency = LatencyProfile(ms, ms * 1.1, 0.01, 32, "float32", "cpu: test (1 thread)", 1, 10, (3, 32, 32), "2.x")
    config = TrialConfig(PruneConfig(method, {"all": sparsity}), HealConfig(heal, calibration_images=64, steps=20))
    return TrialResult(config, accuracy, latency, 1_000_000, 10_000, sparsity, {})


@pytest.fixture
def published(tmp_path: Path):
    tracker = Tracker(resolve_tracking_uri(None, None, tmp_path), "view-exp")
    parent = tracker.start_search(name="view", spec={"name": "view"}, run_name="view_1")
    dense = _result("none", 0.0, 0.95, 10.0, heal="none")
    tracker.log_dense(parent, dense)
    records = []
    for trial_id, (method, sparsity, accuracy, ms) in {
        "fast": ("structured", 0.6, 0.90, 4.0), "mid": ("structured", 0.3, 0.94, 7.0),
        "beaten": ("structured", 0.4, 0.89, 8.0),
    }.items():
        folder = tmp_path / "models" / trial_id
        saved_model(folder)
        records.append(TrialRecord(trial_id, _result(method, sparsity, accuracy, ms), model_dir=str(folder)))
    records.append(TrialRecord("broken", None, error="boom", params={"prune.method": "structured"}))
    result = publish_search(tracker, parent, name="view", cost_metric="latency_ms", registered_model="view-model",
                            dense=dense, records=records)
    return tracker, parent, dense, records, result


def test_the_view_shows_the_searchs_runs_as_accuracy_against_latency(published):
    tracker, parent, _, _, result = published
    experiment = tracker.client.get_experiment(tracker.experiment_id)
    assert experiment.tags[schema.EXPERIMENT_KIND_TAG] == view.EXPERIMENT_KIND
    state = json.loads(experiment.tags[schema.VIEW_TAG_PREFIX + parent])
    assert state["searchFilter"] == f"tags.`{schema.PARENT_TAG}` = '{parent}'"
    assert state["runsHiddenMode"] == "SHOW_ALL"  # the UI's default would chart only the first 10 runs
    [chart] = state["compareRunCharts"]
    assert (chart["type"], chart["xaxis"]["key"], chart["yaxis"]["key"]) == ("SCATTER", "latency_ms", "accuracy")
    assert state["compareRunSections"][0]["uuid"] == chart["metricSectionId"]
    assert result.view_path == f"#/experiments/{tracker.experiment_id}/runs?viewStateShareKey={parent}" \
                               "&compareRunsMode=CHART&workflowType=machine_learning"
    # the search's runs in that filter: the trials and the dense model, whose result the chart draws as a point
    runs = tracker.client.search_runs([tracker.experiment_id], state["searchFilter"])
    assert len(runs) == 5
    [dense_run] = [run for run in runs if run.data.tags[schema.ROLE_TAG] == schema.ROLE_DENSE]
    assert dense_run.data.metrics["accuracy"] == 0.95 and dense_run.data.metrics["latency_ms"] == 10.0


def test_front_trials_are_red_the_others_grey_and_the_dense_model_black(published):
    tracker, parent, _, _, result = published
    colors = {run.data.tags[schema.TRIAL_TAG]: run.data.tags.get(schema.RUN_COLOR_TAG)
              for run in tracker.child_runs(parent)}
    assert [record.trial_id for record in result.front] == ["fast", "mid"]
    assert colors == {"fast": view.FRONT_COLOR, "mid": view.FRONT_COLOR, "beaten": view.TRIAL_COLOR, "broken": None}
    dense_runs = tracker.client.search_runs(
        [tracker.experiment_id], f"tags.`{schema.ROLE_TAG}` = '{schema.ROLE_DENSE}'")
    assert [run.data.tags[schema.RUN_COLOR_TAG] for run in dense_runs] == [view.DENSE_COLOR]
    names = {run.data.tags[schema.TRIAL_TAG]: run.info.run_name for run in tracker.child_runs(parent)}
    assert names["fast"] == "structured 60% + distill · fast" and names["broken"] == "failed · broken"


def test_versions_and_the_search_read_as_sentences_with_their_links(published):
    tracker, parent, _, _, result = published
    versions = {str(v.version): v for v in tracker.client.search_model_versions("name='view-model'")}
    fast = versions[result.versions[0]]
    assert fast.description.startswith("structured pruning to 60% sparsity, healed by distill (20 steps on 64 images):"
                                       " top-1 0.9000 at 4 ms median (p90 4.4 ms) on cpu: test (1 thread), batch 32,"
                                       " float32.")
    assert f"[its run](#/experiments/{tracker.experiment_id}/runs/{fast.run_id})" in fast.description
    note = tracker.client.get_run(parent).data.tags[schema.NOTE_TAG]
    assert f"({result.view_path})" in note
    assert f"[view-model v{result.versions[0]}](#/models/view-model/versions/{result.versions[0]})" in note
    assert "4 trials (1 failed), 2 on the Pareto front" in note
    experiment_note = tracker.client.get_experiment(tracker.experiment_id).tags[schema.NOTE_TAG]
    # names are literal text in Markdown (the run's "_" is not emphasis)
    assert f"- [view\\_1]({result.view_path}): 4 trials, 2 on the front (latency on cpu: test (1 thread))" \
        in experiment_note


def test_publishing_again_keeps_one_dense_run_and_one_view(published):
    tracker, parent, dense, records, result = published
    again = publish_search(tracker, parent, name="view", cost_metric="latency_ms", registered_model="view-model",
                           dense=dense, records=records)
    assert again.view_path == result.view_path and again.versions == result.versions
    runs = tracker.client.search_runs([tracker.experiment_id], f"tags.`{schema.PARENT_TAG}` = '{parent}'")
    assert sorted(run.data.tags[schema.ROLE_TAG] for run in runs) == ["dense"] + ["trial"] * 4
    tags = tracker.client.get_experiment(tracker.experiment_id).tags
    assert [key for key in tags if key.startswith(schema.VIEW_TAG_PREFIX)] == [schema.VIEW_TAG_PREFIX + parent]


def test_ui_finds_the_newest_search_and_says_where_its_front_is(published, tmp_path):
    tracker, parent, _, _, result = published
    found = find_search(tracker.tracking_uri)
    assert (found.run_id, found.experiment, found.path) == (parent, "view-exp", result.view_path)
    assert find_search(tracker.tracking_uri, experiment="view-exp").run_id == parent
    hint = ui_hint(tracker.tracking_uri, result.view_path)
    assert hint.startswith(f"autoprune ui --tracking-uri {tracker.tracking_uri}")
    assert f"http://127.0.0.1:5000/{result.view_path}" in hint
    assert ui_hint("http://mlflow.example:5000/", "#/x") == "http://mlflow.example:5000/#/x"


@pytest.mark.parametrize(("flags", "message"), [
    (["--experiment", "nope"], "no MLflow experiment named 'nope'"),
    (["--run", "0" * 32], "no MLflow run"),
])
def test_ui_errors_name_what_is_missing(published, capsys, flags, message):
    tracker = published[0]
    assert main(["ui", "--tracking-uri", tracker.tracking_uri, *flags]) == 1
    assert message in capsys.readouterr().err


def test_ui_without_a_store_says_how_to_make_one(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: the work directory's store
    assert main(["ui", "--workdir", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert "no MLflow store at" in err and "autoprune demo" in err
    assert not (tmp_path / "none").exists()  # looking did not create an empty store


def test_a_persons_description_of_the_experiment_is_kept(published):
    tracker, parent, dense, records, _ = published
    tracker.client.set_experiment_tag(tracker.experiment_id, schema.NOTE_TAG, "Our pruning runs for the Q3 model.")
    publish_search(tracker, parent, name="view", cost_metric="latency_ms", registered_model="view-model",
                   dense=dense, records=records)
    note = tracker.client.get_experiment(tracker.experiment_id).tags[schema.NOTE_TAG]
    assert note == "Our pruning runs for the Q3 model."


def test_ui_on_a_taken_port_says_so(published, capsys):
    tracker = published[0]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", "--tracking-uri", tracker.tracking_uri, "--port", str(port)]) == 1
    assert f"cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err


def test_only_the_trials_the_final_pass_timed_can_be_on_the_front(tmp_path):
    """A trial the final pass left out (beaten with certainty while the search ran) keeps its rescaled search-time
    latency, which must not put it on the front because the pass found the others slower: the registered
    latencies are all the pass's."""
    tracker = Tracker(resolve_tracking_uri(None, None, tmp_path), "final-exp")
    parent = tracker.start_search(name="final", spec={"name": "final"}, run_name="final_1")
    dense = _result("none", 0.0, 0.95, 10.0, heal="none")
    tracker.log_dense(parent, dense)
    records = []
    for trial_id, (accuracy, ms) in {"left-out": (0.90, 3.0), "timed": (0.92, 6.0)}.items():
        saved_model(tmp_path / "models" / trial_id)
        records.append(TrialRecord(trial_id, _result("structured", 0.5, accuracy, ms),
                                   model_dir=str(tmp_path / "models" / trial_id)))
    result = publish_search(tracker, parent, name="final", cost_metric="latency_ms", registered_model="final-model",
                            dense=dense, records=records, timed_again={"timed"})
    assert [record.trial_id for record in result.front] == ["timed"]
