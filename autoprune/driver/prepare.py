"""What every trial shares, prepared once on the driver: the data (`load_data`) and the dense model's weights
(`dense_weights`: timm pretrained, a local checkpoint, or trained).

With `model.train_steps` (the embedded default), the dense model is trained once on the spec's data and cached
under the work directory, keyed by everything that determines the result, so later searches start at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from autoprune import data as datasets
from autoprune.config import DataSpec, ModelSpec, SearchSpec, largest
from autoprune.data import DataBundle
from autoprune.halving import SharedRungJudge
from autoprune.measure.cache import SharedLatencyCache
from autoprune.models import ModelSource, load_dense
from autoprune.train import cross_entropy, optimise
from autoprune.space.define import full_budget
from autoprune.trial import TrialContext

log = logging.getLogger(__name__)

# Bump when the training recipe below changes, so that stale cached weights are not reused.
RECIPE_VERSION = 2
# Float sums split over threads round differently, so the trained weights (and every table measured on them) would
# depend on the machine's thread count; one thread makes them the same wherever they are trained.
TRAINING_THREADS = 1
RECIPE = {"lr": 2e-3, "batch_size": 64, "weight_decay": 0.05, "label_smoothing": 0.1}


def model_source(model: ModelSpec) -> ModelSource:
    return ModelSource(model.name, model.num_classes, dict(model.kwargs))


def dense_weights(model: ModelSpec, data_spec: DataSpec, data: DataBundle, *, cache_dir: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """The dense state dict the search prunes, from whichever source the spec names."""
    source = model_source(model)
    if not model.train_steps:
        return load_dense(source, pretrained=model.pretrained, checkpoint=model.checkpoint).state_dict()

    from safetensors.torch import load_file, save_file

    key = json.dumps(
        {"model": source.name, "classes": source.num_classes, "kwargs": dict(source.kwargs),
         "data": data_spec.__dict__, "steps": model.train_steps, "seed": seed, "recipe": RECIPE_VERSION,
         # a torchvision or ImageFolder task reads as many training images as the largest calibration budget
         "train_images": len(data.train)},
        sort_keys=True, default=str,
    )
    path = Path(cache_dir) / f"dense-{source.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors"
    if path.is_file():
        log.info("dense weights: cached %s", path)
        return load_file(str(path))
    log.info("dense weights: training %s for %d steps once (cached at %s)", source.name, model.train_steps, path)
    torch.manual_seed(seed)  # before creating the model: its initial weights come from this generator
    dense = source.create(pretrained=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAINING_THREADS)
    try:
        _train(dense, data, model.train_steps, seed)
    finally:
        torch.set_num_threads(threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    # every name its own copy: safetensors refuses tensors that share memory (CoaT's shared position encodings),
    # and loading writes the same values into the one shared tensor twice
    state = {name: tensor.detach().clone().contiguous() for name, tensor in dense.eval().state_dict().items()}
    save_file(state, str(path))
    return state


def _train(dense, data: DataBundle, steps: int, seed: int) -> None:
    optimise(
        dense,
        images=data.train,
        data=data,
        objective=cross_entropy(RECIPE["label_smoothing"]),
        steps=steps,
        lr=RECIPE["lr"],
        batch_size=RECIPE["batch_size"],
        weight_decay=RECIPE["weight_decay"],
        seed=seed,
    )


def load_data(spec: SearchSpec, *, cache_dir: str | Path | None = None, echo=None) -> datasets.DataBundle:
    """The search's data; with `cache_dir`, ImageFolder images decoded once are read from there next time (and a
    torchvision dataset's flat files are laid out there)."""
    if spec.data.source == "reference":
        bundle = datasets.reference_task(seed=spec.search.seed)
        if spec.data.eval_images:
            bundle = replace(bundle, eval=bundle.eval.subset(spec.data.eval_images, seed=spec.search.seed))
        return bundle
    if spec.data.source == "torchvision":
        return datasets.torchvision_dataset(
            name=spec.data.dataset, root=spec.data.root, image_size=spec.data.image_size,
            train_images=largest_calibration_budget(spec), eval_images=spec.data.eval_images, seed=spec.search.seed,
            staging_dir=cache_dir)
    return datasets.image_folder(
        train_dir=spec.data.train_dir,
        val_dir=spec.data.val_dir,
        image_size=spec.data.image_size,
        train_images=largest_calibration_budget(spec),
        eval_images=spec.data.eval_images,
        seed=spec.search.seed,
        cache_dir=cache_dir,
        echo=echo,
    )


def largest_calibration_budget(spec: SearchSpec) -> int:
    """How many training images the search may ask for at most: only those are read from an ImageFolder."""
    return int(largest(spec.heal.calibration_images))


def shared_context(spec: SearchSpec, source: ModelSource, workdir: Path,
                   say) -> tuple[Any, SharedLatencyCache, SharedRungJudge | None]:
    """The data, the dense weights, the latency cache and the rung judge (with `search.halving`), put into Ray's
    object store once: the dense baseline and every trial read that one copy (its images zero-copy). Returns its
    reference, the cache and the judge."""
    import ray

    say(f"autoprune: {spec.name}: loading data and the dense model {spec.model.name}")
    cache_dir = workdir / "cache"
    bundle = load_data(spec, cache_dir=cache_dir, echo=lambda line: say(f"autoprune: data.{line}"))
    state = dense_weights(spec.model, spec.data, bundle, cache_dir=cache_dir, seed=spec.search.seed)
    latency_cache = SharedLatencyCache.start()
    judge = SharedRungJudge.start(spec.search.halving) if spec.search.halving else None
    context = TrialContext(source, state, bundle, spec.profile, spec.latency_target_ms, latency_cache=latency_cache,
                           healing_engine=spec.heal_runtime, judge=judge, heal_budget=full_budget(spec))
    return ray.put(context), latency_cache, judge  # the driver's own copies go when this returns
