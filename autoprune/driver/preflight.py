"""Checks before any trial starts: against the running Ray cluster (a search that could never be scheduled is an
error now, not a hang later) and against the model (a pruning method that cannot prune it is an error now, not a
search of unchanged models)."""

from __future__ import annotations

import difflib
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping

from autoprune.config import SearchSpec
from autoprune.errors import AutopruneError, SpecError
from autoprune.measure.conditions import NodeConditions
from autoprune.measure.timing import LatencyProfile
from autoprune.models import ModelSource, load_dense
from autoprune.train.deepspeed import trial_bundles


def check_target_hardware(accelerator_type: str, cluster: Mapping[str, float]) -> None:
    """A latency task for an accelerator type no node has would wait forever: say so before any trial starts."""
    prefix = "accelerator_type:"
    if f"{prefix}{accelerator_type}" in cluster:
        return
    present = sorted(key[len(prefix):] for key in cluster if key.startswith(prefix))
    raise AutopruneError(
        f"profile.target.accelerator_type: no node of this Ray cluster has accelerator type {accelerator_type!r}"
        f" (it has: {', '.join(present) or 'none'}). Start one (a node type with min_workers >= 1 in the cluster"
        f" config, or `ray start --resources '{{\"{prefix}{accelerator_type}\": 1}}'`), or remove profile.target."
    )


