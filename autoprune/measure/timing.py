"""Latency measured on the device the code runs on, as a comparison: a model is timed against its reference (the
dense model) in the same process, interleaved, and reported as a speedup with a confidence interval.

Never estimated from FLOPs. On a GPU each run is timed with CUDA events on the model's own device; on a CPU with
perf_counter around synchronous work, with the thread count fixed (to the trial's CPU allocation).

Why a comparison: on a shared machine the same structure times 1.7 ms in one search and 3.7 ms in the next, and a
trial timed while its neighbour trains looks slower than a dense model timed alone before. So the candidate and
the reference run in alternating short blocks (the same inputs, threads and recipe); a block's load hits both
alike, and the ratio of their block medians cancels it (stats.py). Blocks go on until the speedup's 95% interval is
within `tolerance` or `max_seconds` have passed; an interval that stays wider than WIDE is flagged. The latency in
ms is the speedup applied to the search's dense latency (`scale_ms`), so that every trial of a search is on one
scale; the reference's own median in the pass (`reference_ms`) and the node's conditions (conditions.py) are
recorded beside it, to show what the load made of the reference at the time.

How the model runs is part of the measurement and is recorded with it (formats.py's recipe): the kernels (dense or
2:4), the memory format (channels-last is often faster for CNNs, and "auto" times both, interleaved, and keeps the
faster) and whether `torch.compile` compiled it. A compile or a sparse kernel that fails is reported in the
profile's note, and the profile says what really ran.

The model timed is always a copy prepared for timing, never the caller's: timing runs under inference mode and in
another dtype, device or layout, and a model moved there in place would come back with rounded weights and
inference tensors that autograd refuses — and it is the model that heals next.
"""

from __future__ import annotations

import math
import platform
import statistics
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from autoprune.measure.conditions import watch
from autoprune.measure.formats import (
    AUTO,
    CHANNELS_LAST,
    CONTIGUOUS,
    DENSE,
    DTYPES,
    MEMORY_FORMATS,
    TORCH_DTYPES,
    ExecutionRecipe,
    join_notes,
    plan_kernels,
)
from autoprune.measure.runners import (
    Runner,
    calls_per_block,
    interleave,
    reference_runner,
    time_model,
    time_runs_on,
    warm_up,
)
from autoprune.measure.stats import EXACT, Speedup, percentile, relative_half_width, speedup_of

__all__ = ["LatencyProfile", "profile_latency", "profile_together", "time_model", "device_name", "percentile",
           "warm_up", "is_convolutional", "merge_profiles", "rescaled", "join_notes", "DTYPES",
           "MEMORY_FORMATS", "CONTIGUOUS", "CHANNELS_LAST", "AUTO", "WIDE"]

# Blocks go on until the speedup's 95% interval is within ±10% (a trial's: enough to decide whether it heals and
# to guide the sampler; a search's final pass over its front halves it)…
DEFAULT_TOLERANCE = 0.10
DEFAULT_MAX_SECONDS = 20.0  # …or this long has passed (per measurement)
WIDE = 0.15  # an interval still wider than ±15% at the end is flagged: the node was too busy to tell


