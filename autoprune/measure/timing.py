"""Latency measured on the device the code runs on: warm-up, repeated timing, median / p90 / spread.

Never estimated from FLOPs. On a GPU each run is timed with CUDA events; on a CPU with perf_counter around
synchronous work, with the thread count fixed (to the trial's CPU allocation) so that measurements compare.

How the model runs is part of the measurement and is recorded with it (formats.py's recipe): the kernels (dense or
2:4), the memory format (channels-last is often faster for CNNs, and "auto" times both and keeps the faster) and
whether `torch.compile` compiled it. A compile or a sparse kernel that fails is reported in the profile's note, and
the profile says what really ran.

The model timed is always a copy prepared for timing, never the caller's: timing runs under inference mode and in
another dtype, device or layout, and a model moved there in place would come back with rounded weights and
inference tensors that autograd refuses — and it is the model that heals next.
"""

from __future__ import annotations

import copy
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from autoprune.measure.formats import (
    AUTO,
    CHANNELS_LAST,
    CONTIGUOUS,
    DENSE,
    DTYPES,
    MEMORY_FORMATS,
    SEMI_STRUCTURED,
    TORCH_DTYPES,
    ExecutionRecipe,
    compiled,
    plan_kernels,
    prepare_eager,
)

__all__ = ["LatencyProfile", "profile_latency", "time_model", "device_name", "percentile", "warm_up", "is_convolutional",
           "DTYPES", "MEMORY_FORMATS", "CONTIGUOUS", "CHANNELS_LAST", "AUTO"]


@dataclass(frozen=True)
class LatencyProfile:
    """One latency measurement and everything that makes it comparable with another."""

    median_ms: float
    p90_ms: float
    spread: float  # (p90 − p10) / median: relative spread of the repeated runs
    batch_size: int
    dtype: str
    device: str  # e.g. "NVIDIA H100 80GB HBM3" or "cpu: AMD EPYC 7B13 (1 thread)"
    threads: int
    repeats: int
    input_size: tuple[int, int, int]
    torch_version: str
    format: str = "dense"  # the kernels that ran: dense, or 2:4 semi-structured (formats.py)
    note: str = ""  # e.g. why a 2:4 model was timed with dense kernels
    memory_format: str = CONTIGUOUS  # of the inputs and 4-d weights when timed
    compiled: bool = False  # torch.compile ran (False also when compiling was asked for and failed: see note)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def recipe(self) -> ExecutionRecipe:
        """How the model ran when timed: what loading and serving it must reproduce."""
        device = "cpu" if self.device.startswith("cpu") else "cuda"  # device_name's two kinds of name
        return ExecutionRecipe(self.dtype, self.memory_format, self.format, self.compiled, device)


