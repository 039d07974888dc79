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


def _cnn():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 4))


def test_auto_memory_format_times_a_cnn_both_ways_and_keeps_the_faster():
    model = _cnn()
    profile = profile_latency(model, input_size=(3, 16, 16), batch_size=2, warmup=1, repeats=5, threads=1,
                              memory_format="auto")
    assert profile.memory_format in ("contiguous", "channels_last") and "faster than the other" in profile.note
    assert model[0].weight.is_contiguous()  # the caller's model comes back in its own layout
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    only = profile_latency(linear, input_size=(3, 8, 8), warmup=1, repeats=3, threads=1, memory_format="auto")
    assert only.memory_format == "contiguous" and only.note == ""  # nothing to gain: timed once
    forced = profile_latency(_cnn(), input_size=(3, 16, 16), warmup=1, repeats=3, threads=1,
                             memory_format="channels_last")
    assert forced.memory_format == "channels_last" and forced.note == ""
    with pytest.raises(ValueError, match="channels_last"):
        profile_latency(model, input_size=(3, 16, 16), memory_format="nhwc")


def test_compile_is_recorded_and_a_failed_compile_is_reported(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 4))
    compiled = profile_latency(model, input_size=(3, 4, 4), warmup=1, repeats=3, threads=1, compile=True)
    assert compiled.compiled and compiled.note == ""

    def broken(model, **kwargs):
        raise RuntimeError("no compiler for this backend\nmore detail")

    monkeypatch.setattr(torch, "compile", broken)
    eager = profile_latency(model, input_size=(3, 4, 4), warmup=1, repeats=3, threads=1, compile=True)
    assert not eager.compiled and "torch.compile failed (RuntimeError: no compiler for this backend)" in eager.note