@dataclass(frozen=True)
class LatencyProfile:
    """One latency measurement and everything that makes it comparable with another."""

    median_ms: float  # paired: the search's dense latency ÷ speedup; alone: the median of the timed runs
    p90_ms: float
    spread: float  # (p90 − p10) / median: relative spread of the repeated runs
    batch_size: int
    dtype: str
    device: str  # e.g. "NVIDIA H100 80GB HBM3" or "cpu: AMD EPYC 7B13 (1 thread)"
    threads: int
    repeats: int  # timed runs of this model
    input_size: tuple[int, int, int]
    torch_version: str
    format: str = "dense"  # the kernels that ran: dense, or 2:4 semi-structured (formats.py)
    note: str = ""  # e.g. why a 2:4 model was timed with dense kernels
    memory_format: str = CONTIGUOUS  # of the inputs and 4-d weights when timed
    compiled: bool = False  # torch.compile ran (False also when compiling was asked for and failed: see note)
    tf32: bool = False  # on a CUDA GPU, float32 matmuls and convolutions ran on TF32 tensor cores
    runtime: str = "torch"  # or onnxruntime: exported and run in ONNX Runtime (measure/onnx.py)
    # Against the reference (the dense model), interleaved in one process: its time ÷ this model's, with the 95%
    # interval (all 1.0: the reference itself, or timed alone), and the reference's median in that pass.
    speedup: float = 1.0
    speedup_low: float = 1.0
    speedup_high: float = 1.0
    reference_ms: float = 0.0  # 0: not paired
    log_ratios: tuple[float, ...] = ()  # the evidence, one per block: merged when a structure is timed again
    conditions: Mapping[str, Any] = field(default_factory=dict, compare=False)  # conditions.NodeConditions.as_dict()

    def as_dict(self) -> dict:
        return {**asdict(self), "conditions": dict(self.conditions)}

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> "LatencyProfile":
        """From `as_dict` (or JSON of it); fields added since a result was saved take their defaults."""
        return cls(**{**fields, "input_size": tuple(fields["input_size"]),
                      "log_ratios": tuple(fields.get("log_ratios", ())), "conditions": dict(fields.get("conditions", {}))})

    @property
    def paired(self) -> bool:
        return self.reference_ms > 0

    @property
    def half_width(self) -> float:
        """The speedup interval's relative half-width (0 when not paired: nothing to compare)."""
        return Speedup(self.speedup, self.speedup_low, self.speedup_high, 0).half_width if self.paired else 0.0

    @property
    def wide(self) -> bool:
        """Its interval stayed wider than ±WIDE: the node was too busy (or the time cap too short) to tell."""
        return self.half_width > WIDE

    @property
    def confidently_slower(self) -> bool:
        """Not faster than the reference, on evidence: the whole interval below 1, or the reference's own
        structure and kernels (a masked model, a 2:4 model on dense kernels)."""
        return self.speedup_high < 1.0 or (self.speedup_low == self.speedup_high == 1.0 and not self.log_ratios)

    def describe_speedup(self) -> str:
        if not self.paired:
            return "the dense structure" if self.speedup == 1.0 else ""
        return f"{self.speedup:.2f}× [{self.speedup_low:.2f}, {self.speedup_high:.2f}]"

    @property
    def recipe(self) -> ExecutionRecipe:
        """How the model ran when timed: what loading and serving it must reproduce."""
        device = "cpu" if self.device.startswith("cpu") else "cuda"  # device_name's two kinds of name
        return recipe_for(device, dtype=self.dtype, memory_format=self.memory_format, kernels=self.format,
                          compiled=self.compiled, tf32=self.tf32, runtime=self.runtime)


