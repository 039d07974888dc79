"""Sparsity chosen by cost (`space.prune.sparsity.mode: macs`): the solve aims a shape at a MACs target, and a
trial with that allocation lands where it was aimed — a BatchNorm CNN and a ViT, through a training heal."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import TINY_RESNET, TINY_VIT

from autoprune import prune
from autoprune.config import HealConfig, ProfileSpec, PruneConfig, TrialConfig
from autoprune.measure.metrics import count_macs
from autoprune.models import layer_groups
from autoprune.prune.target import shaped, solve
from autoprune.trial import TrialContext, run_trial

PROFILE = ProfileSpec(batch_size=2, warmup=1, repeats=3)


def test_the_solve_meets_a_target_cost_along_the_shape():
    """A cost that falls with every group's sparsity: the solve lands within its tolerance of the log-spaced target,
    keeps the shape's order, and stays inside the bounds."""
    weights = {"a": 1.0, "b": 2.0, "c": 4.0}
    calls = []

    def cost(sparsity):
        calls.append(dict(sparsity))
        return sum(w * (1 - s) for w, s in zip(weights.values(), sparsity.values()))

    shape = {"a": 0.2, "b": 0.6, "c": 1.0}
    lightest, heaviest = cost(dict.fromkeys(shape, 0.3)), cost(dict.fromkeys(shape, 0.9))
    for reduction in (0.1, 0.5, 0.9):
        sparsity, ratio = solve(cost, shape, reduction, low=0.3, high=0.9)
        target = math.exp((1 - reduction) * math.log(lightest) + reduction * math.log(heaviest))
        assert cost(sparsity) == pytest.approx(target, rel=0.011) and abs(ratio - 1) <= 0.01
        assert sparsity["a"] <= sparsity["b"] <= sparsity["c"] and all(0.3 <= s <= 0.9 for s in sparsity.values())
    assert solve(cost, shape, 0.0, low=0.3, high=0.9)[0] == dict.fromkeys(shape, 0.3)
    assert shaped(shape, 100.0, 0.3, 0.9) == pytest.approx(dict.fromkeys(shape, 0.9))
    with pytest.raises(ValueError, match="reduction"):
        solve(cost, shape, 1.5, low=0.3, high=0.9)


@pytest.mark.parametrize("source", [TINY_RESNET, TINY_VIT], ids=["resnet-bn", "vit"])
def test_a_trial_aimed_at_a_cost_lands_there_and_heals(source, bundle):
    """The trial solves the shape's scale on the real method's pruned copies, prunes at it, times it, and heals it
    with training; its MACs are the target's (channel rounding aside) and a harder reduction costs less."""
    torch.manual_seed(0)
    context = TrialContext(source, source.create().state_dict(), bundle, PROFILE)
    dense_macs = count_macs(context.dense_model(), bundle.input_size)
    groups = [group.name for group in layer_groups(context.dense_model())]
    shape = {name: 0.3 + 0.7 * index / max(1, len(groups) - 1) for index, name in enumerate(groups)}

    def trial(reduction):
        config = TrialConfig(PruneConfig("structured", shape, {"round_to": 1}, "macs", target=reduction,
                                         bounds=(0.1, 0.7)),
                             HealConfig("finetune", calibration_images=16, steps=2, lr=1e-3, batch_size=8))
        assert TrialConfig.from_json(config.to_json()) == config
        assert config.flat()["prune.reduction"] == reduction and f"prune.shape.{groups[0]}" in config.flat()
        return run_trial(config, context, threads=1)

    def macs_at(sparsity):
        model = copy.deepcopy(context.dense_model())
        request = prune.PruneRequest(layer_groups(model), dict.fromkeys(groups, sparsity),
                                     {**prune.get("structured").options, "round_to": 1},
                                     example_inputs=torch.zeros(2, *bundle.input_size))
        prune.get("structured").apply(model, request)
        return count_macs(model, bundle.input_size)

    lightest, heaviest = macs_at(0.1), macs_at(0.7)
    light, hard = trial(0.25), trial(0.75)
    for result, reduction in ((light, 0.25), (hard, 0.75)):
        target = math.exp((1 - reduction) * math.log(lightest) + reduction * math.log(heaviest))
        assert result.macs == pytest.approx(target, rel=0.05)
        assert result.accuracy is not None and result.steps_spent == 2
    assert hard.macs < light.macs < dense_macs


