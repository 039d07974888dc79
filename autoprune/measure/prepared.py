"""One prepared model: a model made ready to run its execution recipe on a device, built in one place and used
wherever autoprune runs a model as it is served — timing (runners.py), the accuracy that is registered (trial.py),
loading (saved.py) and serving (serve.py). What is registered is then what is served: the same dtype, layout,
kernels, compilation and backend settings, with the same fallbacks.

Building one moves, casts, lays out (channels-last), converts (2:4 kernels) and compiles the model, and calls it
once on an example batch. That first call is where sparse kernels meet the shapes and where compilation happens,
so it is where they fail: a 2:4 model that fails there runs on dense kernels, a compile that fails (or captures
no graph) runs eager, and `note` says why. `recipe` is always what really runs.

The recipe's backend settings (TF32, cuDNN's autotuner) are process-wide in torch: they are set each time a model
is prepared, so that a worker's timing, evaluation and a replica's serving run under the ones recorded.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import nn

from autoprune.measure.allocator import steady_allocator
from autoprune.measure.formats import (
    CHANNELS_LAST,
    DENSE,
    ONNXRUNTIME,
    SEMI_STRUCTURED,
    TORCH,
    TORCH_DTYPES,
    ExecutionRecipe,
    join_notes,
    plan_kernels,
    to_semi_structured,
)


@dataclass
class PreparedModel:
    """A model ready to run in `recipe` on `device`, which has run once on a batch of `batch_size`."""

    module: nn.Module  # what to call: the prepared model, or its compiled wrapper
    recipe: ExecutionRecipe  # what runs (after any fallback)
    device: torch.device
    # the batch it was built on: a compiled model's graph is for this shape (None: not called yet, see `build`)
    example_shape: tuple[int, ...] | None
    note: str = ""  # why `recipe` differs from the one asked for

    @classmethod
    def build(cls, model: nn.Module, recipe: ExecutionRecipe, device: torch.device | str,
              example_shape: tuple[int, ...] | None, *, copy_model: bool = True) -> "PreparedModel":
        """`model` prepared in `recipe` on `device` and called once on a random batch of `example_shape`.
        `copy_model=False` prepares `model` itself (it is then cast and in inference mode: it cannot train).
        Without an `example_shape` (a model saved before it was recorded) nothing is called: its first call is the
        caller's, unguarded, as it always was."""
        device = torch.device(device)
        recipe, note = _runnable_here(model, recipe, device)
        if recipe.runtime == ONNXRUNTIME:
            if example_shape is None:
                example_shape = (1, *_onnx_input_size(model))
            prepared = cls._in_onnx_runtime(model, recipe, device, tuple(example_shape))
            if prepared.recipe.runtime == ONNXRUNTIME:
                return prepared
            recipe, note = prepared.recipe, join_notes(note, prepared.note)  # it could not be: PyTorch, and why
        if example_shape is None:
            module = prepare_eager(copy.deepcopy(model) if copy_model else model, recipe, device)
            return cls(compiled(module) if recipe.compiled else module, recipe, device, None, note)
        example = torch.randn(example_shape, device=device, dtype=TORCH_DTYPES[recipe.dtype])
        spare = copy.deepcopy(model) if recipe.kernels == SEMI_STRUCTURED else None  # a 2:4 failure starts over
        try:
            eager = _first_call(prepare_eager(copy.deepcopy(model) if copy_model else model, recipe, device), example)
        except Exception as error:  # noqa: BLE001 — any kernel failure: run the dense kernels and say why
            if spare is None:
                raise
            note = join_notes(note, f"2:4 sparse kernels failed ({_reason(error)}): dense kernels")
            recipe = replace(recipe, kernels=DENSE)
            eager = _first_call(prepare_eager(spare, recipe, device), example)
        prepared = cls(eager, recipe, device, tuple(example_shape), note)
        if recipe.compiled:
            prepared._compile(example)
        return prepared

    @classmethod
    def _in_onnx_runtime(cls, model: nn.Module, recipe: ExecutionRecipe, device: torch.device,
                         example_shape: tuple[int, ...]) -> "PreparedModel":
        """Exported and run in ONNX Runtime, its outputs checked against PyTorch's on a random batch; where the
        export fails or its outputs differ, the recipe is PyTorch's and the note says why."""
        from autoprune.measure.onnx import OPSET, OnnxModel, export_onnx, exportable_copy, largest_difference

        example = torch.randn(example_shape)
        plain = exportable_copy(model)
        try:
            module = OnnxModel(export_onnx(plain, example), device, torch.get_num_threads())
            with torch.no_grad():
                expected = plain(example)
            difference = largest_difference(expected, module, example)
        except Exception as error:  # noqa: BLE001 — an op the exporter or the runtime does not take
            return cls(model, replace(recipe, runtime=TORCH), device, example_shape,
                       f"ONNX export failed ({_reason(error)}): PyTorch")
        if not difference <= ONNX_TOLERANCE * max(float(expected.abs().max()), 1.0):
            return cls(model, replace(recipe, runtime=TORCH), device, example_shape,
                       f"ONNX Runtime's outputs differ from PyTorch's by {difference:.2g}: PyTorch")
        recipe = replace(recipe, dtype="float32", memory_format="contiguous", kernels=DENSE, compiled=False)
        return cls(module, recipe, device, example_shape,
                   f"ONNX opset {OPSET}, {module.provider}, outputs within {difference:.1e} of PyTorch's")

    def _compile(self, example: torch.Tensor) -> None:
        graphs = _captured_graphs()
        try:
            module = _first_call(compiled(self.module), example)
        except Exception as error:  # noqa: BLE001 — any compiler failure: run eager and say why
            self.recipe, self.note = replace(self.recipe, compiled=False), join_notes(
                self.note, f"torch.compile failed ({_reason(error)}): eager")
            return
        if _captured_graphs() == graphs:
            self.recipe, self.note = replace(self.recipe, compiled=False), join_notes(
                self.note, "torch.compile captured no graph (dynamo fell back to eager): eager")
            return
        self.module = module

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.module(images)

    def warm(self, passes: int = 3) -> None:
        """`passes` untimed calls on a batch of the size it was built on: what a server does before it reports
        ready, so that the first request pays no lazy initialisation (allocator, cuDNN's autotuner, caches)."""
        if self.example_shape is None:
            return
        example = torch.randn(self.example_shape, device=self.device, dtype=TORCH_DTYPES[self.recipe.dtype])
        with torch.inference_mode():
            for _ in range(passes):
                self.module(example)

    @property
    def batch_size(self) -> int:
        return self.example_shape[0] if self.example_shape else 1

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 logits of any number of images, in batches of `batch_size`; a compiled model's last batch is
        padded to that size, so that it runs the graph it compiled instead of compiling another. The batches are
        cut outside inference mode, as the first call's was: dynamo's guards tell the two kinds of tensor apart."""
        if images.is_inference():
            images = images.clone()  # outside inference mode: a normal tensor
        outputs = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size].to(self.device)
            rows = len(batch)
            if self.recipe.compiled and rows < self.batch_size:
                batch = torch.cat([batch, batch.new_zeros(self.batch_size - rows, *batch.shape[1:])])
            with torch.inference_mode():
                outputs.append(self.module(batch)[:rows].float())
        return torch.cat(outputs)


ONNX_TOLERANCE = 1e-3  # ONNX Runtime's outputs within this share of the largest logit of PyTorch's, or not used


def _onnx_input_size(model: nn.Module) -> tuple[int, int, int]:
    config = getattr(model, "pretrained_cfg", None) or {}
    return tuple(config.get("input_size", (3, 224, 224)))


def apply_backend(recipe: ExecutionRecipe, device: torch.device) -> None:
    """Set the recipe's process-wide backend settings: on a CUDA device TF32 and cuDNN's autotuner; on a CPU a
    steady allocator (`allocator.py`), without which the same model times up to 1.4× apart from process to process."""
    if device.type == "cpu":
        steady_allocator()
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = recipe.tf32
    torch.backends.cudnn.allow_tf32 = recipe.tf32
    torch.backends.cudnn.benchmark = recipe.cudnn_benchmark


def prepare_eager(model: nn.Module, recipe: ExecutionRecipe, device: torch.device | str) -> nn.Module:
    """`model` itself moved, cast, laid out and converted to `recipe` on `device` (not compiled, not yet called).
    A forward pre-hook casts floating inputs to the recipe's dtype and layout, so callers may pass float32 images."""
    device = torch.device(device)
    apply_backend(recipe, device)
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


