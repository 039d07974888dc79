"""`autoprune bench families --all`: the timm population (each architecture's smallest model, at an input it runs
at) and the runner that checks each architecture in its own capped subprocess, appending JSON Lines it resumes from."""

from __future__ import annotations

import json
import signal
import sys

import pytest

from autoprune.bench import census, census_tables, population
from autoprune.check import FAILS, REFUSES, WORKS


def test_the_population_is_every_timm_architecture_at_its_smallest_model(monkeypatch):
    names = population.architectures()
    assert len(names) > 50
    assert {"resnet", "vision_transformer", "pit", "coat", "metaformer"} <= set(names)
    assert not any(name.startswith("test_") for name in population.candidates("vision_transformer"))
    pit = population.smallest("pit")  # fewest parameters, counted on the meta device
    assert (pit.model, pit.candidates) == ("pit_ti_224", 8) and 4e6 < pit.params < 5e6
    gemma = population.smallest("gemma4_vit")  # its fewest-parameter model is an encoder with no head: not chosen
    assert gemma.model == "gemma4_vit_167m"
    assert population.size_rank("convnext_zepto") < population.size_rank("convnext_tiny") < population.size_rank(
        "convnext_base") < population.size_rank("convnext_v2")
    monkeypatch.setitem(population.SKIPPED, "coat", "left out by this test")
    variants, skipped = population.population(["pit", "coat"])
    assert [v.model for v in variants] == ["pit_ti_224"] and skipped == {"coat": "left out by this test"}


def test_the_input_is_64_where_the_model_runs_at_it_with_img_size_where_it_needs_that_else_its_own(monkeypatch):
    assert population.small_input("resnet10t") == population.Input({}, (3, 64, 64), ())
    pit = population.small_input("pit_ti_224")  # built for 224: 64 needs img_size=64
    assert (pit.kwargs, pit.input_size) == ({"img_size": 64}, (3, 64, 64)) and pit.tried[0].startswith("64x64: ")

    tried = []

    def inception_like(name, kwargs, input_size, num_classes):  # too small for its stem; takes no img_size
        tried.append((kwargs, input_size[1]))
        if "img_size" in kwargs:
            raise TypeError("Net.__init__() got an unexpected keyword argument 'img_size'")
        if input_size[1] < 299:
            raise RuntimeError("Kernel size can't be greater than actual input size")
        return (2, num_classes)

    monkeypatch.setattr(population, "_forward_shape", inception_like)
    chosen = population.small_input("inception_v3")
    assert (chosen.kwargs, chosen.input_size) == ({}, (3, 299, 299)) and len(chosen.tried) == 3
    assert tried == [({}, 64), ({"img_size": 64}, 64), ({}, 56), ({}, 299)]  # img_size is not offered twice
    monkeypatch.setattr(population, "_forward_shape", lambda *args: (2, 256, 768))  # features, not class scores
    with pytest.raises(population.NotAClassifier, match=r"has shape \(2, 256, 768\), not \(batch, 10\)"):
        population.small_input("gemma4_vit_167m")


def test_each_architecture_is_checked_in_its_own_subprocess_and_a_rerun_resumes(tmp_path, monkeypatch):
    path = tmp_path / "all.jsonl"
    monkeypatch.setitem(population.SKIPPED, "vgg", "left out by this test")
    said = []
    records = census.run_all(path, only=["starnet", "dla", "vgg"], methods=["structured", "nm"], jobs=2,
                               cap_seconds=120, echo=said.append)
    starnet = records["starnet"]
    assert (starnet["status"], starnet["model"], starnet["input_size"]) == ("checked", "starnet_s050", [3, 64, 64])
    assert [(row["method"], row["sparsity"], row["outcome"]) for row in starnet["rows"]] == [
        ("structured", 0.5, WORKS), ("nm", None, WORKS)]
    assert starnet["rows"][0]["macs_ratio"] > 1.2 and starnet["rows"][1]["macs_ratio"] == 1.0  # nm masks
    assert records["dla"]["status"] == "checked" and len(records["dla"]["rows"]) == 2
    assert records["vgg"]["status"] == "skipped" and records["vgg"]["reason"] == "left out by this test"
    assert said[0].startswith("3 architectures: 1 skipped, 0 already in") and "2 to check" in said[0]
    assert sorted(line[:5] for line in said[1:]) == ["[2/3]", "[3/3]"]  # one line per architecture, as it ends
    lines = path.read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["architecture"] * 3 + ["run"]

    again = []
    census.run_all(path, only=["starnet", "dla", "vgg"], methods=["structured", "nm"], echo=again.append)
    assert len(again) == 1 and "2 already in" in again[0] and "0 to check" in again[0]
    assert len(path.read_text().splitlines()) == len(lines) + 1  # nothing but the second run's record

    text = census_tables.population_markdown(*census.read_records(path))
    assert "2 timm architectures checked" in text and "1 skipped" in text
    assert "| starnet | starnet_s050 | 0.4M | 64×64 |" in text and "- vgg: left out by this test" in text
    assert "| nm | 0 | 2 | 0 | 0 | 0 | 0 |" in text  # masks keep the MACs: works below 1.3×
    assert "over 1 run (2 at a time; capped at 120 s an architecture;" in text  # the second run checked nothing


