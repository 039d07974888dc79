"""A real search: local Ray (2 CPUs), Optuna through Ray Tune, MLflow on an sqlite file in a temp dir. No mocks.

The assertions read back what MLflow holds (runs, metrics, artifacts, registered versions, tags, aliases) and what
`best` answers, from Python, from the CLI and from a fresh process that loads the registered model.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path
from importlib import metadata

import pytest
import torch

from autoprune.driver.search import search
from autoprune.errors import AutopruneError, NoModelMeetsTarget
from autoprune.saved import STRUCTURE_FILE, load_model_dir
from autoprune.space.load import parse_spec
from autoprune.testing.browser import read_front, ui_server, why_no_browser
from autoprune.tracking import view
from autoprune.tracking.schema import ALIAS_FASTEST, ALIAS_MOST_ACCURATE
from autoprune.tracking.select import best, registered_versions
from autoprune.tracking.store import Tracker

pytestmark = pytest.mark.e2e

SPEC = {
    "name": "e2e",
    "model": {
        "name": "vit_tiny_patch16_224", "num_classes": 10, "train_steps": 300,
        # Wide enough that removing MLP neurons shows in the latency at batch 32 (a narrower one is all overhead).
        "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2,
                   "global_pool": "avg", "class_token": False},
    },
    "data": {"source": "reference", "eval_images": 200},
    "profile": {"batch_size": 32, "extra_batch_sizes": [1], "warmup": 5, "repeats": 15},
    # Masked trials are healed (stop_unless_faster: false), so that their shared dense measurement shows here; by
    # default the search leaves their method out on a CPU (test_reuse.py). Seed 4 draws each method with and without
    # healing in the flat space (seed 1, before it was flat, did too).
    "search": {"trials": 4, "concurrency": 2, "sampler": "random", "seed": 4, "resources": {"cpu": 1},
               "stop_unless_faster": False},
    "mlflow": {"experiment": "e2e-exp", "registered_model": "e2e-model"},
    "space": {
        "prune": {"methods": ["magnitude", "structured"], "sparsity": {"mode": "global", "low": 0.4, "high": 0.8}},
        # the budget searched, as before it was a fidelity (space.heal.budget: searched keeps that reachable)
        "heal": {"methods": ["none", "distill"], "calibration_images": [32, 64], "steps": {"low": 3, "high": 8},
                 "lr": 1e-3, "batch_size": 16, "budget": "searched"},
    },
}


@pytest.fixture(scope="module")
def outcome(local_ray, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("search")
    return search(parse_spec(SPEC), workdir=workdir, echo=None)


@pytest.fixture(scope="module")
def tracker(outcome):
    return Tracker(outcome.tracking_uri, "e2e-exp")


def test_every_trial_is_a_child_run_with_its_metrics(outcome, tracker):
    assert len(outcome.records) == 4 and not outcome.failed
    children = tracker.child_runs(outcome.parent_run_id)
    assert len(children) == 4
    front_ids = {record.trial_id for record in outcome.front}
    for run in children:
        metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
        for key in ("latency_ms", "latency_p90_ms", "macs", "params", "sparsity", "time_prune_s", "time_profile_s",
                    "latency_ms_batch1", "speedup", "speedup_low", "speedup_high", "latency_ms_in_search"):
            assert key in metrics, key
        assert metrics["speedup_low"] <= metrics["speedup"] <= metrics["speedup_high"]  # timed against dense
        assert "node.load_1m" in tags and "node.busy_processes" in tags  # what else ran, beside the number
        assert metrics["feasible"] == 1 and "accuracy" in metrics and "time_evaluate_s" in metrics
        assert tags["stopped"] == "" and metrics["healing_steps"] == (int(params.get("heal.steps", 0)) if
                                                                      params["heal.method"] == "distill" else 0)
        assert tags["memory_format"] == "contiguous" and tags["compiled"] == "False"  # a ViT: no layout to try
        assert params["prune.method"] in {"magnitude", "structured"}
        assert tags["device"].startswith("cpu: ") and tags["version.torch"] == metadata.version("torch")
        assert tags["autoprune.pareto"] == str(tags["autoprune.trial_id"] in front_ids).lower()


def test_masked_trials_reuse_the_dense_measurement(outcome):
    masked = [r.result for r in outcome.records if r.result.config.prune.method == "magnitude"]
    assert masked, "the fixed seed should sample at least one magnitude trial"
    for result in masked:  # same shapes, same kernels: timed once, on the dense model, via the shared cache
        assert result.latency_cached and result.latency == outcome.dense.latency
    assert outcome.accounting["latency_reused"] >= len(masked)


def test_the_demo_bench_reads_a_finished_search(outcome):
    """`bench demo`'s row and table, from a real search: the accounting, the stops, the front fastest first."""
    from autoprune.bench import demo

    row = demo.summarise(outcome, 0)
    assert row["trials"] == len(outcome.records) and row["failed"] == len(outcome.failed)
    assert row["wall_s"] == outcome.wall_seconds > row["setup_s"] > 0 and 0 < row["work_share"] <= 1
    assert [model["latency_ms"] for model in row["front"]] == sorted(model["latency_ms"] for model in row["front"])
    assert len(row["front"]) == len(outcome.front) >= 1
    text = demo.markdown([row, {**row, "run": 2, "dense_cached": True}])
    assert f"| 1 | trained | {row['wall_s']:.0f} |" in text and "| 2 | cached |" in text
    assert "0% apart" in text  # the same dense latency twice


