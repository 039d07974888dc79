"""Latency measured on the device the code runs on: warm-up, repeated timing, median / p90 / spread.

Never estimated from FLOPs. On a GPU each run is timed with CUDA events; on a CPU with perf_counter around
synchronous work, with the thread count fixed (to the trial's CPU allocation) so that measurements compare.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
) -> LatencyProfile:
    """Time `repeats` forward passes of a `batch_size` batch, after at least `warmup` passes and until settled.
    `execution_format` "2:4" runs the model on semi-structured sparse kernels where the device has them."""
    from autoprune.formats import timing_model

    device = torch.device(device)
    if device.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    model = model.eval().to(device=device, dtype=DTYPES[dtype])
    model, ran_as, note = timing_model(model, execution_format, device, DTYPES[dtype])
    inputs = torch.randn(batch_size, *input_size, device=device, dtype=DTYPES[dtype])
    time_runs = _time_cuda if device.type == "cuda" else _time_cpu
    warm_up(model, inputs, minimum=warmup, time_runs=time_runs)
    timings = time_runs(model, inputs, repeats)
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
        note=note,
    )


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