def test_a_child_past_its_cap_or_dying_is_rows_without_a_verdict_not_an_exception(tmp_path, monkeypatch):
    path = tmp_path / "all.jsonl"
    methods = ["structured", "nm"]
    timed_out = census.run_all(path, only=["starnet"], methods=methods, cap_seconds=0.5,
                                 echo=lambda line: None)["starnet"]
    assert timed_out["status"] == census_tables.TIMED_OUT
    assert [row["outcome"] for row in timed_out["rows"]] == [census_tables.TIMED_OUT] * 2
    assert timed_out["rows"][0]["reason"].startswith("still running after the 0.5 s cap, killed (while ")
    text = census_tables.population_markdown(*census.read_records(path))
    assert "| structured | 0 | 0 | 0 | 0 | 0 | 1 |" in text and "- starnet, timed out: still running" in text

    died = "import os, signal, sys; print('out of memory, say', file=sys.stderr, flush=True); os.kill(os.getpid(), 9)"
    monkeypatch.setattr(census, "child_command", lambda architecture, methods: [sys.executable, "-c", died])
    assert census.run_all(path, only=["starnet"], methods=methods, echo=lambda line: None)["starnet"][
        "status"] == census_tables.TIMED_OUT  # done already: without --retry-failed it is not run again
    crashed = census.run_all(path, only=["starnet"], methods=methods, retry_failed=True,
                               echo=lambda line: None)["starnet"]
    assert crashed["status"] == census_tables.CRASHED and crashed["rows"][0]["outcome"] == census_tables.CRASHED
    assert f"killed by SIGKILL (exit status -{int(signal.SIGKILL)}" in crashed["reason"]
    assert "out of memory, say" in crashed["reason"]
    exits = "import sys; print('Traceback …', file=sys.stderr); print('ValueError: no', file=sys.stderr); sys.exit(3)"
    monkeypatch.setattr(census, "child_command", lambda architecture, methods: [sys.executable, "-c", exits])
    record = census.run_architecture("starnet", methods, cap_seconds=30)
    assert record["reason"].startswith("the child exited with status 3 before it finished; its last stderr line:"
                                       " ValueError: no (while choosing its smallest model)")
    assert "Traceback …\nValueError: no" in record["reason"]  # the end of its stderr, in full


def test_the_tables_read_any_outcome_and_the_cli_prints_them_from_the_json_alone(tmp_path, capsys):
    from autoprune.cli import main

    def architecture(name, status, rows, **fields):
        return {**census._record(name, status, ["structured", "magnitude"], model=f"{name}_small",
                                   params=2_000_000, input_size=[3, 64, 64], seconds=12.0, rows=rows), **fields}

    def row(method, outcome, ratio=None, reason=""):
        return {"method": method, "sparsity": 0.5, "outcome": outcome, "macs_ratio": ratio, "reason": reason}

    records = [
        architecture("alpha", "checked", [row("structured", WORKS, 1.8), row("magnitude", WORKS, 1.0)]),
        architecture("beta", "checked", [row("structured", "removes little", 1.02), row("magnitude", "sideways")],
                     kwargs={"img_size": 64}),
        architecture("gamma", "checked", [row("structured", REFUSES, reason="no internal channels"),
                                          row("magnitude", FAILS, reason="it broke\nsecond line")]),
        architecture("delta", "crashed", [row("structured", "crashed"), row("magnitude", "crashed")],
                     reason="the child was killed by SIGKILL\nmore"),
        census._record("epsilon", "skipped", [], reason="not a classifier"),
        {"kind": "run", "wall_s": 3725.0, "population": 98, "timm": "1.0.31", "jobs": 2, "cap_seconds": 300,
         "sparsity": 0.5, "cpus": 2, "checked": 5},
    ]
    path = tmp_path / "all.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records) + '{"kind": "archi')  # cut short

    assert main(["bench", "families", "--all", "--json", str(path), "--table-only"]) == 0
    out = capsys.readouterr().out
    assert "4 timm architectures checked" in out and "1 skipped, of 98 in timm 1.0.31" in out
    assert ("| method | works ≥ 1.3× | works < 1.3× | removes little/nothing | refuses | fails | sideways |"
            " no verdict (timed out, crashed, does not run) |") in out
    assert "| structured | 1 | 0 | 1 | 1 | 0 | 0 | 1 |" in out and "| magnitude | 0 | 1 | 0 | 0 | 1 | 1 | 1 |" in out
    assert "MACs ratio ≥ 1.3 on 1 of 4 architectures (25%" in out
    assert "| beta | beta_small | 2.0M | 64×64 (img_size=64) | 12 | removes little (1.02×) | sideways |" in out
    assert "- gamma (gamma_small) / magnitude: it broke\n" in out and "- delta (delta_small), crashed: the child" in out
    assert "- epsilon: not a classifier" in out and "Wall time: 1 h 02 min over 1 run (2 at a time" in out

    assert main(["bench", "families", "--all"]) == 1
    assert "--json PATH is required" in capsys.readouterr().err
    assert main(["bench", "families", "--only", "resnet"]) == 1
    assert "--only goes with --all" in capsys.readouterr().err
    assert main(["bench", "families", "--all", "--only", "resnet,no_such", "--json", str(tmp_path / "x")]) == 1
    assert "no_such is not a timm architecture" in capsys.readouterr().err