def test_the_parent_run_holds_spec_table_and_plots(outcome, tracker):
    names = {item.path for item in tracker.client.list_artifacts(outcome.parent_run_id)}
    assert {"spec.json", "trials.json", "pareto.png", "pareto.html"} <= names
    parent = tracker.client.get_run(outcome.parent_run_id)
    assert parent.data.metrics["front_size"] == len(outcome.front) >= 1
    assert parent.data.metrics["dense_accuracy"] > 0.5  # trained once on the reference task


def test_the_front_is_registered_with_tags_and_aliases(outcome, tracker):
    versions = tracker.client.search_model_versions("name='e2e-model'")
    assert len(versions) == len(outcome.front)
    for version in versions:
        for key in ("accuracy", "latency_ms", "latency_p90_ms", "device", "batch_size", "dtype", "config"):
            assert key in version.tags, key
        assert version.tags["batch_size"] == "32" and version.tags["dtype"] == "float32"
    by_accuracy = max(versions, key=lambda v: float(v.tags["accuracy"]))
    by_speed = min(versions, key=lambda v: float(v.tags["latency_ms"]))
    assert tracker.client.get_model_version_by_alias("e2e-model", ALIAS_MOST_ACCURATE).version == by_accuracy.version
    assert tracker.client.get_model_version_by_alias("e2e-model", ALIAS_FASTEST).version == by_speed.version


def test_registering_the_same_search_twice_adds_no_version(outcome, tracker):
    entries = [(tracker.child_runs(outcome.parent_run_id, trial_id=r.trial_id)[0].info.run_id, r)
               for r in outcome.front]
    tracker.register("e2e-model", outcome.parent_run_id, entries)
    assert len(tracker.client.search_model_versions("name='e2e-model'")) == len(outcome.front)


def test_best_picks_the_most_accurate_version_within_the_target(outcome):
    versions = registered_versions("e2e-model", tracking_uri=outcome.tracking_uri)
    latencies = sorted(v.latency_ms for v in versions)
    for target in {latencies[0], (latencies[0] + latencies[-1]) / 2, latencies[-1] * 2}:
        expected = max((v for v in versions if v.latency_ms <= target), key=lambda v: (v.accuracy, -v.latency_ms))
        assert best(model="e2e-model", max_latency_ms=target, tracking_uri=outcome.tracking_uri) == expected
    with pytest.raises(NoModelMeetsTarget, match="the fastest is version"):
        best(model="e2e-model", max_latency_ms=latencies[0] * 0.5, tracking_uri=outcome.tracking_uri)


