"""`autoprune retarget RUN`: a finished search's front on other hardware, without healing again.

A trial's accuracy does not depend on the device that times it; its latency does. So the healed models a search
saved are timed again on the new device (a Ray worker with a GPU, a node of a Ray accelerator type, or the CPU
with a number of threads), together with the dense model (timed with its structure: latency does not depend on
weights), and that device's front is published as a new search run in the same experiment (tagged with the run it
retargets) and registered as versions tagged with the device, so that `best --device` answers for it. Each model is
saved again with the recipe it was timed in on the new device (its memory format, kernels), since that is how it
must be served there. The registered model's aliases stay with the search that healed the models.

Trials that stopped before healing (masked models not faster than the dense model, a missed latency target, an
outdone rung) have no accuracy, so they are not retargeted; a structure the old device could not speed up may be
faster on the new one, and only a new search tells.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from autoprune.config import ProfileSpec
from autoprune.driver.connect import start_ray
from autoprune.driver.preflight import warn_if_busy
from autoprune.errors import AutopruneError
from autoprune.models import ModelSource
from autoprune.result import TrialRecord, TrialResult
from autoprune.tracking.publish import Published, experiment_path, publish_search, records_from_storage
from autoprune.tracking.schema import RETARGET_TAG
from autoprune.tracking.store import Tracker
from autoprune.tracking.ui import ui_hint


@dataclass(frozen=True)
class Retargeted:
    parent_run_id: str
    device: str  # as the profiles name it
    dense: TrialResult
    records: list[TrialRecord]
    published: Published
    wall_seconds: float


def retarget(run_id: str, *, tracking_uri: str, workdir: str | Path, device: str = "cpu", cpus: int = 1,
             accelerator_type: str | None = None, address: str | None = None, storage: str | None = None,
             echo: Callable[[str], None] | None = print) -> Retargeted:
    """Time every healed model of search `run_id` on the new device and publish its front there."""
    started = time.perf_counter()
    say = echo or (lambda line: None)
    if device not in ("cpu", "cuda"):
        raise AutopruneError(f"--device: {device!r} is not cpu or cuda (a GPU type is --accelerator-type)")
    tracker = Tracker.for_search_run(tracking_uri, run_id)
    spec = tracker.search_spec(run_id)
    workdir = Path(workdir).resolve()
    path = experiment_path(storage or spec["search"]["storage"] or str(workdir / "ray"), run_id)
    records, _ = records_from_storage(path, workdir / "checkpoints" / run_id)
    healed = [r for r in records if r.result is not None and r.result.feasible and r.model_dir]
    if not healed:
        raise AutopruneError(f"search run {run_id} has no healed model to time again (its trials in {path})")
    profile = _profile(spec["profile"])
    source = ModelSource(spec["model"]["name"], spec["model"]["num_classes"], dict(spec["model"]["kwargs"]))
    input_size = tuple(healed[0].result.latency.input_size)
    gpus = 1 if device == "cuda" or accelerator_type else 0
    ray = start_ray(address)
    _check_schedulable(ray.cluster_resources(), cpus=cpus, gpus=gpus, accelerator_type=accelerator_type)
    options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus}
    if accelerator_type:
        options["accelerator_type"] = accelerator_type
    # One worker process times them all, each against the dense model (interleaved, as a search does), which it
    # keeps prepared and warm between models.
    timer = ray.remote(_Timer).options(**options).remote(source.create(pretrained=False), profile, input_size)
    where = f"accelerator type {accelerator_type}" if accelerator_type else f"{device} ({cpus} CPU)"
    say(f"autoprune: timing the dense model and {len(healed)} healed models of run {run_id} on {where}, each against"
        " the dense model")
    dense_result = tracker.dense_result(run_id)
    dense = _retimed(dense_result, ray.get(timer.dense.remote(_format(dense_result))))
    warn_if_busy(dense.latency, say, "the node that times them")
    say(f"autoprune: dense {dense.latency.median_ms:.3f} ms on {dense.latency.device}"
        f" (it was {dense_result.latency.median_ms:.3f} ms on {dense_result.latency.device})")
    parent_id = tracker.start_search(name=spec["name"], spec=spec,
                                     run_name=f"{spec['name']}-retarget-{time.strftime('%Y%m%d-%H%M%S')}")
    tracker.client.set_tag(parent_id, RETARGET_TAG, run_id)
    tracker.log_dense(parent_id, dense)
    try:
        retimed = [_retime(record, timer, source, workdir / "retarget" / parent_id) for record in healed]
    finally:
        ray.kill(timer)
    cost = next(metric for metric in spec["objectives"] if metric != "accuracy")
    published = publish_search(tracker, parent_id, name=spec["name"], cost_metric=cost,
                               registered_model=spec["mlflow"]["registered_model"], dense=dense, records=retimed,
                               aliases=False)
    wall = time.perf_counter() - started
    if published.versions:
        say(f"autoprune: the front on {dense.latency.device}: {len(published.front)} models, registered as"
            f" {spec['mlflow']['registered_model']!r} versions {', '.join(published.versions)} in {wall:.0f} s;"
            f" `autoprune best --device {dense.latency.device!r}` picks among them")
    else:
        say(f"autoprune: on {dense.latency.device} no healed model beat the dense model on latency or accuracy:"
            f" nothing was registered ({wall:.0f} s)")
    say(f"The front in MLflow's UI: {ui_hint(tracker.tracking_uri, published.view_path)}")
    return Retargeted(parent_id, dense.latency.device, dense, retimed, published, wall)


def _check_schedulable(resources: Mapping[str, float], *, cpus: int, gpus: int, accelerator_type: str | None) -> None:
    """A timing task this Ray cluster can never place would wait forever: say so instead."""
    if accelerator_type and f"accelerator_type:{accelerator_type}" not in resources:
        declared = sorted(key.split(":", 1)[1] for key in resources if key.startswith("accelerator_type:"))
        raise AutopruneError(f"--accelerator-type {accelerator_type}: no node of that type in this Ray cluster"
                             f" (types here: {', '.join(declared) or 'none'})")
    if gpus > resources.get("GPU", 0):
        raise AutopruneError("--device cuda: this Ray cluster has no GPU (pass --address of one that has)")
    if cpus > resources.get("CPU", 0):
        raise AutopruneError(f"--cpus {cpus}: this Ray cluster has {resources.get('CPU', 0):g} CPUs")


def _profile(raw: Mapping[str, Any]) -> ProfileSpec:
    """The search's profile as logged (`SearchSpec.as_dict`), timed here on the retargeting worker."""
    fields = {**raw, "extra_batch_sizes": tuple(raw.get("extra_batch_sizes", ())), "target": None}
    return ProfileSpec(**fields)


