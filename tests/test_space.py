"""The search space: conditional parameters, the sparsity parametrisations, and seed-reproducible sampling."""

from __future__ import annotations

import copy
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import TINY_VIT

from autoprune.config import SAMPLERS
from autoprune.driver.sampling import make_sampler
from autoprune.errors import SpecError
from autoprune.models import layer_groups
from autoprune.space.define import SearchSpace, interpolate_knots
from autoprune.space.load import parse_spec

DEMO = yaml.safe_load((Path(__file__).parents[1] / "search_spaces" / "demo.yaml").read_text())
GROUPS = layer_groups(TINY_VIT.create())


def _space(**sparsity) -> SearchSpace:
    raw = copy.deepcopy(DEMO)
    raw["space"]["prune"]["sparsity"].update(sparsity)
    return SearchSpace(parse_spec(raw), GROUPS)


def _sample(space: SearchSpace, fixed: dict):
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.enqueue_trial(fixed, skip_if_exists=False)  # these values are used; the rest is sampled
    trial = study.ask()
    space.define(trial)
    return trial.params, space.to_config(trial.params)


def test_a_configuration_reads_only_what_its_methods_use():
    space = _space(mode="global")
    params, config = _sample(space, {"prune.method": "nm", "heal.method": "none"})
    assert set(params) == {"prune.method", "prune.sparsity", "heal.method", "heal.lr"}  # flat: every parameter
    assert config.prune.sparsity == {} and config.prune.options == {"n": 2, "m": 4}
    assert config.heal.steps == 0 and config.heal.calibration_images == 0 and config.heal.lr == 0

    params, config = _sample(space, {"prune.method": "magnitude", "heal.method": "distill"})
    assert config.prune.sparsity == {"all": params["prune.sparsity"]}
    assert (config.heal.steps, config.heal.calibration_images, config.heal.lr) == (120, 256, params["heal.lr"])
    assert config.heal.options["alpha"] == 0.5


def test_method_options_can_be_searched_and_belong_to_their_method():
    raw = copy.deepcopy(DEMO)
    raw["space"]["prune"]["options"]["structured"] = {"round_to": [1, 8], "heads": False}
    raw["space"]["heal"]["options"] = {"align": {"states": ["all", "last"]}}
    space = SearchSpace(parse_spec(raw), GROUPS)
    params, config = _sample(space, {"prune.method": "structured", "prune.structured.round_to": 8,
                                     "heal.method": "align", "heal.align.states": "last"})
    assert config.prune.options == {"round_to": 8, "heads": False, "importance": "l2", "scope": "auto"}
    assert config.heal.options["states"] == "last"
    assert config.flat()["prune.structured.round_to"] == 8
    params, config = _sample(space, {"prune.method": "magnitude", "heal.method": "finetune"})
    assert "prune.structured.round_to" in params  # flat: drawn, and left unread
    assert "round_to" not in config.prune.options and "states" not in config.heal.options


def test_an_option_that_reads_images_brings_the_image_budget():
    raw = copy.deepcopy(DEMO)
    raw["space"]["prune"]["options"]["structured"] = {"importance": ["l2", "taylor"]}
    space = SearchSpace(parse_spec(raw), GROUPS)
    fixed = {"prune.method": "structured", "heal.method": "none"}
    _, config = _sample(space, {**fixed, "prune.structured.importance": "taylor"})
    assert config.heal.calibration_images == 256
    _, config = _sample(space, {**fixed, "prune.structured.importance": "l2"})
    assert config.heal.calibration_images == 0


def test_per_group_mode_has_one_dimension_per_group():
    params, config = _sample(_space(mode="per_group"), {"prune.method": "structured", "heal.method": "none"})
    assert sorted(k for k in params if k.startswith("prune.sparsity.")) == sorted(
        f"prune.sparsity.{g.name}" for g in GROUPS)
    assert set(config.prune.sparsity) == {g.name for g in GROUPS}


def test_depth_mode_interpolates_knots_over_depth():
    params, config = _sample(_space(mode="depth", knots=2), {"prune.method": "magnitude", "heal.method": "none"})
    values = list(config.prune.sparsity.values())
    assert values[0] == pytest.approx(params["prune.sparsity.knot0"])
    assert values[-1] == pytest.approx(params["prune.sparsity.knot1"])
    assert interpolate_knots([0.2, 0.8], 4) == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert interpolate_knots([0.1, 0.9, 0.1], 5) == pytest.approx([0.1, 0.5, 0.9, 0.5, 0.1])


