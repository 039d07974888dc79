"""What a GPU cluster needs that a CPU shows too: one GPU type per search, one GPU per trial, and a CUDA error
that corrupts its process ending that process instead of failing every later trial on it."""

from __future__ import annotations

import pytest
from test_spec import DEMO

from autoprune.driver.preflight import check_cluster
from autoprune.driver.tune import gpu_type_resource, trial_resources
from autoprune.driver.worker import poisons_the_process
from autoprune.errors import AutopruneError, SpecError
from autoprune.space.load import parse_spec


def _spec(**resources):
    return parse_spec({**DEMO, "search": {**DEMO.get("search", {}), "resources": {"cpu": 1, **resources}}})


def test_a_trial_asking_for_several_gpus_is_refused_with_the_way_to_use_them():
    with pytest.raises(SpecError, match=r"search.resources.gpu.*at most 1.*heal_runtime.engine: deepspeed"):
        _spec(gpu=2)


def test_a_cluster_with_two_gpu_types_must_be_told_which_one_the_trials_use():
    cluster = {"CPU": 16, "GPU": 4, "accelerator_type:A10G": 2, "accelerator_type:L4": 2}
    said = []
    with pytest.raises(AutopruneError, match=r"GPUs of 2 types \(A10G, L4\).*search.resources.accelerator_type"):
        check_cluster(_spec(gpu=1), cluster, said.append)
    with pytest.raises(AutopruneError, match=r"no node .* 'H100' \(it has: A10G, L4\)"):
        check_cluster(_spec(gpu=1, accelerator_type="H100"), cluster, said.append)
    chosen = check_cluster(_spec(gpu=1, accelerator_type="L4"), cluster, said.append)
    assert trial_resources(chosen) == {"cpu": 1, "gpu": 1, "accelerator_type:L4": 0.001}


def test_the_only_gpu_type_is_pinned_and_a_cpu_search_asks_for_none():
    said = []
    pinned = check_cluster(_spec(gpu=1), {"CPU": 8, "GPU": 2, "accelerator_type:A10G": 2}, said.append)
    assert pinned.search.accelerator_type == "A10G" and "A10G" in said[0]
    assert gpu_type_resource(pinned) == {"accelerator_type:A10G": 0.001}
    cpu = check_cluster(_spec(), {"CPU": 2, "accelerator_type:A10G": 1}, said.append)
    assert cpu.search.accelerator_type is None and trial_resources(cpu) == {"cpu": 1, "gpu": 0}


def test_the_final_timing_runs_on_the_trials_gpu_type_or_the_target_type():
    """The pass that sets the registered latencies must run on the GPU type the trials and the dense baseline were
    timed on: on a cluster of several types, a GPU of any type would put the front on another device's scale."""
    from autoprune.driver.retime import final_timing_options

    said = []
    cluster = {"CPU": 16, "GPU": 4, "accelerator_type:A10G": 2, "accelerator_type:L4": 2}
    chosen = check_cluster(_spec(gpu=1, accelerator_type="A10G"), cluster, said.append)
    assert final_timing_options(chosen) == {"num_cpus": 1, "num_gpus": 1,
                                            "resources": {"accelerator_type:A10G": 0.001}}
    assert final_timing_options(_spec()) == {"num_cpus": 1, "num_gpus": 0}  # a CPU search asks for no GPU type
    targeted = parse_spec({**DEMO, "search": {**DEMO["search"], "resources": {"cpu": 1, "gpu": 1}},
                           "profile": {**DEMO["profile"], "target": {"accelerator_type": "L4", "gpu": 1}}})
    assert final_timing_options(targeted)["accelerator_type"] == "L4"


@pytest.mark.parametrize("message, poisons", [
    ("CUDA error: an illegal memory access was encountered", True),
    ("CUDA error: device-side assert triggered", True),
    ("CUDA error: unspecified launch failure", True),
    ("CUDA out of memory. Tried to allocate 2.00 GiB", False),  # recoverable: the next trial may fit
    ("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)", False),
])
def test_only_an_error_that_corrupts_the_cuda_context_ends_the_worker(message, poisons):
    assert poisons_the_process(RuntimeError(message)) is poisons
    assert not poisons_the_process(ValueError(message))