def _retime(record: TrialRecord, timer, source: ModelSource, folder: Path) -> TrialRecord:
    """The trial with its latency measured on the new device, and its model saved in that device's recipe."""
    import ray

    from autoprune.saved import load_model_dir, save_model

    result = record.result
    model = load_model_dir(record.model_dir, recipe=False)
    try:
        latencies = ray.get(timer.time.remote(model, _format(result)))
    except Exception as error:  # out of memory on a smaller GPU, say: this model is left out, the others go on
        return TrialRecord(record.trial_id, None, error=f"timing on the new device failed: {error}",
                           params=record.params)
    retimed = _retimed(result, latencies)
    # the batch shape it was timed on: loading warms it there (and compiles that graph), and an ONNX Runtime
    # recipe writes the ONNX file it was timed as — as a search saves its trials' models (trial.py)
    latency = retimed.latency
    saved = save_model(model, source, folder / record.trial_id, recipe=latency.recipe,
                       example_shape=(latency.batch_size, *latency.input_size))
    return TrialRecord(record.trial_id, retimed, model_dir=str(saved), params=record.params)


def _format(result: TrialResult) -> str:
    """The execution format the trial's pruning method runs in (dense kernels, or 2:4 where they exist)."""
    from autoprune import prune

    method = prune.get(result.config.prune.method)
    return method.execution_format({**method.options, **result.config.prune.options})


def _retimed(result: TrialResult, latencies) -> TrialResult:
    return replace(result, latency=latencies.objective, extra_latency=dict(latencies.extra), latency_cached=False,
                   latency_keys={}, node="")


class _Timer:
    """A Ray actor on the new device: the dense model timed alone once (the scale), then every model against it."""

    def __init__(self, dense, profile: ProfileSpec, input_size) -> None:
        from autoprune.measure.latency import assigned_device

        self.device = assigned_device()
        self.dense_model, self.profile, self.input_size = dense.eval(), profile, tuple(input_size)
        self.references = None

    def dense(self, fmt: str):
        latencies = self._measure(self.dense_model, fmt, reference=None)
        self.references = {latencies.objective.batch_size: latencies.objective, **latencies.extra}
        return latencies

    def time(self, model, fmt: str):
        return self._measure(model, fmt, reference=self.dense_model)

    def _measure(self, model, fmt: str, *, reference):
        from autoprune.driver.worker import assigned_cpus
        from autoprune.measure.latency import measure_latency

        return measure_latency(model.to(self.device), fmt, self.profile, self.input_size, device=self.device,
                               threads=assigned_cpus(), cache=None, reference=reference, references=self.references)
