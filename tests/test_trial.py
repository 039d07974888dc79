"""`run_trial` without Ray: the whole pipeline on a tiny model, and the early stop on a missed latency target."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import TEST_ACCELERATOR, TINY_VIT

from autoprune.config import HealConfig, ProfileSpec, PruneConfig, TrialConfig
from autoprune.result import STAGES, TrialResult
from autoprune.saved import load_model_dir
from autoprune.tracking.schema import report, result_from_report
from autoprune.trial import TrialContext, run_trial

PROFILE = ProfileSpec(batch_size=2, warmup=1, repeats=3)


@pytest.fixture(scope="module")
def context(bundle):
    torch.manual_seed(0)
    return TrialContext(TINY_VIT, TINY_VIT.create().state_dict(), bundle, PROFILE)


CONFIG = TrialConfig(
    PruneConfig("structured", {"blocks.0.mlp": 0.5, "blocks.1.mlp": 0.75, "blocks.0.attn": 0.5, "blocks.1.attn": 0.5},
                {"round_to": 1, "heads": True}),
    HealConfig("finetune", calibration_images=32, steps=3, lr=1e-3, batch_size=8, options={"label_smoothing": 0.1}),
)


def test_a_trial_measures_everything_and_saves_its_model(context, tmp_path, example):
    result = run_trial(CONFIG, context, save_dir=tmp_path, threads=1)
    assert 0 <= result.accuracy <= 1
    assert result.latency.batch_size == 2 and result.latency.threads == 1
    assert result.macs > 0 and result.params < sum(v.numel() for v in context.dense_state.values())
    assert 0.2 < result.sparsity < 0.8
    assert set(result.timings) == set(STAGES)
    assert result_from_report(report(result)) == result  # what Tune carries back is the whole result
    model = load_model_dir(tmp_path)
    assert model.blocks[1].mlp.fc1.out_features == context.dense_model().blocks[1].mlp.fc1.out_features // 4


def test_a_missed_latency_target_stops_before_healing(context):
    from dataclasses import replace

    result = run_trial(CONFIG, replace(context, latency_target_ms=1e-6), threads=1)
    assert result.accuracy is None and not result.feasible
    assert "heal" not in result.timings and "evaluate" not in result.timings
    assert report(result)["accuracy"] == 0.0 and report(result)["feasible"] == 0
    assert result.stopped.startswith("missed the latency target")


def test_a_trial_not_faster_than_the_dense_model_stops_before_healing(context):
    """Masks on dense kernels cannot beat the dense model's latency, so they cannot join the front: the trial stops
    after profiling (seconds) instead of healing (minutes), says why, and reaches the sampler as a bad point. A
    structurally smaller model is healed; so is the dense reference itself."""
    from dataclasses import replace

    masked = TrialConfig(PruneConfig("magnitude", {"all": 0.5}), CONFIG.heal)
    # the dense shapes on dense kernels: the dense model's own measurement (speedup exactly 1), not a noisy twin
    result = run_trial(masked, replace(context, stop_unless_faster=True), threads=1)
    assert not result.feasible and "heal" not in result.timings
    assert result.stopped.startswith("not faster than the dense model")
    assert result.latency.speedup == result.latency.speedup_high == 1.0 and not result.latency.paired
    assert TrialResult.from_dict(result.to_dict()).stopped == result.stopped  # it travels with the result
    healed = run_trial(masked, context, threads=1)
    assert healed.feasible and not healed.stopped and "heal" in healed.timings
    reference = run_trial(TrialConfig(PruneConfig("none"), CONFIG.heal), replace(context, stop_unless_faster=True),
                          threads=1)
    assert reference.feasible


def test_a_trial_stops_only_on_evidence_that_it_is_not_faster(context):
    """The stop rule reads the speedup's interval: confidently slower stops; an interval that straddles 1 heals
    (noise must not throw away a trial that may be faster); a missed target counts the interval's fast end."""
    from dataclasses import replace

    from autoprune.trial import _stop_reason

    on = replace(context, stop_unless_faster=True)
    base = run_trial(TrialConfig(PruneConfig("structured", {"all": 0.5}), HealConfig("none")), context,
                     threads=1).latency
    assert base.paired and base.speedup_low <= base.speedup <= base.speedup_high and base.reference_ms > 0

    def at(low, ratio, high):
        return replace(base, speedup_low=low, speedup=ratio, speedup_high=high, median_ms=4.0 / ratio,
                       log_ratios=(0.1, 0.2))

    assert "not faster" in _stop_reason(at(0.80, 0.85, 0.95), on, "structured")
    assert _stop_reason(at(0.90, 0.99, 1.08), on, "structured") == ""  # might be faster: heal it
    assert _stop_reason(at(0.80, 0.85, 0.95), context, "structured") == ""  # stop_unless_faster off
    target = replace(context, latency_target_ms=4.2)
    assert _stop_reason(at(0.90, 0.95, 1.0), target, "structured") == ""  # 4.21 ms, but 4.0 at the fast end
    assert "missed the latency target" in _stop_reason(at(0.80, 0.85, 0.90), target, "structured")