def _runnable_here(model: nn.Module, recipe: ExecutionRecipe, device: torch.device) -> tuple[ExecutionRecipe, str]:
    """The recipe as it can run on `device`: its kind of device, and dense kernels where 2:4 ones cannot run."""
    recipe, note = replace(recipe, device=device.type), ""
    if device.type != "cuda":
        recipe = replace(recipe, tf32=False, cudnn_benchmark=False)
    if recipe.kernels == SEMI_STRUCTURED:
        kernels, note = plan_kernels(model, SEMI_STRUCTURED, device, TORCH_DTYPES[recipe.dtype])
        recipe = replace(recipe, kernels=kernels)
    return recipe, note


def _first_call(module: nn.Module, example: torch.Tensor) -> nn.Module:
    with torch.inference_mode():
        module(example)
    return module


def _reason(error: Exception) -> str:
    first = str(error).splitlines()[0][:160] if str(error) else ""
    return f"{type(error).__name__}: {first}"


def _captured_graphs() -> int:
    """How many graphs dynamo has compiled in this process (it counts them; a silent fallback adds none)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _input_caster(device: torch.device, dtype: torch.dtype, layout):
    def cast(module, args):
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
            return None
        images = args[0].to(device=device, dtype=dtype)
        if images.dim() == 4:
            images = images.contiguous(memory_format=layout)
        return (images, *args[1:])

    return cast
