"""A search whose Pareto front is empty (every trial slower than, or less accurate than, the dense model) ran: it
says plainly that nothing was registered and why, exits 0, and `best` on its registered model names that search
rather than telling the user to run one. Real MLflow (sqlite in a temp dir), searches published without Ray."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_publish import DEMO, _started_search
from test_view import _result, saved_model

from autoprune.cli import main
from autoprune.driver.outcome import SearchOutcome, summary_text
from autoprune.errors import NoModelMeetsTarget
from autoprune.result import TrialRecord
from autoprune.space.load import parse_spec
from autoprune.tracking.publish import publish_search
from autoprune.tracking.select import best
from autoprune.tracking.store import Tracker, resolve_tracking_uri

DENSE = _result("none", 0.0, 0.95, 10.0, heal="none")


@pytest.fixture(autouse=True)
def no_telemetry(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def _records(tmp_path: Path, trials: dict[str, tuple[float, float]]) -> list[TrialRecord]:
    """Healed trials (trial id → accuracy, latency in ms), each with a saved model folder."""
    records = []
    for trial_id, (accuracy, ms) in trials.items():
        folder = tmp_path / "models" / trial_id
        saved_model(folder)
        records.append(TrialRecord(trial_id, _result("structured", 0.5, accuracy, ms), model_dir=str(folder)))
    return records


# every trial slower than the dense model (10 ms), or less accurate (0.95), or both: the dense model beats them all
BEATEN = {"slower": (0.95, 12.0), "worse": (0.80, 10.0), "both": (0.90, 11.0)}


def _published(tmp_path: Path, raw: dict, trials: dict[str, tuple[float, float]]) -> str:
    """A search as `autoprune search` leaves it: its parent run with the spec, then its trials published."""
    spec = parse_spec(raw)
    run_id = _started_search(tmp_path, spec)
    tracker = Tracker(resolve_tracking_uri(None, None, tmp_path), spec.mlflow.experiment)
    tracker.log_dense(run_id, DENSE)
    publish_search(tracker, run_id, name=spec.name, cost_metric=spec.cost_metric,
                   registered_model=spec.mlflow.registered_model, dense=DENSE,
                   records=_records(tmp_path / run_id, trials))
    return run_id


def _outcome(tmp_path: Path, *, records, front, versions) -> SearchOutcome:
    return SearchOutcome(spec=parse_spec(DEMO), tracking_uri="sqlite:///x.db", parent_run_id="r", dense=DENSE,
                         records=records, front=front, registered_versions=versions, wall_seconds=3.0,
                         ui_hint="http://127.0.0.1:5000/#/x", failed=[r for r in records if r.result is None])


def test_the_summary_of_an_empty_front_says_nothing_was_registered_and_why(tmp_path):
    text = summary_text(_outcome(tmp_path, records=_records(tmp_path, BEATEN), front=[], versions=[]))
    assert "aliases" not in text and "versions —" not in text
    assert ("Nothing was registered as 'demo-vit-pruned' by this search: no trial beat the dense model on latency or"
            " accuracy, so the dense model stays the best choice.") in text

    failed = [TrialRecord("broken", None, error="boom")]
    text = summary_text(_outcome(tmp_path, records=failed, front=[], versions=[]))
    assert "aliases" not in text and "Nothing was registered as 'demo-vit-pruned' by this search: no trial finished" \
        in text


def test_the_summary_of_a_front_names_its_versions_and_aliases(tmp_path):
    records = _records(tmp_path, {"fast": (0.93, 4.0)})
    text = summary_text(_outcome(tmp_path, records=records, front=records, versions=["1"]))
    assert "Registered as 'demo-vit-pruned' versions 1 (aliases: most-accurate, fastest)." in text
    assert "Nothing was registered" not in text


def test_best_after_a_search_with_an_empty_front_names_that_search(tmp_path, capsys):
    empty = _published(tmp_path, DEMO, BEATEN)
    other = copy.deepcopy(DEMO)  # a later search into another registered model, whose front is not empty
    other["mlflow"]["registered_model"] = "other-pruned"
    _published(tmp_path, other, {"fast": (0.93, 4.0)})

    uri = resolve_tracking_uri(None, None, tmp_path)
    with pytest.raises(NoModelMeetsTarget, match=f"search run {empty} .*found no trial that beat the dense model"
                                                 ".*nothing was registered"):
        best(model="demo-vit-pruned", max_latency_ms=100, tracking_uri=uri)
    assert best(model="other-pruned", max_latency_ms=100, tracking_uri=uri).accuracy == 0.93

    capsys.readouterr()  # what publishing said
    assert main(["best", "--model", "demo-vit-pruned", "--max-latency-ms", "100", "--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert empty in err and "run `autoprune search` first" not in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_best_on_a_name_that_is_not_there_suggests_the_closest_and_lists_the_rest(tmp_path):
    uri = resolve_tracking_uri(None, None, tmp_path)
    tracker = Tracker(uri, "models")
    for name in ("resnet50-pruned", "demo-vit-pruned", "deit-small-pruned"):
        tracker.client.create_registered_model(name)
    with pytest.raises(NoModelMeetsTarget) as raised:
        best(model="demo_vit_pruned", max_latency_ms=1, tracking_uri=uri)
    assert str(raised.value) == (f"no registered model named 'demo_vit_pruned' at {uri!r}; did you mean"
                                 " 'demo-vit-pruned'? (registered models there: deit-small-pruned, demo-vit-pruned,"
                                 " resnet50-pruned)")
    with pytest.raises(NoModelMeetsTarget, match="no registered model named 'xyz' at .*; registered models there:"
                                                 " deit-small-pruned, demo-vit-pruned, resnet50-pruned.$"):
        best(model="xyz", max_latency_ms=1, tracking_uri=uri)


def test_search_demo_and_retarget_exit_0_on_an_empty_front(tmp_path, monkeypatch):
    import autoprune.driver.retarget
    import autoprune.driver.search
    import autoprune.tracking.select

    empty = SimpleNamespace(front=[], spec=parse_spec(DEMO), tracking_uri="sqlite:///x.db", ui_hint="")
    monkeypatch.setattr(autoprune.driver.search, "search", lambda *args, **kwargs: empty)
    monkeypatch.setattr(autoprune.driver.retarget, "retarget",
                        lambda *args, **kwargs: SimpleNamespace(published=SimpleNamespace(front=[])))

    def no_best(**kwargs):
        raise AssertionError("`demo` asked `best` of an empty front")

    monkeypatch.setattr(autoprune.tracking.select, "best", no_best)
    assert main(["search", str(tmp_path / "spec.yaml"), "--workdir", str(tmp_path)]) == 0
    assert main(["demo", "--workdir", str(tmp_path)]) == 0
    assert main(["retarget", "abc", "--workdir", str(tmp_path)]) == 0