def test_dense_training_is_reproducible(bundle, tmp_path):
    """Two cache misses train to identical weights, whatever consumed the global RNG before and however many threads
    the process has."""
    from autoprune.config import DataSpec, ModelSpec
    from autoprune.driver.prepare import dense_weights

    model = ModelSpec(TINY_VIT.name, 10, train_steps=3, kwargs=TINY_VIT.kwargs)
    first = dense_weights(model, DataSpec(), bundle, cache_dir=tmp_path / "a")
    torch.randn(100)  # disturb the global generator
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        second = dense_weights(model, DataSpec(), bundle, cache_dir=tmp_path / "b")
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert len(list((tmp_path / "a").glob("dense-*.safetensors"))) == 1  # cached for the next search


def test_spectral_allocation_drives_a_structured_method(context):
    config = TrialConfig(PruneConfig("structured", {"all": 0.5}, allocation="spectral"), HealConfig("none"))
    result = run_trial(config, context, threads=1)
    assert 0.2 < result.sparsity < 0.6 and result.params < sum(v.numel() for v in context.dense_state.values())
    assert TrialConfig.from_json(config.to_json()) == config


def test_identical_structures_are_timed_once(context, monkeypatch):
    from dataclasses import replace

    import autoprune.measure.latency as latency_module
    from autoprune.measure.cache import LocalLatencyCache

    calls = []
    real = latency_module.profile_latency
    monkeypatch.setattr(latency_module, "profile_latency", lambda *a, **k: calls.append(1) or real(*a, **k))
    cached = replace(context, latency_cache=LocalLatencyCache())
    dense = run_trial(TrialConfig(PruneConfig("none"), HealConfig("none")), cached, threads=1)
    masked = run_trial(TrialConfig(PruneConfig("magnitude", {"all": 0.5}), HealConfig("none")), cached, threads=1)
    assert len(calls) == 1 and masked.latency_cached and not dense.latency_cached
    assert masked.latency == dense.latency  # masks run the dense kernels: the dense measurement, not a noisy twin
    smaller = run_trial(TrialConfig(PruneConfig("structured", {"all": 0.5}), HealConfig("none")), cached, threads=1)
    assert len(calls) == 2 and not smaller.latency_cached and smaller.latency != dense.latency
    again = run_trial(TrialConfig(PruneConfig("structured", {"all": 0.5}), HealConfig("none"), seed=1), cached,
                      threads=1)
    if smaller.latency.half_width <= PROFILE.tolerance:  # known precisely enough: reused, not timed again
        assert len(calls) == 2 and again.latency == smaller.latency
        assert result_from_report(report(again)).latency_cached
    else:  # a busy machine left it imprecise: timed again, and both measurements merged
        assert len(calls) == 3 and again.latency.repeats > smaller.latency.repeats
        assert again.latency.log_ratios[:len(smaller.latency.log_ratios)] == smaller.latency.log_ratios


def test_the_signature_tells_structures_and_settings_apart():
    from autoprune.measure.cache import structure_signature

    model = TINY_VIT.create()
    assert structure_signature(model, batch_size=1) == structure_signature(TINY_VIT.create(), batch_size=1)
    assert structure_signature(model, batch_size=1) != structure_signature(model, batch_size=2)
    model.blocks[0].attn.num_heads = 1  # same shapes, different attention: a different computation
    assert structure_signature(model, batch_size=1) != structure_signature(TINY_VIT.create(), batch_size=1)


def test_on_cpu_a_two_four_model_says_it_was_timed_with_dense_kernels(context):
    from dataclasses import replace

    from autoprune.measure.cache import LocalLatencyCache

    cached = replace(context, latency_cache=LocalLatencyCache())
    dense = run_trial(TrialConfig(PruneConfig("none"), HealConfig("none")), cached, threads=1)
    two_four = run_trial(TrialConfig(PruneConfig("nm"), HealConfig("none")), cached, threads=1)
    assert two_four.latency.format == "dense" and "2:4" in two_four.latency.note and "CUDA" in two_four.latency.note
    assert two_four.latency_cached and two_four.latency.median_ms == dense.latency.median_ms
    alone = run_trial(TrialConfig(PruneConfig("nm", options={"n": 1, "m": 4}), HealConfig("none")), context, threads=1)
    assert alone.latency.format == "dense" and alone.latency.note == ""  # 1:4 has no kernel to try


