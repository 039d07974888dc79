"""The spec loader: shipped specs load; every kind of bad input names its key, its value and the choices."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from autoprune.config import Fixed, Range, TrialConfig
from autoprune.errors import SpecError
from autoprune.space.load import load_spec, parse_spec

SPECS = sorted((Path(__file__).parents[1] / "search_spaces").glob("*.yaml"))
DEMO = yaml.safe_load((Path(__file__).parents[1] / "search_spaces" / "demo.yaml").read_text())


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_shipped_specs_load(path):
    spec = load_spec(path)
    assert spec.search.trials > 0 and spec.prune.methods and spec.heal.methods


def test_demo_dimensions_parse_into_their_kinds():
    spec = parse_spec(DEMO)
    assert spec.heal.calibration_images == Fixed(256) and spec.heal.steps == Fixed(120)  # the budget: a fidelity
    assert spec.heal.budget == "fixed"
    assert isinstance(spec.heal.lr, Range) and spec.heal.lr.log
    assert spec.prune.options == {"magnitude": {}, "nm": {"n": Fixed(2), "m": Fixed(4)},
                                  "structured": {"round_to": Fixed(1), "heads": Fixed(True), "importance": Fixed("l2"),
                                                 "scope": Fixed("auto")},
                                  "vbp": {}}
    assert spec.cost_metric == "latency_ms"


def _broken(path: str, value) -> dict:
    raw = copy.deepcopy(DEMO)
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return raw


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("search.trails", 3, ["search.trails", "unknown key", "trials"]),
        ("search.trials", "many", ["search.trials", "expected int", "'many'"]),
        ("search.trials", 0, ["search.trials", "must be > 0", "0"]),
        ("search.sampler", "grid", ["search.sampler", "'grid'", "tpe, nsga2, random"]),
        ("space.prune.methods", ["magnitude", "magnitde"], ["space.prune.methods[1]", "'magnitde'", "structured"]),
        ("space.heal.methods", ["starfsh"], ["space.heal.methods[0]", "'starfsh'", "distill"]),
        ("space.prune.sparsity.high", 1.5, ["space.prune.sparsity.high", "0 <= value < 1", "1.5"]),
        ("space.prune.sparsity.mode", "layerwise", ["space.prune.sparsity.mode", "global, per_group, depth"]),
        ("space.heal.steps", {"low": 50, "high": 10}, ["space.heal.steps", "low < high"]),
        ("space.heal.lr", {"low": 0.1, "hi": 1}, ["space.heal.lr", "hi", "unknown key"]),
        ("space.heal.calibration_images", [], ["space.heal.calibration_images", "empty list"]),
        ("space.prune.options", {"nm": {"n": 2, "k": 4}}, ["space.prune.options.nm.k", "unknown key", "m, n"]),
        ("space.prune.options", {"nmm": {}}, ["space.prune.options.nmm", "unknown key"]),
        ("space.heal.options", {"align": {"states": "every"}}, ["space.heal.options.align.states", "'every'", "all, last"]),
        ("space.heal.options", {"align": {"states": ["all", "lats"]}}, ["states[1]", "'lats'", "all, last"]),
        ("space.heal.options", {"align": {"normalize": {"low": 0, "high": 1}}}, ["normalize", "list of choices"]),
        ("space.prune.options", {"structured": {"round_to": "eight"}}, ["structured.round_to", "expected int"]),
        ("space.prune.options", {"nm": {"n": 4, "m": 4}}, ["space.prune.options.nm", "0 < n < m", "n=4, m=4"]),
        ("space.prune.options", {"cast": {"n": [1, 2], "m": [2, 4]}}, ["options.cast", "n=2, m=2"]),
        ("space.prune.options", {"progressive": {"end": {"low": 0.5, "high": 1.5}}}, ["options.progressive", "end=1.5"]),
        ("latency_target_ms", -1, ["latency_target_ms", "must be > 0"]),
        ("latency_target_ms", 0, ["latency_target_ms", "must be > 0"]),
        ("objectives", {"accuracy": "max", "energy": "min"}, ["objectives", "energy", "latency_ms"]),
        ("profile.dtype", "int8", ["profile.dtype", "'int8'", "bfloat16"]),
        ("search.max_retries", -1, ["search.max_retries", "must be >= 0", "-1"]),
        ("heal_runtime.engine", "horovod", ["heal_runtime.engine", "'horovod'", "local, deepspeed"]),
        ("heal_runtime.zero_stage", 4, ["heal_runtime.zero_stage", "4", "0, 1, 2, 3"]),
        ("heal_runtime.workers", 0, ["heal_runtime.workers", "must be > 0"]),
        ("profile.memory_format", "nhwc", ["profile.memory_format", "'nhwc'", "auto, contiguous, channels_last"]),
        ("profile.compile", "yes", ["profile.compile", "expected bool", "'yes'"]),
        ("profile.extra_batch_sizes", [1, 0], ["profile.extra_batch_sizes[1]", "positive integer", "0"]),
        ("profile.extra_batch_sizes", 8, ["profile.extra_batch_sizes", "expected list", "8"]),
        ("profile.target", {"accelerator": "A10G"}, ["profile.target.accelerator", "unknown key", "accelerator_type"]),
        ("search.resources", {"cpu": 1, "gpu": 0.5}, ["search.resources.gpu", "whole number", "0.5", "time their latency"]),
        ("profile.target", {"accelerator_type": "L4", "gpu": 0.25}, ["profile.target.gpu", "whole number", "0.25"]),
        ("profile.target", {"gpu": 1}, ["profile.target.accelerator_type", "is required"]),
        ("profile.target", {"accelerator_type": "L4", "gpu": -1}, ["profile.target.gpu", "must be >= 0", "-1"]),
        ("data.source", "imagenet", ["data.source", "reference, imagefolder"]),
        ("model.pretrained", True, ["model", "exactly one source", "pretrained", "train_steps"]),
        ("model.num_classes", True, ["model.num_classes", "expected int"]),
    ],
)
def test_bad_input_names_key_value_and_choices(path, value, expected):
    with pytest.raises(SpecError) as error:
        parse_spec(_broken(path, value), origin="demo.yaml")
    message = str(error.value)
    for fragment in expected:
        assert fragment in message, message


def test_profile_settings_parse():
    spec = parse_spec(_broken("profile", {"batch_size": 8, "extra_batch_sizes": [1, 8, 1], "memory_format": "auto",
                                          "compile": True, "target": {"accelerator_type": "L4"}}))
    assert spec.profile.batch_sizes == (8, 1)  # the objective's first, repeats dropped
    assert spec.profile.compile and spec.profile.memory_format == "auto"
    assert spec.profile.target.accelerator_type == "L4" and spec.profile.target.gpu == 1
    assert parse_spec(DEMO).profile.target is None
    raw = _broken("profile.target", {"accelerator_type": "L4"})
    raw["latency_target_ms"] = 5
    assert parse_spec(raw).latency_target_ms == 5.0  # the target section does not shadow the latency target


def test_deepspeed_healing_parses_and_rejects_a_stage_a_method_cannot_take():
    raw = _broken("heal_runtime", {"engine": "deepspeed", "workers": 4, "zero_stage": 3, "bf16": True, "gpu": 1})
    raw["space"]["heal"]["methods"] = ["distill"]
    healing = parse_spec(raw).heal_runtime
    assert (healing.engine, healing.workers, healing.zero_stage, healing.bf16) == ("deepspeed", 4, 3, True)
    raw["space"]["heal"]["methods"] = ["distill", "align"]
    with pytest.raises(SpecError, match=r"heal_runtime.zero_stage: 3 does not work with space.heal.methods\[1\] 'align'"):
        parse_spec(raw)
    assert parse_spec(DEMO).heal_runtime.engine == "local"


@pytest.mark.parametrize(("path", "uri"), [
    ("mlflow.tracking_uri", "http://alice:s3cret@mlflow.example.com:5000"),
    ("search.storage", "s3://bucket/runs?region=us-east-1&secret_key=s3cret"),
])
def test_credentials_in_a_spec_are_refused_without_echoing_them(path, uri):
    with pytest.raises(SpecError) as error:
        parse_spec(_broken(path, uri), origin="demo.yaml")
    assert path in str(error.value) and "credentials" in str(error.value) and "s3cret" not in str(error.value)
    assert parse_spec(_broken(path, uri.replace("alice:s3cret@", "").replace("&secret_key=s3cret", "")))


def test_missing_required_section_is_reported():
    raw = copy.deepcopy(DEMO)
    del raw["space"]
    with pytest.raises(SpecError, match="space: is required"):
        parse_spec(raw)


def test_imagefolder_needs_both_folders():
    with pytest.raises(SpecError, match="train_dir"):
        parse_spec(_broken("data", {"source": "imagefolder", "train_dir": "x"}))


def test_yaml_errors_and_missing_files_are_spec_errors(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)


def test_scalar_dimension_is_fixed():
    spec = parse_spec(_broken("space.heal.steps", 7))
    assert spec.heal.steps == Fixed(7)


def test_trial_config_round_trips_through_json():
    from autoprune.config import HealConfig, PruneConfig

    config = TrialConfig(PruneConfig("magnitude", {"blocks.0.mlp": 0.5}, {}), HealConfig("distill", 64, 10, 1e-3, 16,
                                                                                         {"alpha": 0.5}), seed=3)
    assert TrialConfig.from_json(config.to_json()) == config
    assert config.flat()["prune.sparsity.blocks.0.mlp"] == 0.5


def test_sparsity_mode_profile_is_read_as_depth_with_a_warning():
    raw = _broken("space.prune.sparsity.mode", "profile")
    with pytest.warns(FutureWarning, match="'profile' is now called 'depth'"):
        spec = parse_spec(raw)
    assert spec.prune.sparsity.mode == "depth"
    assert parse_spec(_broken("space.prune.sparsity.mode", "depth")) == spec


def test_a_spec_built_in_python_is_validated_like_yaml():
    from dataclasses import replace

    from autoprune.space.load import validate

    spec = parse_spec(DEMO)
    assert validate(spec) == spec  # a valid spec comes back equal: written as YAML and read back
    with pytest.raises(SpecError, match=r"search.trials: must be > 0, but got 0"):
        validate(replace(spec, search=replace(spec.search, trials=0)))
    with pytest.raises(SpecError, match=r"space.prune.methods\[0\]: 'obs' is not a registered pruning method"):
        validate(replace(spec, prune=replace(spec.prune, methods=("obs",))))
    with pytest.raises(SpecError, match=r"space.heal.steps.*`low < high` must hold"):
        validate(replace(spec, heal=replace(spec.heal, steps=Range(50, 10))))


def test_the_section_healing_is_read_as_heal_runtime_with_a_warning():
    raw = copy.deepcopy(DEMO)
    raw["healing"] = {"engine": "deepspeed", "workers": 4, "gpu": 1}
    with pytest.warns(FutureWarning, match="`healing:` is now called `heal_runtime:`"):
        spec = parse_spec(raw)
    assert (spec.heal_runtime.engine, spec.heal_runtime.workers) == ("deepspeed", 4)
    raw["heal_runtime"] = {"engine": "local"}
    with pytest.raises(SpecError, match="healing: is the old name of `heal_runtime`; give one of them, not both"):
        parse_spec(raw)


def test_a_directory_or_a_binary_file_as_the_spec_is_one_clear_error(tmp_path):
    (tmp_path / "mine.yaml").write_text("name: x\n")
    with pytest.raises(SpecError, match=r"is a directory; give the YAML file in it \(there: mine.yaml\)"):
        load_spec(tmp_path)
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(128, 256)) * 4)
    with pytest.raises(SpecError, match="is not text"):
        load_spec(binary)
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"name: \x00\x01")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(nul)
