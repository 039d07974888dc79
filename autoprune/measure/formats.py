"""How a pruned model executes: its dtype, memory layout, kernels and compilation — one recipe for timing and serving.

A model's latency is a property of how it runs, not only of its weights, so the recipe it was timed in is recorded
with its measurement (`LatencyProfile`), saved with the model and applied again when the model is loaded or served
(`prepare`): what is registered is what runs.

- Structured removal: the model is already a smaller dense model.
- Unstructured masks: dense kernels (no speedup is claimed).
- 2:4 semi-structured: on a CUDA GPU with sparse tensor cores (compute capability ≥ 8.0) and a float16/bfloat16
  profile, the eligible Linear layers are converted with torch's semi-structured sparse tensors and *that* is
  timed; anywhere else the dense kernels are timed and the profile says why. On some GPUs the sparse kernels are
  slower than dense ones at some shapes; the measurement shows it, and the front follows the measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from autoprune.config import DTYPES, MEMORY_FORMATS

DENSE, SEMI_STRUCTURED = "dense", "2:4"
TORCH, ONNXRUNTIME = "torch", "onnxruntime"  # the spec's runtimes (config.RUNTIMES)
SPARSE_DTYPES = (torch.float16, torch.bfloat16)
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}  # the spec's dtype names (config) → torch's
CONTIGUOUS, CHANNELS_LAST, AUTO = "contiguous", "channels_last", "auto"
assert set(MEMORY_FORMATS) == {CONTIGUOUS, CHANNELS_LAST, AUTO}  # the spec's names (config), as constants here


@dataclass(frozen=True)
class ExecutionRecipe:
    """How a model runs: what its latency was measured in, and what loading and serving it must reproduce."""

    dtype: str = "float32"
    memory_format: str = CONTIGUOUS  # of the inputs and the 4-d weights
    kernels: str = DENSE  # dense, or 2:4 (eligible Linear layers on semi-structured sparse kernels)
    compiled: bool = False  # torch.compile(model)
    device: str = "cpu"  # the kind of device it was timed on: cpu or cuda
    # The backend's process-wide settings it ran under (CUDA only; prepared.py sets them whenever a model is
    # prepared): float32 matmuls and convolutions on TF32 tensor cores, and cuDNN's autotuner picking each
    # convolution's fastest algorithm for the shapes it meets. Both change speed, TF32 the numbers too.
    tf32: bool = False
    cudnn_benchmark: bool = False
    runtime: str = TORCH  # or ONNX Runtime (measure/onnx.py): exported, and run in an InferenceSession

    def as_dict(self) -> dict:
        return {"dtype": self.dtype, "memory_format": self.memory_format, "kernels": self.kernels,
                "compiled": self.compiled, "device": self.device, "tf32": self.tf32,
                "cudnn_benchmark": self.cudnn_benchmark, "runtime": self.runtime}

    @classmethod
    def from_dict(cls, fields: dict) -> "ExecutionRecipe":
        """From `as_dict`; a recipe saved before a field existed takes its default."""
        known = ("dtype", "memory_format", "kernels", "compiled", "device", "tf32", "cudnn_benchmark", "runtime")
        return cls(**{key: fields[key] for key in known if key in fields})

    def describe(self) -> str:
        extras = [", compiled" if self.compiled else "", ", TF32" if self.tf32 else "",
                  ", cuDNN autotuned" if self.cudnn_benchmark else ""]
        where = " in ONNX Runtime" if self.runtime == ONNXRUNTIME else ""
        return f"{self.dtype}, {self.memory_format}, {self.kernels} kernels{''.join(extras)} on {self.device}{where}"


def semi_structured_unsupported(device: torch.device, dtype: torch.dtype, *, capability: tuple[int, int] | None = None,
                                backend=None) -> str | None:
    """Why 2:4 kernels cannot run here (None when they can). `capability` and `backend` default to the device's
    and to the class torch converts to."""
    if device.type != "cuda":
        return f"2:4 sparse kernels need a CUDA GPU; this is {device.type}: timed with dense kernels"
    capability = tuple(capability or torch.cuda.get_device_capability(device))
    if capability < (8, 0):
        return f"2:4 sparse kernels need compute capability >= 8.0, this GPU has {capability}: timed with dense kernels"
    backend = backend or semi_structured_backend()
    if backend.__name__.endswith("CUTLASS") and capability[0] != 8:
        # CUTLASS's 2:4 kernels are built for sm_8x only; on a Hopper without cuSPARSELt they fail at run time
        return (f"torch's CUTLASS 2:4 kernels run on compute capability 8.x only, this GPU has {capability} and"
                " torch uses CUTLASS here (cuSPARSELt missing, or CUTLASS forced): timed with dense kernels")
    if dtype not in SPARSE_DTYPES:
        return f"2:4 sparse kernels take float16/bfloat16, the profile uses {dtype}: timed with dense kernels"
    return None


def is_two_four(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every 4 consecutive input weights of every row."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def semi_structured_backend():
    """The class torch converts to: cuSPARSELt by default, CUTLASS when forced or when cuSPARSELt is missing.
    Its shape rules are the ones that count (they differ: cuSPARSELt takes multiples of 16, CUTLASS of 32 × 64)."""
    from torch.sparse import (
        SparseSemiStructuredTensor,
        SparseSemiStructuredTensorCUSPARSELT,
        SparseSemiStructuredTensorCUTLASS,
    )

    cusparselt = getattr(torch.backends, "cusparselt", None)
    available = cusparselt is not None and cusparselt.is_available()
    if SparseSemiStructuredTensor._FORCE_CUTLASS or not available:
        return SparseSemiStructuredTensorCUTLASS
    return SparseSemiStructuredTensorCUSPARSELT


def semi_structured_layers(model: nn.Module, dtype: torch.dtype, backend=None) -> list[tuple[str, nn.Linear]]:
    """The Linear layers the 2:4 kernels would run: a 2:4 weight pattern and a shape the backend's kernels take."""
    backend = backend or semi_structured_backend()
    rule = backend._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
    if rule is None:
        return []
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not is_two_four(module.weight):
            continue
        rows, columns = module.weight.shape
        if rows >= rule.sparse_min_rows and rows % rule.sparse_min_rows == 0 and \
                columns >= rule.sparse_min_cols and columns % rule.sparse_min_cols == 0:
            layers.append((name, module))
    return layers


