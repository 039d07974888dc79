"""Resuming and publishing refuse what they cannot do, before Ray starts, and say what to do instead.

(That they work — a killed driver resumed, a search published after MLflow came back — is in test_faults.py.)
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from autoprune.cli import main
from autoprune.driver.search import search
from autoprune.errors import AutopruneError
from autoprune.space.load import parse_spec
from autoprune.tracking.publish import experiment_path
from autoprune.tracking.store import Tracker, resolve_tracking_uri

DEMO = yaml.safe_load((Path(__file__).parents[1] / "search_spaces" / "demo.yaml").read_text())


def test_the_run_id_goes_before_a_uri_query():
    assert experiment_path("/runs/ray/", "abc") == "/runs/ray/abc"
    assert (experiment_path("s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http", "abc")
            == "s3://bucket/runs/abc?endpoint_override=127.0.0.1:9000&scheme=http")


def test_resume_with_nothing_to_resume_says_so(tmp_path):
    with pytest.raises(AutopruneError, match="no unfinished search named 'demo'.*without --resume"):
        search(parse_spec(DEMO), workdir=tmp_path, resume="latest", echo=None)
    assert not (tmp_path / "ray").exists() and not (tmp_path / "cache").exists()  # nothing started


def _started_search(tmp_path: Path, spec) -> str:
    """A parent run as a search that started and then stopped leaves it (the spec that ran logged — without the
    methods it left out before starting —, no Tune state yet)."""
    from autoprune.driver.search import _methods_that_can_be_faster

    tracker = Tracker(resolve_tracking_uri(None, None, tmp_path), spec.mlflow.experiment)
    return tracker.start_search(name=spec.name, spec=_methods_that_can_be_faster(spec, lambda line: None).as_dict())


def test_resume_with_another_spec_names_what_changed(tmp_path):
    run_id = _started_search(tmp_path, parse_spec(DEMO))
    changed = copy.deepcopy(DEMO)
    changed["search"]["trials"] = 99
    with pytest.raises(AutopruneError, match=r"different spec \(changed: search.trials\)"):
        search(parse_spec(changed), workdir=tmp_path, resume=run_id, echo=None)


def test_resume_without_tune_state_points_at_the_storage(tmp_path):
    run_id = _started_search(tmp_path, parse_spec(DEMO))
    with pytest.raises(AutopruneError, match="left no Ray Tune state at .*--workdir"):
        search(parse_spec(DEMO), workdir=tmp_path, resume="latest", echo=None)
    assert run_id


def test_publish_of_a_run_that_is_not_a_search_is_a_one_line_error(tmp_path, capsys):
    tracker = Tracker(resolve_tracking_uri(None, None, tmp_path), "x")
    trial_run = tracker.client.create_run(tracker.experiment_id).info.run_id
    assert main(["publish", trial_run, "--workdir", str(tmp_path)]) == 1
    assert "is not a search's parent run" in capsys.readouterr().err
    assert main(["publish", "0123456789abcdef", "--workdir", str(tmp_path)]) == 1
    assert "no MLflow run '0123456789abcdef'" in capsys.readouterr().err
