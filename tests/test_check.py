"""`autoprune check`: every pruning method tried on a model, each outcome classified with its reason, on a CNN with
BatchNorm and a ViT; a method that removes nothing, refuses or crashes is reported, never raised."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TINY_RESNET, TINY_VIT

from autoprune import heal, prune
from autoprune.check import FAILS, REFUSES, REMOVES_LITTLE, REMOVES_NOTHING, WORKS, check_model, table
from autoprune.cli import main
from autoprune.errors import AutopruneError, Unsupported
from autoprune.models import ModelSource, pooled_group
from autoprune.prune.masks import Masks


@pytest.mark.parametrize("source", [TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
def test_every_registered_method_works_on_the_tiny_models(source):
    result = check_model(source, input_size=(3, 32, 32))
    methods = {check.method for check in result.checks}
    assert methods == set(prune.list_methods()) - {"none"}
    for check in result.checks:
        assert check.outcome == WORKS, (check.method, check.sparsity, check.reason)
        assert check.achieved_sparsity > 0.1 and check.reload_max_abs_diff <= 1e-4 and check.trains
    structured = [c for c in result.checks if c.method == "structured"]
    assert all(c.macs_ratio > 1.0 and c.params_ratio > 1.0 for c in structured)  # it removed units
    # what structured removal leaves exports to ONNX and runs there with PyTorch's outputs (a column of its own)
    assert all(c.onnx == "" for c in structured), [c.onnx for c in structured]
    assert all(c.onnx is None for c in result.checks if not prune.get(c.method).structured)
    magnitude = [c for c in result.checks if c.method == "magnitude"]
    assert [round(c.achieved_sparsity, 2) for c in magnitude] == [0.3, 0.5] and all(c.macs_ratio == 1 for c in magnitude)
    assert result.groups and result.working("structured") and "structured" in table(result)


def _method(name, apply):
    return prune.PruneMethod(name=name, apply=apply, description="a test method, not registered")


def _refuse(model, request):
    raise Unsupported("this model has no units of my kind")


def _wrapped_crash(model, request):  # a method that wraps a crash in its own error: still a crash
    raise AutopruneError("mine: removing channels of blocks.0 failed (RuntimeError: shape mismatch)")


def _little(model, request):  # zeros a tenth of the first layer's weights, whatever it was asked
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.view(-1)[: layer.weight.numel() // 10] = 0
    return Masks()


def _crash(model, request):
    raise IndexError("list index out of range")


def _no_op(model, request):
    return Masks()


def _breaks_training(model, request):
    with torch.no_grad():
        first = next(layer for layer in model.modules() if isinstance(layer, torch.nn.Linear))
        first.weight.zero_()
        first.weight[0, 0] = float("inf")  # prunes (zeros) almost all of it, and poisons what is left
    return Masks()


def test_a_method_that_removes_nothing_refuses_crashes_or_breaks_the_model_is_reported_as_such():
    methods = [_method("no_op", _no_op), _method("refuse", _refuse), _method("crash", _crash),
               _method("wrapped", _wrapped_crash), _method("poison", _breaks_training), _method("little", _little)]
    result = check_model(TINY_VIT, input_size=(3, 32, 32), methods=methods, sparsities=(0.5,))
    outcome = {check.method: check for check in result.checks}
    assert outcome["no_op"].outcome == REMOVES_NOTHING and outcome["no_op"].macs_ratio == 1.0
    assert outcome["refuse"].outcome == REFUSES and outcome["refuse"].reason == "this model has no units of my kind"
    assert outcome["crash"].outcome == FAILS and outcome["crash"].reason == "pruning: IndexError: list index out of range"
    assert outcome["wrapped"].outcome == FAILS and outcome["wrapped"].reason.startswith("pruning: mine: removing")
    assert outcome["poison"].outcome == FAILS and "training one step: its loss" in outcome["poison"].reason
    assert outcome["little"].outcome == REMOVES_LITTLE and "of 0.50 asked" in outcome["little"].reason
    assert not result.working("crash") and not result.working("never checked")


def test_nothing_in_a_check_raises_not_even_counting_the_dense_model(monkeypatch):
    from autoprune import check

    def broken(model, input_size):
        raise AttributeError("'NoneType' object has no attribute 'next_functions'")

    monkeypatch.setattr(check, "count_macs", broken)
    result = check_model(TINY_RESNET, input_size=(3, 32, 32), methods=["magnitude", "structured"], sparsities=(0.5,))
    assert [c.outcome for c in result.checks] == [FAILS, FAILS]
    assert all(c.reason == "counting the dense model's MACs: AttributeError: 'NoneType' object has no attribute"
               " 'next_functions'" for c in result.checks)


def test_an_unknown_method_is_an_error_before_anything_runs():
    with pytest.raises(AutopruneError, match="'obs' is not a registered pruning method"):
        check_model(TINY_VIT, input_size=(3, 32, 32), methods=["magnitude", "obs"])


def test_the_cli_prints_json_and_takes_the_model_size_from_its_kwargs(capsys):
    kwargs = json.dumps(dict(TINY_VIT.kwargs))
    assert main(["check", TINY_VIT.name, "--num-classes", "10", "--kwargs", kwargs, "--methods", "structured", "nm",
                 "--sparsities", "0.5", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["input_size"] == [3, 32, 32]  # the patch embedding's size, not timm's default 224
    assert [(c["method"], c["outcome"]) for c in printed["checks"]] == [("structured", WORKS), ("nm", WORKS)]
    assert main(["check", TINY_VIT.name, "--kwargs", "[1]"]) == 1  # not an object: one line, exit 1
    assert "--kwargs: expected a JSON object" in capsys.readouterr().err


def test_the_families_bench_tabulates_check_per_family_and_states_the_targets():
    from autoprune.bench import families

    tiny = {"vit": (TINY_VIT.name, dict(TINY_VIT.kwargs), (3, 32, 32)),
            "resnet": (TINY_RESNET.name, dict(TINY_RESNET.kwargs), (3, 32, 32)),
            "missing": ("no_such_model", {}, (3, 32, 32))}
    said = []
    rows = families.run(tiny, methods=["structured", "magnitude"], echo=said.append)
    assert [(r["family"], r["method"]) for r in rows] == [("vit", "structured"), ("vit", "magnitude"),
                                                         ("resnet", "structured"), ("resnet", "magnitude"),
                                                         ("missing", "—")]
    assert rows[-1]["outcome"] == FAILS and "not a timm model" in rows[-1]["reason"] and len(said) == 3
    text = families.markdown(rows)
    assert "| vit | vit_tiny_patch16_224 | 1.00× |" in text  # magnitude masks: the dense MACs
    vit_reached = rows[0]["macs_ratio"] >= 1.3  # the tiny ViT's MLPs and heads shrink; the tiny ResNet less so
    reached = sum(r["method"] == "structured" and r["outcome"] == WORKS and r["macs_ratio"] >= 1.3 for r in rows)
    assert vit_reached and f"on {reached} of 2 families" in families.verdict(rows)
    assert "without a refusal: 1 (target: 0)" in families.verdict(rows)


def _repvgg_spec(methods):
    """RepVGG: every conv feeds a residual sum, so no channel is block-internal: structured removal limited to
    internal channels (scope: internal) and vbp refuse it."""
    from test_spec import DEMO

    from autoprune.space.load import parse_spec

    raw = {**DEMO, "model": {"name": "repvgg_a0", "num_classes": 10, "train_steps": 10}}
    raw["space"] = {**DEMO["space"], "prune": {"methods": methods, "sparsity": {"low": 0.3, "high": 0.6},
                                               "options": {"structured": {"scope": "internal"}}}}
    return parse_spec(raw)


def test_structured_removes_a_residual_stream_where_a_block_has_no_channel_of_its_own():
    """RepVGG and MobileOne (every conv writes the stage's residual sum) and Res2Net (its blocks' channels are split
    into scales): scope internal refuses them, the stream scope narrows whole stages, and auto chooses it; where a
    model has internal channels (a ResNet with BatchNorm) auto keeps to them, as before."""
    from dataclasses import replace

    structured = prune.get("structured")
    scoped = [replace(structured, name=scope, options={**structured.options, "scope": scope})
              for scope in ("auto", "internal", "stream")]
    for name in ("repvgg_a0", "mobileone_s0"):
        result = check_model(ModelSource(name, 10), input_size=(3, 32, 32), methods=scoped, sparsities=(0.5,))
        auto, internal, stream = result.checks
        assert internal.outcome == REFUSES and "scope: stream removes" in internal.reason
        assert stream.outcome == WORKS and stream.macs_ratio >= 1.5 and stream.reload_max_abs_diff <= 1e-5
        assert abs(stream.achieved_sparsity - 0.5) < 0.15  # asked of the weights, not of the channels
        assert auto.achieved_sparsity == stream.achieved_sparsity
    auto, internal, _ = check_model(TINY_RESNET, input_size=(3, 32, 32), methods=scoped, sparsities=(0.5,)).checks
    assert auto.outcome == internal.outcome == WORKS and auto.macs_ratio == internal.macs_ratio
    # ConvMixer's internal channels touch a sliver of its weights (1% removed of 50% asked): auto takes both kinds
    auto, internal, _ = check_model(ModelSource("convmixer_768_32", 10), input_size=(3, 32, 32), methods=scoped,
                                    sparsities=(0.5,)).checks
    assert internal.achieved_sparsity < 0.05 and auto.outcome == WORKS and auto.achieved_sparsity > 0.4


def test_a_search_refuses_a_method_that_cannot_prune_its_model_before_anything_starts(tmp_path):
    from autoprune.driver.preflight import check_methods
    from autoprune.driver.prepare import model_source
    from autoprune.driver.search import search
    from autoprune.errors import SpecError

    spec = _repvgg_spec(["magnitude", "structured", "vbp"])
    # on a CPU magnitude's masks could never be faster (left out first); then neither of the others can prune it:
    # one error, before any training, with both reasons and advice that fits them (not "add structured")
    with pytest.raises(SpecError, match=r"none of them can prune repvgg_a0 here, at sparsity 0.6: structured refuses"
                                        r" \(structured: ByobNet has no block-internal channels.*; vbp refuses"
                                        r" \(vbp: ByobNet has no hidden channels.*`autoprune check repvgg_a0`"):
        search(spec, workdir=tmp_path, echo=None, drop_unusable_methods=True)
    assert not list(tmp_path.iterdir())  # nothing was started: no store, no Ray folder, no cache
    with pytest.raises(SpecError, match=r"structured refuses .*--drop-unusable-methods"):
        check_methods(_repvgg_spec(["magnitude", "structured"]), model_source(spec.model), lambda line: None)
    said = []
    kept = check_methods(spec, model_source(spec.model), said.append, drop_unusable=True)
    assert kept.prune.methods == ("magnitude",) and "dropping structured, vbp" in said[0]
    with pytest.raises(SpecError, match="none of them can prune .* structured refuses"):  # nothing left to search
        check_methods(_repvgg_spec(["structured"]), model_source(spec.model), said.append, drop_unusable=True)
    assert check_methods(_repvgg_spec(["magnitude", "nm"]), model_source(spec.model), said.append).prune.methods \
        == ("magnitude", "nm")


def test_the_stem_is_never_pruned_a_deep_stem_included():
    """The README's rule: the top-level module holding timm's first_conv (resnet10t's three stem convs), or the first
    conv alone where that module is most of the network (VGG's `features`)."""
    import timm

    from autoprune.models import stem_layers

    assert stem_layers(timm.create_model("vgg11", num_classes=10)) == {"features.0"}
    source = ModelSource("resnet10t", 10)
    dense = source.create()
    assert stem_layers(dense) == {"conv1.0", "conv1.3", "conv1.6"}
    model = copy.deepcopy(dense)
    structured = prune.get("structured")
    example = torch.randn(2, 3, 32, 32)
    request = prune.PruneRequest(groups=(pooled_group(model),), sparsity={"all": 0.5}, options=dict(structured.options),
                                 example_inputs=example, calibration=example, seed=0)
    structured.apply(model, request).finish(model)
    for name in ("conv1.0", "conv1.3", "conv1.6"):
        assert model.get_submodule(name).weight.shape == dense.get_submodule(name).weight.shape, name
    assert model.layer1[0].conv1.out_channels < dense.layer1[0].conv1.out_channels  # the blocks were pruned


def test_every_healing_method_trains_what_each_method_leaves_and_align_compares_logits_where_no_state_is_left():
    """lcnet_050 has no residuals: structured removal changes every stage's width, and align had no state left to
    compare (its loss a constant: `element 0 of tensors does not require grad`, one trial of four lost). Now it
    aligns the logits; and a healing method that cannot train a model fails that row, saying which."""
    from autoprune import check

    result = check_model(ModelSource("lcnet_050", 10), input_size=(3, 32, 32), methods=["structured"],
                         sparsities=(0.5,), heal_methods=["finetune", "distill", "align", "align_logits", "none"])
    (structured,) = result.checks
    assert structured.outcome == WORKS and structured.heals == {"finetune": "", "distill": "", "align": "",
                                                                "align_logits": ""}  # (none trains nothing)
    broken = heal.HealMethod("broken", lambda model, request: [float("nan")], "a test method, not registered")
    real_get = heal.get
    check.heal.get = lambda name: broken if name == "broken" else real_get(name)
    try:
        (row,) = check_model(TINY_RESNET, input_size=(3, 32, 32), methods=["structured"], sparsities=(0.5,),
                             heal_methods=["finetune", "broken"]).checks
    finally:
        check.heal.get = real_get
    assert row.outcome == FAILS and row.reason == "healing with broken: its loss is not finite ([nan])"


def test_a_model_that_does_not_export_to_onnx_still_works_and_says_why():
    """timm's EVA attention (here DINOv3's ViT-Ti) passes a tensor where torch's ONNX exporter wants a bool:
    structured removal still works on it, and the onnx column says why the model cannot run in ONNX Runtime."""
    from autoprune.models import ModelSource

    eva = ModelSource("vit_tiny_patch16_dinov3_qkvb", 10, {})
    result = check_model(eva, input_size=(3, 64, 64), methods=["structured"], sparsities=(0.5,))
    [check] = result.checks
    assert check.outcome == WORKS, check.reason
    assert check.onnx and "is_causal" in check.onnx and "onnx: " in table(result)
