"""Healing as a multi-worker DeepSpeed job, for models whose healing does not fit one GPU.

A trial that selects `healing: {engine: deepspeed}` runs the same optimisation as `training.optimise` — the same
loss, batches, schedule and masks — as a Ray Train `TorchTrainer` of `workers` processes, each a DeepSpeed engine
(ZeRO stage 1–3, bf16 or fp32; NCCL on GPUs, gloo on CPUs). DeepSpeed is the training engine only: its removed
compression module is not used.

Masks hold as in single-process healing. ZeRO keeps fp32 master weights apart from the module's weights, so after
every step the pruned entries are zeroed in both (`safe_set_full_fp32_param`): a masked weight never comes back,
and a gradual method's next masks are computed from the weights the optimiser really holds.

Every worker draws the same global batch from one seeded generator and trains on its share, so the run is the
single-process run with its batch split across workers. Rank 0 returns the fp32 weights (gathered across ranks
under ZeRO-3) and the loss of every step (averaged over workers) through a Ray Train checkpoint.
"""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoprune.spec import HealingEngine

STATE_FILE = "healed.pt"


def optimise_deepspeed(model: nn.Module, engine: HealingEngine, **job: Any) -> list[float]:
    """Run `training.optimise`'s job (images, data, loss_fn, steps, lr, batch_size, seed, weight_decay, masks) on
    `engine.workers` DeepSpeed workers; load the healed weights into `model` and return the losses."""
    import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # One pickle for everything: the loss function may hold hooks on the model (alignment), and those must still
    # point at the same model object on the workers.
    payload = cloudpickle.dumps({"model": model.cpu(), **job})
    with tempfile.TemporaryDirectory(prefix="autoprune-heal-") as local_storage:
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"payload": payload, "zero_stage": engine.zero_stage, "bf16": engine.bf16},
            scaling_config=ScalingConfig(num_workers=engine.workers, use_gpu=engine.gpu > 0,
                                         resources_per_worker={"CPU": engine.cpu, "GPU": engine.gpu}),
            torch_config=TorchConfig(backend="nccl" if engine.gpu > 0 else "gloo"),
            # the checkpoint goes where every node can write it: the search's storage on a cluster
            run_config=RunConfig(storage_path=engine.storage or local_storage, name=f"heal-{uuid.uuid4().hex[:12]}"),
        )
        result = trainer.fit()
        with result.checkpoint.as_directory() as folder:
            saved = torch.load(Path(folder) / STATE_FILE, weights_only=True)
    model.load_state_dict(saved["state"])
    return saved["losses"]


def _worker(config: dict) -> None:
    import cloudpickle
    import deepspeed
    import ray.train
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    from autoprune.training import shifted, warmup_cosine

    job = cloudpickle.loads(config["payload"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    model, masks, steps = job["model"].train().to(device), job["masks"], job["steps"]
    images, data = job["images"], job["data"]
    inputs, labels = data.normalize(images.images), images.labels
    global_batch = max(world, min(job["batch_size"], len(labels)))
    per_worker = global_batch // world
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=job["lr"], weight_decay=job["weight_decay"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    dtype = torch.bfloat16 if config["bf16"] else torch.float32
    ds_config = {
        "train_batch_size": per_worker * world,
        "train_micro_batch_size_per_gpu": per_worker,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told; the single-process loop does not clip
        "zero_optimization": {"stage": config["zero_stage"]},
        "bf16": {"enabled": config["bf16"]},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: the fused CUDA Adam does not exist on CPUs
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config,
                                           dist_init_required=False)
    module = engine.module
    named = dict(module.named_modules())

    def student(batch: torch.Tensor) -> torch.Tensor:  # the loss functions call `model(inputs)`
        return engine(batch.to(dtype)).float()

    def hold_masks() -> None:
        """Zero the pruned weights in the module and in the optimiser's fp32 masters (all ranks take part)."""
        with _gathered(module, config["zero_stage"]):
            masks.after_step(module)
        for name, mask in masks.by_layer.items():
            weight = named[name].weight
            master = safe_get_full_fp32_param(weight)
            if master is not None:  # None: no separate master copy (ZeRO off, fp32): the module's weight is it
                safe_set_full_fp32_param(weight, master * mask.to(master.device, master.dtype))

    generator = torch.Generator().manual_seed(job["seed"])
    max_shift = max(1, inputs.shape[-1] // 16)
    losses = []
    for step in range(steps):
        with _gathered(module, config["zero_stage"]):
            masks.before_step(module, step / steps)
        index = torch.randint(0, len(labels), (global_batch,), generator=generator)
        batch = shifted(inputs[index], generator, max_shift)
        mine = slice(rank * per_worker, (rank + 1) * per_worker)
        loss = job["loss_fn"](student, batch[mine].to(device), labels[index][mine].to(device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss.item()} at step {step} (lr={job['lr']:g}).")
        engine.backward(loss)
        engine.step()  # the optimiser, then the schedule
        hold_masks()
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)

    state = {name: _full_fp32(p, safe_get_full_fp32_param) for name, p in module.named_parameters()}
    state.update({name: b.detach().float().cpu().clone() if b.is_floating_point() else b.detach().cpu().clone()
                  for name, b in module.named_buffers()})
    saved_keys = set(module.state_dict())  # persistent buffers only, as load_state_dict expects
    state = {name: tensor for name, tensor in state.items() if name in saved_keys}
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            torch.save({"state": state, "losses": losses}, Path(folder) / STATE_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({"final_loss": losses[-1] if losses else float("nan")}, checkpoint=checkpoint)


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