def check_healing_resources(spec: SearchSpec, cluster: Mapping[str, float], say: Callable[[str], None]) -> None:
    """A trial that heals with DeepSpeed reserves its own resources and its workers' together (one placement
    group), so Tune starts it only when all of them are free. A reservation larger than the cluster would never
    start: say so before any trial. (An autoscaling cluster counts only the nodes it has now.)"""
    bundles = trial_bundles({"CPU": spec.search.cpu, "GPU": spec.search.gpu}, spec.heal_runtime)
    healing = spec.heal_runtime
    fits = []
    for resource, trial, per_worker in (("CPU", spec.search.cpu, healing.cpu), ("GPU", spec.search.gpu, healing.gpu)):
        needed = sum(bundle.get(resource, 0) for bundle in bundles)
        if needed > cluster.get(resource, 0):
            raise AutopruneError(
                f"heal_runtime: a trial needs {needed:g} {resource} at once (search.resources {trial:g} + heal_runtime.workers"
                f" {healing.workers} × {per_worker:g}) but this Ray cluster has {cluster.get(resource, 0):g}. Lower"
                f" heal_runtime.workers / heal_runtime.{resource.lower()}, or add nodes."
            )
        if needed:
            fits.append(int(cluster.get(resource, 0) // needed))
    at_once = min(fits + [spec.search.concurrency])
    if at_once < spec.search.concurrency:
        say(f"autoprune: each trial reserves {bundles[0]} for itself and {healing.workers} × {bundles[-1]} for its"
            f" DeepSpeed workers: at most {at_once} of search.concurrency {spec.search.concurrency} run at once here")


def one_gpu_type(spec: SearchSpec, cluster: Mapping[str, float], say: Callable[[str], None]) -> SearchSpec:
    """The spec with its trials' GPU type pinned: the one it names (which a node must have), or the cluster's only
    one. Trials are timed against one dense model and ranked on one front: a search over A10Gs and L4s at once
    would rank the GPUs, not the models. A cluster with several types must be told which."""
    if spec.search.gpu <= 0:
        return spec
    prefix = "accelerator_type:"
    present = sorted(key[len(prefix):] for key in cluster if key.startswith(prefix))
    named = spec.search.accelerator_type
    if named is not None:
        if named not in present:
            raise AutopruneError(
                f"search.resources.accelerator_type: no node of this Ray cluster has accelerator type {named!r} (it"
                f" has: {', '.join(present) or 'none'}).")
        return spec
    if len(present) > 1:
        raise AutopruneError(
            f"search.resources: this Ray cluster has GPUs of {len(present)} types ({', '.join(present)}): trials on"
            " different types cannot share one front. Set search.resources.accelerator_type to one of them.")
    if present:
        say(f"autoprune: every trial runs on the cluster's {present[0]} GPUs")
        return replace(spec, search=replace(spec.search, accelerator_type=present[0]))
    return spec


def check_cluster(spec: SearchSpec, cluster: Mapping[str, float], say: Callable[[str], None]) -> SearchSpec:
    """Every check of the spec against the cluster's resources; returns the spec with its GPU type pinned."""
    if spec.profile.target is not None:
        check_target_hardware(spec.profile.target.accelerator_type, cluster)
    if spec.heal_runtime.engine != "local":
        check_healing_resources(spec, cluster, say)
    pinned = one_gpu_type(spec, cluster, say)
    target = spec.profile.target
    if target is not None and target.gpu > 0 and pinned.search.gpu > 0 \
            and target.accelerator_type == pinned.search.accelerator_type:
        # a trial holds its GPU while its latency task waits for another GPU of the same type: once every such GPU
        # is held by a waiting trial (on a one-GPU node, at the dense baseline already), none ever goes on
        raise AutopruneError(
            f"profile.target.accelerator_type: {target.accelerator_type!r} is the trials' own GPU type, so a trial"
            " holding its GPU would wait for a second one to be timed on, and with every GPU of that type held by"
            " a waiting trial none would go on. Leave profile.target out: each trial is then timed on the GPU it"
            " runs on.")
    return pinned


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


def check_data(spec: SearchSpec, source: ModelSource) -> None:
    """The spec's data against the files on disk and the model, before anything heavy (MLflow, Ray, the pre-flight
    pruning check, training): each problem one line naming the key, the value and what would be valid."""
    data = spec.data
    if data.source == "imagefolder":
        classes = {role: _class_folders(role, folder) for role, folder in (("train_dir", data.train_dir),
                                                                            ("val_dir", data.val_dir))}
        if classes["train_dir"] != classes["val_dir"]:
            raise SpecError(f"data: train_dir has {len(classes['train_dir'])} classes and val_dir"
                            f" {len(classes['val_dir'])}, or other names: both must hold the same class sub-folders.")
        if len(classes["train_dir"]) != spec.model.num_classes:
            raise SpecError(f"model.num_classes: {spec.model.num_classes}, but data.train_dir {data.train_dir!r} has"
                            f" {len(classes['train_dir'])} class sub-folders ({', '.join(classes['train_dir'][:5])}"
                            f"{', …' if len(classes['train_dir']) > 5 else ''}): they must agree.")
    elif data.source == "torchvision":
        from torchvision import datasets

        if not isinstance(getattr(datasets, data.dataset, None), type):
            known = sorted(n for n in dir(datasets) if isinstance(getattr(datasets, n), type) and n[0].isupper())
            close = difflib.get_close_matches(data.dataset, known, n=3)
            raise SpecError(f"data.dataset: {data.dataset!r} is not a torchvision dataset"
                            + (f"; did you mean {', '.join(close)}?" if close else f"; e.g. {', '.join(known[:12])}."))
        if not Path(data.root).is_dir():
            raise SpecError(f"data.root: {data.root!r} is not a directory (the folder {data.dataset} reads; nothing"
                            " is downloaded).")
    # the checkpoint read and fitted now (a second for most), not on the driver after Ray started
    model = load_dense(source, checkpoint=spec.model.checkpoint) if spec.model.checkpoint else source.create()
    _check_image_size(model, source, data.image_size, data.source)


def _class_folders(role: str, folder: str) -> list[str]:
    path = Path(folder)
    if not path.is_dir():
        raise SpecError(f"data.{role}: {folder!r} is not a directory; give an ImageFolder tree (one sub-folder of"
                        " images per class).")
    classes = sorted(entry.name for entry in path.iterdir() if entry.is_dir())
    if not classes:
        raise SpecError(f"data.{role}: {folder!r} has no class sub-folders; an ImageFolder tree holds one folder of"
                        " images per class.")
    empty = [name for name in classes
             if not any(f.suffix.lower() in IMAGE_SUFFIXES for f in (path / name).rglob("*") if f.is_file())]
    if empty:
        raise SpecError(f"data.{role}: {len(empty)} class folder(s) of {folder!r} hold no images ({', '.join(empty[:5])};"
                        f" images end in {', '.join(IMAGE_SUFFIXES)}).")
    return classes


def _check_image_size(model, source: ModelSource, size: int, data_source: str) -> None:
    """One forward pass of the model (batch 1) at the data's image size: a model built for another size (a ViT's
    fixed patch grid) is a spec error here, not a traceback from the pre-flight."""
    import torch

    model.eval()
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, size, size))
    except Exception as error:  # noqa: BLE001 — any failure at this size is the mismatch to report
        takes = _input_size(model, source)
        given = (f"the reference task's images are {size}×{size}" if data_source == "reference"
                 else f"data.image_size: {size}")
        fix = (f" Set data.image_size: {takes[0]}, or" if takes and data_source != "reference" else " Set")
        raise SpecError(f"{given}, but {source.name} (model.kwargs {dict(source.kwargs)}) does not run on"
                        f" {size}×{size} images ({type(error).__name__}: {str(error).splitlines()[0][:160]})"
                        + (f"; it takes {takes[0]}×{takes[1]}." if takes else ".")
                        + f"{fix} the model's img_size kwarg to {size}.") from None