def test_spectral_mode_samples_one_value_for_the_trial_to_spread():
    params, config = _sample(_space(mode="spectral"), {"prune.method": "structured", "heal.method": "none"})
    assert [k for k in params if k.startswith("prune.sparsity")] == ["prune.sparsity"]
    assert config.prune.sparsity == {"all": params["prune.sparsity"]} and config.prune.allocation == "spectral"
    _, config = _sample(_space(mode="spectral"), {"prune.method": "nm", "heal.method": "none"})
    assert config.prune.allocation == "given"  # N:M takes no sparsity to spread


def test_macs_mode_samples_a_reduction_and_a_shape_for_the_trial_to_solve():
    space = _space(mode="macs", knots=2)
    params, config = _sample(space, {"prune.method": "structured", "heal.method": "none"})
    assert sorted(k for k in params if k.startswith(("prune.reduction", "prune.shape"))) == [
        "prune.reduction", "prune.shape.knot0", "prune.shape.knot1"]
    assert config.prune.allocation == "macs" and config.prune.target == params["prune.reduction"]
    assert config.prune.bounds == (0.3, 0.9) and set(config.prune.sparsity) == {g.name for g in GROUPS}
    assert list(config.prune.sparsity.values())[-1] == pytest.approx(params["prune.shape.knot1"])
    _, config = _sample(space, {"prune.method": "nm", "heal.method": "none"})
    assert config.prune.allocation == "given" and config.prune.target is None
    start = space.coarse_start(12)  # uniform shapes, from a light reduction to every group at `high`
    reductions = sorted({point["prune.reduction"] for point in start if "prune.reduction" in point})
    assert reductions[-1] == 1.0 and all(point.get("prune.shape.knot0", 1.0) == 1.0 for point in start)


def test_a_mode_a_method_cannot_take_is_a_spec_error():
    raw = copy.deepcopy(DEMO)
    raw["space"]["prune"]["methods"] = ["magnitude", "mp_budget"]
    raw["space"]["prune"]["sparsity"]["mode"] = "per_group"
    with pytest.raises(SpecError, match=r"space.prune.sparsity.mode: 'per_group' does not apply to method 'mp_budget', which takes: global"):
        parse_spec(raw)


def test_more_knots_than_groups_is_a_spec_error():
    with pytest.raises(SpecError, match="knots"):
        _space(mode="depth", knots=len(GROUPS) + 1)


def _sequence(seed: int, trials: int = 14) -> list[dict]:
    """What Ray Tune's OptunaSearch suggests, one trial at a time, fed a deterministic result per config."""
    from ray.tune.search.optuna import OptunaSearch

    space = _space(mode="depth", knots=2)
    searcher = OptunaSearch(space=space.define, metric=["accuracy", "latency_ms"], mode=["max", "min"],
                            sampler=make_sampler("tpe", seed))
    suggested = []
    for index in range(trials):
        config = searcher.suggest(f"t{index}")
        suggested.append(config)
        fake_accuracy = 1 - sum(v for k, v in config.items() if k.startswith("prune.sparsity")) / 3
        searcher.on_trial_complete(f"t{index}", {"accuracy": fake_accuracy, "latency_ms": 1 + fake_accuracy})
    return suggested


def test_a_fixed_seed_samples_the_same_configurations():
    first = _sequence(seed=7)
    assert first == _sequence(seed=7)
    assert first != _sequence(seed=8)


def test_the_latency_target_reaches_optuna_as_a_constraint():
    from autoprune.driver.sampling import LATENCY_CONSTRAINT, latency_constrained_searcher

    raw = copy.deepcopy(DEMO)
    raw["latency_target_ms"] = 2.0
    spec = parse_spec(raw)
    searcher = latency_constrained_searcher(SearchSpace(spec, GROUPS), spec)
    for index, latency in enumerate((1.5, 3.0)):
        searcher.suggest(f"t{index}")
        searcher.on_trial_complete(f"t{index}", {"accuracy": 0.9, "latency_ms": latency})
    trials = [t for t in searcher._ot_study.trials if t.state.name != "WAITING"]  # the coarse start's are queued
    assert [t.constraints for t in trials] == [{LATENCY_CONSTRAINT: -0.5}, {LATENCY_CONSTRAINT: 1.0}]

    unconstrained = latency_constrained_searcher(SearchSpace(parse_spec(DEMO), GROUPS), parse_spec(DEMO))
    unconstrained.suggest("t0")
    unconstrained.on_trial_complete("t0", {"accuracy": 0.9, "latency_ms": 3.0})
    assert unconstrained._ot_study.trials[0].constraints == {}


