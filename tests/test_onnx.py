"""ONNX Runtime as a runtime (`profile.runtime: onnxruntime`): exported with torch's exporter, checked against
PyTorch, timed paired with the dense model in ONNX Runtime, scored, saved with its ONNX file and loaded by MLflow's
onnx flavour — on a BatchNorm CNN and a ViT."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TINY_RESNET, TINY_VIT

from autoprune.config import HealConfig, ProfileSpec, PruneConfig, TrialConfig
from autoprune.measure.formats import ExecutionRecipe
from autoprune.measure.onnx import ONNX_FILE, OPSET, OnnxModel
from autoprune.measure.prepared import PreparedModel
from autoprune.measure.timing import profile_latency

pytest.importorskip("onnxruntime")
ORT = ExecutionRecipe(runtime="onnxruntime")
SOURCES = {"resnet-bn": TINY_RESNET, "vit": TINY_VIT}


@pytest.mark.parametrize("name", SOURCES)
def test_a_model_prepared_for_onnx_runtime_gives_pytorchs_outputs(name, bundle):
    torch.manual_seed(0)
    model = SOURCES[name].create().eval()
    prepared = PreparedModel.build(model, ORT, "cpu", (4, *bundle.input_size))
    assert isinstance(prepared.module, OnnxModel) and prepared.recipe.runtime == "onnxruntime"
    assert f"ONNX opset {OPSET}" in prepared.note and "CPUExecutionProvider" in prepared.note
    images = bundle.normalize(bundle.eval.images[:7])  # another batch size than it was exported with
    with torch.no_grad():
        expected = model(images)
    assert torch.allclose(prepared.logits(images), expected, atol=1e-4)


def test_a_model_that_cannot_be_exported_runs_in_pytorch_and_says_why(bundle):
    """A global filter in the frequency domain (GFNet's): the exporter has no rfft2 at this opset."""

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3 * 32 * 17, 10)

        def forward(self, x):
            return self.head(torch.fft.rfft2(x).abs().flatten(1))

    prepared = PreparedModel.build(Model().eval(), ORT, "cpu", (2, *bundle.input_size))
    assert prepared.recipe.runtime == "torch"
    assert "ONNX export failed (UnsupportedOperatorError: Exporting the operator 'aten::fft_rfft2'" in prepared.note


def test_onnx_runtime_latency_is_paired_with_the_dense_model_in_onnx_runtime(bundle):
    from autoprune.bench.latency import shrink

    torch.manual_seed(0)
    dense = TINY_RESNET.create().eval()
    pruned = shrink(dense, 0.5, 8).eval()
    profile = profile_latency(pruned, input_size=bundle.input_size, batch_size=4, warmup=2, repeats=6, threads=1,
                              reference=dense, runtime="onnxruntime", memory_format="auto")
    assert profile.runtime == "onnxruntime" and profile.recipe.runtime == "onnxruntime" and profile.paired
    assert profile.memory_format == "contiguous"  # ONNX Runtime lays out its own tensors
    assert 0 < profile.speedup_low <= profile.speedup <= profile.speedup_high


def test_a_trial_timed_in_onnx_runtime_saves_and_loads_its_onnx_model(bundle, tmp_path):
    import mlflow.onnx
    import onnxruntime

    from autoprune.saved import load_model_dir
    from autoprune.tracking.pyfunc import save_mlflow_model
    from autoprune.trial import TrialContext, run_trial

    torch.manual_seed(0)
    profile = ProfileSpec(batch_size=4, warmup=1, repeats=3, runtime="onnxruntime")
    context = TrialContext(TINY_RESNET, TINY_RESNET.create().state_dict(), bundle, profile)
    config = TrialConfig(PruneConfig("structured", {"all": 0.5}),
                         HealConfig("finetune", calibration_images=32, steps=2, lr=1e-3, batch_size=8))
    result = run_trial(config, context, save_dir=tmp_path / "saved", threads=1)
    assert result.latency.runtime == "onnxruntime" and (tmp_path / "saved" / ONNX_FILE).exists()
    served = load_model_dir(tmp_path / "saved")
    assert isinstance(served, OnnxModel)
    images, labels = bundle.normalize(bundle.eval.images), bundle.eval.labels
    top1 = float((torch.cat([served(images[i:i + 4]) for i in range(0, len(images), 4)]).argmax(-1) == labels)
                 .float().mean())
    assert abs(top1 - result.accuracy) <= 0.002
    # the version carries the ONNX file as MLflow's onnx flavour: usable without autoprune
    folder = save_mlflow_model(tmp_path / "saved", tmp_path / "mlflow-model")
    proto = mlflow.onnx.load_model(str(folder))
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    [logits] = session.run(None, {"images": images[:4].numpy()})
    assert np.abs(logits - served(images[:4]).numpy()).max() <= 1e-5


def test_onnx_runtime_runs_float32_and_the_spec_says_so():
    from test_spec import DEMO

    from autoprune.errors import SpecError
    from autoprune.space.load import parse_spec

    spec = parse_spec({**DEMO, "profile": {**DEMO.get("profile", {}), "runtime": "onnxruntime"}})
    assert spec.profile.runtime == "onnxruntime"
    with pytest.raises(SpecError, match=r"profile.runtime: onnxruntime.*float32"):
        parse_spec({**DEMO, "profile": {**DEMO.get("profile", {}), "runtime": "onnxruntime", "dtype": "bfloat16"}})
    with pytest.raises(SpecError, match=r"profile.runtime"):
        parse_spec({**DEMO, "profile": {**DEMO.get("profile", {}), "runtime": "tensorrt"}})


def test_the_recipe_names_its_runtime_and_old_recipes_are_pytorchs():
    assert ExecutionRecipe.from_dict({"dtype": "float32"}).runtime == "torch"
    assert replace(ORT).describe().endswith("in ONNX Runtime")


def test_onnx_runtime_without_its_cuda_provider_refuses_a_gpu_instead_of_timing_the_cpu():
    """The `onnxruntime` wheel runs on the CPU only: on a GPU worker it once fell back to the CPU while the profile
    carried the GPU's name. Without the CUDA provider (this machine's install) a GPU is refused, saying what to
    install; the CPU is served as before."""
    import onnxruntime

    from autoprune.errors import AutopruneError
    from autoprune.measure.onnx import providers_for

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this install has ONNX Runtime's CUDA provider")
    with pytest.raises(AutopruneError, match=r"onnxruntime-gpu.*profile.runtime: torch"):
        providers_for(torch.device("cuda"))
    assert providers_for(torch.device("cpu")) == ["CPUExecutionProvider"]