def test_two_four_layers_follow_the_backend_that_runs_them(example):
    """A layer runs on 2:4 kernels only with a 2:4 pattern and a shape the backend takes: cuSPARSELt (torch's
    default) takes multiples of 16, CUTLASS 32 rows × 64 columns. A CNN has no such Linear layer."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    from autoprune import prune
    from autoprune.measure.formats import semi_structured_layers
    from autoprune.models import pooled_group

    vit = TINY_VIT.create()
    group = pooled_group(vit)
    prune.get("nm").apply(vit, prune.PruneRequest((group,), {group.name: 0.5}, {"n": 2, "m": 4}))
    cusparselt = dict(semi_structured_layers(vit, torch.bfloat16, SparseSemiStructuredTensorCUSPARSELT))
    cutlass = dict(semi_structured_layers(vit, torch.bfloat16, SparseSemiStructuredTensorCUTLASS))
    assert "blocks.0.attn.qkv" in cusparselt and "blocks.0.attn.qkv" not in cutlass  # 96 × 32: 32 < 64 columns
    assert "blocks.0.mlp.fc2" in cutlass  # 32 × 128
    assert semi_structured_layers(vit, torch.float32, SparseSemiStructuredTensorCUSPARSELT) == []  # no fp32 kernels
    resnet = TINY_RESNET.create()
    group = pooled_group(resnet)
    prune.get("nm").apply(resnet, prune.PruneRequest((group,), {group.name: 0.5}, {"n": 2, "m": 4}))
    assert semi_structured_layers(resnet, torch.bfloat16) == []


def test_a_two_four_model_with_no_layer_for_the_kernels_shares_the_dense_measurement(bundle, monkeypatch):
    """On a GPU with sparse kernels, a CNN pruned 2:4 still runs dense kernels (its convolutions have none): it is
    the dense structure's twin and gets its measurement, not a 2:4 key of its own. (The GPU is pretended: the
    kernels' availability is the only thing asked of it before timing.)"""

    import autoprune.measure.formats as formats
    from autoprune.measure.cache import LocalLatencyCache

    monkeypatch.setattr(formats, "semi_structured_unsupported", lambda device, dtype: None)
    # (latency.py decided the key with its own copy of this check before it asked formats.py)
    monkeypatch.setattr("autoprune.measure.latency.semi_structured_unsupported", lambda device, dtype: None, raising=False)
    torch.manual_seed(0)
    context = TrialContext(TINY_RESNET, TINY_RESNET.create().state_dict(), bundle, PROFILE,
                           latency_cache=LocalLatencyCache())
    dense = run_trial(TrialConfig(PruneConfig("none"), HealConfig("none")), context, threads=1)
    two_four = run_trial(TrialConfig(PruneConfig("nm"), HealConfig("none")), context, threads=1)
    assert two_four.latency_cached and two_four.latency.median_ms == dense.latency.median_ms
    assert two_four.latency.format == "dense" and "no Linear layer has a 2:4 pattern" in two_four.latency.note
    assert len(context.latency_cache) == 1


def test_a_worker_uses_the_device_ray_assigned_it(monkeypatch):
    """With `gpu: 0`, Ray no longer hides the machine's GPUs: a trial must not take cuda:0 because one exists."""
    import ray

    from autoprune.measure.latency import assigned_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    assert assigned_device() == torch.device("cpu")
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [3])  # Ray made GPU 3 this worker's only visible one
    assert assigned_device() == torch.device("cuda")


def test_the_latency_cache_survives_its_actor_dying(local_ray):
    """If the cache's actor dies, it is restarted (empty) and a lookup meanwhile is a miss, not a failed trial."""
    from autoprune.measure.cache import SharedLatencyCache

    cache = SharedLatencyCache.start()
    assert cache.put("a", 1) == 1 and cache.get("a") == 1
    local_ray.kill(cache.actor, no_restart=False)
    assert cache.get("a") in (None, 1)  # a miss while it restarts (never an error)
    # The kill is asynchronous: a put may still reach the old actor and be lost with it. Once restarted, the cache
    # works again (empty); every call meanwhile returned a value, never raised.
    deadline = time.monotonic() + 60
    while not (cache.put("b", 2) == 2 and cache.get("b") == 2):
        assert time.monotonic() < deadline, "the cache's actor was not restarted within 60 s"
        time.sleep(0.5)


