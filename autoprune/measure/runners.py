"""How a model is run to be timed: a copy prepared in its recipe that has run once (prepared.py), warm, on inputs of
its dtype and layout (`Runner`), and several of them timed in turns (`interleave`) — the mechanics under
timing.py's measurements.

A reference (the dense model) is prepared once per process and kept warm (`reference_runner`): every trial a
worker runs is paired with the same dense structure, and preparing (or compiling) it once per trial would double
what profiling costs.
"""

from __future__ import annotations

import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from autoprune.measure.formats import CHANNELS_LAST, TORCH_DTYPES, ExecutionRecipe
from autoprune.measure.prepared import PreparedModel

MIN_BLOCKS = 6  # fewer blocks give a t-interval too wide to decide anything
BLOCK_MS = 20.0  # each runner's share of a block: long enough to beat timer jitter, short enough that a change
MAX_CALLS_PER_BLOCK = 10  # of load hits every runner of the block alike


def calls_per_block(runners: Sequence["Runner"]) -> int:
    """Passes per runner in a block: BLOCK_MS of the slowest runner, 1 to MAX_CALLS_PER_BLOCK."""
    return max(1, min(MAX_CALLS_PER_BLOCK, round(BLOCK_MS / max(runner.estimate_ms for runner in runners))))


def time_runs_on(device: torch.device):
    """The timer for a device: CUDA events on a GPU, perf_counter around synchronous work on a CPU."""
    return _time_cuda if device.type == "cuda" else _time_cpu


def interleave(runners: Sequence["Runner"], time_runs, *, calls: int, min_calls: int, converged,
               max_seconds: float) -> list[list[list[float]]]:
    """Time the runners in turns, `calls` passes each per block, until at least MIN_BLOCKS blocks and `min_calls`
    passes each, and `converged(block medians)` holds — or, after MIN_BLOCKS blocks, `max_seconds` have passed.
    The order rotates from block to block, so that no runner always follows the same one (for two: AB BA AB …).
    Returns each runner's blocks."""
    blocks: list[list[list[float]]] = [[] for _ in runners]
    started, count = time.perf_counter(), 0
    with torch.inference_mode():
        while True:
            start = count % len(runners)
            for index in [*range(start, len(runners)), *range(start)]:
                blocks[index].append(time_runs(runners[index].module, runners[index].inputs, calls))
            count += 1
            if count >= MIN_BLOCKS:
                if time.perf_counter() - started > max_seconds:  # a slow model on a busy node: what there is
                    return blocks
                if count * calls >= min_calls and converged(
                        [[statistics.median(block) for block in runner] for runner in blocks]):
                    return blocks


@dataclass
class Runner:
    """A copy of a model prepared in a recipe, its inputs, and what warming it up showed."""

    module: nn.Module
    recipe: ExecutionRecipe
    note: str
    inputs: torch.Tensor
    estimate_ms: float = 0.0  # a pass's time after the warm-up: sizes the blocks
    warmed: bool = False

    @classmethod
    def prepare(cls, model: nn.Module, recipe: ExecutionRecipe, shape, device: torch.device) -> "Runner":
        prepared = PreparedModel.build(model, recipe, device, shape)
        return cls(prepared.module, prepared.recipe, prepared.note, timing_inputs(shape, prepared.recipe, device))

    def warm(self, minimum: int, time_runs, *, settle: bool) -> None:
        """`minimum` untimed passes (and, for a measurement on its own, until settled: see `warm_up`); once."""
        with torch.inference_mode():
            if not self.warmed:
                if settle:
                    warm_up(self.module, self.inputs, minimum=minimum, time_runs=time_runs)
                else:
                    for _ in range(minimum):
                        self.module(self.inputs)
                self.warmed = True
            self.estimate_ms = statistics.median(time_runs(self.module, self.inputs, 3))


def timing_inputs(shape, recipe: ExecutionRecipe, device: torch.device) -> torch.Tensor:
    """The batch every runner of a measurement gets: the same values (seeded), in the runner's dtype and layout."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(shape, generator=generator).to(device=device, dtype=TORCH_DTYPES[recipe.dtype])
    return inputs.contiguous(memory_format=torch.channels_last) if recipe.memory_format == CHANNELS_LAST else inputs


_REFERENCES: "OrderedDict[tuple, Runner]" = OrderedDict()  # prepared, warm references, most recent last
KEPT_REFERENCES = 4


def reference_runner(reference: nn.Module, recipe: ExecutionRecipe, shape, device: torch.device) -> Runner:
    """The reference prepared in `recipe`, kept warm in this process: every trial a worker runs is paired with the
    same dense structure, which is prepared (and compiled) once rather than once per trial. Latency depends on
    the structure, not the weights, so the structure is the key."""
    key = (type(reference).__name__, tuple((name, tuple(t.shape)) for name, t in reference.state_dict().items()),
           recipe, tuple(shape), str(device), torch.get_num_threads())
    if key in _REFERENCES:
        _REFERENCES.move_to_end(key)
        return _REFERENCES[key]
    runner = Runner.prepare(reference, recipe, shape, device)
    _REFERENCES[key] = runner
    while len(_REFERENCES) > KEPT_REFERENCES:
        _REFERENCES.popitem(last=False)
    return runner


def time_model(runner, inputs: torch.Tensor, *, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of `repeats` calls of a ready-to-run model on `inputs` (on its device), after at least
    `warmup` calls and until settled, under inference mode: what a benchmark does to a model as loaded or served."""
    time_runs = time_runs_on(inputs.device)
    with torch.inference_mode():
        warm_up(runner, inputs, minimum=warmup, time_runs=time_runs)
        return time_runs(runner, inputs, repeats)


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
    """CUDA events recorded on the inputs' own device (the trial's GPU, which need not be the current device), and
    that device synchronised: events on another device would time nothing of this model."""
    device = inputs.device
    with torch.cuda.device(device):
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        torch.cuda.synchronize(device)
        for start, end in pairs:
            start.record()
            model(inputs)
            end.record()
        torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in pairs]