def _input_size(model, source: ModelSource) -> tuple[int, int] | None:
    """The input size a model was built for: its img_size kwarg, its patch embedding's, or its default config's."""
    size = source.kwargs.get("img_size") or getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        size = ((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (None,))[1:] or None
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def check_methods(spec: SearchSpec, source: ModelSource, say: Callable[[str], None], *,
                  drop_unusable: bool = False) -> SearchSpec:
    """`autoprune check` on the spec's model for the spec's pruning methods, before anything starts: a method that
    would remove nothing from this model, refuses it or fails on it is a spec error naming the method, the model and
    why — or, with `drop_unusable`, is dropped from the search with a warning. Each method is tried with its default
    options (or those the spec fixes) at the space's highest sparsity, on random weights (structure, not accuracy,
    decides this)."""
    from autoprune import prune
    from autoprune.check import REMOVES_LITTLE, WORKS, check_model
    from autoprune.config import Fixed

    names = [method for method in spec.prune.methods if method != "none"]  # the dense reference removes nothing
    if not names:
        return spec
    # each with the options the spec fixes (a structured scope, say); an option the search varies at its default
    methods = [replace(prune.get(name), options={**prune.get(name).options, **{
        option: dimension.value for option, dimension in spec.prune.options.get(name, {}).items()
        if isinstance(dimension, Fixed)}}) for name in names]
    size = spec.data.image_size
    result = check_model(source, input_size=(3, size, size), methods=methods, sparsities=(spec.prune.sparsity.high,),
                         heal_methods=spec.heal.methods)  # and one step of each healing method on what it leaves
    for check in result.checks:  # it prunes, less than asked: the search's sparsity overstates it
        if check.outcome == REMOVES_LITTLE:
            say(f"autoprune: warning: {check.method} on {spec.model.name} at sparsity {check.sparsity:g}: {check.reason}")
    unusable = {check.method: check for check in result.checks if check.outcome not in (WORKS, REMOVES_LITTLE)}
    if not unusable:
        return spec
    why = "; ".join(f"{name} {check.outcome}" + (f" ({check.reason})" if check.reason else "")
                    for name, check in unusable.items())
    kept = tuple(method for method in spec.prune.methods if method not in unusable)
    if not [method for method in kept if method != "none"]:  # dropping them would leave nothing to search
        raise SpecError(
            f"space.prune.methods: none of them can prune {spec.model.name} here, at sparsity"
            f" {spec.prune.sparsity.high:g}: {why}. `autoprune check {spec.model.name}` shows every registered"
            " method on this model: put one that works in the spec.")
    if not drop_unusable:
        raise SpecError(
            f"space.prune.methods: on {spec.model.name} at sparsity {spec.prune.sparsity.high:g}: {why}."
            f" Drop {'it' if len(unusable) == 1 else 'them'} from the spec, or pass --drop-unusable-methods to"
            f" search with the others (`autoprune check {spec.model.name}` shows every method on this model).")
    say(f"autoprune: dropping {', '.join(unusable)} from this search: on {spec.model.name}: {why}")
    return replace(spec, prune=replace(spec.prune, methods=kept))


def warn_if_busy(dense: LatencyProfile, say: Callable[[str], None], where: str) -> None:
    """A node that was busy while the dense model was timed will be busy while the others are: say so before they
    are. With several threads a busy neighbour is worse than a share of the time: every parallel operation waits
    for the thread that shares its core, and a model can run many times slower than on a quiet node."""
    if not dense.conditions:
        return
    conditions = NodeConditions.from_dict(dense.conditions)
    if conditions.busy:
        threads = (f" It runs {dense.threads} threads: each parallel operation waits for the one that shares a core"
                   " with the neighbour, so its latency here can be many times a quiet node's."
                   if dense.threads > 1 else "")
        say(f"autoprune: warning: {where} was busy while the dense model was timed ({conditions.describe()};"
            f" dense {dense.median_ms:.3f} ms). Every model is timed against the dense model, interleaved, so a"
            f" steady load cancels in its speedup, but intervals will be wider and timing slower.{threads}")