def test_the_top_of_the_range_costs_two_counts_and_a_group_may_keep_its_floor():
    """Reduction 1 (the coarse start's last point) is every group at `high`: known after the two counts that bound
    the range, not after a dozen more prunes. A group whose shape weight is 0 stays at `low`; a shape with no
    positive weight is refused."""
    calls = []

    def cost(sparsity):
        calls.append(1)
        return sum(1 - s for s in sparsity.values())

    sparsity, ratio = solve(cost, {"a": 0.5, "b": 1.0}, 1.0, low=0.3, high=0.9)
    assert sparsity == {"a": 0.9, "b": 0.9} and ratio == pytest.approx(1.0) and len(calls) == 2
    sparsity, _ = solve(cost, {"a": 0.0, "b": 1.0}, 0.5, low=0.3, high=0.9)
    assert sparsity["a"] == 0.3 and 0.3 < sparsity["b"] <= 0.9
    with pytest.raises(ValueError, match="positive weight"):
        solve(cost, {"a": 0.0, "b": 0.0}, 0.5, low=0.3, high=0.9)


def test_the_replay_solves_a_masking_method_on_its_non_zero_weights():
    """Masked zeros still count as MACs, so a method that masks costs the same at every sparsity in MACs; the live
    solve counts its non-zero weights, and so must the replay's, or every `+macs` trial of it lands at `low`."""
    from autoprune.bench.replay_macs import KnotSolver

    configs = [{"params": {"prune.method": "magnitude", "prune.sparsity.knot0": a, "prune.sparsity.knot1": b},
                "macs": 1_000_000, "sparsity": (a + b) / 2}
               for a in (0.3, 0.5, 0.7, 0.9) for b in (0.3, 0.5, 0.7, 0.9)]
    solver = KnotSolver(configs, 2, 0.3, 0.9)
    assert solver.macs("magnitude", [0.5, 0.5]) == pytest.approx(0.5)
    solved = solver.to_knots({"prune.method": "magnitude", "heal.method": "none", "prune.reduction": 0.5,
                              "prune.shape.knot0": 1.0, "prune.shape.knot1": 1.0})
    knots = (solved["prune.sparsity.knot0"], solved["prune.sparsity.knot1"])
    assert knots[0] == pytest.approx(knots[1]) and 0.5 < knots[0] < 0.9
    assert solver.macs("magnitude", list(knots)) == pytest.approx(math.sqrt(0.7 * 0.1), rel=0.011)


def test_a_warm_start_leaves_out_trials_aimed_within_another_sparsity_range():
    """A reduction and a shape are positions within the sparsity range: under another range they name other
    structures, so an earlier search's trials with other bounds are not told to Optuna as this search's."""
    from types import SimpleNamespace

    from autoprune.driver.warm import _same_scale
    from autoprune.space.load import demo_document, parse_spec

    raw = demo_document()
    raw["space"]["prune"]["sparsity"].update(mode="macs")
    spec = parse_spec(raw)  # low 0.3, high 0.9

    def record(allocation, bounds):
        prune_config = PruneConfig("structured", {"blocks.0.mlp": 1.0}, {}, allocation, target=0.5, bounds=bounds)
        return SimpleNamespace(result=SimpleNamespace(config=SimpleNamespace(prune=prune_config)))

    assert _same_scale(record("macs", (0.3, 0.9)), spec)
    assert not _same_scale(record("macs", (0.2, 0.8)), spec)
    assert _same_scale(record("given", None), spec)