def plan_kernels(model: nn.Module, fmt: str, device: torch.device, dtype: torch.dtype,
                 runtime: str = TORCH) -> tuple[str, str]:
    """The kernels a model of execution format `fmt` will run here, and why when they are not the format's own.
    Decided from the model before anything is converted, so that the latency cache keys the measurement by what
    really runs (a 2:4 model without eligible layers is the dense structure's twin)."""
    if fmt != SEMI_STRUCTURED:
        return DENSE, ""
    if runtime == ONNXRUNTIME:
        return DENSE, "ONNX Runtime has no 2:4 sparse kernels: timed with dense kernels"
    if reason := semi_structured_unsupported(device, dtype):
        return DENSE, reason
    if not semi_structured_layers(model, dtype):
        return DENSE, "no Linear layer has a 2:4 pattern and a shape the sparse kernels take: timed with dense kernels"
    return SEMI_STRUCTURED, ""


@torch.no_grad()
def to_semi_structured(model: nn.Module, dtype: torch.dtype) -> int:
    """Convert the eligible Linear weights of `model` (on its CUDA device, in `dtype`) in place; returns how many."""
    backend = semi_structured_backend()
    layers = semi_structured_layers(model, dtype, backend)
    for _, module in layers:
        module.weight = nn.Parameter(backend.from_dense(module.weight.detach().contiguous()), requires_grad=False)
    return len(layers)


def join_notes(*notes: str) -> str:
    """Notes joined with "; ", each part once (a cached profile may already carry the reason being added)."""
    return "; ".join(dict.fromkeys(part for note in notes for part in note.split("; ") if part))
