"""What is registered is what is served: one prepared model (measure/prepared.py) for timing, the registered
accuracy, loading and serving — a bf16 channels-last BatchNorm CNN and a bf16 ViT, on this CPU."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import TINY_RESNET, TINY_VIT

from autoprune.config import HealConfig, ProfileSpec, PruneConfig, TrialConfig
from autoprune.measure.formats import ExecutionRecipe
from autoprune.measure.metrics import accuracy
from autoprune.measure.prepared import PreparedModel
from autoprune.saved import load_model_dir, load_prepared, saved_recipe
from autoprune.trial import TrialContext, run_trial

BF16 = ProfileSpec(batch_size=4, warmup=1, repeats=3, dtype="bfloat16", memory_format="channels_last")


def _top1(model, images, labels, batch: int) -> float:
    with torch.inference_mode():
        predicted = torch.cat([model(images[start:start + batch]).float().argmax(-1)
                               for start in range(0, len(images), batch)])
    return float((predicted == labels).float().mean())


@pytest.mark.parametrize("source", [TINY_RESNET, TINY_VIT], ids=["resnet-bn", "vit"])
def test_the_registered_accuracy_is_the_accuracy_of_the_model_as_loaded(source, bundle, tmp_path):
    """The trial's accuracy is that of the model in its recipe (bf16, channels-last): `load_model` of the saved
    folder scores exactly that on the held-out split, and the float32 model scores the `accuracy_fp32` kept beside
    it. Before, the registered number was the float32 model's, 0.4–0.6 points off what a user served."""
    torch.manual_seed(0)
    context = TrialContext(source, source.create().state_dict(), bundle, BF16)
    config = TrialConfig(PruneConfig("structured", {"all": 0.5}),
                         HealConfig("finetune", calibration_images=64, steps=5, lr=1e-3, batch_size=16))
    result = run_trial(config, context, save_dir=tmp_path, threads=1)
    assert result.latency.recipe.dtype == "bfloat16" and saved_recipe(tmp_path) == result.latency.recipe
    images, labels = bundle.normalize(bundle.eval.images), bundle.eval.labels
    served = load_model_dir(tmp_path)  # in its recipe: bf16 (and channels-last where it has 4-d weights)
    assert next(served.parameters()).dtype == torch.bfloat16
    assert abs(_top1(served, images, labels, 64) - result.accuracy) <= 0.002
    # what a replica runs (serve.py: the prepared model, its `logits` in batches of the measured size), in the
    # recipe that was timed
    replica = load_prepared(tmp_path)
    assert replica.recipe == result.latency.recipe and replica.batch_size == BF16.batch_size
    assert abs(float((replica.logits(images).argmax(-1) == labels).float().mean()) - result.accuracy) <= 0.002
    trained = load_model_dir(tmp_path, recipe=False)
    assert abs(accuracy(trained, bundle.eval, bundle) - result.accuracy_fp32) <= 0.002


def test_a_fp32_recipe_on_a_cpu_scores_once(bundle):
    """A float32 contiguous model on a CPU runs as it trained: one evaluation, the same number twice."""
    torch.manual_seed(0)
    context = TrialContext(TINY_RESNET, TINY_RESNET.create().state_dict(), bundle,
                           replace(BF16, dtype="float32", memory_format="contiguous"))
    config = TrialConfig(PruneConfig("structured", {"all": 0.5}), HealConfig("none"))
    result = run_trial(config, context, threads=1)
    assert result.accuracy == result.accuracy_fp32


def test_a_loaded_model_has_run_before_its_first_request(bundle, tmp_path):
    """Loading prepares the model on the batch shape it was timed on and warms it: its first call (where 2:4
    kernels or a compile fail) has happened, and the prepared model says which recipe runs."""
    from autoprune.saved import save_model

    model = TINY_RESNET.create().eval()
    recipe = ExecutionRecipe(dtype="bfloat16", memory_format="channels_last")
    save_model(model, TINY_RESNET, tmp_path, recipe=recipe, example_shape=(4, *bundle.input_size))
    prepared = load_prepared(tmp_path)
    assert prepared.recipe == recipe and prepared.example_shape == (4, *bundle.input_size) and not prepared.note
    calls = []
    prepared.module.register_forward_hook(lambda *args: calls.append(1))
    prepared.warm(2)
    assert len(calls) == 2


def test_a_compiled_model_runs_one_graph_for_any_number_of_images(bundle, monkeypatch):
    """A compiled model compiled a graph for the batch it was prepared on: `logits` pads a short last batch to that
    size, so that the graph is reused rather than another compiled (dynamo's real capture, its `eager` backend to
    keep this fast)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import autoprune.measure.prepared as prepared_module

    monkeypatch.setattr(prepared_module, "compiled",
                        lambda model: (torch._dynamo.reset(), torch.compile(model, backend="eager"))[1])
    model = TINY_RESNET.create().eval()
    images = bundle.normalize(bundle.eval.images[:10])
    prepared = PreparedModel.build(model, ExecutionRecipe(compiled=True), "cpu", (4, *bundle.input_size))
    assert prepared.recipe.compiled, prepared.note
    graphs = counters["stats"]["unique_graphs"]
    logits = prepared.logits(images)  # 4 + 4 + 2 (padded to 4)
    assert counters["stats"]["unique_graphs"] == graphs
    with torch.no_grad():
        expected = model(images)
    assert logits.shape == expected.shape and torch.allclose(logits, expected, atol=1e-5)


_MALLINFO_PROBE = """
import ctypes, ctypes.util, sys, torch
from autoprune.measure.formats import ExecutionRecipe
from autoprune.measure.prepared import prepare_eager

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "prepared":
    prepare_eager(torch.nn.Linear(4, 4), ExecutionRecipe(device="cpu"), "cpu")
before = libc.mallinfo2().hblkhd
activation = torch.empty(2**20)  # 4 MiB, as one activation of a forward pass
print(libc.mallinfo2().hblkhd - before)
"""


def test_a_model_prepared_on_a_cpu_takes_its_activations_from_the_heap_not_fresh_mmaps():
    """With glibc's defaults a 4 MiB activation is a fresh mmap, page-faulted in on every forward pass, and how
    often depends on the process's history (a small ResNet timed 4.5 ms in a search's worker and 3.2 ms served):
    preparing a model fixes the allocator's thresholds, in the timing, evaluating and serving process alike."""
    import ctypes.util

    if not hasattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "mallinfo2"):
        pytest.skip("the C library is not glibc ≥ 2.33 (no mallinfo2)")
    mapped = {how: int(subprocess.run([sys.executable, "-c", _MALLINFO_PROBE, how], capture_output=True, text=True,
                                      check=True).stdout.split()[-1]) for how in ("plain", "prepared")}
    assert mapped["plain"] >= 2**22  # glibc's default: the block is mmapped
    assert mapped["prepared"] == 0  # steady: it comes from the heap
