"""The pruning and healing contracts: what every registered method must do, as plain functions a test calls.

Our tests run them over every method in `autoprune.prune.PRUNE_METHODS` and `autoprune.heal.HEAL_METHODS`; a method
registered outside this repository runs the same checks from its own tests (no pytest needed here: a broken
contract raises `ContractViolation`, an `AssertionError`, so pytest reports it as a failure):

    import pytest
    from autoprune.testing import contracts, models
    import my_methods  # noqa: F401 (registers "my_prune" with autoprune.prune.register)

    @pytest.mark.parametrize("source", list(models.FAMILIES.values()), ids=list(models.FAMILIES))
    def test_my_prune_keeps_the_contract(source, tmp_path):
        contracts.check_prune_method("my_prune", source, models.reference_bundle(), tmp_path)
        contracts.check_prune_method_in_trial("my_prune", source, models.reference_bundle())

A healing method likewise: `check_heal_method("my_heal", source, bundle)` and `check_heal_method_in_trial(…)`.
A method is named as registered, or passed as its registered object (a trial finds it by name, so the trial checks
want it registered).
"""

from __future__ import annotations

import copy
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from autoprune import heal, prune
from autoprune.measure.metrics import achieved_sparsity, count_params, prunable_weight_count
from autoprune.models import ModelSource, layer_groups, pooled_group, prunable_layers
from autoprune.registry import Registry
from autoprune.saved import load_model_dir, save_model
from autoprune.testing.models import briefly_trained, example_inputs

if TYPE_CHECKING:
    from torch import nn

    from autoprune.data import DataBundle
    from autoprune.prune.masks import Masks, Sparsifier

TARGET = 0.5  # the sparsity a method that takes one is asked for
# Where a method that fixes its own sparsity (`uses_sparsity=False`, such as 2:4) must land: above, at most.
OWN_SPARSITY = (0.3, 0.5)

T = TypeVar("T")


class ContractViolation(AssertionError):
    """A method broke its contract (an AssertionError, so test runners report a failure, not an error)."""


def _require(holds: object, what: str) -> None:
    if not holds:
        raise ContractViolation(what)


def _entry(registry: Registry[T], method: str | T) -> T:
    return registry.get(method) if isinstance(method, str) else method


def _registered_name(registry: Registry[T], method: str | T) -> str:
    entry = _entry(registry, method)
    if entry.name not in registry or registry.get(entry.name) is not entry:
        raise ValueError(f"{entry.name!r} is not the registered {registry.kind} of that name: a trial finds methods "
                         "by name, so register it first.")
    return entry.name


# ---- pruning ------------------------------------------------------------------------------------------------


def prune_fresh(source: ModelSource, method: str | prune.PruneMethod, example: torch.Tensor, sparsity: float = TARGET,
                pooled: bool = False, options: dict[str, Any] | None = None) -> tuple[nn.Module, nn.Module, Masks]:
    """A freshly built (seeded) model and its pruned copy: (dense, pruned, final masks). Every layer group is asked
    for `sparsity` (one pooled group if `pooled`); a gradual method jumps to its final sparsity."""
    torch.manual_seed(0)
    model = source.create().eval()
    dense = copy.deepcopy(model)
    groups = (pooled_group(model),) if pooled else layer_groups(model)
    entry = _entry(prune.PRUNE_METHODS, method)
    request = prune.PruneRequest(groups, {g.name: sparsity for g in groups}, {**entry.options, **(options or {})},
                                 example, calibration=example)
    return dense, model, entry.apply(model, request).finish(model)


def _sparsity(dense: nn.Module, model: nn.Module) -> float:
    layers = [name for name, _ in prunable_layers(dense)]
    return achieved_sparsity(model, layers, prunable_weight_count(dense, layers)[1])