def _cli(*args):
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run([sys.executable, "-m", "autoprune.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_best_json_and_no_fit(outcome, tmp_path):
    versions = registered_versions("e2e-model", tracking_uri=outcome.tracking_uri)
    fastest = min(v.latency_ms for v in versions)
    done = _cli("best", "--model", "e2e-model", "--max-latency-ms", str(fastest * 100), "--json",
                "--tracking-uri", outcome.tracking_uri)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert {"name", "version", "accuracy", "latency_ms", "device", "model_uri"} <= set(answer)
    assert answer["accuracy"] == max(v.accuracy for v in versions)
    missed = _cli("best", "--model", "e2e-model", "--max-latency-ms", str(fastest / 2), "--tracking-uri",
                  outcome.tracking_uri)
    assert missed.returncode == 1 and "fastest is version" in missed.stderr
    front = _cli("front", "--experiment", "e2e-exp", "--json", "--tracking-uri", outcome.tracking_uri)
    assert front.returncode == 0, front.stderr
    shown = json.loads(front.stdout)
    assert shown["run_id"] == outcome.parent_run_id and len(shown["front"]) == len(outcome.front)
    # each front model names its registered version and aliases; the dense model's row comes with them
    assert sorted(row["version"] for row in shown["front"]) == sorted(
        f"e2e-model/{version}" for version in outcome.registered_versions)
    assert {"fastest", "most-accurate"} <= {alias for row in shown["front"] if row["aliases"]
                                           for alias in row["aliases"].split(", ")}
    assert shown["dense"]["prune"] == "dense" and shown["dense"]["accuracy"] == outcome.dense.accuracy
    plot = tmp_path / "front.png"
    newest = _cli("front", "--tracking-uri", outcome.tracking_uri, "--plot", str(plot))  # the newest search
    assert newest.returncode == 0 and outcome.parent_run_id in newest.stdout, newest.stderr
    assert re.search(r"\|\s+dense\s+\|", newest.stdout) and plot.read_bytes()[:4] == b"\x89PNG"


def test_a_registered_model_loads_in_a_fresh_process_with_the_trials_outputs(outcome, tracker, tmp_path):
    version = registered_versions("e2e-model", tracking_uri=outcome.tracking_uri)[0]
    trial_id = tracker.client.get_run(version.run_id).data.tags["autoprune.trial_id"]
    record = next(r for r in outcome.front if r.trial_id == trial_id)
    inputs = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(inputs, tmp_path / "in.pt")
    script = textwrap.dedent(f"""
        import torch, autoprune
        model = autoprune.load_model({version.model_uri!r}, tracking_uri={outcome.tracking_uri!r})
        inputs = torch.load({str(tmp_path / 'in.pt')!r}, weights_only=True)
        torch.save(model(inputs).detach(), {str(tmp_path / 'out.pt')!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert done.returncode == 0, done.stderr
    with torch.no_grad():
        expected = load_model_dir(record.model_dir)(inputs)  # the model the trial saved as its checkpoint
    assert torch.allclose(torch.load(tmp_path / "out.pt", weights_only=True), expected, atol=1e-6)


def test_best_ranks_only_latencies_measured_under_the_same_conditions(outcome, tracker):
    """A registered model holding versions measured at batch 32 and at batch 1 must not rank one latency against
    the other: without a choice of conditions that is an error that lists them; --batch-size chooses."""
    client = tracker.client
    client.create_registered_model("e2e-mixed")
    for version in client.search_model_versions("name='e2e-model'"):
        for batch in ("32", "1"):
            client.create_model_version("e2e-mixed", version.source, run_id=version.run_id,
                                        tags={**version.tags, "batch_size": batch})
    with pytest.raises(AutopruneError, match=r"measured under 2 conditions.*batch 1, .*batch 32, .*--batch-size"):
        best(model="e2e-mixed", max_latency_ms=1e6, tracking_uri=outcome.tracking_uri)
    choice = best(model="e2e-mixed", max_latency_ms=1e6, batch_size=1, tracking_uri=outcome.tracking_uri)
    assert choice.batch_size == 1 and choice.dtype == "float32"
    with pytest.raises(NoModelMeetsTarget, match="dtype 'bfloat16'.*float32"):
        best(model="e2e-mixed", max_latency_ms=1e6, batch_size=1, dtype="bfloat16", tracking_uri=outcome.tracking_uri)
    done = _cli("best", "--model", "e2e-mixed", "--max-latency-ms", "1e6", "--batch-size", "32", "--json",
                "--tracking-uri", outcome.tracking_uri)
    assert done.returncode == 0 and json.loads(done.stdout)["batch_size"] == 32, done.stderr


CNN_SPEC = {
    "name": "e2e-cnn",
    "model": {"name": "resnet18", "num_classes": 10, "train_steps": 150,
              "kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}},
    "data": {"source": "reference", "eval_images": 200},
    "profile": {"batch_size": 16, "warmup": 3, "repeats": 10},  # memory_format: auto, the default
    # every trial heals (search.stop_unless_faster off): this test holds the heal path of a CNN whose pruned
    # copies are barely faster than dense (channels 8–64); test_busy_search.py holds the stop rule under load
    # the default sampler, whose coarse start these 4 trials are; sparsity chosen by cost (each trial solves its
    # shape's scale on pruned copies of the CNN before it is timed)
    "search": {"trials": 4, "concurrency": 2, "sampler": "gp", "seed": 3, "resources": {"cpu": 1},
               "stop_unless_faster": False},
    "mlflow": {"experiment": "e2e-cnn", "registered_model": "e2e-cnn-model"},
    "space": {
        "prune": {"methods": ["structured", "vbp"], "sparsity": {"mode": "macs", "knots": 2, "low": 0.6, "high": 0.9}},
        "heal": {"methods": ["finetune", "distill", "align"], "calibration_images": 32, "steps": 3, "lr": 1e-3,
                 "batch_size": 8},
    },
}


@pytest.mark.browser
def test_the_printed_address_opens_the_front_in_a_browser(outcome, tracker, tmp_path):
    """`autoprune ui` serves the address the search printed, and stops its server when it stops; what a person sees
    there, in headless Chromium (where there is one)."""
    missing = why_no_browser()
    screenshot = tmp_path / "front.png"
    with ui_server(outcome.tracking_uri) as address:
        base, path = address.split("/#")[0], address.split("/", 3)[3]
        assert path in outcome.ui_hint  # the address `autoprune ui` prints is the one the search printed
        with urllib.request.urlopen(f"{base}/health", timeout=10) as response:
            assert response.status == 200
        page = None if missing else read_front(address, screenshot=screenshot)
    with pytest.raises(OSError):  # MLflow's server went down with `autoprune ui`
        urllib.request.urlopen(f"{base}/health", timeout=5)
    if missing:
        pytest.skip(f"cannot look at the front in a browser here: {missing}")
    print(f"the front as a browser shows it: {screenshot}")
    # MLflow's model-training layout names the runs tab "Runs"; its GenAI layout, where an address without
    # `workflowType=machine_learning` used to open, names it "Training runs" beside traces and agent versions
    assert page.heading == "Runs"
    assert page.sections[0] == view.FRONT_SECTION  # the front's chart first, without a click
    healed = [r for r in outcome.records if r.result is not None and r.result.feasible]
    assert page.points == {view.FRONT_COLOR: len(outcome.front), view.TRIAL_COLOR: len(healed) - len(outcome.front),
                           view.DENSE_COLOR: 1}
    front_runs = {tracker.child_runs(outcome.parent_run_id, trial_id=r.trial_id)[0].info.run_id: r
                  for r in outcome.front}
    clicked = page.point_link.rsplit("/", 1)[-1]
    assert clicked in front_runs  # a front point's card links to its trial's run …
    versions = {f"/models/{v.name}/versions/{v.version}"  # (other tests here register it under more names)
                for v in tracker.client.search_model_versions(f"run_id='{clicked}'")}
    assert any(link.endswith(tuple(versions)) for link in page.run_page_links)  # … whose page links to its version


def test_a_cnn_search_with_training_heals_loses_no_trial(local_ray, tmp_path):
    """The product's main path for every CNN: structured / VBP removal, then a training heal, with the default
    layout search in the profile (a ResNet with BatchNorm). The registered models carry the recipe they were timed
    in, and load in it; retargeted to another device, in the recipe they were timed in there."""
    outcome = search(parse_spec(CNN_SPEC), workdir=tmp_path, echo=None)
    assert len(outcome.records) == 4
    assert not outcome.failed, outcome.failed[0].error
    assert {record.result.config.heal.method for record in outcome.records} <= {"finetune", "distill", "align"}
    assert all(record.result.healing_steps > 0 for record in outcome.records)  # each one healed
    # aimed by cost: the coarse start's reductions, a harder one landing on fewer MACs for the same method
    for method in ("structured", "vbp"):
        aimed = sorted((r.result.config.prune.target, r.result.macs) for r in outcome.records
                       if r.result.config.prune.method == method)
        assert [target for target, _ in aimed] == [0.5, 1.0] and aimed[1][1] < aimed[0][1]
    runs = Tracker(outcome.tracking_uri, "e2e-cnn").child_runs(outcome.parent_run_id)
    assert all("prune.reduction" in run.data.params for run in runs)
    for record in outcome.records:  # each checkpoint loads in the layout its latency was measured in
        model = load_model_dir(record.model_dir)
        channels_last = model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        assert channels_last == (record.result.latency.memory_format == "channels_last")
    for version in registered_versions("e2e-cnn-model", tracking_uri=outcome.tracking_uri):  # the front's, if any
        assert version.memory_format in ("contiguous", "channels_last") and version.kernels == "dense"
    # Retimed on another device (2 threads), each model is saved again in the layout it was timed in there
    from autoprune.driver.retarget import retarget

    done = retarget(outcome.parent_run_id, tracking_uri=outcome.tracking_uri, workdir=tmp_path, cpus=2, echo=None)
    assert len(done.records) == len([r for r in outcome.records if r.result.feasible])  # the healed ones
    for record in done.records:
        model = load_model_dir(record.model_dir)
        channels_last = model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        assert channels_last == (record.result.latency.memory_format == "channels_last")
        assert record.result.latency.threads == 2
        # saved with the batch shape it was timed on there: loading warms (and compiles) it on that shape
        structure = json.loads((Path(record.model_dir) / STRUCTURE_FILE).read_text())
        assert structure["example_shape"] == [record.result.latency.batch_size, *record.result.latency.input_size]


def test_latency_is_measured_on_the_target_type_from_inside_tune_trials(local_ray, tmp_path):
    """A Tune trial's placement group captures the tasks it starts; the latency task for `profile.target` must be
    placed on the cluster at large (a node of that type), or it waits forever for a resource the group lacks."""
    import copy

    from conftest import TEST_ACCELERATOR

    spec = copy.deepcopy(SPEC)
    spec["mlflow"] = {"experiment": "e2e-target", "registered_model": "e2e-target-model"}
    spec["profile"] = {"batch_size": 4, "warmup": 1, "repeats": 3,
                       "target": {"accelerator_type": TEST_ACCELERATOR, "cpu": 1, "gpu": 0}}
    spec["search"].update({"trials": 2, "concurrency": 1})  # the trial holds one CPU, its latency task the other
    spec["space"]["heal"] = {"methods": ["none"]}
    outcome = search(parse_spec(spec), workdir=tmp_path, echo=None)
    assert not outcome.failed and len(outcome.records) == 2
    assert all(record.result.latency.threads == 1 for record in outcome.records)


@pytest.mark.faults
def test_a_failing_trial_is_recorded_with_its_error_and_the_search_goes_on(local_ray, tmp_path):
    import copy

    spec = copy.deepcopy(SPEC)
    spec["mlflow"] = {"experiment": "e2e-failures", "registered_model": "e2e-failures-model"}
    # finetune at an absurd learning rate diverges at once; `none` trials succeed.
    spec["space"]["heal"] = {"methods": ["none", "finetune"], "calibration_images": 32, "steps": 5, "lr": 1.0e6,
                             "batch_size": 16}
    result = search(parse_spec(spec), workdir=tmp_path, echo=None)
    assert result.failed and len(result.failed) < len(result.records) == 4
    tracker = Tracker(result.tracking_uri, "e2e-failures")
    failed_runs = [run for run in tracker.child_runs(result.parent_run_id) if run.info.status == "FAILED"]
    assert len(failed_runs) == len(result.failed)
    assert all("training loss became nan" in run.data.tags["error"] for run in failed_runs)
    # with the configuration that failed
    assert all(run.data.params["heal.method"] == "finetune" and float(run.data.params["heal.lr"]) == 1e6
               for run in failed_runs)
    parent = tracker.client.get_run(result.parent_run_id)
    assert parent.data.metrics["trials_failed"] == len(result.failed)
    # its own error would only happen again: reported as its result, not retried like a worker that died
    assert result.retried == 0 and parent.data.metrics["trials_retried"] == 0


@pytest.mark.faults
@pytest.mark.parametrize(("section", "value", "message"), [
    ("profile", {"target": {"accelerator_type": "H100"}}, "accelerator type 'H100' \\(it has: autoprune-test\\)"),
    ("heal_runtime", {"engine": "deepspeed", "workers": 2, "cpu": 0.5, "gpu": 1}, "needs 2 GPU at once .* has 0"),
], ids=["missing-accelerator-type", "deepspeed-workers-too-big"])
def test_a_search_that_could_never_be_scheduled_stops_before_any_trial(local_ray, tmp_path, section, value,
                                                                        message):
    import copy

    from autoprune.errors import AutopruneError

    spec = copy.deepcopy(SPEC)
    spec.setdefault(section, {}).update(value)
    with pytest.raises(AutopruneError, match=message):
        search(parse_spec(spec), workdir=tmp_path, echo=None)
    assert not (tmp_path / "cache").exists()  # it stopped before the dense model was trained


def test_the_selected_model_is_served_over_http(outcome, local_ray, bundle):
    """Ray Serve on loopback answers with the predictions of the model `best` selects."""
    import urllib.request

    from ray import serve

    from autoprune.serve import PrunedModel
    from autoprune.testing.loopback import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(PrunedModel.bind("e2e-model", 1e6, outcome.tracking_uri), blocking=False)
        images = bundle.normalize(bundle.eval.images[:5])
        request = urllib.request.Request(f"http://127.0.0.1:{port}/", method="POST",
                                         data=json.dumps({"images": images.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        choice, model = best(model="e2e-model", max_latency_ms=1e6, tracking_uri=outcome.tracking_uri, load=True)
        with torch.no_grad():
            expected = model(images).argmax(-1).tolist()
        assert answer["top1"] == expected and answer["version"] == choice.version
    finally:
        serve.shutdown()


def test_every_registered_version_loads_with_mlflow_pyfunc(outcome, bundle, monkeypatch):
    """A registered version is an MLflow model: `mlflow.pyfunc.load_model("models:/NAME@alias")` predicts what
    `autoprune.load_model` gives, and the registry keeps its tags and aliases."""
    import mlflow.pyfunc

    from autoprune.tracking.select import load_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", outcome.tracking_uri)  # where MLflow resolves models:/
    images = bundle.normalize(bundle.eval.images[:4])
    versions = [f"models:/e2e-model/{version}" for version in outcome.registered_versions]
    for uri in [*versions, "models:/e2e-model@fastest"]:
        predicted = mlflow.pyfunc.load_model(uri).predict(images.numpy())
        with torch.no_grad():
            expected = load_model(uri, tracking_uri=outcome.tracking_uri)(images).float().numpy()
        assert abs(predicted - expected).max() <= 1e-6, uri


def test_mlflow_models_serve_answers_from_the_registry_as_autoprune_serve_does(outcome, bundle):
    """`mlflow models serve -m models:/NAME/VERSION --env-manager local`, MLflow's own scoring server resolving the
    version in the search's registry, answers with the logits autoprune's replica computes."""
    from test_mlflow_model import scoring_server

    from autoprune.tracking.select import load_served

    uri = f"models:/e2e-model/{outcome.registered_versions[0]}"
    images = bundle.normalize(bundle.eval.images[:3])
    with scoring_server(uri, MLFLOW_TRACKING_URI=outcome.tracking_uri) as predict:
        answer = torch.from_numpy(predict(images))
    expected = load_served(uri, tracking_uri=outcome.tracking_uri).logits(images)  # what a replica computes
    assert answer.shape == expected.shape and (answer - expected).abs().max() <= 1e-5


@pytest.mark.faults
def test_a_trial_whose_worker_is_killed_is_run_again_and_nothing_is_lost(local_ray, tmp_path):
    """SIGKILL to the process running the first trial (found by Ray's process title): Tune starts the trial again
    (search.max_retries), and the search ends with every trial accounted for, once each."""
    import copy
    import signal
    import threading
    import time

    import psutil

    spec = copy.deepcopy(SPEC)
    spec["mlflow"] = {"experiment": "e2e-kill", "registered_model": "e2e-kill-model"}
    spec["search"].update({"trials": 2, "concurrency": 1, "max_retries": 2})
    spec["space"]["heal"] = {"methods": ["distill"], "calibration_images": 64, "steps": 400, "lr": 1e-3,
                             "batch_size": 16}
    killed: list[int] = []

    def kill_the_first_trial_worker() -> None:
        deadline = time.monotonic() + 300
        while not killed and time.monotonic() < deadline:
            for process in psutil.process_iter(["pid", "cmdline"]):
                if "ImplicitFunc" in " ".join(process.info["cmdline"] or []):
                    time.sleep(1.0)  # into the trial's work
                    process.send_signal(signal.SIGKILL)
                    killed.append(process.info["pid"])
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_the_first_trial_worker, daemon=True)
    killer.start()
    outcome = search(parse_spec(spec), workdir=tmp_path, echo=None)
    killer.join(timeout=5)
    assert killed, "no trial worker was found to kill"
    assert outcome.retried >= 1 and not outcome.failed and len(outcome.records) == 2
    tracker = Tracker(outcome.tracking_uri, "e2e-kill")
    children = tracker.child_runs(outcome.parent_run_id)
    assert len(children) == 2 and all(run.info.status == "FINISHED" for run in children)  # once each
    assert tracker.client.get_run(outcome.parent_run_id).data.metrics["trials_retried"] >= 1
