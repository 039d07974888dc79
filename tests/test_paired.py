"""Latency as a comparison: a model timed against the dense model in the same process, interleaved, reported as a
speedup with a confidence interval — on a quiet machine and beside a busy process the test starts and stops."""

from __future__ import annotations

import math

import pytest
import torch

from autoprune.bench.latency import shrink
from autoprune.measure.cache import LocalLatencyCache
from autoprune.measure.stats import EXACT, speedup_of
from autoprune.measure.timing import merge_profiles, profile_latency, profile_together, rescaled
from autoprune.testing.load import busy_processes
from autoprune.testing.models import TINY_RESNET

# Wide enough that removing channels shows in the latency on one CPU thread (a narrower model is all overhead).
VIT = ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2,
                                "global_pool": "avg", "class_token": False}, 32)
CNN = ("resnet18", {"layers": (1, 1, 1, 1), "channels": (32, 64, 128, 256)}, 8)  # BatchNorm everywhere


def _pair(family):
    import timm

    name, kwargs, batch = family
    torch.manual_seed(0)
    dense = timm.create_model(name, num_classes=10, **kwargs).eval()
    return dense, shrink(dense, 0.75, 8), batch


def test_speedup_statistics():
    assert speedup_of([math.log(2.0)] * 5).ratio == pytest.approx(2.0)
    assert speedup_of([math.log(2.0)] * 5).half_width == pytest.approx(0.0)
    noisy = speedup_of([0.1, 0.3, 0.2, 0.25, 0.15])
    assert noisy.low < noisy.ratio < noisy.high and noisy.ratio == pytest.approx(math.exp(0.2))
    assert speedup_of([0.1, 0.3]).half_width > noisy.half_width  # fewer blocks: a wider interval
    assert EXACT.half_width == 0 and speedup_of([0.2]).high == math.inf


@pytest.mark.parametrize("family", [VIT, CNN], ids=["vit", "cnn"])
def test_a_pruned_model_is_timed_against_its_dense_model(family):
    dense, pruned, batch = _pair(family)
    profile = profile_latency(pruned, input_size=(3, 32, 32), batch_size=batch, warmup=3, repeats=20, threads=1,
                              memory_format="auto", reference=dense)
    assert profile.paired and profile.reference_ms > 0 and profile.repeats >= 10  # half of 20: the other half dense
    assert profile.speedup_low > 1.0, profile  # three quarters of the channels gone: faster, with confidence
    assert profile.speedup_low <= profile.speedup <= profile.speedup_high
    assert profile.median_ms == pytest.approx(profile.reference_ms / profile.speedup)
    assert len(profile.log_ratios) >= 6 and profile.conditions["cpus"] >= 1
    scaled = profile_latency(pruned, input_size=(3, 32, 32), batch_size=batch, warmup=3, repeats=20, threads=1,
                             reference=dense, scale_ms=10.0)
    assert scaled.median_ms == pytest.approx(10.0 / scaled.speedup)  # on the search's dense latency
    assert dense.training is False and all(p.requires_grad for p in dense.parameters())  # left as it came


def test_the_reference_against_itself_is_about_one():
    dense, _, batch = _pair(VIT)
    profile = profile_latency(dense, input_size=(3, 32, 32), batch_size=batch, warmup=3, repeats=20, threads=1,
                              reference=dense, tolerance=0.03)
    assert profile.speedup_low <= 1.0 <= profile.speedup_high or abs(profile.speedup - 1) < 0.05, profile


def test_measurements_of_one_structure_merge_and_put_on_a_new_scale():
    dense, pruned, batch = _pair(VIT)
    kwargs = dict(input_size=(3, 32, 32), batch_size=batch, warmup=3, repeats=12, threads=1, reference=dense,
                  scale_ms=5.0)
    first, second = profile_latency(pruned, **kwargs), profile_latency(pruned, **kwargs)
    merged = merge_profiles(first, second)
    assert merged.log_ratios == first.log_ratios + second.log_ratios
    assert merged.repeats == first.repeats + second.repeats
    assert merged.speedup == pytest.approx(speedup_of(merged.log_ratios).ratio)
    assert merged.median_ms == pytest.approx(5.0 / merged.speedup)  # the scale both were put on
    cache = LocalLatencyCache()
    cache.put("k", first)
    assert cache.put("k", second) == merged and cache.get("k") == merged  # the cache pools, it does not keep one
    assert rescaled(merged, 8.0).median_ms == pytest.approx(8.0 / merged.speedup)


def test_the_front_is_timed_together_in_one_pass():
    dense, pruned, batch = _pair(VIT)
    half = shrink(dense, 0.5, 8)
    from autoprune.measure.formats import ExecutionRecipe

    recipe = ExecutionRecipe()
    reference, (fast, medium) = profile_together(dense, [(pruned, recipe), (half, recipe)], reference_recipe=recipe,
                                                 input_size=(3, 32, 32), batch_size=batch, warmup=3, repeats=12,
                                                 device="cpu", threads=1)
    assert not reference.paired and reference.median_ms > 0
    assert fast.reference_ms == medium.reference_ms == reference.median_ms  # one pass, one scale
    assert fast.speedup > medium.speedup > 1.0 and fast.median_ms < medium.median_ms < reference.median_ms


@pytest.mark.parametrize("family", [VIT, CNN], ids=["vit", "cnn"])
def test_a_busy_neighbour_does_not_make_a_faster_model_look_slower(family):
    """What broke the searches: a dense model timed alone and a trial timed beside a busy process. Paired, the
    decision holds: the pruned model is not confidently slower, whatever the neighbour does to both."""
    dense, pruned, batch = _pair(family)
    with busy_processes(2) as pids:  # as many as this machine's CPUs in CI: the worst a trial worker meets
        profile = profile_latency(pruned, input_size=(3, 32, 32), batch_size=batch, warmup=3, repeats=20, threads=1,
                                  reference=dense, max_seconds=10)
    assert len(pids) == 2 and profile.conditions["busy_processes"] >= 1
    assert not profile.confidently_slower and profile.speedup > 1.0, profile


def test_a_missing_tolerance_is_an_error():
    dense, pruned, batch = _pair(VIT)
    with pytest.raises(ValueError, match="tolerance"):
        profile_latency(pruned, input_size=(3, 32, 32), reference=dense, tolerance=0)


def test_the_tiny_cnn_pair_runs_channels_last():
    """A CNN with BatchNorm timed in both layouts keeps the faster, and its reference runs the dense model's."""
    dense = TINY_RESNET.create().eval()
    profile = profile_latency(shrink(dense, 0.5, 8), input_size=(3, 32, 32), batch_size=2, warmup=2, repeats=6,
                              threads=1, memory_format="auto", reference=dense, reference_memory_format="channels_last",
                              max_seconds=3)
    assert profile.memory_format in ("contiguous", "channels_last") and "faster than the other" in profile.note
    assert profile.paired