def test_a_version_measured_on_a_gpu_is_refused_on_a_cluster_without_one_unless_served_on_the_cpu(
        local_ray, monkeypatch):
    """`autoprune serve` on a machine without a GPU: a replica asking for one would wait for ever while the command
    says it is serving. It is refused with the way out; with `--device cpu` it asks for CPUs only."""
    import ray

    from autoprune.serve import replica_options
    from autoprune.tracking.select import ModelChoice

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    cluster = ray.cluster_resources()  # the suite's local Ray: 2 CPUs, no GPU
    assert cluster.get("GPU", 0) == 0
    measured_on_gpu = ModelChoice("vit", "3", "models:/vit/3", "run", 0.9, 2.0, device="NVIDIA A10G")
    with pytest.raises(AutopruneError, match=r"'vit' version 3 was measured on NVIDIA A10G.*no GPU.*--device cpu"):
        replica_options(measured_on_gpu, cluster=cluster)
    assert replica_options(measured_on_gpu, device="cpu", cluster=cluster) == {"num_cpus": 1}
    assert replica_options(measured_on_gpu, cluster={"CPU": 8, "GPU": 1}) == {"num_gpus": 1, "num_cpus": 1}
    measured_on_cpu = ModelChoice("vit", "4", "models:/vit/4", "run", 0.9, 2.0, device="cpu: Xeon (2 threads)",
                                  threads=2)
    assert replica_options(measured_on_cpu, cluster=cluster) == {"num_cpus": 2}
    with pytest.raises(AutopruneError, match=r"asked to run on cuda"):
        replica_options(measured_on_cpu, device="cuda", cluster=cluster)


def test_the_trials_gpu_type_is_kept_by_a_spec_built_in_python_and_needs_a_gpu():
    """A spec naming the trials' GPU type survives `validate` (which every search runs: it once read it back as an
    unknown key, naming no file); naming a GPU type for trials that take no GPU is refused, naming the key."""
    from autoprune.space.load import validate

    spec = _spec(gpu=1, accelerator_type="L4")
    assert validate(spec).search.accelerator_type == "L4"
    with pytest.raises(SpecError, match=r"spec.yaml: search.resources.accelerator_type: 'L4' is the trials' GPU"
                                        r" type, but `search.resources.gpu` is 0"):
        parse_spec({**DEMO, "search": {**DEMO["search"], "resources": {"cpu": 1, "accelerator_type": "L4"}}},
                   origin="spec.yaml")


def test_timing_on_the_trials_own_gpu_type_is_refused_before_it_can_deadlock():
    """A trial holds its GPU while its latency task waits for a GPU of the target type: when that is the trials'
    own type, every GPU can end up held by a waiting trial (on a one-GPU node at the dense baseline)."""
    def spec(target: str, accelerator_type: str | None = None):
        return parse_spec({**DEMO, "search": {**DEMO["search"], "resources": {
            "cpu": 1, "gpu": 1, **({"accelerator_type": accelerator_type} if accelerator_type else {})}},
            "profile": {**DEMO["profile"], "target": {"accelerator_type": target, "gpu": 1}}})

    said = []
    one_type = {"CPU": 8, "GPU": 1, "accelerator_type:L4": 1}
    with pytest.raises(AutopruneError, match=r"profile.target.accelerator_type: 'L4' is the trials' own GPU type"):
        check_cluster(spec("L4"), one_type, said.append)  # pinned to the only type, which is the target's
    two_types = {"CPU": 16, "GPU": 3, "accelerator_type:L4": 1, "accelerator_type:A10G": 2}
    with pytest.raises(AutopruneError, match="the trials' own GPU type"):
        check_cluster(spec("L4", "L4"), two_types, said.append)
    assert check_cluster(spec("L4", "A10G"), two_types, said.append).search.accelerator_type == "A10G"
