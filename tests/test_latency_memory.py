"""An extra batch size (logged beside the objective's) that does not fit in memory is left out and recorded, not a
failed trial; the objective's batch size running out of memory still fails it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprune.config import ProfileSpec
from autoprune.measure.cache import LocalLatencyCache
from autoprune.measure.latency import measure_latency


class FitsUpTo(nn.Module):
    """A small conv net that raises what CUDA raises when a batch exceeds `limit` (a CPU has no such limit)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory: batch {x.shape[0]} (a test model)")
        return self.conv(x).mean((2, 3))


def _measure(model: nn.Module, batch_size: int, extra: tuple[int, ...]):
    settings = ProfileSpec(batch_size=batch_size, extra_batch_sizes=extra, warmup=1, repeats=3, max_seconds=5)
    return measure_latency(model, "dense", settings, (3, 16, 16), device=torch.device("cpu"), threads=1,
                           cache=LocalLatencyCache(), reference=FitsUpTo(1024))


def test_an_extra_batch_size_that_runs_out_of_memory_is_left_out_and_recorded():
    latencies = _measure(FitsUpTo(8), 4, (1, 64))
    assert latencies.objective.batch_size == 4 and set(latencies.extra) == {1}
    assert "batch size 64 ran out of memory: not timed" in latencies.objective.note


def test_the_objectives_batch_size_running_out_of_memory_still_fails():
    with pytest.raises(torch.OutOfMemoryError):
        _measure(FitsUpTo(8), 16, (1,))
