"""Healing as a multi-worker DeepSpeed job, for models whose healing does not fit one GPU.

A trial that selects `heal_runtime: {engine: deepspeed}` runs the same optimisation as `loop.optimise` — the same
objective, batches, schedule, masks and step loop (`loop.run_steps`, with DeepSpeed's backward and step plugged in)
— on `workers` Ray actors, each a DeepSpeed engine (ZeRO stage 0–3, bf16 or fp32; NCCL on GPUs, gloo on CPUs).
`autoprune.train.optimise` sends a job here when its engine is DeepSpeed's. DeepSpeed is the training engine only:
its removed compression module is not used.

Where the workers run. A trial reserves its own resources and its workers' as one placement group (`bundles`, which
the search gives Tune), and the workers are placed in that group's bundles: a trial starts only when its workers
can, so concurrent trials never hold every GPU while their workers wait for one. Outside Tune (`run_trial` called
directly, `autoprune doctor`) the job reserves a group of its own. Ray gives each worker its own GPU, so a worker's
device is its own `cuda:0`, whichever node and GPU it landed on.

What travels: one payload, written with `torch.save` and read with `map_location="cpu"` (no tensor lands on a GPU
named by the sending process): the model, the objective with its teacher, the masks, the calibration images
(uint8) and the normalisation — not the data bundle. Each worker binds the objective to its own module on its own
device (the teacher is moved there, hooks are attached there).

Masks hold as in single-process healing. ZeRO keeps fp32 master weights apart from the module's weights, so after
every step the pruned entries are zeroed in both (`safe_set_full_fp32_param`): a masked weight never comes back,
and a gradual method's next masks are computed from the weights the optimiser really holds.

Every worker draws the same global batch from one seeded generator and trains on its share, so the run is the
single-process run with its batch split across workers. Rank 0 returns the fp32 weights (gathered across ranks
under ZeRO-3) and the loss of every step (averaged over workers).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
from typing import Any

import torch
from torch import nn

from autoprune.config import HealingEngine
from autoprune.errors import AutopruneError
from autoprune.train.loop import batch_sampler, run_steps, warmup_cosine

PLACEMENT_TIMEOUT_S = 600  # a job outside Tune waits this long for its workers' resources, then says why


def worker_bundle(engine: HealingEngine) -> dict[str, float]:
    """The resources of one DeepSpeed worker, as a placement-group bundle."""
    return {key: value for key, value in (("CPU", engine.cpu), ("GPU", engine.gpu)) if value > 0}


def trial_bundles(trial: dict[str, float], engine: HealingEngine) -> list[dict[str, float]]:
    """What a trial that heals with DeepSpeed reserves at once: its own resources first, then one bundle per worker
    (the workers of `optimise_deepspeed` are placed in the bundles after the first)."""
    return [{key: value for key, value in trial.items() if value > 0}] + [worker_bundle(engine)] * engine.workers


def optimise_deepspeed(model: nn.Module, engine: HealingEngine, *, images, mean, std, objective, steps: int,
                       lr: float, batch_size: int, seed: int, weight_decay: float, masks, schedule=None) -> list[float]:
    """Run `loop.optimise`'s job on `engine.workers` DeepSpeed workers; load the healed weights into `model`
    (on the CPU) and return the loss of every step. (`autoprune.train.optimise` calls this for a DeepSpeed engine.)"""
    import cloudpickle
    import ray

    # the calibration images alone: a subset is a view, and pickled it would carry the whole training pool
    job = {"model": model.cpu(), "objective": objective, "masks": masks, "images": images.compact(), "mean": mean,
           "std": std, "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "weight_decay": weight_decay,
           "schedule": schedule if schedule is not None else warmup_cosine(steps),
           "zero_stage": engine.zero_stage, "bf16": engine.bf16, "threads": max(1, int(engine.cpu)),
           "backend": "nccl" if engine.gpu > 0 else "gloo"}
    buffer = io.BytesIO()
    torch.save(job, buffer, pickle_module=cloudpickle)  # cloudpickle: objectives hold closures and hooks' owners
    payload = ray.put(buffer.getvalue())
    with _placement(engine) as (group, first):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        workers = [
            ray.remote(_Worker).options(
                num_cpus=engine.cpu, num_gpus=engine.gpu,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=first + rank),
            ).remote()
            for rank in range(engine.workers)
        ]
        try:
            master = ray.get(workers[0].address.remote())
            runs = [worker.run.remote(payload, rank, engine.workers, master) for rank, worker in enumerate(workers)]
            results = _first_error_or_all(runs)
        finally:
            for worker in workers:
                ray.kill(worker)
    saved = results[0]
    model.load_state_dict(saved["state"])
    return saved["losses"]


@contextlib.contextmanager
def _placement(engine: HealingEngine):
    """(placement group, index of the first worker bundle): the Tune trial's own group when it reserved the
    workers' bundles, else a group made (and removed) here."""
    from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group

    current = get_current_placement_group()
    if current is not None and len(current.bundle_specs) > engine.workers:
        yield current, len(current.bundle_specs) - engine.workers
        return
    group = placement_group([worker_bundle(engine)] * engine.workers, strategy="PACK")
    try:
        import ray

        ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            raise AutopruneError(
                f"heal_runtime: {engine.workers} DeepSpeed workers of {worker_bundle(engine)} each could not be placed in"
                f" {PLACEMENT_TIMEOUT_S} s (this Ray cluster has {ray.available_resources()} free). Lower"
                " heal_runtime.workers / heal_runtime.cpu / heal_runtime.gpu, or add nodes.")
        yield group, 0
    finally:
        remove_placement_group(group)


