"""The latency profiler's statistics and the record that makes a measurement comparable."""

import pytest
import torch

from autoprune.profile import percentile, profile_latency


def test_percentile_interpolates():
    assert percentile([1, 2, 3, 4, 5], 0.5) == 3
    assert percentile([1, 2, 3, 4, 5], 0.9) == pytest.approx(4.6)


def test_profile_records_what_makes_it_comparable():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    profile = profile_latency(model, input_size=(3, 8, 8), batch_size=4, warmup=2, repeats=7, threads=1)
    assert profile.repeats == 7 and profile.batch_size == 4 and profile.threads == 1
    assert profile.device.startswith("cpu: ") and "1 thread" in profile.device
    assert 0 < profile.median_ms <= profile.p90_ms
    assert profile.spread >= 0
    assert profile.torch_version == torch.__version__


def test_warm_up_runs_until_timings_settle():
    from autoprune.profile import warm_up

    calls = []
    drifting = iter([[10.0] * 5, [5.0] * 5, [2.0] * 5, [1.0] * 5, [1.02] * 5] + [[1.0] * 5] * 30)

    def time_runs(model, inputs, count):
        calls.append(count)
        return next(drifting)

    passes = warm_up(lambda x: x, torch.zeros(1), minimum=2, time_runs=time_runs)
    assert len(calls) == 5  # 10 → 5 → 2 → 1 → 1.02: settled at the fifth window
    assert passes == 2 + 5 * 5
