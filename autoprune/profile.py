"""Latency measured on the device the code runs on: warm-up, repeated timing, median / p90 / spread.

Never estimated from FLOPs. On a GPU each run is timed with CUDA events; on a CPU with perf_counter around
synchronous work, with the thread count fixed (to the trial's CPU allocation) so that measurements compare.

How the model runs is part of the measurement and is recorded with it: the kernels (dense or 2:4, formats.py),
the memory format (channels-last is often faster for CNNs, and "auto" times both and keeps the faster) and
whether `torch.compile` compiled it. A compile that fails is reported in the profile's note, not hidden.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CONTIGUOUS, CHANNELS_LAST, AUTO = "contiguous", "channels_last", "auto"
MEMORY_FORMATS = (CONTIGUOUS, CHANNELS_LAST, AUTO)


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


@torch.inference_mode()
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
    execution_format: str = "dense",
    memory_format: str = CONTIGUOUS,
    compile: bool = False,
) -> LatencyProfile:
    """Time `repeats` forward passes of a `batch_size` batch, after at least `warmup` passes and until settled.

    `execution_format` "2:4" runs the model on semi-structured sparse kernels where the device has them;
    `memory_format` "auto" times a convolutional model both contiguous and channels-last and keeps the faster;
    `compile` times `torch.compile(model)` (its compilation happens during the warm-up, untimed)."""
    from autoprune.formats import timing_model

    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format {memory_format!r}: choose one of {', '.join(MEMORY_FORMATS)}")
    device = torch.device(device)
    if device.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    model = model.eval().to(device=device, dtype=DTYPES[dtype])
    model, ran_as, note = timing_model(model, execution_format, device, DTYPES[dtype])
    inputs = torch.randn(batch_size, *input_size, device=device, dtype=DTYPES[dtype])
    candidates = [memory_format] if memory_format != AUTO else (
        [CONTIGUOUS, CHANNELS_LAST] if is_convolutional(model) else [CONTIGUOUS])
    runs = [_timed(model, inputs, layout, compile, warmup, repeats, device) for layout in candidates]
    timings, layout, compiled, compile_note = min(runs, key=lambda run: statistics.median(run[0]))
    if len(runs) > 1:
        other = max(statistics.median(run[0]) for run in runs) / statistics.median(timings)
        note = _join(note, f"{layout} kept: {other:.2f}× faster than the other memory format")
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
        format=ran_as,
        note=_join(note, compile_note),
        memory_format=layout,
        compiled=compiled,
    )


def is_convolutional(model: nn.Module) -> bool:
    """More than one 2-d convolution: a CNN, not a transformer whose only convolution embeds the patches."""
    return sum(isinstance(module, nn.Conv2d) for module in model.modules()) > 1


def _timed(model, inputs, layout, compile, warmup, repeats, device) -> tuple[list[float], str, bool, str]:
    """Warm up and time `model` in memory format `layout`: (timings, layout, compiled, note)."""
    if layout == CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)  # 4-d weights only; Linear layers are unchanged
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    time_runs = _time_cuda if device.type == "cuda" else _time_cpu
    runner, compiled, note = model, False, ""
    if compile:
        try:
            runner = torch.compile(model)
            runner(inputs)  # compiles now, so that a failure is caught here and the warm-up times steady state
            compiled = True
        except Exception as error:  # noqa: BLE001 — any compiler failure: time the eager model and say why
            runner, note = model, f"torch.compile failed ({type(error).__name__}: {str(error).splitlines()[0][:160]}): timed eager"
    warm_up(runner, inputs, minimum=warmup, time_runs=time_runs)
    timings = time_runs(runner, inputs, repeats)
    if layout == CHANNELS_LAST:
        model.to(memory_format=torch.contiguous_format)  # leave the caller's model as it came
    return timings, layout, compiled, note


def _join(*notes: str) -> str:
    return "; ".join(note for note in notes if note)


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
