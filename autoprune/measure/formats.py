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

    def as_dict(self) -> dict:
        return {"dtype": self.dtype, "memory_format": self.memory_format, "kernels": self.kernels,
                "compiled": self.compiled, "device": self.device}

    @classmethod
    def from_dict(cls, fields: dict) -> "ExecutionRecipe":
        known = ("dtype", "memory_format", "kernels", "compiled", "device")
        return cls(**{key: fields[key] for key in known if key in fields})

    def describe(self) -> str:
        return (f"{self.dtype}, {self.memory_format}, {self.kernels} kernels{', compiled' if self.compiled else ''}"
                f" on {self.device}")


def semi_structured_unsupported(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why 2:4 kernels cannot run here (None when they can)."""
    if device.type != "cuda":
        return f"2:4 sparse kernels need a CUDA GPU; this is {device.type}: timed with dense kernels"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 0):
        return f"2:4 sparse kernels need compute capability >= 8.0, this GPU has {capability}: timed with dense kernels"
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


def plan_kernels(model: nn.Module, fmt: str, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """The kernels a model of execution format `fmt` will run here, and why when they are not the format's own.
    Decided from the model before anything is converted, so that the latency cache keys the measurement by what
    really runs (a 2:4 model without eligible layers is the dense structure's twin)."""
    if fmt != SEMI_STRUCTURED:
        return DENSE, ""
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


def prepare(model: nn.Module, recipe: ExecutionRecipe, device: torch.device | str) -> nn.Module:
    """`model` made ready to run `recipe` on `device`: moved, cast, laid out, converted, compiled — in place, so
    give it a copy of a model that must still train. A forward pre-hook casts floating inputs to the recipe's dtype
    and layout, so callers may pass float32 images. Returns the module to call (a compiled wrapper when compiled).

    2:4 conversion raises when the kernels cannot take the model; the first call of a compiled model compiles it.
    Both are the caller's to guard (`profile.runnable` falls back to dense kernels or eager and says why)."""
    model = prepare_eager(model, recipe, device)
    return compiled(model) if recipe.compiled else model


def prepare_eager(model: nn.Module, recipe: ExecutionRecipe, device: torch.device | str) -> nn.Module:
    """`prepare` without the compilation."""
    device = torch.device(device)
    dtype = TORCH_DTYPES[recipe.dtype]
    model = model.eval().requires_grad_(False).to(device=device, dtype=dtype)
    layout = torch.channels_last if recipe.memory_format == CHANNELS_LAST else torch.contiguous_format
    if recipe.memory_format == CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)  # 4-d weights only; Linear layers are unchanged
    if recipe.kernels == SEMI_STRUCTURED:
        to_semi_structured(model, dtype)
    model.register_forward_pre_hook(_input_caster(device, dtype, layout))
    return model


def compiled(model: nn.Module) -> nn.Module:
    import torch._dynamo

    # A worker compiles model after model: past dynamo's recompile limit it would silently run eager.
    torch._dynamo.reset()
    return torch.compile(model)


def _input_caster(device: torch.device, dtype: torch.dtype, layout):
    def cast(module, args):
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
            return None
        images = args[0].to(device=device, dtype=dtype)
        if images.dim() == 4:
            images = images.contiguous(memory_format=layout)
        return (images, *args[1:])

    return cast