def test_format_selection():
    from autoprune import prune
    from autoprune.measure.formats import is_two_four, semi_structured_unsupported

    assert prune.get("nm").execution_format({"n": 2, "m": 4}) == "2:4"
    assert prune.get("cast").execution_format({"n": 2, "m": 4, "permute": True}) == "2:4"
    assert prune.get("nm").execution_format({"n": 2, "m": 8}) == "dense"
    assert prune.get("magnitude").execution_format({}) == "dense"
    assert "CUDA" in semi_structured_unsupported(torch.device("cpu"), torch.float16)
    # CUTLASS's 2:4 kernels are sm_8x only: an H100 without cuSPARSELt times dense kernels and says so
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT as CUSPARSELT
    from torch.sparse import SparseSemiStructuredTensorCUTLASS as CUTLASS

    cuda = torch.device("cuda")
    assert "8.x only" in semi_structured_unsupported(cuda, torch.bfloat16, capability=(9, 0), backend=CUTLASS)
    assert semi_structured_unsupported(cuda, torch.bfloat16, capability=(8, 6), backend=CUTLASS) is None
    assert semi_structured_unsupported(cuda, torch.bfloat16, capability=(9, 0), backend=CUSPARSELT) is None
    assert ">= 8.0" in semi_structured_unsupported(cuda, torch.bfloat16, capability=(7, 5), backend=CUSPARSELT)
    assert is_two_four(torch.tensor([[1.0, 0, 0, 2, 0, 3, 4, 0]]))
    assert not is_two_four(torch.tensor([[1.0, 1, 0, 2, 0, 3, 4, 0]]))


def test_extra_batch_sizes_are_measured_cached_and_reported(context):
    from dataclasses import replace

    from autoprune.measure.cache import LocalLatencyCache

    settings = replace(PROFILE, batch_size=4, extra_batch_sizes=(1,))
    cached = replace(context, profile=settings, latency_cache=LocalLatencyCache())
    dense = run_trial(TrialConfig(PruneConfig("none"), HealConfig("none")), cached, threads=1)
    assert dense.latency.batch_size == 4 and set(dense.extra_latency) == {1}
    assert dense.extra_latency[1].batch_size == 1
    metrics = report(dense)
    assert metrics["latency_ms_batch1"] == dense.extra_latency[1].median_ms
    assert result_from_report(metrics) == dense
    assert len(cached.latency_cache) == 2  # one entry per batch size
    masked = run_trial(TrialConfig(PruneConfig("magnitude", {"all": 0.5}), HealConfig("none")), cached, threads=1)
    assert masked.latency_cached and masked.extra_latency == dense.extra_latency


def test_latency_is_measured_on_the_target_accelerator_type(context, local_ray):
    """The profile runs in a Ray task placed by accelerator type: its 1 CPU, not the trial's 2 threads."""
    from dataclasses import replace

    from autoprune.config import TargetHardware

    settings = replace(PROFILE, target=TargetHardware(TEST_ACCELERATOR, cpu=1, gpu=0))
    result = run_trial(CONFIG, replace(context, profile=settings), threads=2)
    assert result.latency.threads == 1 and result.accuracy is not None
    local = run_trial(CONFIG, context, threads=2)
    assert local.latency.threads == 2


# ---- CNNs through the whole trial, with every healing method that trains -------------------------------------

from conftest import TINY_BOTTLENECK, TINY_RESNET  # noqa: E402

from autoprune import heal  # noqa: E402

TRAINING_HEALS = [method.name for method in heal.HEAL_METHODS if method.trains]
CNN_PROFILES = {  # the default layout search (both timed), a forced layout, and a low-precision profile
    "auto": ProfileSpec(batch_size=2, warmup=1, repeats=3, memory_format="auto"),
    "channels_last": ProfileSpec(batch_size=2, warmup=1, repeats=3, memory_format="channels_last"),
    "bf16": ProfileSpec(batch_size=2, warmup=1, repeats=3, memory_format="auto", dtype="bfloat16"),
}


@pytest.fixture(scope="module", params=[(TINY_RESNET, "structured"), (TINY_BOTTLENECK, "vbp")],
                ids=["basicblock-structured", "bottleneck-vbp"])
