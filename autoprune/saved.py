"""The saved-model format: a pruned model's folder, and loading it back as it was measured.

A saved model is a folder with `weights.safetensors` and `structure.json` (timm name, create kwargs, every
tensor's shape, attention head counts, and the execution recipe its latency was measured in). Loading rebuilds the
timm model, resizes the layers that pruning shrank, loads the weights — no pickled code is ever executed — and,
unless told not to, prepares it in its recipe (dtype, memory format, 2:4 kernels, compilation), so that it runs as
it was measured.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from autoprune.errors import AutopruneError
from autoprune.measure.formats import ONNXRUNTIME, ExecutionRecipe
from autoprune.measure.prepared import PreparedModel
from autoprune.models import ModelSource, attention_settings, fix_width_metadata, restore_attention_settings

log = logging.getLogger(__name__)

SAVED_FORMAT = "autoprune.model/1"
WEIGHTS_FILE = "weights.safetensors"
STRUCTURE_FILE = "structure.json"
MLFLOW_DATA = Path("data") / "model"  # where a registered version (an MLflow model) keeps the saved model


def save_model(model: nn.Module, source: ModelSource, directory: str | Path, *,
               recipe: ExecutionRecipe | None = None, example_shape: tuple[int, ...] | None = None) -> Path:
    """Write `weights.safetensors` (float32, as trained) + `structure.json`, with the `recipe` the model's latency
    was measured in and the batch shape it was timed on (`example_shape`); `load_model_dir` rebuilds the same model
    from them and prepares it in that recipe, warmed on that shape.

    A tensor the model holds under several names (CoaT's position encodings, shared by its blocks) is written once,
    under the name safetensors' own `save_model` keeps; the file's metadata maps each name left out to it, and
    `structure.json` still gives every name's shape."""
    from safetensors.torch import _remove_duplicate_names, save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach() for key, value in model.state_dict().items()}
    shapes = {key: list(value.shape) for key, value in state.items()}
    aliases = {alias: kept for kept, names in _remove_duplicate_names(state).items() for alias in names}
    weights = {key: value.cpu().contiguous() for key, value in state.items() if key not in aliases}
    save_file(weights, str(directory / WEIGHTS_FILE), metadata=aliases or None)
    structure = {
        "format": SAVED_FORMAT,
        "timm_name": source.name,
        "num_classes": source.num_classes,
        "kwargs": dict(source.kwargs),
        "shapes": shapes,
        # Head counts cannot be read off the shapes (fewer heads and narrower heads look alike).
        "attention_heads": attention_settings(model),
    }
    if recipe is not None:
        structure["execution"] = recipe.as_dict()
    if example_shape is not None:
        structure["example_shape"] = list(example_shape)
    if recipe is not None and recipe.runtime == ONNXRUNTIME and example_shape is not None:
        # the ONNX file it was timed and scored as, for those who deploy it without autoprune
        from autoprune.measure.onnx import ONNX_FILE, export_onnx, exportable_copy

        (directory / ONNX_FILE).write_bytes(export_onnx(exportable_copy(model), torch.zeros(example_shape)))
    (directory / STRUCTURE_FILE).write_text(json.dumps(structure, indent=1))
    return directory


def model_folder(directory: str | Path) -> Path:
    """The saved model in `directory`: the folder itself, or — for a registered version, an MLflow model
    (tracking/pyfunc.py) — its data folder."""
    directory = Path(directory)
    nested = directory / MLFLOW_DATA
    if not (directory / STRUCTURE_FILE).exists() and (directory / "MLmodel").exists() and nested.is_dir():
        return nested
    return directory


def saved_recipe(directory: str | Path) -> ExecutionRecipe | None:
    """The execution recipe a saved model was measured in (None for models saved without one)."""
    structure = json.loads((model_folder(directory) / STRUCTURE_FILE).read_text())
    return ExecutionRecipe.from_dict(structure["execution"]) if "execution" in structure else None


