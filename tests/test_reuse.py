"""A finished real search (Ray, Optuna, MLflow on sqlite; its trials healed in rungs by one shared judge) reused:

- warm start: it seeds a new search — as completed Optuna trials when it measured the same way, as configurations
  run again first (its front first) when it did not;
- retarget: its healed models are timed on another device, whose front is published and registered with it."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_e2e import SPEC

from autoprune.driver.prepare import model_source
from autoprune.driver.sampling import LATENCY_CONSTRAINT, latency_constrained_searcher
from autoprune.driver.search import search
from autoprune.driver.warm import earlier_search, warm_start
from autoprune.errors import AutopruneError
from autoprune.halving import rung_decay
from autoprune.models import layer_groups
from autoprune.pareto import pareto_front
from autoprune.space.define import SearchSpace
from autoprune.space.load import parse_spec
from autoprune.tracking.store import Tracker

pytestmark = pytest.mark.e2e

WARM = {**SPEC, "name": "e2e-warm", "mlflow": {"experiment": "e2e-warm", "registered_model": "e2e-warm"},
        "search": {**SPEC["search"], "trials": 4, "seed": 5, "stop_unless_faster": True,  # the default
                   "sampler": "gp",  # the default, with its coarse start
                   "halving": {"rungs": [0.5], "margin": 0.0}},
        # the default budget: one value, the fidelity the rungs are fractions of
        "space": {**SPEC["space"], "heal": {**SPEC["space"]["heal"], "calibration_images": 64, "steps": 8,
                                            "budget": "fixed"}}}
SAID: list[str] = []


@pytest.fixture(scope="module")
def first(local_ray, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("warm")
    return search(parse_spec(WARM), workdir=workdir, echo=SAID.append), workdir


def test_a_search_leaves_out_the_methods_that_cannot_be_faster_on_its_device(first):
    """magnitude keeps the dense shapes and runs dense kernels on a CPU: the search says so and samples no trial
    of it (each would have stopped after profiling, a trial spent to learn nothing)."""
    outcome, _ = first
    assert any("magnitude run with the dense shapes on dense kernels" in line and "leaves them out" in line
               for line in SAID)
    assert {r.result.config.prune.method for r in outcome.records} == {"structured"}
    assert outcome.spec.prune.methods == ("structured",)
    # the spec logged with the search is the one that ran, not the one before the methods were left out
    logged = Tracker(outcome.tracking_uri, "e2e-warm").search_spec(outcome.parent_run_id)
    assert logged["prune"]["methods"] == ["structured"]


def _earlier(first):
    outcome, workdir = first
    tracker = Tracker(outcome.tracking_uri, "e2e-warm")
    return earlier_search(outcome.parent_run_id, tracker=tracker, storage=str(workdir / "ray"),
                          downloads=workdir / "downloads")


def test_a_search_with_halving_judges_every_trial_by_one_judge(first):
    """Trials that train heal first half their steps; the rung accuracies are child-run metrics, and a trial
    stopped at its rung was outdone by another trial's result at that rung (one judge for every worker)."""
    outcome, _ = first
    assert any("successive halving" in line for line in SAID)
    results = [record.result for record in outcome.records]
    for result in results:
        if result.stopped.startswith("not faster"):  # timed no faster than dense (noise, a small sparsity): stopped
            assert result.rungs == () and result.healing_steps == 0  # after profiling, before any rung
            continue
        trains = result.config.heal.method == "distill"
        expected = [4] if trains else []  # half the budget of 8 steps, the same for every trial
        assert [steps for steps, _ in result.rungs] == expected
        if not result.feasible:  # the heal stopped at its rung: 4 steps and the rung's short decay
            assert result.stopped.startswith("outdone after") and result.healing_steps == 4 + rung_decay(4)
            assert any(other.rungs and other.rungs[0][1] > result.rungs[0][1]
                       and other.latency.median_ms <= result.latency.median_ms for other in results)
        else:  # continued from its rung: the budget once, and the rung's decay
            assert result.healing_steps == (8 + rung_decay(4)) * trains
    runs = Tracker(outcome.tracking_uri, "e2e-warm").child_runs(outcome.parent_run_id)
    logged = sorted(run.data.metrics["accuracy_rung1"] for run in runs if "accuracy_rung1" in run.data.metrics)
    assert logged == sorted(r.rungs[0][1] for r in results if r.rungs)
    assert all("healing_steps" in run.data.metrics for run in runs)


