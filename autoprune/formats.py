"""How a pruned model is executed when it is timed: the speedup a format gives is measured, never assumed.

- Structured removal: the model is already a smaller dense model.
- Unstructured masks: dense kernels (no speedup is claimed).
- 2:4 semi-structured: on a CUDA GPU with sparse tensor cores (compute capability ≥ 8.0) and a float16/bfloat16
  profile, the eligible Linear layers are converted with `torch.sparse.to_sparse_semi_structured` and *that* is
  timed; anywhere else the dense kernels are timed and the profile says why. On some GPUs the sparse kernels are
  slower than dense ones at some shapes; the measurement shows it, and the front follows the measurement.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

DENSE, SEMI_STRUCTURED = "dense", "2:4"
SPARSE_DTYPES = (torch.float16, torch.bfloat16)


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


# The CUTLASS / cuSPARSELt kernels need these multiples (rows, columns) of the weight, per dtype.
_MIN_MULTIPLES = {torch.float16: (32, 64), torch.bfloat16: (32, 64)}


@torch.no_grad()
def semi_structured_copy(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of `model` whose 2:4-patterned Linear weights are semi-structured sparse tensors; and how many."""
    from torch.sparse import to_sparse_semi_structured

    timed = copy.deepcopy(model)
    converted = 0
    for module in timed.modules():
        if not isinstance(module, nn.Linear) or not is_two_four(module.weight):
            continue
        rows, columns = _MIN_MULTIPLES.get(module.weight.dtype, (32, 64))
        if module.weight.shape[0] % rows or module.weight.shape[1] % columns:
            continue
        module.weight = nn.Parameter(to_sparse_semi_structured(module.weight), requires_grad=False)
        converted += 1
    return timed, converted


def timing_model(model: nn.Module, fmt: str, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, str, str]:
    """The model to time, the format it runs in, and a note (why a format fell back to dense kernels)."""
    if fmt != SEMI_STRUCTURED:
        return model, DENSE, ""
    if reason := semi_structured_unsupported(device, dtype):
        return model, DENSE, reason
    try:
        timed, converted = semi_structured_copy(model.to(device=device, dtype=dtype))
    except (RuntimeError, NotImplementedError) as error:  # a kernel missing for this device / shape
        return model, DENSE, f"2:4 conversion failed ({error}): timed with dense kernels"
    if not converted:
        return model, DENSE, "no Linear layer has a 2:4 pattern and a kernel-compatible shape: timed dense"
    return timed, SEMI_STRUCTURED, f"{converted} Linear layers on 2:4 sparse kernels"