def load_model_dir(directory: str | Path, *, recipe: bool = True, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild a saved (possibly physically pruned) model in eval mode, without unpickling anything.

    With `recipe` (the default) it is prepared in the recipe its latency was measured in — dtype, memory format,
    2:4 kernels, compiled, backend settings — on `device` (default: the kind it was measured on, when this machine
    has one), and warmed up (`load_prepared`); inputs may stay float32, a hook casts them. `recipe=False` gives the
    plain float32 model on the CPU (to train on)."""
    if not recipe:
        return _load_plain(Path(directory))[0]
    return load_prepared(directory, device=device).module


def load_prepared(directory: str | Path, *, device: str | torch.device | None = None,
                  warm_passes: int = 3) -> PreparedModel:
    """A saved model prepared in its recipe (measure/prepared.py: the same path timing and the registered accuracy
    took) and warmed on the batch shape it was timed on: its first call, where 2:4 kernels or a compile can fail
    (and fall back, with a warning), has happened already. A model saved without a recipe runs in float32."""
    model, structure = _load_plain(Path(directory))
    recipe = ExecutionRecipe.from_dict(structure.get("execution", {"device": "cpu"}))
    if device is None:
        device = recipe.device if recipe.device != "cuda" or torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != recipe.device:
        log.warning(
            "this model was measured on %s and is loaded on %s: it will not run at its measured latency",
            recipe.device, device.type)
    if "example_shape" not in structure:  # saved before the shape was recorded: prepared, first called by the caller
        log.warning("%s was saved without the batch shape it was timed on: it is not warmed up", Path(directory).name)
        return PreparedModel.build(model, recipe, device, None, copy_model=False)
    prepared = PreparedModel.build(model, recipe, device, tuple(structure["example_shape"]), copy_model=False)
    if prepared.note:
        log.warning("%s: %s", Path(directory).name, prepared.note)
    prepared.warm(warm_passes)
    return prepared


def _load_plain(directory: Path) -> tuple[nn.Module, dict]:
    """The float32 model on the CPU, in eval mode, and its structure.json."""
    directory = model_folder(directory)
    try:
        structure = json.loads((directory / STRUCTURE_FILE).read_text())
    except FileNotFoundError:
        raise AutopruneError(f"{str(directory)!r} holds no {STRUCTURE_FILE}; it is not an autoprune model.") from None
    if structure.get("format") != SAVED_FORMAT:
        raise AutopruneError(f"{str(directory)!r}: unknown saved-model format {structure.get('format')!r}.")
    source = ModelSource(structure["timm_name"], structure["num_classes"], structure["kwargs"])
    model = source.create(pretrained=False)
    _resize_to(model, {key: torch.Size(shape) for key, shape in structure["shapes"].items()})
    fix_width_metadata(model)
    restore_attention_settings(model, structure.get("attention_heads", {}))
    _load_weights(model, directory)
    return model.eval(), structure


def _load_weights(model: nn.Module, directory: Path) -> None:
    """Load the saved weights, strictly except for what `save_model` left out: a name the rebuilt model holds as
    the very tensor of a name in the file (safetensors' rule for shared tensors, preferring the file's names)."""
    from safetensors.torch import _remove_duplicate_names, load_file

    weights = load_file(str(directory / WEIGHTS_FILE))
    shared = _remove_duplicate_names(model.state_dict(), preferred_names=list(weights))
    restored = {alias for kept, names in shared.items() if kept in weights for alias in names}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = sorted(set(missing) - restored)
    if missing or unexpected:
        wrong = [f"{what} {', '.join(names[:5])}{' …' if len(names) > 5 else ''}"
                 for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
        raise AutopruneError(f"{str(directory)!r}: the weights do not fit the rebuilt {type(model).__name__}"
                             f" ({'; '.join(wrong)}).")


def _resize_to(model: nn.Module, shapes: Mapping[str, torch.Size]) -> None:
    """Give every layer the tensor shapes that pruning left it with, updating the attributes forward uses."""
    # A tensor two modules share is replaced by one new tensor, still shared (keyed by the old tensor's id; the old
    # tensor is kept alive alongside, so that its id is not reused).
    resized: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, module in _modules_with_state(model):
        prefix = f"{name}." if name else ""
        for key, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            shape = shapes.get(prefix + key)
            if tensor is None or shape is None or tensor.shape == shape:
                continue
            if id(tensor) not in resized:
                empty = torch.empty(shape, dtype=tensor.dtype)
                parameter = isinstance(tensor, nn.Parameter)
                new = nn.Parameter(empty, requires_grad=tensor.requires_grad) if parameter else empty
                resized[id(tensor)] = (tensor, new)
            if isinstance(tensor, nn.Parameter):
                setattr(module, key, resized[id(tensor)][1])
            else:
                module.register_buffer(key, resized[id(tensor)][1])
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = weight.shape
        elif isinstance(module, nn.Conv2d):
            # A depthwise conv keeps its channel multiplier (out = multiplier × groups, e.g. FastViT's 2×): the
            # groups follow the output channels divided by it, never the output channels themselves.
            depthwise = module.groups > 1 and module.groups == module.in_channels
            multiplier = module.out_channels // module.groups
            module.out_channels = weight.shape[0]
            module.groups = weight.shape[0] // multiplier if depthwise else module.groups
            module.in_channels = weight.shape[1] * module.groups
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.num_features = weight.shape[0]
        elif isinstance(module, nn.LayerNorm):
            module.normalized_shape = tuple(weight.shape)


def _modules_with_state(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
            yield name, module