def test_a_search_measured_the_same_way_starts_optuna_from_its_trials(first):
    outcome, _ = first
    spec = parse_spec(WARM)
    space = SearchSpace(spec, layer_groups(model_source(spec.model).create()))
    lines: list[str] = []
    warm = warm_start(_earlier(first), spec=spec, space=space, dense=outcome.dense, say=lines.append)
    finished = [r for r in outcome.records if r.result is not None]
    assert len(warm.completed) == len(finished) and not warm.points and warm.left_out == 0
    assert "Optuna starts from its 4 trials" in lines[0]
    for trial in warm.completed:  # what each trial reported to Optuna, with the distributions this space gives
        # its sampled parameters, and those its space held fixed (prune.method: the only one left there)
        result, = [r.result for r in finished if r.params.items() <= trial.params.items()]
        assert trial.params["prune.method"] == result.config.prune.method
        stopped_at_rung = bool(result.rungs) and not result.feasible  # told as pruned: no values
        assert trial.values == (None if stopped_at_rung else (result.best_known_accuracy or 0.0,
                                                              result.latency.median_ms))
        assert set(trial.distributions) == set(trial.params)
    targeted = replace(spec, latency_target_ms=1.0)
    assert latency_constrained_searcher(space, targeted)._points_to_evaluate  # gp's coarse start, on its own …
    searcher = latency_constrained_searcher(space, targeted, coarse_start=False)  # … left out as the driver does
    searcher.tell_earlier(warm.completed)
    told = searcher._ot_study.get_trials()
    assert len(told) == 4 and [t.state.name for t in told] == [
        "PRUNED" if t.values is None else "COMPLETE" for t in warm.completed]
    assert [t.system_attrs[f"constraints:{LATENCY_CONSTRAINT}"] for t in told] == [
        pytest.approx(t.latency_ms - 1.0) for t in warm.completed]


def test_a_search_measured_otherwise_runs_the_earlier_front_first(first, tmp_path):
    """Another batch size: the earlier latencies do not apply, so its configurations are tried again, front first
    — in a real second search, whose first trials are the earlier front's configurations."""
    outcome, workdir = first
    raw = {**WARM, "profile": {**WARM["profile"], "batch_size": 16}, "search": {**WARM["search"], "trials": 2}}
    lines: list[str] = []
    second = search(parse_spec(raw), workdir=workdir, echo=lines.append, warm_start_from=outcome.parent_run_id)
    assert any("it measured another profile.batch_size" in line for line in lines)
    front = pareto_front(outcome.records, "latency_ms", dense=outcome.dense)
    expected = [dict(r.params) for r in front][:2]
    first_trials = [dict(r.params) for r in second.records][: len(expected)]  # two at a time: in either order
    assert sorted(map(str, first_trials)) == sorted(map(str, expected))


def test_a_wrong_run_is_an_error_before_ray_starts(tmp_path):
    with pytest.raises(AutopruneError, match="no MLflow run 'nope'"):
        search(parse_spec(WARM), workdir=tmp_path, echo=None, warm_start_from="nope")
    with pytest.raises(AutopruneError, match="give one of them"):
        search(parse_spec(WARM), workdir=tmp_path, echo=None, warm_start_from="nope", resume="latest")



def test_retarget_times_the_healed_models_on_another_device_and_registers_its_front(first):
    """The same CPU with two threads is another device as the profiles name it: every healed model is timed there,
    keeps its accuracy, and that device's front is registered with its device; `best --device` picks among them;
    the aliases stay with the search that healed the models."""
    from autoprune.driver.retarget import retarget
    from autoprune.saved import load_model_dir
    from autoprune.tracking.schema import RETARGET_TAG
    from autoprune.tracking.select import best, registered_versions

    outcome, workdir = first
    model = WARM["mlflow"]["registered_model"]
    before = {v.version: v for v in registered_versions(model, tracking_uri=outcome.tracking_uri)}
    tracker = Tracker(outcome.tracking_uri, "e2e-warm")
    aliases = {alias: tracker.client.get_model_version_by_alias(model, alias).version
               for alias in ("most-accurate", "fastest")}
    for wrong, error in (({"device": "cuda"}, "this Ray cluster has no GPU"),
                         ({"accelerator_type": "H100"}, "no node of that type in this Ray cluster")):
        with pytest.raises(AutopruneError, match=error):  # said at once, not a task waiting forever
            retarget(outcome.parent_run_id, tracking_uri=outcome.tracking_uri, workdir=workdir, echo=None, **wrong)
    done = retarget(outcome.parent_run_id, tracking_uri=outcome.tracking_uri, workdir=workdir, cpus=2, echo=None)
    assert done.device.endswith("(2 threads)") and done.device != outcome.dense.latency.device
    healed = {r.trial_id: r.result for r in outcome.records if r.result is not None and r.result.feasible}
    assert {r.trial_id for r in done.records} == set(healed)
    for record in done.records:
        assert record.result.accuracy == healed[record.trial_id].accuracy
        assert record.result.latency.device == done.device and record.result.latency.threads == 2
        assert load_model_dir(record.model_dir) is not None  # saved again, in the new device's recipe
    assert tracker.client.get_run(done.parent_run_id).data.tags[RETARGET_TAG] == outcome.parent_run_id
    after = registered_versions(model, tracking_uri=outcome.tracking_uri)
    new = [v for v in after if v.version not in before]
    assert len(new) == len(done.published.front) and all(v.device == done.device for v in new)
    choice = best(model=model, max_latency_ms=1e6, device=done.device, tracking_uri=outcome.tracking_uri)
    assert choice.version in {v.version for v in new}
    assert {alias: tracker.client.get_model_version_by_alias(model, alias).version for alias in aliases} == aliases
