"""Successive halving on two objectives: the rungs, the rule, the spec, and a trial healed in rungs (a ViT and a CNN
with BatchNorm). A real search whose trials are judged by one shared judge: tests/test_reuse.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import TINY_RESNET, TINY_VIT

from autoprune.config import Halving, HealConfig, ProfileSpec, PruneConfig, TrialConfig
from autoprune.errors import SpecError
from autoprune.halving import LocalRungJudge, among_the_best, outdone, rung_decay, rungs_of
from autoprune.models import POOLED_GROUP
from autoprune.space.load import parse_spec
from autoprune.tracking.schema import STOPPED_AT_RUNG, report, result_from_report, trial_metrics
from autoprune.trial import TrialContext, run_trial


def test_rungs_are_fractions_of_the_full_budget_shared_by_every_trial():
    ninth, third = Halving().rungs
    assert rungs_of(120, (ninth, third)) == [(ninth, 13), (third, 40)]
    assert rungs_of(120, (0.0, ninth, third)) == [(0.0, 0), (ninth, 13), (third, 40)]  # 0: before any training
    assert rungs_of(120, (ninth, third), trial_steps=30) == [(ninth, 13)]  # a searched budget's shorter trial
    assert rungs_of(9, (ninth, third)) == [(third, 3)]  # one step says nothing: that rung is left out
    assert rungs_of(3, (ninth, third)) == []
    assert rungs_of(10, (0.5, 0.52, 0.99)) == [(0.5, 5)]  # no rung as long as the one before, or as the whole
    assert [rung_decay(steps) for steps in (1, 13, 40, 400)] == [1, 1, 4, 40]


def test_a_trial_healed_through_the_default_rungs_costs_at_most_1_05_times_its_budget():
    for budget in (60, 120, 2000):
        spent = budget + sum(rung_decay(steps) for _, steps in rungs_of(budget, Halving().rungs))
        assert spent <= 1.05 * budget, (budget, spent)


def test_a_trial_goes_on_unless_one_at_least_as_fast_was_more_accurate_by_the_margin():
    assert not outdone(0.80, 2.0, [], margin=0.01)
    assert outdone(0.80, 2.0, [(0.90, 1.5)], margin=0.01)  # faster and more accurate
    assert outdone(0.80, 2.0, [(0.90, 2.0)], margin=0.01)  # as fast and more accurate
    assert not outdone(0.80, 2.0, [(0.805, 1.5)], margin=0.01)  # within the margin: near the front
    assert not outdone(0.80, 2.0, [(0.99, 2.5)], margin=0.01)  # more accurate, but slower: a trade-off
    judge = LocalRungJudge(Halving(rungs=(0.5,), margin=0.0))
    assert judge.promote(0.5, 0.7, 3.0)  # the first has nothing to be judged against
    assert judge.promote(0.5, 0.6, 2.0)  # faster
    assert not judge.promote(0.5, 0.5, 2.5)  # slower than the second and less accurate
    assert judge.promote(0.25, 0.1, 9.0)  # another rung has its own results


def test_a_rung_promotes_the_best_third_as_nsga2_ranks_them():
    """Nine results on three fronts of three: the first front goes on (3 = 9 / 3), the others stop. Where a front
    straddles the cut, its ends go on first, then the most isolated points; the margin keeps a nearly-as-good
    point in the front before."""
    fronts = [[(0.9, 3.0), (0.8, 2.0), (0.7, 1.0)], [(0.85, 3.1), (0.75, 2.1), (0.65, 1.1)],
              [(0.6, 3.2), (0.5, 2.2), (0.4, 1.2)]]
    points = [p for front in fronts for p in front]

    def best(point, eta, margin=0.0, among=points):
        return among_the_best(point, [q for q in among if q is not point], margin=margin, eta=eta)

    assert [best(p, 3) for p in points] == [p in fronts[0] for p in points]
    # ⌈9/2⌉ = 5 places: the first front, then the second front's two ends (its middle point is the most crowded)
    assert [best(p, 2) for p in points] == [True] * 3 + [True, False, True] + [False] * 3
    # one front of five: 2 places → its two ends (a tie of infinite distances: both go on), not the middle
    line = [(0.5, 1.0), (0.6, 2.0), (0.7, 2.5), (0.8, 4.0), (0.9, 5.0)]
    assert [best(p, 3, among=line) for p in line] == [True, False, False, False, True]
    assert among_the_best((0.895, 3.0), [(0.9, 2.9), (0.1, 0.5), (0.2, 0.6)], margin=0.01, eta=3)
    assert not among_the_best((0.85, 3.0), [(0.9, 2.9), (0.1, 0.5), (0.2, 0.6)], margin=0.01, eta=3)


def _demo_raw(**search) -> dict:
    from autoprune.bench import demo_spec

    raw = demo_spec()
    raw["search"].update(search)
    return raw


def test_the_spec_takes_halving_as_true_or_as_rungs_and_margin():
    assert parse_spec(_demo_raw()).search.halving is None
    assert parse_spec(_demo_raw(halving=True)).search.halving == Halving()
    given = {"rungs": [0.5, 0.25], "margin": 0.02, "eta": 4}
    assert parse_spec(_demo_raw(halving=given)).search.halving == Halving((0.25, 0.5), 0.02, 4)
    assert parse_spec(_demo_raw(halving={"rungs": [0.33, 0, 0.11]})).search.halving.rungs == (0.0, 0.11, 0.33)
    with pytest.raises(SpecError, match=r"search.halving.rungs: must be fractions of the full healing budget.* got \[1.5\]"):
        parse_spec(_demo_raw(halving={"rungs": [1.5]}))
    with pytest.raises(SpecError, match="search.halving.eta: must be at least 2, but got 1"):
        parse_spec(_demo_raw(halving={"eta": 1}))
    with pytest.raises(SpecError, match=r"search.halving.rung: unknown key \(did you mean rungs\?\); valid keys here: eta, margin, rungs"):
        parse_spec(_demo_raw(halving={"rung": [0.5]}))
    raw = _demo_raw(halving=True)
    raw["objectives"] = {"accuracy": "max", "macs": "min"}
    with pytest.raises(SpecError, match="search.halving: judges trials by accuracy and latency, but the objective"):
        parse_spec(raw)
    raw = _demo_raw(halving=True)
    raw["heal_runtime"] = {"engine": "deepspeed", "gpu": 0}
    with pytest.raises(SpecError, match="search.halving: rungs continue a heal in the trial's own process, but"
                                        " heal_runtime.engine is 'deepspeed'"):
        parse_spec(raw)


PROFILE = ProfileSpec(batch_size=2, warmup=1, repeats=3)
CASES = {  # a ViT, and a CNN with BatchNorm (whose statistics a rung's copy must not share with the trial's model)
    "vit": (TINY_VIT, TrialConfig(PruneConfig("structured", {POOLED_GROUP: 0.5}, {"round_to": 1}),
                                  HealConfig("distill", calibration_images=64, steps=9, lr=1e-3, batch_size=16,
                                             options={"alpha": 0.5, "temperature": 2.0, "label_smoothing": 0.1}))),
    "cnn": (TINY_RESNET, TrialConfig(PruneConfig("vbp", {POOLED_GROUP: 0.5}),
                                     HealConfig("finetune", calibration_images=64, steps=9, lr=1e-3, batch_size=16,
                                                options={"label_smoothing": 0.1}))),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, bundle):
    source, config = CASES[request.param]
    torch.manual_seed(0)  # untrained weights: what is compared here is the same trial with and without rungs
    return TrialContext(source, source.create().state_dict(), bundle, PROFILE), config


def test_a_promoted_trial_is_the_trial_without_rungs(case):
    """A rung branches off the heal and is put back: a trial that goes on to its whole budget ends exactly where it
    would have without rungs, and costs its budget plus the rung's short decay, not a second heal."""
    context, config = case
    plain = run_trial(config, context, threads=1)
    judged = run_trial(config, replace(context, judge=LocalRungJudge(Halving())), threads=1)
    assert judged.rungs and [steps for steps, _ in judged.rungs] == [3]  # 9 steps: 1/9 is one step, left out
    assert judged.accuracy == plain.accuracy and judged.latency.median_ms > 0
    assert judged.healing_steps == 9 + rung_decay(3) and plain.healing_steps == 9
    assert trial_metrics(judged)["accuracy_rung1"] == judged.rungs[0][1]