def test_a_trial_without_a_measured_latency_does_not_count_as_meeting_the_target():
    from autoprune.driver.sampling import LATENCY_CONSTRAINT, latency_constrained_searcher

    raw = copy.deepcopy(DEMO)
    raw["latency_target_ms"] = 2.0
    spec = parse_spec(raw)
    searcher = latency_constrained_searcher(SearchSpace(spec, GROUPS), spec)
    searcher.suggest("t0")
    searcher.on_trial_complete("t0", {"accuracy": 0.9})  # stopped before its profile
    assert searcher._ot_study.trials[0].constraints[LATENCY_CONSTRAINT] > 0  # > 0: infeasible


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_searches_the_conditional_space_under_a_latency_target(sampler):
    """Each offered sampler proposes valid configurations of the demo space for a constrained two-objective search,
    past its random start-up (GP and the grouped TPE model the trials from the fourth on: 3 at random)."""
    from autoprune.driver.sampling import latency_constrained_searcher

    raw = copy.deepcopy(DEMO)
    raw["latency_target_ms"] = 2.0
    raw["search"]["sampler"] = sampler
    raw["search"]["trials"] = 10
    spec = parse_spec(raw)
    space = SearchSpace(spec, GROUPS)
    searcher = latency_constrained_searcher(space, spec)
    for index in range(10):  # past the coarse start (7 points here) of the small-budget samplers
        config = space.to_config(searcher.suggest(f"t{index}"))
        assert config.prune.method in spec.prune.methods
        sparsity = sum(config.prune.sparsity.values()) / max(len(config.prune.sparsity), 1)
        searcher.on_trial_complete(f"t{index}", {"accuracy": 1 - sparsity / 2, "latency_ms": 3.0 - 2 * sparsity})
    assert len(searcher._ot_study.trials) == 10


def test_the_small_budget_samplers_begin_with_a_coarse_start_over_method_and_sparsity():
    """tpe_grouped and gp spend their first trials on each method at a few uniform sparsities spread over the range,
    healed with the full budget (a fidelity, not a parameter); the healing method is left to the sampler."""
    from autoprune.driver.sampling import latency_constrained_searcher

    raw = copy.deepcopy(DEMO)
    raw["search"].update(sampler="tpe_grouped", trials=24)
    spec = parse_spec(raw)
    space = SearchSpace(spec, GROUPS)
    points = space.coarse_start(24)
    sparse = [m for m in spec.prune.methods if m != "nm"]
    assert [p["prune.method"] for p in points] == sparse * 2 + ["nm"]  # 24 / 4 / 3 → 2 sparsities each, nm once
    assert sorted({p["prune.sparsity.knot0"] for p in points if "prune.sparsity.knot0" in p}) == [0.6, 0.9]  # up to the top of the range
    assert not any("heal.steps" in p or "heal.calibration_images" in p for p in points)
    searcher = latency_constrained_searcher(space, spec)
    for index, point in enumerate(points):
        config = space.to_config(searcher.suggest(f"t{index}"))
        assert config.prune.method == point["prune.method"] and config.heal.calibration_images == 256
        searcher.on_trial_complete(f"t{index}", {"accuracy": 0.5, "latency_ms": 1.0})
    random_spec = parse_spec({**raw, "search": {**raw["search"], "sampler": "random"}})
    assert not latency_constrained_searcher(space, random_spec)._points_to_evaluate  # random search stays random


