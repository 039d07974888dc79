"""ONNX Runtime as a runtime: a model exported to ONNX, checked against PyTorch, and run in an InferenceSession.

Most users deploy through ONNX Runtime (or TensorRT), not eager PyTorch, and a front measured in one runtime is not
the front in another: pruning that pays in PyTorch may not pay there. So a recipe (formats.py) may name
`onnxruntime` as its runtime; prepared.py then builds the model as an `OnnxModel` — exported once (torch's
exporter, opset OPSET, the batch dimension dynamic), its outputs compared with PyTorch's on the example batch (the
largest difference is in the note), and run on the device's execution provider (CUDA where the GPU is, else the
CPU) with the recipe's threads — and times, scores, loads and serves it like any prepared model.

ONNX Runtime runs float32 here: a bfloat16 or float16 recipe is exported in float32 (the note says so).
"""

from __future__ import annotations

import io
import warnings

import torch
from torch import nn

from autoprune.errors import AutopruneError

OPSET = 18
ONNX_FILE = "model.onnx"


def export_onnx(model: nn.Module, example: torch.Tensor) -> bytes:
    """`model` (float32, on the CPU, in eval mode) as ONNX bytes, the batch dimension dynamic."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings are not the user's
        torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=OPSET, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    return buffer.getvalue()


def exportable_copy(model: nn.Module) -> nn.Module:
    """A float32 copy of `model` on the CPU in eval mode (the model itself stays where it is, as it is)."""
    import copy

    return copy.deepcopy(model).float().cpu().eval()


def providers_for(device: torch.device) -> list:
    """ONNX Runtime's execution providers for a device: CUDA's on that very GPU (its default is GPU 0, whatever
    device the trial was given), then the CPU's; a GPU without ONNX Runtime's CUDA provider is an error."""
    providers: list = ["CPUExecutionProvider"]
    if device.type == "cuda":
        problem = gpu_provider_missing()
        if problem:  # it would run on the CPU, timed and registered under the GPU's name
            raise AutopruneError(problem)
        index = device.index if device.index is not None else torch.cuda.current_device()
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
    return providers


def gpu_provider_missing() -> str | None:
    """Why ONNX Runtime cannot run on a GPU here (None when it can): the `onnxruntime` wheel runs on the CPU only."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return None
    return ("profile.runtime: onnxruntime on a GPU needs ONNX Runtime's CUDA provider, and this install has only"
            f" {', '.join(available)}: install `onnxruntime-gpu` in place of `onnxruntime` on the GPU workers, or"
            " time in torch (profile.runtime: torch).")


class OnnxModel(nn.Module):
    """An InferenceSession behind a module's call: float images in (any device; cast to float32), float32 logits out
    on `device`. A module, so that timing, evaluation and serving call it as they call a PyTorch model."""

    def __init__(self, onnx: bytes, device: torch.device, threads: int | None) -> None:
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.inter_op_num_threads = 1
        if threads:
            options.intra_op_num_threads = threads
        self.onnx, self.device = onnx, device
        self.session = onnxruntime.InferenceSession(onnx, sess_options=options, providers=providers_for(device))
        self.provider = self.session.get_providers()[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # a float32 contiguous CPU tensor is handed over without a copy (numpy shares its memory)
        array = images.detach().float().cpu().contiguous().numpy()
        [logits] = self.session.run(None, {"images": array})
        return torch.from_numpy(logits).to(self.device)


def largest_difference(expected: torch.Tensor, onnx_model: OnnxModel, example: torch.Tensor) -> float:
    """The largest absolute difference between PyTorch's outputs `expected` and ONNX Runtime's on `example`."""
    return float((onnx_model(example).cpu() - expected.cpu()).abs().max())