def test_an_outdone_trial_stops_at_its_rung_and_optuna_is_told_it_was_pruned(case):
    context, config = case
    judge = LocalRungJudge(Halving(rungs=(1 / 3,), margin=0.0))
    judge.promote(1 / 3, 1.0, 1e-6)  # a trial faster and perfectly accurate at that rung came first
    result = run_trial(config, replace(context, judge=judge), threads=1)
    assert result.accuracy is None and not result.feasible
    assert result.stopped.startswith("outdone after 3 of 9 healing steps")
    (steps, top1), = result.rungs
    assert steps == 3 and 0 <= top1 <= 1 and result.healing_steps == 3 + rung_decay(3)
    reported = report(result)
    assert reported[STOPPED_AT_RUNG] == 1 and reported["accuracy"] == top1
    assert result_from_report(reported) == result


def test_the_zero_shot_rung_judges_a_trial_before_it_trains(case):
    context, config = case
    judge = LocalRungJudge(Halving(rungs=(0.0, 1 / 3), margin=0.0))
    judge.promote(0.0, 1.0, 1e-6)
    result = run_trial(config, replace(context, judge=judge), threads=1)
    assert result.stopped.startswith("outdone before healing") and result.healing_steps == 0
    assert [steps for steps, _ in result.rungs] == [0]
    promoted = run_trial(config, replace(context, judge=LocalRungJudge(Halving(rungs=(0.0, 1 / 3)))), threads=1)
    assert [steps for steps, _ in promoted.rungs] == [0, 3] and promoted.feasible
    assert promoted.accuracy == run_trial(config, context, threads=1).accuracy


def test_a_trial_that_does_not_train_is_not_judged(case):
    context, config = case
    judge = LocalRungJudge(Halving(margin=0.0))
    judge.promote(1 / 3, 1.0, 1e-6)
    untrained = replace(config, heal=HealConfig("none", calibration_images=64))  # VBP still reads images
    result = run_trial(untrained, replace(context, judge=judge), threads=1)
    assert result.feasible and result.rungs == () and result.healing_steps == 0