def recipe_for(device: str, *, dtype: str, memory_format: str, kernels: str, compiled: bool,
               tf32: bool, runtime: str = "torch") -> ExecutionRecipe:
    """The recipe a model is timed in on a kind of device: on a GPU cuDNN's autotuner is on (timing and serving
    run fixed shapes, which it picks the fastest algorithms for) and TF32 as the profile asks; a CPU has neither."""
    on_gpu = device == "cuda"
    return ExecutionRecipe(dtype, memory_format, kernels, compiled, device, tf32=tf32 and on_gpu,
                           cudnn_benchmark=on_gpu, runtime=runtime)


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
    tf32: bool = False,
    runtime: str = "torch",
    reference: nn.Module | None = None,
    reference_memory_format: str | None = None,
    scale_ms: float | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    max_seconds: float = DEFAULT_MAX_SECONDS,
) -> LatencyProfile:
    """Time forward passes of a `batch_size` batch: at least `repeats`, after `warmup` untimed ones, in blocks
    until the estimate is within `tolerance` (95%) or `max_seconds` have passed.

    With `reference` (the dense model), the two are timed interleaved and the profile is a speedup with its
    interval; its `median_ms` is `scale_ms` (the search's dense latency; by default the reference's median in this
    pass) ÷ speedup. The reference runs dense kernels in `reference_memory_format` (default: `memory_format`).
    `model` itself is left as it came (a prepared copy is timed). `execution_format` "2:4" runs the model on
    semi-structured sparse kernels where the device has them; `memory_format` "auto" times a convolutional model
    both contiguous and channels-last and keeps the faster; `compile` times `torch.compile(model)` (its
    compilation happens before the warm-up, untimed); `tf32` lets a GPU's float32 matmuls use TF32; `runtime`
    "onnxruntime" exports both models to ONNX and times them in ONNX Runtime (float32, its own layout)."""
    for name, value in (("memory_format", memory_format), ("reference_memory_format", reference_memory_format)):
        if value is not None and value not in MEMORY_FORMATS:
            raise ValueError(f"{name} {value!r}: choose one of {', '.join(MEMORY_FORMATS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if not 0 < tolerance < 1:
        raise ValueError(f"`0 < tolerance < 1` must hold, but got {tolerance=}.")
    device = torch.device(device)
    if device.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    kernels, note = plan_kernels(model, execution_format, device, TORCH_DTYPES[dtype], runtime)
    if runtime == "onnxruntime":
        dtype, memory_format, compile = "float32", CONTIGUOUS, False  # what ONNX Runtime runs here
    shape = (batch_size, *input_size)
    with watch(device) as window:
        def recipe(layout: str, kernels: str) -> ExecutionRecipe:
            return recipe_for(device.type, dtype=dtype, memory_format=layout, kernels=kernels, compiled=compile,
                              tf32=tf32, runtime=runtime)

        candidates = [Runner.prepare(model, recipe(layout, kernels), shape, device)
                      for layout in _layouts(model, memory_format)]
        references = [] if reference is None else [
            reference_runner(reference, recipe(layout, DENSE), shape, device)
            for layout in _layouts(reference, reference_memory_format or memory_format)]
        runners = [*references, *candidates]
        time_runs = time_runs_on(device)
        for runner in runners:
            runner.warm(warmup, time_runs, settle=reference is None)
        calls = calls_per_block(runners)
        converged = _paired_converged(len(references), tolerance) if references else _alone_converged(tolerance)
        # Paired, `repeats` passes are split between the model and the dense model: the interval, not the count,
        # says when the speedup is known (and blocks go on until it is), so timing both in full would only cost.
        min_calls = math.ceil(repeats / 2) if references else repeats
        blocks = interleave(runners, time_runs, calls=calls, min_calls=min_calls, converged=converged,
                            max_seconds=max_seconds)
    medians = [[statistics.median(block) for block in runner_blocks] for runner_blocks in blocks]
    if references:
        ref = min(range(len(references)), key=lambda index: statistics.median(medians[index]))
        speedups = [speedup_of(_log_ratios(medians[ref], medians[index]))
                    for index in range(len(references), len(runners))]
        best = max(range(len(candidates)), key=lambda index: speedups[index].ratio)
        speedup, log_ratios = speedups[best], _log_ratios(medians[ref], medians[len(references) + best])
        reference_ms = statistics.median(_flat(blocks[ref]))
    else:
        best = min(range(len(candidates)), key=lambda index: statistics.median(medians[index]))
        speedup, log_ratios, reference_ms = EXACT, (), 0.0
    chosen = candidates[best]
    timings = _flat(blocks[len(references) + best])
    if len(candidates) > 1:
        others = [statistics.median(_flat(blocks[len(references) + index])) for index in range(len(candidates))]
        note = join_notes(note, f"{chosen.recipe.memory_format} kept: {max(others) / min(others):.2f}× faster than"
                                " the other memory format")
    own_median = statistics.median(timings)
    median = (scale_ms or reference_ms) / speedup.ratio if references else own_median
    return LatencyProfile(
        median_ms=median,
        p90_ms=median * percentile(timings, 0.9) / own_median,
        spread=(percentile(timings, 0.9) - percentile(timings, 0.1)) / own_median,
        batch_size=batch_size,
        dtype=dtype,
        device=device_name(device, threads),
        threads=threads,
        repeats=len(timings),
        input_size=tuple(input_size),
        torch_version=torch.__version__,
        format=chosen.recipe.kernels,
        note=join_notes(note, chosen.note),
        memory_format=chosen.recipe.memory_format,
        compiled=chosen.recipe.compiled,
        tf32=chosen.recipe.tf32,
        runtime=chosen.recipe.runtime,
        speedup=speedup.ratio,
        speedup_low=speedup.low,
        speedup_high=speedup.high,
        reference_ms=reference_ms,
        log_ratios=tuple(log_ratios),
        conditions=window.conditions.as_dict(),
    )


def profile_together(
    reference: nn.Module,
    candidates: Sequence[tuple[nn.Module, ExecutionRecipe]],
    *,
    reference_recipe: ExecutionRecipe,
    input_size: tuple[int, int, int],
    batch_size: int,
    warmup: int,
    repeats: int,
    device: torch.device | str,
    threads: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    max_seconds: float = DEFAULT_MAX_SECONDS,
) -> tuple[LatencyProfile, list[LatencyProfile]]:
    """The reference and every candidate, each in its recipe, timed in one interleaved pass: the reference's own
    profile, and each candidate's speedup against it put on the reference's median in this pass. What a search's
    final re-timing does with its front (driver/retime.py): one pass, one set of conditions, one scale."""
    device = torch.device(device)
    if device.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    shape = (batch_size, *input_size)
    with watch(device) as window:
        runners = [reference_runner(reference, reference_recipe, shape, device),
                   *(Runner.prepare(model, recipe, shape, device) for model, recipe in candidates)]
        time_runs = time_runs_on(device)
        for runner in runners:
            runner.warm(warmup, time_runs, settle=False)
        calls = calls_per_block(runners)
        blocks = interleave(runners, time_runs, calls=calls, min_calls=repeats,
                            converged=_paired_converged(1, tolerance), max_seconds=max_seconds)
    conditions = window.conditions.as_dict()
    reference_timings = _flat(blocks[0])
    reference_ms = statistics.median(reference_timings)
    reference_medians = [statistics.median(block) for block in blocks[0]]
    common = dict(batch_size=batch_size, device=device_name(device, threads), threads=threads,
                  input_size=tuple(input_size), torch_version=torch.__version__, conditions=conditions)
    dense = LatencyProfile(
        median_ms=reference_ms, p90_ms=percentile(reference_timings, 0.9),
        spread=(percentile(reference_timings, 0.9) - percentile(reference_timings, 0.1)) / reference_ms,
        dtype=runners[0].recipe.dtype, repeats=len(reference_timings), format=runners[0].recipe.kernels,
        memory_format=runners[0].recipe.memory_format, compiled=runners[0].recipe.compiled,
        tf32=runners[0].recipe.tf32, runtime=runners[0].recipe.runtime, **common)
    profiles = []
    for runner, runner_blocks in zip(runners[1:], blocks[1:]):
        timings = _flat(runner_blocks)
        log_ratios = _log_ratios(reference_medians, [statistics.median(block) for block in runner_blocks])
        speedup = speedup_of(log_ratios)
        own, median = statistics.median(timings), reference_ms / speedup.ratio
        profiles.append(LatencyProfile(
            median_ms=median, p90_ms=median * percentile(timings, 0.9) / own,
            spread=(percentile(timings, 0.9) - percentile(timings, 0.1)) / own, dtype=runner.recipe.dtype,
            repeats=len(timings), format=runner.recipe.kernels, note=runner.note,
            memory_format=runner.recipe.memory_format, compiled=runner.recipe.compiled, tf32=runner.recipe.tf32,
            runtime=runner.recipe.runtime,
            speedup=speedup.ratio,
            speedup_low=speedup.low, speedup_high=speedup.high, reference_ms=reference_ms,
            log_ratios=tuple(log_ratios), **common))
    return dense, profiles


def merge_profiles(stored: LatencyProfile, fresh: LatencyProfile) -> LatencyProfile:
    """Two measurements of one structure (under one recipe) as one: their blocks' evidence pooled. Profiles timed
    alone (the dense model's) have no evidence to pool: the first stays."""
    if not (stored.log_ratios and fresh.log_ratios):
        return stored
    log_ratios = stored.log_ratios + fresh.log_ratios
    speedup = speedup_of(log_ratios)
    scale = stored.median_ms * stored.speedup  # the dense latency both were put on
    median = scale / speedup.ratio
    return replace(fresh, median_ms=median, p90_ms=median * fresh.p90_ms / fresh.median_ms,
                   repeats=stored.repeats + fresh.repeats, speedup=speedup.ratio, speedup_low=speedup.low,
                   speedup_high=speedup.high, log_ratios=log_ratios, note=join_notes(stored.note, fresh.note))


def rescaled(profile: LatencyProfile, scale_ms: float) -> LatencyProfile:
    """`profile` put on another dense latency (its speedup unchanged): what the final re-timing does to the
    trials it did not time again, so that a search's latencies share one scale."""
    median = scale_ms / profile.speedup
    return replace(profile, median_ms=median, p90_ms=median * profile.p90_ms / profile.median_ms)


def is_convolutional(model: nn.Module) -> bool:
    """More than one 2-d convolution: a CNN, not a transformer whose only convolution embeds the patches."""
    return sum(isinstance(module, nn.Conv2d) for module in model.modules()) > 1


def _layouts(model: nn.Module, memory_format: str) -> list[str]:
    if memory_format != AUTO:
        return [memory_format]
    return [CONTIGUOUS, CHANNELS_LAST] if is_convolutional(model) else [CONTIGUOUS]


def _flat(blocks: Sequence[Sequence[float]]) -> list[float]:
    return [value for block in blocks for value in block]


def _log_ratios(reference: Sequence[float], candidate: Sequence[float]) -> list[float]:
    return [math.log(ref / cand) for ref, cand in zip(reference, candidate)]


def _paired_converged(references: int, tolerance: float):
    """Done when every candidate's speedup against every reference layout is known within `tolerance`."""
    def converged(medians: list[list[float]]) -> bool:
        return all(speedup_of(_log_ratios(medians[ref], medians[index])).half_width <= tolerance
                   for ref in range(references) for index in range(references, len(medians)))
    return converged


def _alone_converged(tolerance: float):
    """Done when every runner's typical block median is known within `tolerance`."""
    def converged(medians: list[list[float]]) -> bool:
        return all(relative_half_width(runner) <= tolerance for runner in medians)
    return converged