def test_a_trial_that_reports_its_own_error_reaches_optuna_as_failed():
    """A trial that fails by itself reports its traceback as its result (so that Tune does not restart it): the
    searcher must tell Optuna FAIL, not COMPLETE or PRUNED, so the sampler does not count it as a measured point."""
    import optuna

    from autoprune.driver.sampling import latency_constrained_searcher
    from autoprune.tracking.schema import TRIAL_ERROR

    spec = parse_spec(DEMO)
    searcher = latency_constrained_searcher(SearchSpace(spec, GROUPS), spec)
    searcher.suggest("ok")
    searcher.on_trial_complete("ok", {"accuracy": 0.9, "latency_ms": 1.0})
    searcher.suggest("broken")
    searcher.on_trial_complete("broken", {TRIAL_ERROR: "RuntimeError: training loss became nan", "config_json": "{}"})
    states = [trial.state for trial in searcher._ot_study.trials if trial.state.name != "WAITING"]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]


def test_first_points_outside_the_space_are_left_out_with_a_count():
    """A search that left a method out (or narrowed a range) takes only the first points that are configurations of
    its space; Optuna would otherwise stop the search at the first that is not."""
    from autoprune.driver.search import _fitting

    raw = copy.deepcopy(DEMO)
    raw["space"]["prune"]["methods"] = ["structured", "vbp"]
    space = SearchSpace(parse_spec(raw), GROUPS)
    fits = {"prune.method": "vbp", "prune.sparsity.knot0": 0.5, "prune.sparsity.knot1": 0.6, "heal.method": "none"}
    points = [fits, {**fits, "prune.method": "magnitude"}, {**fits, "prune.sparsity.knot0": 0.95},
              {**fits, "heal.method": "starfish"}]
    said = []
    assert _fitting(points, space, said.append) == [fits]
    assert said == ["autoprune: 3 of the 4 first points are not configurations of this search's space (a method it"
                    " leaves out, a value outside a range): they are left out"]


def test_a_trial_stopped_at_a_rung_reaches_optuna_as_pruned():
    """Successive halving stopped it part-way: its accuracy at a small budget must not read as a final one."""
    import optuna

    from autoprune.driver.sampling import latency_constrained_searcher
    from autoprune.tracking.schema import STOPPED_AT_RUNG

    spec = parse_spec(DEMO)
    searcher = latency_constrained_searcher(SearchSpace(spec, GROUPS), spec)
    searcher.suggest("healed")
    searcher.on_trial_complete("healed", {"accuracy": 0.9, "latency_ms": 1.0, STOPPED_AT_RUNG: 0})
    searcher.suggest("stopped")
    searcher.on_trial_complete("stopped", {"accuracy": 0.4, "latency_ms": 1.0, STOPPED_AT_RUNG: 1})
    trials = [trial for trial in searcher._ot_study.trials if trial.state.name != "WAITING"]
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    assert trials[1].values is None


def test_the_space_is_flat_so_that_model_based_samplers_see_every_parameter():
    """Every trial has every parameter (N:M's trials draw sparsity knots they ignore, `none`'s a learning rate):
    GPSampler and multivariate TPE model only what every trial has, and would draw the rest at random."""
    import optuna

    spec = parse_spec(DEMO)
    space = SearchSpace(spec, GROUPS)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    names = set()
    for _ in range(12):
        trial = study.ask()
        space.define(trial)
        names.add(frozenset(trial.params))
        study.tell(trial, [0.5, 1.0])
    assert len(names) == 1, names  # one set of parameters, whatever the methods drawn
    (params,) = names
    assert {"prune.sparsity.knot0", "heal.lr"} <= params and "heal.steps" not in params  # the budget: a fidelity


def test_the_healing_budget_is_one_value_unless_the_spec_searches_it():
    raw = copy.deepcopy(DEMO)
    raw["space"]["heal"]["steps"] = {"low": 20, "high": 120, "log": True}
    with pytest.raises(SpecError, match=r"space.heal.steps: is a range, but the healing budget is the search's"
                                        r" fidelity.*say 120.*space.heal.budget: searched"):
        parse_spec(raw)
    raw["space"]["heal"]["budget"] = "searched"
    spec = parse_spec(raw)
    assert spec.heal.budget == "searched"
    params = SearchSpace(spec, GROUPS).coarse_start(12)[0]
    assert params["heal.steps"] == 120  # the coarse start heals with the most the space allows
    with pytest.raises(SpecError, match=r"space.heal.budget: .sampled. is not one of the valid choices: fixed, searched"):
        parse_spec({**raw, "space": {**raw["space"], "heal": {**raw["space"]["heal"], "budget": "sampled"}}})