def _first_error_or_all(runs: list) -> list:
    """Every worker's result; as soon as one worker fails, its error (the others would wait for it forever)."""
    import ray

    pending, done = list(runs), {}
    while pending:
        finished, pending = ray.wait(pending, num_returns=1)
        done[finished[0]] = ray.get(finished[0])  # raises the worker's own error
    return [done[run] for run in runs]


class _Worker:
    """One DeepSpeed process of a healing job: a Ray actor in its trial's placement group."""

    def address(self) -> tuple[str, int]:
        """Where rank 0 listens for the others (this node's address and a free port)."""
        import socket

        import ray

        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def run(self, payload: bytes, rank: int, world: int, master: tuple[str, int]) -> dict[str, Any] | None:
        import torch.distributed as dist

        job = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)  # trusted: our own payload
        device = _own_device()
        torch.set_num_threads(job["threads"])
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0", "MASTER_ADDR": master[0],
                           "MASTER_PORT": str(master[1])})
        dist.init_process_group(job["backend"], init_method=f"tcp://{master[0]}:{master[1]}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(minutes=10))
        try:
            return _heal(job, rank, world, device)
        finally:
            dist.destroy_process_group()


def _own_device() -> torch.device:
    """Ray made this worker's GPU (if it was given one) the only one it sees: cuda:0, made current for NCCL."""
    from autoprune.measure.latency import assigned_device

    if assigned_device().type == "cuda":
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    return torch.device("cpu")


def _heal(job: dict, rank: int, world: int, device: torch.device) -> dict[str, Any] | None:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    model, masks, steps = job["model"].train().to(device), job["masks"], job["steps"]
    images = job["images"]
    global_batch = max(world, min(job["batch_size"], len(images.labels)))
    per_worker = global_batch // world
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=job["lr"], weight_decay=job["weight_decay"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, job["schedule"])
    dtype = torch.bfloat16 if job["bf16"] else torch.float32
    zero_stage = job["zero_stage"]
    ds_config = {
        "train_batch_size": per_worker * world,
        "train_micro_batch_size_per_gpu": per_worker,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told; the single-process loop does not clip
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": job["bf16"]},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: the fused CUDA Adam does not exist on CPUs
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config,
                                           dist_init_required=False)
    module = engine.module
    named = dict(module.named_modules())
    loss_fn = job["objective"].bind(module, device)  # the teacher moves to this worker's device, hooks attach here

    def student(batch: torch.Tensor) -> torch.Tensor:  # the loss functions call `model(inputs)`
        return engine(batch.to(dtype)).float()

    def before_step(progress: float) -> None:
        with _gathered(module, zero_stage):
            masks.before_step(module, progress)

    def update(loss: torch.Tensor) -> None:
        engine.backward(loss)
        engine.step()  # the optimiser, then the schedule

    def hold_masks() -> None:
        """Zero the pruned weights in the module and in the optimiser's fp32 masters (all ranks take part)."""
        with _gathered(module, zero_stage):
            masks.after_step(module)
        for name, mask in masks.by_layer.items():
            weight = named[name].weight
            master = safe_get_full_fp32_param(weight)
            if master is not None:  # None: no separate master copy (ZeRO off, fp32): the module's weight is it
                safe_set_full_fp32_param(weight, master * mask.to(master.device, master.dtype))

    def mean_over_workers(loss: torch.Tensor) -> float:
        total = loss.detach().float().clone()
        dist.all_reduce(total)
        return float(total) / world

    # every worker draws the same global batch and trains on its own rows of it
    next_batch = batch_sampler(images, job["mean"], job["std"], batch_size=global_batch, seed=job["seed"],
                               device=device, share=slice(rank * per_worker, (rank + 1) * per_worker))
    losses = run_steps(steps, next_batch=next_batch, loss_of=lambda inputs, labels: loss_fn(student, inputs, labels),
                       step=update, before_step=before_step, after_step=hold_masks, record=mean_over_workers,
                       lr=job["lr"])
    job["objective"].release()

    state = {name: _full_fp32(p, safe_get_full_fp32_param) for name, p in module.named_parameters()}
    state.update({name: b.detach().float().cpu().clone() if b.is_floating_point() else b.detach().cpu().clone()
                  for name, b in module.named_buffers()})
    saved_keys = set(module.state_dict())  # persistent buffers only, as load_state_dict expects
    return {"state": {k: v for k, v in state.items() if k in saved_keys}, "losses": losses} if rank == 0 else None


def _full_fp32(param: nn.Parameter, get_master) -> torch.Tensor:
    master = get_master(param)  # the optimiser's fp32 copy, whole (gathered across ranks under ZeRO-3)
    return (param.detach().float() if master is None else master.detach()).cpu().clone()


@contextlib.contextmanager
def _gathered(module: nn.Module, zero_stage: int):
    """Under ZeRO-3 each rank holds a shard of every weight: gather them (rank 0's edits are kept) while masks are
    read or written. Below stage 3 the weights are whole on every rank."""
    if zero_stage < 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
        yield