def check_prune_method(method: str | prune.PruneMethod, source: ModelSource, data: DataBundle,
                       workdir: Path | None = None, *, target: float = TARGET) -> None:
    """Asked for `target` on every layer group of `source`, the method keeps the model's output shape; reaches
    the sparsity it declares (exactly `target` for a masking method, some of it for a structured one, which
    removes parameters and leaves no masks; its own for one that fixes it; none for "none"); prunes the same
    weights again for the same seed; and its model saves to `workdir` (a temporary folder if None) and reloads
    with equal outputs, without pickle."""
    entry = _entry(prune.PRUNE_METHODS, method)
    example = example_inputs(data)
    dense, model, masks = prune_fresh(source, entry, example, target)
    with torch.no_grad():
        out, expected = model(example), dense(example)
    _require(out.shape == expected.shape, f"{entry.name}: output shape {tuple(out.shape)}, not {tuple(expected.shape)}")

    achieved = _sparsity(dense, model)
    reached = f"{entry.name} reached sparsity {achieved:.4f}"
    if entry.name == "none":
        _require(abs(achieved) <= 1e-6, f"{reached}, not 0")
    elif entry.structured:  # only block-internal units go; the residual stream stays
        _require(0.1 < achieved <= target + 0.05, f"{reached}, not in (0.1, {target + 0.05}]")
        _require(count_params(model) < count_params(dense), f"{entry.name} is structured but removed no parameters")
        _require(not masks, f"{entry.name} is structured but left masks")
    elif entry.uses_sparsity:
        _require(abs(achieved - target) <= 0.01, f"{reached}, not {target} ± 0.01")
    else:  # it fixes its own sparsity (N:M: 1 − n/m on every layer it can pattern)
        low, high = OWN_SPARSITY
        _require(low < achieved <= high + 1e-6, f"{reached}, not in ({low}, {high}]")

    _, again, _ = prune_fresh(source, entry, example, target)  # deterministic for a seed
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        _require(torch.equal(a, b), f"{entry.name} is not deterministic for a seed: {name} differs")

    with tempfile.TemporaryDirectory() if workdir is None else nullcontext(workdir) as folder:
        save_model(model, source, Path(folder))  # saves and reloads with equal outputs, no pickle
        with torch.no_grad():
            reloaded = load_model_dir(Path(folder))(example)
    _require(torch.allclose(reloaded, out, atol=1e-6), f"{entry.name}: the reloaded model's outputs differ")


def check_prune_method_in_trial(method: str | prune.PruneMethod, source: ModelSource, data: DataBundle, *,
                                target: float = TARGET) -> None:
    """Through the whole trial a search runs — prune, profile (the default layout search), a short fine-tune,
    evaluate — the method gives a feasible result with an accuracy, a latency, and (unless "none") sparsity."""
    from autoprune.config import HealConfig, ProfileSpec, PruneConfig, TrialConfig
    from autoprune.trial import TrialContext, run_trial

    name = _registered_name(prune.PRUNE_METHODS, method)
    torch.manual_seed(0)
    context = TrialContext(source, source.create().state_dict(), data, ProfileSpec(batch_size=2, warmup=1, repeats=3))
    sparsity = {"all": target} if prune.get(name).uses_sparsity else {}
    config = TrialConfig(PruneConfig(name, sparsity),
                         HealConfig("finetune", calibration_images=32, steps=3, lr=1e-3, batch_size=8))
    result = run_trial(config, context, threads=1)
    _require(result.feasible, f"{name}: the trial is infeasible")
    _require(0 <= result.accuracy <= 1, f"{name}: accuracy {result.accuracy}")
    _require(result.latency.median_ms > 0, f"{name}: latency {result.latency.median_ms} ms")
    if name != "none":
        _require(result.sparsity > 0.1, f"{name}: the trial's sparsity is {result.sparsity}")


# ---- healing ------------------------------------------------------------------------------------------------


def magnitude_pruned(dense: nn.Module, sparsity: float = 0.75) -> tuple[nn.Module, Masks]:
    """A copy of `dense` with `sparsity` of every layer group's weights masked by magnitude, and its masks."""
    model = copy.deepcopy(dense)
    groups = layer_groups(model)
    return model, prune.get("magnitude").apply(model, prune.PruneRequest(groups, {g.name: sparsity for g in groups}))


