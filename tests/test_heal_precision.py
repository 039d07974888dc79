"""Healing as fast as the hardware allows: autocast in the engine's precision (bf16 forced here, on a CPU), and an
out-of-memory error retried once at half the batch, recorded with the result."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_RESNET, TINY_VIT

from autoprune.config import HealConfig, HealingEngine, ProfileSpec, PruneConfig, TrialConfig
from autoprune.train import loop
from autoprune.train.loop import Precision
from autoprune.trial import TrialContext, run_trial

PROFILE = ProfileSpec(batch_size=2, warmup=1, repeats=3)


def test_auto_precision_is_float32_on_a_cpu_and_what_is_asked_otherwise():
    assert Precision.of(HealingEngine(), "cpu") == Precision(None, False)
    assert Precision.of(HealingEngine(autocast="bfloat16"), "cpu") == Precision(torch.bfloat16, False)
    assert Precision.of(HealingEngine(autocast="off", tf32=True), "cpu").tf32 is False  # TF32 is a GPU's
    assert Precision.of(None, "cpu") == Precision()


@pytest.mark.parametrize("source", [TINY_RESNET, TINY_VIT], ids=["resnet-bn", "vit"])
def test_a_bf16_heal_computes_in_bf16_and_keeps_float32_weights(source, bundle):
    """Under `heal_runtime.autocast: bfloat16` the forward's matmuls and convolutions run in bf16 (seen from
    inside the model), the loss stays finite, and the weights the optimiser updates stay float32."""
    from autoprune.train import optimise
    from autoprune.train.loop import cross_entropy

    torch.manual_seed(0)
    model = source.create()
    seen = []
    layer = next(module for module in model.modules() if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)))
    layer.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    before = [p.detach().clone() for p in model.parameters()]
    losses = optimise(model, images=bundle.train, data=bundle, objective=cross_entropy(), steps=3, lr=1e-3,
                      batch_size=8, seed=0, engine=HealingEngine(autocast="bfloat16"))
    assert seen and set(seen) == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_healing_that_runs_out_of_memory_is_retried_once_at_half_the_batch(bundle, monkeypatch):
    """An out-of-memory error while healing restarts the heal from the pruned model at half the batch, and the
    result says so; a second one fails the trial as before."""
    real = loop.run_steps
    batches = []

    def small_memory(steps, *, next_batch, **kwargs):
        def batch():
            inputs, labels = next_batch()
            batches.append(len(inputs))
            if len(inputs) > 4:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return inputs, labels
        return real(steps, next_batch=batch, **kwargs)

    monkeypatch.setattr(loop, "run_steps", small_memory)
    torch.manual_seed(0)
    context = TrialContext(TINY_RESNET, TINY_RESNET.create().state_dict(), bundle, PROFILE)
    config = TrialConfig(PruneConfig("structured", {"all": 0.5}),
                         HealConfig("finetune", calibration_images=32, steps=3, lr=1e-3, batch_size=8))
    result = run_trial(config, context, threads=1)
    assert result.feasible and batches == [8, 4, 4, 4]
    assert result.heal_note == "healing ran out of memory at batch 8: healed at batch 4"
    with pytest.raises(torch.OutOfMemoryError):
        run_trial(TrialConfig(config.prune, HealConfig("finetune", calibration_images=32, steps=3, lr=1e-3,
                                                       batch_size=16)), context, threads=1)
