"""The latency profiler's statistics and the record that makes a measurement comparable."""

import pytest
import torch

from autoprune.measure.timing import percentile, profile_latency


def test_percentile_interpolates():
    assert percentile([1, 2, 3, 4, 5], 0.5) == 3
    assert percentile([1, 2, 3, 4, 5], 0.9) == pytest.approx(4.6)


def test_profile_records_what_makes_it_comparable():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    profile = profile_latency(model, input_size=(3, 8, 8), batch_size=4, warmup=2, repeats=7, threads=1)
    assert profile.repeats >= 7 and profile.batch_size == 4 and profile.threads == 1  # at least: until precise
    assert profile.device.startswith("cpu: ") and "1 thread" in profile.device
    assert 0 < profile.median_ms <= profile.p90_ms
    assert profile.spread >= 0
    assert profile.torch_version == torch.__version__


def test_warm_up_runs_until_timings_settle():
    from autoprune.measure.timing import warm_up

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


# ---- the model that is timed is never the model that heals ---------------------------------------------------


def _state(model):
    return {name: (tensor.data_ptr(), tensor.dtype, tensor.clone()) for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize(("memory_format", "dtype"), [("channels_last", "float32"), ("auto", "float32"),
                                                      ("contiguous", "bfloat16"), ("auto", "bfloat16")])
def test_profiling_leaves_the_model_as_it_came_and_trainable(memory_format, dtype):
    """A CNN with BatchNorm, timed in another layout or dtype under inference mode: its own tensors are untouched
    (same storage, dtype and values, none an inference tensor) and it still trains, BatchNorm counters included."""
    from conftest import TINY_RESNET

    torch.manual_seed(0)
    model = TINY_RESNET.create().train()
    before = _state(model)
    profile = profile_latency(model, input_size=(3, 16, 16), batch_size=2, warmup=1, repeats=3, threads=1,
                              memory_format=memory_format, dtype=dtype)
    assert profile.dtype == dtype
    for name, tensor in model.state_dict().items():
        pointer, kind, values = before[name]
        assert tensor.data_ptr() == pointer and tensor.dtype == kind and torch.equal(tensor, values), name
        assert not tensor.is_inference(), name
    assert model.conv1.weight.is_contiguous()
    model.train()
    loss = model(torch.randn(4, 3, 16, 16)).square().mean()
    loss.backward()  # "Inference tensors cannot be saved for backward" when the profile moved the model in place
    assert model.bn1.num_batches_tracked.item() == before["bn1.num_batches_tracked"][2].item() + 1


def test_a_sparse_kernel_failing_at_its_first_call_is_timed_dense_with_the_reason(monkeypatch):
    """Conversion can succeed and the kernels still fail on the first forward (a shape or device they do not
    take): the profile falls back to dense kernels and says why, rather than failing the trial."""
    import autoprune.measure.prepared as prepared
    import autoprune.measure.timing as profile_module

    def converted_but_broken(model, dtype):
        def fail(module, args):
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        for layer in linears:
            layer.register_forward_pre_hook(fail)
        return len(linears)

    for module in (profile_module, prepared):  # as if this CPU had the kernels
        monkeypatch.setattr(module, "plan_kernels", lambda *args: ("2:4", ""))
    monkeypatch.setattr(prepared, "to_semi_structured", converted_but_broken)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 8))
    profile = profile_latency(model, input_size=(3, 4, 4), warmup=1, repeats=3, threads=1, execution_format="2:4")
    assert profile.format == "dense" and profile.recipe.kernels == "dense"
    assert "2:4 sparse kernels failed (RuntimeError: CUDA error: no kernel image" in profile.note


def test_each_compiled_structure_is_compiled_and_a_silent_eager_fallback_is_recorded(monkeypatch):
    """A reused worker compiles structure after structure: past dynamo's recompile limit, torch.compile runs eager
    without a word. Each profile resets dynamo first; and if a compile still captured nothing, the profile says so
    instead of `compiled: true`. (Dynamo's real graph capture, with its `eager` backend to keep the test fast.)"""
    import functools

    import torch._dynamo

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))

    def mlp(width):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, width), torch.nn.ReLU(),
                                   torch.nn.Linear(width, 3))

    # dynamo's own patch: pytest's monkeypatch, undoing it, deletes the alias from dynamo's config for good
    with torch._dynamo.config.patch(recompile_limit=1):
        profiles = [profile_latency(mlp(width), input_size=(3, 2, 2), warmup=1, repeats=3, threads=1, compile=True)
                    for width in (4, 5, 6)]
        assert all(p.compiled and p.note == "" for p in profiles)
        monkeypatch.setattr(torch._dynamo, "reset", lambda: None)  # what a worker without the reset went through
        stale = [profile_latency(mlp(width), input_size=(3, 2, 2), warmup=1, repeats=3, threads=1, compile=True)
                 for width in (7, 8)]
    assert not stale[-1].compiled and "captured no graph" in stale[-1].note
