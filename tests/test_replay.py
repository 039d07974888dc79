"""The search replay (autoprune/bench/replay.py) over a small synthetic pool: lookups, halving's costs and verdicts,
the hypervolume's normalisation, cost to reach, determinism and the page."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from autoprune.bench import record, replay
from autoprune.bench.commands import render
from autoprune.halving import rung_decay
from autoprune.space.load import demo_document

FULL = 120
FIDELITIES = (0, 4, 13, 40, FULL)
SECONDS = {"prune": 0.3, "profile": 2.0, "evaluate": 0.4, "heal_step": 0.02, "zero_shot": 0.5}
GRID_SPARSITIES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def _spec() -> dict:
    doc = demo_document()
    doc["space"]["prune"] = {"methods": ["structured", "vbp"],
                             "sparsity": {"mode": "depth", "knots": 2, "low": 0.3, "high": 0.9, "step": 0.05}}
    doc["space"]["heal"].update({"methods": ["none", "finetune", "distill"], "steps": FULL, "calibration_images": 256,
                                 "lr": {"low": 3e-4, "high": 3e-3, "log": True}})
    return doc


def _config(method: str, knots: tuple[float, float], heal: str, lr: float, origin: str, noise) -> dict:
    """Accuracy falls with sparsity (more for `structured`), rises with healing steps (none: it never trains) and is
    best at lr 1e-3; latency falls with sparsity; structured at low sparsity is not faster than the dense model."""
    sparsity = sum(knots) / 2
    ratio = 1.0 - 0.8 * sparsity if method == "vbp" else 1.5 - 1.0 * sparsity
    params = {"prune.method": method, "prune.sparsity.knot0": knots[0], "prune.sparsity.knot1": knots[1],
              "heal.method": heal, "heal.lr": lr}
    trains = heal != "none"
    not_faster = ratio >= 1.0
    macs = round(1e6 * (1 - 0.9 * knots[0]) * 0.4 + 1e6 * (1 - 0.9 * knots[1]) * 0.6)  # the last knot weighs more
    config = {"params": params, "origin": origin, "trains": trains, "latency_ratio": round(ratio, 4), "macs": macs,
              "not_faster": not_faster, "seconds": dict(SECONDS), "seeds": []}
    if not_faster:
        return config
    zero_shot = 0.95 - 0.9 * sparsity ** 2 - (0.05 if method == "structured" else 0.0)
    healed = (0.95 - 0.12 * sparsity ** 2 - (0.02 if method == "structured" else 0.0)
              - 0.02 * abs(math.log10(lr / 1e-3)) - (0.0 if heal == "distill" else 0.01))
    for seed in (0, 1):
        accuracy = {}
        for fidelity in FIDELITIES:
            value = healed - (healed - zero_shot) * math.exp(-fidelity / 25) if trains else zero_shot
            accuracy[str(fidelity)] = round(value + noise.normal(0, 0.004), 4)
        config["seeds"].append({"seed": seed, "accuracy": accuracy})
    return config


def synthetic_pool(sobol: int = 48) -> dict:
    noise = np.random.default_rng(0)
    configs = []
    for _ in range(sobol):
        knots = tuple(round(0.3 + 0.05 * int(k), 2) for k in noise.integers(0, 13, size=2))
        configs.append(_config(str(noise.choice(["structured", "vbp"])), knots,
                               str(noise.choice(["none", "finetune", "distill"])),
                               float(np.exp(noise.uniform(math.log(3e-4), math.log(3e-3)))), "sobol", noise))
    for method in ("structured", "vbp"):
        for sparsity in GRID_SPARSITIES:
            configs.append(_config(method, (sparsity, sparsity), "distill", 1e-3, "grid", noise))
    return {"task": "reference", "spec": _spec(), "dense": {"accuracy": 0.95, "latency_ms": 3.0},
            "budget": {"steps": FULL, "calibration_images": 256}, "fidelities": list(FIDELITIES), "configs": configs}


@pytest.fixture(scope="module")
def pool() -> dict:
    return synthetic_pool()


def test_a_grid_point_is_found_exactly_and_the_grid_arm_replays_the_grid(pool):
    grid = [index for index, config in enumerate(pool["configs"]) if config["origin"] == "grid"]
    for index in grid:
        params = dict(pool["configs"][index]["params"])
        params["prune.sparsity.knot0"] += 1e-12  # Optuna's step arithmetic: a float a hair away is the same point
        assert replay.lookup(pool, params) == (index, True, 0.0)
    run = replay.replay(pool, "grid", 0)
    assert [t["config"] for t in run["trials"][: 2 * len(grid)]] == grid + grid  # in pool order, then again
    assert all(t["exact"] for t in run["trials"])
    assert run["summary"]["nearest"] == 0


def test_an_ignored_parameter_does_not_make_a_point_new(pool):
    none = next(i for i, c in enumerate(pool["configs"]) if c["params"]["heal.method"] == "none"
                and not c["not_faster"])
    params = {**pool["configs"][none]["params"], "heal.lr": 2.9e-3}  # heal: none ignores the learning rate
    assert replay.lookup(pool, params) == (none, True, 0.0)


def test_the_nearest_configuration_has_the_same_methods(pool):
    configs = pool["configs"]
    for index, config in enumerate(configs):
        if config["params"]["heal.method"] == "none":
            continue
        other = "vbp" if config["params"]["prune.method"] == "structured" else "structured"
        params = {**config["params"], "prune.method": other}
        found, exact, distance = replay.lookup(pool, params)
        match = configs[found]["params"]
        assert (match["prune.method"], match["heal.method"]) == (other, config["params"]["heal.method"])
        if not exact:  # and no configuration of those methods is nearer, on the scaled dimensions
            same = [c["params"] for c in configs if (c["params"]["prune.method"], c["params"]["heal.method"])
                    == (other, config["params"]["heal.method"])]
            assert distance == pytest.approx(min(_scaled_distance(params, p) for p in same))
            assert distance > 0


def _scaled_distance(a: dict, b: dict) -> float:
    knots = sum(((a[k] - b[k]) / 0.6) ** 2 for k in ("prune.sparsity.knot0", "prune.sparsity.knot1"))
    lr = ((math.log(a["heal.lr"]) - math.log(b["heal.lr"])) / (math.log(3e-3) - math.log(3e-4))) ** 2
    return math.sqrt(knots + lr)


def test_a_trial_asked_by_a_sampler_is_answered_and_counted(pool):
    run = replay.replay(pool, "random", 3)
    summary = run["summary"]
    assert summary["exact"] + summary["nearest"] == len(run["trials"])
    assert summary["nearest"] > 0  # random search asks for points the pool does not hold
    for trial in run["trials"]:
        config = pool["configs"][trial["config"]]
        assert config["params"]["prune.method"] == trial["params"]["prune.method"]
        assert config["params"]["heal.method"] == trial["params"]["heal.method"]
        if trial["state"] == "complete":
            assert trial["accuracy"] == config["seeds"][1]["accuracy"][str(FULL)]  # seed 3 reads pool seed 1
            assert trial["steps"] == (FULL if config["trains"] else 0)
    # the cap: healing steps spent before the last trial started are below it
    assert run["trials"][-2]["spent"][0] < run["cap_steps"] or run["trials"][-2]["spent"][1] < run["cap_seconds"]


def test_a_macs_arm_asks_for_a_cost_and_is_answered_at_the_knots_that_cost_it(pool):
    """The sampler proposes a reduction and a shape; the replay solves them onto the pool's knots on its recorded
    MACs (as the live trial does on counted ones), so the solved knots cost the target and keep the shape."""
    from autoprune.bench.replay_pool import _Task

    run = replay.replay(pool, "tpe_grouped+macs", 0)
    solver = _Task.of(pool).solver
    lightest = solver.macs("vbp", [0.3, 0.3])
    heaviest = solver.macs("vbp", [0.9, 0.9])
    solved = solver.to_knots({"prune.method": "vbp", "heal.method": "distill", "prune.reduction": 0.5,
                              "prune.shape.knot0": 0.5, "prune.shape.knot1": 1.0})
    knots = [solved["prune.sparsity.knot0"], solved["prune.sparsity.knot1"]]
    assert set(solved) == {"prune.method", "heal.method", "prune.sparsity.knot0", "prune.sparsity.knot1"}
    assert solver.macs("vbp", knots) == pytest.approx(math.sqrt(lightest * heaviest), rel=0.011)
    assert 0.3 < knots[0] < knots[1] <= 0.9
    assert run["trials"] and all("prune.reduction" not in t["params"] for t in run["trials"])
    assert {t["params"]["prune.method"] for t in run["trials"]} == {"structured", "vbp"}


def test_halving_promotes_at_full_cost_plus_decays_and_stops_as_pruned(pool):
    run = replay.replay(pool, "tpe+halving", 0)
    decays = rung_decay(13) + rung_decay(40)
    promoted = [t for t in run["trials"] if t["state"] == "complete" and t["trains"]]
    stopped = [t for t in run["trials"] if t["state"] == "pruned"]
    assert promoted and stopped
    for trial in promoted:
        assert trial["steps"] == FULL + decays
        assert [fidelity for fidelity, _ in trial["rungs"]] == [13, 40]
        seconds = SECONDS["prune"] + SECONDS["profile"] + (FULL + decays) * SECONDS["heal_step"] + 3 * SECONDS[
            "evaluate"]
        assert trial["seconds"] == pytest.approx(seconds)
    for trial in stopped:
        reached = trial["rungs"][-1][0]
        assert trial["steps"] == reached + sum(rung_decay(f) for f, _ in trial["rungs"])
        assert run["optuna_states"][trial["number"]] == "PRUNED"
    for trial in promoted:
        assert run["optuna_states"][trial["number"]] == "COMPLETE"
    assert sum(t["steps"] for t in run["trials"]) == run["trials"][-1]["spent"][0]


def test_the_zero_shot_rung_costs_no_steps(pool):
    run = replay.replay(pool, "random+halving0", 1)
    at_zero = [t for t in run["trials"] if t["state"] == "pruned" and t["rungs"][-1][0] == 0]
    assert at_zero and all(t["steps"] == 0 for t in at_zero)
    assert all(t["seconds"] == pytest.approx(sum(SECONDS[k] for k in ("prune", "profile", "zero_shot", "evaluate")))
               for t in at_zero)


def test_a_trial_not_faster_is_told_zero_accuracy(pool):
    run = replay.replay(pool, "random", 0)
    slow = [t for t in run["trials"] if t["state"] == "not_faster"]
    assert slow and all(t["steps"] == 0 and t["accuracy"] is None for t in slow)
    assert run["summary"]["not_faster"] == len([t for t in slow if t["spent"][0] <= run["cap_steps"]])


def test_the_old_space_samples_the_budget_and_pays_for_what_it_samples(pool):
    run = replay.replay(pool, "tpe_grouped-old", 0)
    healed = [t for t in run["trials"] if t["state"] == "complete" and t["trains"]]
    assert {t["steps"] for t in healed} > {FULL}  # the coarse start heals the full budget; the sampler less
    for trial in healed:
        assert trial["steps"] == trial["params"]["heal.steps"]
        config = pool["configs"][trial["config"]]
        recorded = config["seeds"][0]["accuracy"]
        low = max(f for f in FIDELITIES if f <= trial["steps"])
        high = min(f for f in FIDELITIES if f >= trial["steps"])
        assert min(recorded[str(low)], recorded[str(high)]) - 1e-9 <= trial["accuracy"] \
            <= max(recorded[str(low)], recorded[str(high)]) + 1e-9


def test_interpolation_in_log_steps_meets_the_recorded_fidelities(pool):
    config = next(c for c in pool["configs"] if c["trains"] and not c["not_faster"])
    for fidelity in (13, 40, FULL):
        assert replay.accuracy_after(config, 0, fidelity, FIDELITIES) == config["seeds"][0]["accuracy"][str(fidelity)]
    middle = replay.accuracy_after(config, 0, round(math.sqrt(13 * 40)), FIDELITIES)
    a, b = config["seeds"][0]["accuracy"]["13"], config["seeds"][0]["accuracy"]["40"]
    assert middle == pytest.approx((a + b) / 2, abs=0.01 * abs(b - a) + 1e-9)


def test_the_pooled_front_is_the_unit_of_hypervolume(pool):
    assert replay.normalised_hypervolume(replay.pooled_points(pool), pool) == pytest.approx(1.0)
    one_seed = replay.normalised_hypervolume(replay.pooled_points(pool, seeds=[0]), pool)
    assert 0.8 < one_seed <= 1.0
    assert replay.normalised_hypervolume([(0.0, 0.5)], pool) == 0.0  # below the reference point: nothing


def test_a_seed_is_also_measured_against_what_its_pool_seed_can_reach(pool):
    run = replay.replay(pool, "grid", 3)
    assert run["ceiling"] == pytest.approx(replay.normalised_hypervolume(replay.pooled_points(pool, seeds=[1]), pool))
    assert max(point[2] for point in run["trajectory"]) <= run["ceiling"] + 1e-12  # a run never beats its ceiling
    for target in ("0.9", "0.95"):
        assert run["summary"]["reach_of_ceiling"][target]["steps"] <= run["summary"]["reach"][target]["steps"]


def test_cost_to_reach_rises_with_the_target(pool):
    run = replay.replay(pool, "tpe_grouped", 2)
    trajectory = run["trajectory"]
    assert all(a[0] <= b[0] and a[1] <= b[1] and a[2] <= b[2] for a, b in zip(trajectory, trajectory[1:]))
    costs = [replay.cost_to_reach(trajectory, target, cap_steps=run["cap_steps"], cap_seconds=run["cap_seconds"])
             for target in (0.3, 0.6, 0.8, 0.9, 0.95, 0.99, 1.5)]
    assert all(a["steps"] <= b["steps"] and a["seconds"] <= b["seconds"] for a, b in zip(costs, costs[1:]))
    assert costs[0]["reached_steps"] and not costs[-1]["reached_steps"]
    assert costs[-1]["steps"] == run["cap_steps"] and costs[-1]["seconds"] == run["cap_seconds"]  # censored


@pytest.mark.parametrize("arm,concurrency", [("tpe_grouped+halving", 1), ("tpe_grouped+halving", 4), ("gp", 1)])
def test_the_same_seed_replays_the_same_run(pool, arm, concurrency):
    cap = 12 * FULL
    first = replay.replay(pool, arm, 5, cap_steps=cap, concurrency=concurrency)
    again = replay.replay(pool, arm, 5, cap_steps=cap, concurrency=concurrency)
    assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)
    other = replay.replay(pool, arm, 6, cap_steps=cap, concurrency=concurrency)
    assert [t["params"] for t in other["trials"]] != [t["params"] for t in first["trials"]]


def test_concurrent_trials_are_told_in_the_order_they_finish(pool):
    run = replay.replay(pool, "random+halving", 0, concurrency=4)
    numbers = [t["number"] for t in run["trials"]]
    assert numbers != sorted(numbers)  # a short trial started later is told before a long one
    assert sorted(numbers) == list(range(len(numbers)))


def test_paired_comparison_says_which_needs_less():
    same = replay.paired_comparison([100, 200, 300, 400], [100, 200, 300, 400])
    assert same["p"] == 1.0 and same["ratio"] == 1.0
    faster = replay.paired_comparison([400 + i for i in range(20)], [100 + i for i in range(20)])
    assert faster["ratio"] > 3 and faster["low"] > 3 and faster["p"] < 0.001


def test_rank_agreement_rises_with_the_fidelity(pool):
    rows = replay.rank_agreement(pool)
    overall = next(r for r in rows if r["heal"] == "all" and r["latency"] == "all")
    assert overall["n"] == sum(1 for c in pool["configs"] if c["trains"] and not c["not_faster"])
    assert overall["40"] > overall["0"]
    assert {r["latency"] for r in rows} == {"all", "Q1", "Q2", "Q3", "Q4"}
    assert {r["heal"] for r in rows} == {"all", "finetune", "distill"}


def test_an_unknown_arm_or_a_rung_the_pool_lacks_is_refused(pool):
    with pytest.raises(ValueError, match="unknown arm"):
        replay.find_arm("annealing")
    assert replay.find_arm("tpe+halving:0,0.0333").rungs == (0.0, 0.0333)
    with pytest.raises(ValueError, match="recorded accuracies at"):
        replay.replay(pool, "tpe+halving:0.5", 0)


def test_the_command_writes_its_file_and_prints_the_page(pool, tmp_path, capsys):
    path = tmp_path / "pool.json"
    record.write(path, record.Provenance("search-pool"), pool)
    parser = argparse.ArgumentParser()
    replay.add_arguments(parser)
    out = tmp_path / "replay.json"
    args = parser.parse_args(["--pool", str(path), "--arms", "random", "grid", "tpe_grouped-old", "tpe+halving",
                              "--seeds", "3", "--cap-steps", str(16 * FULL), "--workers", "1", "--json", str(out)])
    assert replay.main_replay(args) == 0
    provenance, results = record.read(out)
    assert provenance["bench"] == "replay"  # the table it renders as (bench/commands.py)
    task = results["tasks"]["reference"]
    assert set(task["arms"]) == {"random", "grid", "tpe_grouped-old", "tpe+halving"}
    assert task["arms"]["random"]["seeds"] == 3
    assert set(task["comparisons"]["tpe+halving"]) == {"random", "tpe_grouped-old"}
    assert "random" not in task["comparisons"].get("random", {})
    printed = capsys.readouterr().out
    assert printed.strip().endswith(replay.page(results).strip())
    assert replay.page(results) == render(provenance["bench"], results)  # as the docs render the file
    assert sum(line.startswith("bench replay: ") for line in printed.splitlines()) == 4 * 3  # a line per run
    assert set(task["comparisons"]["tpe+halving"]["random"]) == {"steps", "seconds", "of_ceiling"}
    for text in ("| tpe+halving |", "| grid |", "τ 13 steps", "vs tpe_grouped-old", "its pool seed's own front"):
        assert text in printed
    with pytest.raises(SystemExit):
        parser.parse_args(["--pool", str(path), "--arms", "annealing", "--json", str(out)])