def heal_with(method: str | heal.HealMethod, model: nn.Module, masks: Sparsifier, dense: nn.Module, data: DataBundle,
              *, steps: int = 20, images: int = 64, seed: int = 0, **options: Any) -> list[float]:
    """Heals `model` in place with `method` (its default options, updated by `options`) on `images` training
    images, with `dense` as the teacher; returns the loss per step."""
    entry = _entry(heal.HEAL_METHODS, method)
    return entry.apply(model, heal.HealRequest(
        calibration=data.train.subset(images, seed=seed), data=data, steps=steps, lr=2e-3, batch_size=16,
        masks=masks, teacher=dense, options={**entry.options, **options}, seed=seed,
    ))


def check_heal_method(method: str | heal.HealMethod, source: ModelSource, data: DataBundle,
                      trained: nn.Module | None = None) -> None:
    """Healing a 75%-magnitude-pruned copy of `trained` (`source` briefly trained if None), the method returns a
    finite loss per step, never revives a pruned weight, keeps the output shape and finite outputs, heals the
    same for the same seed, and leaves the teacher untouched (in eval mode, no gradients)."""
    entry = _entry(heal.HEAL_METHODS, method)
    trained = briefly_trained(source, data) if trained is None else trained
    example = example_inputs(data)
    model, masks = magnitude_pruned(trained)
    losses = heal_with(entry, model, masks, trained, data)
    _require(isinstance(losses, list), f"{entry.name} returned {type(losses).__name__}, not a list of losses")
    _require(all(torch.isfinite(torch.tensor(loss)) for loss in losses), f"{entry.name}: a loss is not finite")
    modules = dict(model.named_modules())
    for name, mask in masks.by_layer.items():  # the masks hold: achieved sparsity stays at its target
        _require(not modules[name].weight[~mask].any(), f"{entry.name} revived pruned weights in {name}")
    with torch.no_grad():
        out, expected = model.eval()(example), trained(example)
    _require(out.shape == expected.shape, f"{entry.name}: output shape {tuple(out.shape)}, not {tuple(expected.shape)}")
    _require(torch.isfinite(out).all(), f"{entry.name}: the healed model's outputs are not finite")
    again, masks_again = magnitude_pruned(trained)  # deterministic for a seed
    heal_with(entry, again, masks_again, trained, data)
    with torch.no_grad():
        _require(torch.allclose(again.eval()(example), out, atol=1e-5), f"{entry.name} is not deterministic for a seed")
    _require(not trained.training and all(p.grad is None for p in trained.parameters()),
             f"{entry.name} changed the teacher (its mode or gradients)")


def check_heal_method_in_trial(method: str | heal.HealMethod, source: ModelSource, data: DataBundle,
                               trained: nn.Module | None = None) -> None:
    """Through the whole trial — structured pruning to half, its profile (which times a copy in the default layout
    search), then this method — a feasible result with an accuracy and fewer parameters than `trained`."""
    from autoprune.config import HealConfig, ProfileSpec, PruneConfig, TrialConfig
    from autoprune.trial import TrialContext, run_trial

    name = _registered_name(heal.HEAL_METHODS, method)
    trained = briefly_trained(source, data) if trained is None else trained
    context = TrialContext(source, trained.state_dict(), data, ProfileSpec(batch_size=2, warmup=1, repeats=3))
    config = TrialConfig(PruneConfig("structured", {"all": 0.5}),
                         HealConfig(name, calibration_images=32, steps=3, lr=1e-3, batch_size=8))
    result = run_trial(config, context, threads=1)
    _require(result.feasible, f"{name}: the trial is infeasible")
    _require(0 <= result.accuracy <= 1, f"{name}: accuracy {result.accuracy}")
    dense_params = sum(p.numel() for p in trained.parameters())
    _require(result.params < dense_params, f"{name}: {result.params} parameters, not fewer than {dense_params}")