def device_name(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_model()} ({threads} thread{'s' if threads != 1 else ''})"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def profile_latency(
    model: nn.Module,
    *,
    input_size: tuple[int, int, int],
    batch_size: int = 1,
    dtype: str = "float32",
    warmup: int = 10,
    repeats: int = 30,
    device: torch.device | str = "cpu",
    threads: int | None = None,
    execution_format: str = DENSE,
    memory_format: str = CONTIGUOUS,
    compile: bool = False,
) -> LatencyProfile:
    """Time `repeats` forward passes of a `batch_size` batch, after at least `warmup` passes and until settled.

    `model` itself is left as it came (a prepared copy is timed). `execution_format` "2:4" runs the model on
    semi-structured sparse kernels where the device has them; `memory_format` "auto" times a convolutional model
    both contiguous and channels-last and keeps the faster; `compile` times `torch.compile(model)` (its compilation
    happens before the warm-up, untimed)."""
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format {memory_format!r}: choose one of {', '.join(MEMORY_FORMATS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    device = torch.device(device)
    if device.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    kernels, note = plan_kernels(model, execution_format, device, TORCH_DTYPES[dtype])
    layouts = [memory_format] if memory_format != AUTO else (
        [CONTIGUOUS, CHANNELS_LAST] if is_convolutional(model) else [CONTIGUOUS])
    shape = (batch_size, *input_size)
    runs = [_timed(model, ExecutionRecipe(dtype, layout, kernels, compile, device.type), shape, warmup, repeats,
                   device) for layout in layouts]
    timings, recipe, run_note = min(runs, key=lambda run: statistics.median(run[0]))
    if len(runs) > 1:
        other = max(statistics.median(run[0]) for run in runs) / statistics.median(timings)
        note = join_notes(note, f"{recipe.memory_format} kept: {other:.2f}× faster than the other memory format")
    median = statistics.median(timings)
    return LatencyProfile(
        median_ms=median,
        p90_ms=percentile(timings, 0.9),
        spread=(percentile(timings, 0.9) - percentile(timings, 0.1)) / median,
        batch_size=batch_size,
        dtype=dtype,
        device=device_name(device, threads),
        threads=threads,
        repeats=repeats,
        input_size=tuple(input_size),
        torch_version=torch.__version__,
        format=recipe.kernels,
        note=join_notes(note, run_note),
        memory_format=recipe.memory_format,
        compiled=recipe.compiled,
    )


def is_convolutional(model: nn.Module) -> bool:
    """More than one 2-d convolution: a CNN, not a transformer whose only convolution embeds the patches."""
    return sum(isinstance(module, nn.Conv2d) for module in model.modules()) > 1


def _timed(model, recipe: ExecutionRecipe, shape, warmup, repeats, device) -> tuple[list[float], ExecutionRecipe, str]:
    """Warm up and time a copy of `model` prepared in `recipe`: (timings, the recipe that really ran, note)."""
    runner, recipe, note = runnable(model, recipe, device, shape)
    inputs = torch.randn(shape, device=device, dtype=TORCH_DTYPES[recipe.dtype])
    if recipe.memory_format == CHANNELS_LAST:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return time_model(runner, inputs, warmup=warmup, repeats=repeats), recipe, note


def time_model(runner, inputs: torch.Tensor, *, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of `repeats` calls of a ready-to-run model on `inputs` (on its device), after at least
    `warmup` calls and until settled, under inference mode. What the profile does to its prepared copy, and what
    a benchmark does to a model as loaded or served."""
    time_runs = _time_cuda if inputs.device.type == "cuda" else _time_cpu
    with torch.inference_mode():
        warm_up(runner, inputs, minimum=warmup, time_runs=time_runs)
        return time_runs(runner, inputs, repeats)


def runnable(model: nn.Module, recipe: ExecutionRecipe, device: torch.device,
             shape: tuple[int, ...]) -> tuple[nn.Module, ExecutionRecipe, str]:
    """A copy of `model` prepared in `recipe` that has run once: (module, the recipe that ran, note).

    The first call is where sparse kernels meet the shapes and where compilation happens, so it is where they
    fail: a 2:4 model that fails there runs on dense kernels, a compile that fails runs eager, and the note says
    why. A compile that captured no graph (dynamo gave up) is recorded as not compiled."""
    note = ""
    example = torch.randn(shape, device=device, dtype=TORCH_DTYPES[recipe.dtype])
    try:
        runner = _first_call(prepare_eager(copy.deepcopy(model), recipe, device), example)
    except Exception as error:  # noqa: BLE001 — any kernel failure: time the dense kernels and say why
        if recipe.kernels != SEMI_STRUCTURED:
            raise
        note = f"2:4 sparse kernels failed ({_reason(error)}): timed with dense kernels"
        recipe = replace(recipe, kernels=DENSE)
        runner = _first_call(prepare_eager(copy.deepcopy(model), recipe, device), example)
    if not recipe.compiled:
        return runner, recipe, note
    graphs = _captured_graphs()
    try:
        compiled_runner = _first_call(compiled(runner), example)
    except Exception as error:  # noqa: BLE001 — any compiler failure: time the eager model and say why
        return runner, replace(recipe, compiled=False), join_notes(note, f"torch.compile failed ({_reason(error)}): timed eager")
    if _captured_graphs() == graphs:
        return runner, replace(recipe, compiled=False), join_notes(
            note, "torch.compile captured no graph (dynamo fell back to eager): timed eager")
    return compiled_runner, recipe, note


def _first_call(runner: nn.Module, example: torch.Tensor) -> nn.Module:
    with torch.inference_mode():
        runner(example)
    return runner


def _reason(error: Exception) -> str:
    first = str(error).splitlines()[0][:160] if str(error) else ""
    return f"{type(error).__name__}: {first}"


def _captured_graphs() -> int:
    """How many graphs dynamo has compiled in this process (it counts them; a silent fallback adds none)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def join_notes(*notes: str) -> str:
    """Notes joined with "; ", each part once (a cached profile may already carry the reason being added)."""
    return "; ".join(dict.fromkeys(part for note in notes for part in note.split("; ") if part))


SETTLE_TOLERANCE = 0.05  # warm-up ends when two consecutive windows' medians agree within 5%…
SETTLE_MAX_WINDOWS = 20  # …or after this many windows


def warm_up(model: nn.Module, inputs: torch.Tensor, *, minimum: int, time_runs) -> int:
    """Run at least `minimum` untimed passes, then timed windows until their medians settle; returns the count.

    A fresh process's first passes pay lazy initialisation (allocator growth, kernel selection, caches), which a
    fixed small warm-up does not always cover, and which would bias whichever model is measured first.
    """
    for _ in range(minimum):
        model(inputs)
    window = max(5, minimum)
    previous = statistics.median(time_runs(model, inputs, window))
    for count in range(1, SETTLE_MAX_WINDOWS + 1):
        current = statistics.median(time_runs(model, inputs, window))
        if abs(current - previous) <= SETTLE_TOLERANCE * previous:
            return minimum + window * (count + 1)
        previous = current
    return minimum + window * (SETTLE_MAX_WINDOWS + 1)


def _time_cpu(model: nn.Module, inputs: torch.Tensor, repeats: int) -> list[float]:
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(inputs)
        timings.append((time.perf_counter() - start) * 1e3)
    return timings


def _time_cuda(model: nn.Module, inputs: torch.Tensor, repeats: int) -> list[float]:
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    torch.cuda.synchronize()
    for start, end in pairs:
        start.record()
        model(inputs)
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in pairs]
