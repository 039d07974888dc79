"""DeepSpeed healing on 2 CPU workers over gloo (Ray actors in a placement group, as inside a Tune trial): the
loss falls, the sparsity stays at its target, and the healed model has the single-process result's structure."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_VIT, briefly_trained

from autoprune import heal, prune
from autoprune.config import HealingEngine
from autoprune.measure.metrics import achieved_sparsity, prunable_weight_count
from autoprune.models import pooled_group, prunable_layers

pytestmark = pytest.mark.cluster
pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def dense(bundle):
    return briefly_trained(TINY_VIT, bundle)


def _pruned(dense, bundle, method: str, sparsity: float):
    model = copy.deepcopy(dense)
    group = pooled_group(model)
    masks = prune.get(method).apply(model, prune.PruneRequest(
        groups=(group,), sparsity={group.name: sparsity}, options=dict(prune.get(method).options),
        example_inputs=bundle.normalize(bundle.train.images[:2]), calibration=None, seed=0))
    return model, masks


def _calibration(bundle):
    return bundle.train.subset(64, seed=0)


@torch.no_grad()
def _loss_on_calibration(model, bundle) -> float:
    """A fixed yardstick (the per-step losses are of random batches): cross-entropy on the healing images."""
    images = _calibration(bundle)
    return float(torch.nn.functional.cross_entropy(model.eval()(bundle.normalize(images.images)), images.labels))


def _heal(model, dense, masks, bundle, method: str, engine: HealingEngine | None):
    healing = heal.get(method)
    request = heal.HealRequest(calibration=_calibration(bundle), data=bundle, steps=12, lr=3e-3,
                               batch_size=16, masks=masks, teacher=dense, options=dict(healing.options), seed=0,
                               engine=engine)
    losses = healing.apply(model, request)
    masks.finish(model)
    return losses


@pytest.mark.parametrize(("zero_stage", "bf16", "method"), [(2, False, "distill"), (3, True, "distill"), (2, True, "align")],
                         ids=["zero2-fp32-distill", "zero3-bf16-distill", "zero2-bf16-align"])
def test_deepspeed_healing_keeps_masks_and_structure(local_ray, bundle, dense, zero_stage, bf16, method):
    model, masks = _pruned(dense, bundle, "magnitude", 0.75)
    layers = [name for name, _ in prunable_layers(model)]
    _, dense_weights = prunable_weight_count(dense, layers)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    unhealed = _loss_on_calibration(model, bundle)
    engine = HealingEngine("deepspeed", workers=2, zero_stage=zero_stage, bf16=bf16, cpu=1, gpu=0)
    losses = _heal(model, dense, masks, bundle, method, engine)

    assert len(losses) == 12 and _loss_on_calibration(model, bundle) < unhealed  # it learns
    assert achieved_sparsity(model, layers, dense_weights) == pytest.approx(0.75, abs=1e-3)
    modules = dict(model.named_modules())
    for name, keep in masks.by_layer.items():  # every pruned weight is exactly zero
        assert not modules[name].weight[~keep].any()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the weights moved

    alone, alone_masks = _pruned(dense, bundle, "magnitude", 0.75)
    single = _heal(alone, dense, alone_masks, bundle, method, None)
    assert {k: v.shape for k, v in alone.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    if not bf16:  # the same batches, split over two workers: the single-process run, up to float rounding
        assert losses == pytest.approx(single, rel=1e-3)


def test_a_search_reserves_each_trials_workers_with_the_trial(local_ray, tmp_path):
    """Each Tune trial reserves 1 CPU for itself and 2 × ½ CPU for its DeepSpeed workers, as one placement group.
    On this 2-CPU cluster two concurrent trials would each hold a CPU while their workers waited for one forever
    (what a search did when only the trial was reserved); reserved together, one trial runs at a time and the
    search ends."""
    from autoprune.driver.search import search
    from autoprune.space.load import parse_spec

    spec = parse_spec({
        "name": "deepspeed-search",
        "model": {"name": TINY_VIT.name, "num_classes": 10, "train_steps": 50, "kwargs": dict(TINY_VIT.kwargs)},
        "data": {"source": "reference", "eval_images": 100},
        "profile": {"batch_size": 4, "warmup": 1, "repeats": 3},
        "heal_runtime": {"engine": "deepspeed", "workers": 2, "zero_stage": 2, "bf16": False, "cpu": 0.5, "gpu": 0},
        # masked methods heal here (on a CPU the search would leave them out): the workers are what is tested
        "search": {"trials": 2, "concurrency": 2, "sampler": "random", "seed": 0, "resources": {"cpu": 1},
                   "storage": str(tmp_path / "storage"), "stop_unless_faster": False},
        "mlflow": {"experiment": "deepspeed-search", "registered_model": "deepspeed-search-model"},
        "space": {"prune": {"methods": ["magnitude", "progressive"], "sparsity": {"low": 0.5, "high": 0.5}},
                  "heal": {"methods": ["distill"], "calibration_images": 32, "steps": 4, "lr": 1e-3,
                           "batch_size": 8}},
    })
    said = []
    outcome = search(spec, workdir=tmp_path, echo=said.append)
    assert not outcome.failed, outcome.failed[0].error
    assert len(outcome.records) == 2
    for record in outcome.records:
        assert record.result.sparsity == pytest.approx(0.5, abs=0.01)
    assert any("at most 1 of search.concurrency 2 run at once" in line for line in said)


def test_combinations_deepspeed_cannot_run_are_refused_when_the_spec_is_read():
    from autoprune.errors import SpecError
    from autoprune.space.load import parse_spec

    base = {"name": "x", "model": {"name": TINY_VIT.name, "num_classes": 10, "train_steps": 5},
            "heal_runtime": {"engine": "deepspeed", "gpu": 1},
            "space": {"prune": {"methods": ["magnitude", "feather"]}, "heal": {"methods": ["distill"]}}}
    with pytest.raises(SpecError, match=r"space.prune.methods\[1\]: 'feather' cannot heal with `heal_runtime.engine: deepspeed`"):
        parse_spec(base)
    with pytest.raises(SpecError, match="heal_runtime.gpu: must be 0 or a whole number of GPUs, but got 0.5: NCCL"):
        parse_spec({**base, "heal_runtime": {"engine": "deepspeed", "gpu": 0.5},
                    "space": {"prune": {"methods": ["magnitude"]}, "heal": {"methods": ["distill"]}}})