def cnn_context(request, bundle):
    source, method = request.param
    torch.manual_seed(0)
    return TrialContext(source, source.create().state_dict(), bundle), method


@pytest.mark.parametrize("profile", CNN_PROFILES)
@pytest.mark.parametrize("healing", TRAINING_HEALS)
def test_a_cnn_trial_heals_after_it_was_timed(cnn_context, healing, profile, tmp_path):
    """Structured removal (or VBP), the profile, then a training heal: the model that heals is the one the profile
    left behind, so a profile that moved it in place (channels-last, bf16, inference mode) broke every CNN trial."""
    from dataclasses import replace

    context, method = cnn_context
    config = TrialConfig(PruneConfig(method, {"all": 0.5}),
                         HealConfig(healing, calibration_images=32, steps=2, lr=1e-3, batch_size=8))
    result = run_trial(config, replace(context, profile=CNN_PROFILES[profile]), save_dir=tmp_path, threads=1)
    assert result.feasible and 0 <= result.accuracy <= 1
    assert result.latency.dtype == CNN_PROFILES[profile].dtype
    if profile == "channels_last":
        assert result.latency.memory_format == "channels_last"
    assert result.params < sum(v.numel() for k, v in context.dense_state.items() if "num_batches" not in k)


def test_the_saved_model_loads_in_the_recipe_it_was_timed_in(bundle, tmp_path):
    """What is registered is what runs: a CNN timed channels-last in bfloat16 loads channels-last in bfloat16 and
    gives the trial's outputs within bfloat16's tolerance; `recipe=False` gives the float32 model to train on."""
    from dataclasses import replace

    from autoprune.saved import saved_recipe

    torch.manual_seed(0)
    context = TrialContext(TINY_RESNET, TINY_RESNET.create().state_dict(), bundle,
                           replace(PROFILE, memory_format="channels_last", dtype="bfloat16"))
    config = TrialConfig(PruneConfig("structured", {"all": 0.5}),
                         HealConfig("finetune", calibration_images=32, steps=2, lr=1e-3, batch_size=8))
    result = run_trial(config, context, save_dir=tmp_path, threads=1)
    recipe = saved_recipe(tmp_path)
    assert recipe == result.latency.recipe and (recipe.dtype, recipe.memory_format) == ("bfloat16", "channels_last")
    served = load_model_dir(tmp_path)
    assert served.conv1.weight.dtype == torch.bfloat16
    assert served.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    trained = load_model_dir(tmp_path, recipe=False)
    assert trained.conv1.weight.dtype == torch.float32 and trained.conv1.weight.requires_grad
    images = bundle.normalize(bundle.eval.images[:8])
    with torch.no_grad():
        expected, got = trained(images), served(images)  # float32 inputs: the served model casts them
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), expected, atol=0.05 * expected.abs().max().item())


def test_the_search_leaves_out_the_methods_that_cannot_be_faster_on_its_device(context):
    """On a CPU, masks and 2:4 run the dense kernels: no trial of theirs can beat the dense model's latency, so the
    search leaves them out of its space and says so; with nothing left that could be faster, it stops with the
    reason; `stop_unless_faster: false` keeps them (and heals their trials)."""
    from dataclasses import replace

    from test_spec import DEMO

    from autoprune.driver.search import _methods_that_can_be_faster, _stops_unless_faster
    from autoprune.errors import AutopruneError
    from autoprune.space.load import parse_spec

    dense = run_trial(TrialConfig(PruneConfig("none"), HealConfig("none")), context, threads=1)
    assert dense.latency.device.startswith("cpu")
    spec = parse_spec({**DEMO, "space": {**DEMO["space"], "prune": {
        **DEMO["space"]["prune"], "methods": ["magnitude", "nm", "structured", "vbp", "none"]}}})
    said = []
    assert _stops_unless_faster(spec)
    assert _methods_that_can_be_faster(spec, said.append).prune.methods == ("structured", "vbp", "none")
    assert "on a CPU, magnitude, nm run with the dense shapes on dense kernels" in said[0] and "leaves them out" in said[0]
    masked_only = replace(spec, prune=replace(spec.prune, methods=("magnitude", "none")))
    with pytest.raises(AutopruneError, match="no trial could be faster than the dense model. Add a method"):
        _methods_that_can_be_faster(masked_only, said.append)
    off = replace(spec, search=replace(spec.search, stop_unless_faster=False))
    assert not _stops_unless_faster(off)
    assert _methods_that_can_be_faster(off, said.append) is off and len(said) == 1
