"""The typed settings: a search space (`SearchSpec` and its parts) and one point of it (`TrialConfig`).

Plain frozen dataclasses and the vocabulary they draw on. They import nothing from autoprune, so every stage can
take its settings from here without depending on how a spec is read or checked (`autoprune.space` does that).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

SAMPLERS = ("tpe", "nsga2", "random", "tpe_grouped", "gp")
SPARSITY_MODES = ("global", "per_group", "depth", "spectral", "macs")
DATA_SOURCES = ("reference", "imagefolder", "torchvision")
DTYPES = ("float32", "float16", "bfloat16")
HEALING_ENGINES = ("local", "deepspeed")
AUTOCAST = ("auto", "off", "bfloat16", "float16")  # heal_runtime.autocast
RUNTIMES = ("torch", "onnxruntime")  # profile.runtime: what a model is timed, scored and served in
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")  # auto: CNNs are timed both ways, the faster is kept
LATENCY_METRICS = ("latency_ms", "latency_p90_ms", "macs", "params")  # what the cost objective may be
# space.heal.budget: fixed, the healing budget is the search's fidelity (every trial heals the full budget, or stops
# at a rung of search.halving); searched, the sampler draws it like any other dimension (autoprune < 0.2)
HEAL_BUDGETS = ("fixed", "searched")


# ---- search dimensions -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fixed:
    """A dimension held at one value (written as a plain scalar in YAML)."""

    value: Any


@dataclass(frozen=True)
class Choice:
    """A categorical dimension (written as a list)."""

    values: tuple


@dataclass(frozen=True)
class Range:
    """A numeric interval (written as {low, high, log?, step?})."""

    low: float
    high: float
    log: bool = False
    step: float | None = None


Dimension = Union[Fixed, Choice, Range]


def largest(dimension: Dimension) -> Any:
    """The most a dimension may be: its value, its largest choice, or its range's upper end."""
    if isinstance(dimension, Fixed):
        return dimension.value
    return max(dimension.values) if isinstance(dimension, Choice) else dimension.high


# ---- the spec ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    name: str  # timm model name
    num_classes: int  # the classes of your task (the classifier head is built for them)
    pretrained: bool = False  # timm's pretrained weights (needs the hub, or timm's local cache)
    checkpoint: str | None = None  # local weights file (.safetensors, or a torch state dict)
    train_steps: int | None = None  # no weights given: train the dense model this many steps once, and cache it
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments


@dataclass(frozen=True)
class DataSpec:
    source: str = "reference"  # "reference" (built in), "imagefolder" or "torchvision" (a dataset already on disk)
    train_dir: str | None = None  # ImageFolder tree the calibration images are drawn from
    val_dir: str | None = None  # ImageFolder tree accuracy is measured on (healing never sees it)
    # torchvision's class name (FashionMNIST, CIFAR10, …): its train split calibrates, its test split measures
    dataset: str | None = None
    root: str | None = None  # the folder that torchvision class reads (never downloaded)
    # ImageFolder images are resized and centre-cropped to this, torchvision images resized; the reference task's are
    # 32. Left out: the model's own size (space/load.py's `_image_size` states the rule, as the README does)
    image_size: int | None = None
    eval_images: int | None = None  # measure accuracy on at most this many (class-balanced) images


@dataclass(frozen=True)
class TargetHardware:
    """Latency measured on a node of this Ray accelerator type (say the deployment GPU), not on the healing worker."""

    accelerator_type: str  # Ray's name for it, e.g. "A10G", "L4", "H100" (`ray.util.accelerators`)
    cpu: float = 1  # what the measuring task takes on that node
    gpu: float = 1  # what the measuring task takes on that node


@dataclass(frozen=True)
class ProfileSpec:
    batch_size: int = 1  # the batch whose latency is the objective
    extra_batch_sizes: tuple[int, ...] = ()  # also measured and logged (e.g. 1 next to a serving batch)
    dtype: str = "float32"  # the dtype the model is timed, scored and served in (bfloat16/float16 on GPUs)
    warmup: int = 10  # untimed forward passes first
    repeats: int = 30  # timed passes at least, unless max_seconds pass (paired: half each side)
    # A trial is timed against the dense model, interleaved, until the speedup's 95% interval is within ±tolerance
    # or max_seconds have passed (measure/timing.py)
    tolerance: float = 0.10
    max_seconds: float = 20.0  # …or when this many seconds have passed (per measurement)
    memory_format: str = "auto"  # the inputs' and 4-d weights' layout; auto times a CNN both ways and keeps the faster
    compile: bool = False  # time torch.compile(model) (compilation itself is not timed)
    # On a CUDA GPU with TF32 tensor cores (Ampere and later): float32 matmuls and convolutions run in TF32 when
    # timed, evaluated and served (the recipe records it), and healing trains with it
    tf32: bool = True
    # torch, or onnxruntime: exported to ONNX and run in ONNX Runtime (float32), the dense model alike
    runtime: str = "torch"
    target: TargetHardware | None = None  # None: on the worker that runs the trial

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """Every batch size measured, the objective's first."""
        return (self.batch_size, *self.extra_batch_sizes)


@dataclass(frozen=True)
class Halving:
    """`search.halving`: successive halving on two objectives (autoprune/halving.py). A trial that trains is
    judged at each rung — these fractions of the full healing budget (`space.heal.steps`), the same steps for
    every trial; 0 is the pruned model before any training (BatchNorm statistics re-estimated) — and its heal goes
    on from there only while it is among the best 1/`eta` of the results at that rung by non-dominated front (a
    faster trial beats it when more accurate by more than `margin`)."""

    rungs: tuple[float, ...] = (1 / 9, 1 / 3)  # fractions of the full healing budget at which a trial is judged
    margin: float = 0.01  # top-1, 0–1
    eta: int = 3  # about one in eta goes on at each rung


@dataclass(frozen=True)
class SearchSettings:
    trials: int = 12  # trials in all (the coarse start's among them)
    concurrency: int = 2  # trials running at once
    # Optuna sampler: gp, tpe_grouped, tpe, nsga2 or random (driver/sampling.py; `autoprune bench replay` chose gp)
    sampler: str = "gp"
    seed: int = 0  # sampler seed and every trial's seed
    cpu: float = 1  # Ray resources per trial
    gpu: float = 0  # at most 1: a trial heals, times and evaluates on one GPU (several: heal_runtime deepspeed)
    # The Ray accelerator type of the trials' GPUs (search.resources.accelerator_type): every trial and the dense
    # model on one kind. None: the cluster's only type (a cluster with several must name one)
    accelerator_type: str | None = None
    # A trial whose worker dies (or that raises: Tune cannot tell them apart) is started again this many times.
    max_retries: int = 1
    # A trial whose measured latency is not below the dense model's stops after profiling (it cannot join the front).
    stop_unless_faster: bool = True
    halving: Halving | None = None  # None: every trial heals its whole budget
    # Where Tune keeps trial results and checkpoints (the pruned models): a path every node reaches (NFS) or a URI
    # (s3://bucket/prefix, gs://…); None: <workdir>/ray on the driver, enough for one machine.
    storage: str | None = None


@dataclass(frozen=True)
class HealingEngine:
    """How a trial runs its healing: in its own process (local), or as a multi-worker DeepSpeed job."""

    engine: str = "local"  # local | deepspeed
    workers: int = 2  # DeepSpeed processes per trial (Ray Train workers)
    zero_stage: int = 2  # ZeRO stage 1, 2 or 3
    bf16: bool = True  # DeepSpeed trains in bf16 (its fp32 master weights hold the masks too)
    cpu: float = 1  # Ray resources per worker
    gpu: float = 1  # 0 or a whole number: NCCL refuses two workers on one GPU
    # The local engine's mixed precision (train/loop.py): auto is bfloat16 on a CUDA GPU that has it (float16 with
    # loss scaling on one that has not) and float32 on a CPU; off, bfloat16 or float16 force it
    autocast: str = "auto"
    tf32: bool = True  # on a CUDA GPU, float32 matmuls and convolutions on TF32 tensor cores while healing


@dataclass(frozen=True)
class MlflowSpec:
    experiment: str  # the MLflow experiment the search's runs go to
    registered_model: str  # the registered model the front's versions are registered as
    tracking_uri: str | None = None  # None: a local sqlite store in the work directory


@dataclass(frozen=True)
class SparsitySpace:
    # global: one value; per_group: one per layer group; depth: knots over depth;
    # spectral: one value, spread over the groups by the Marchenko–Pastur layer budget of the dense weights;
    # macs: a reduction (how far between every group at `low` and every group at `high`, in MACs) and a shape over
    # depth (knots), whose scale the trial solves to meet that cost before it heals (prune/target.py)
    mode: str = "global"
    low: float = 0.3  # the sparsity range sampled (fractions of the prunable weights)
    high: float = 0.9  # (upper end)
    step: float | None = None  # the grid step of the range (null: continuous)
    knots: int = 3  # depth and macs modes only


@dataclass(frozen=True)
class PruneSpace:
    methods: tuple[str, ...]  # the pruning methods searched over (`autoprune methods` lists them)
    sparsity: SparsitySpace = field(default_factory=SparsitySpace)
    options: Mapping[str, Mapping[str, Dimension]] = field(default_factory=dict)  # method → option → dimension


@dataclass(frozen=True)
class HealSpace:
    methods: tuple[str, ...]  # the healing methods searched over
    # images drawn from the training split for pruning statistics and healing
    calibration_images: Dimension = field(default_factory=lambda: Fixed(256))
    steps: Dimension = field(default_factory=lambda: Fixed(100))  # optimiser steps of healing: the full budget
    # healing's peak learning rate (AdamW; warm-up, stable, then decay over the last fifth of the steps)
    lr: Dimension = field(default_factory=lambda: Fixed(1e-3))
    batch_size: int = 32  # healing's mini-batch (halved once if it runs out of memory)
    options: Mapping[str, Mapping[str, Dimension]] = field(default_factory=dict)  # method → option → dimension
    # fixed: steps and calibration_images are one value each, the budget every trial heals with (more healing
    # never costs accuracy, so it is a fidelity, not a design choice); searched: ranges the sampler draws from
    budget: str = "fixed"


@dataclass(frozen=True)
class SearchSpec:
    name: str  # the search's name (its MLflow run names start with it)
    model: ModelSpec
    data: DataSpec
    mlflow: MlflowSpec
    prune: PruneSpace
    heal: HealSpace
    # accuracy (max) and one cost (min): latency_ms, latency_p90_ms, macs or params
    objectives: Mapping[str, str] = field(default_factory=lambda: {"accuracy": "max", "latency_ms": "min"})
    latency_target_ms: float | None = None  # trials timed slower than this stop before healing; null: no target
    profile: ProfileSpec = field(default_factory=ProfileSpec)
    heal_runtime: HealingEngine = field(default_factory=HealingEngine)  # how healing runs (space.heal: which)
    search: SearchSettings = field(default_factory=SearchSettings)

    @property
    def cost_metric(self) -> str:
        """The objective traded against accuracy (latency_ms unless the spec says otherwise)."""
        return next(metric for metric in self.objectives if metric != "accuracy")

    def as_dict(self) -> dict:
        return plain(dataclasses.asdict(self))


# ---- one point of the space -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneConfig:
    method: str  # a registered pruning method
    sparsity: Mapping[str, float] = field(default_factory=dict)  # group → fraction; {"all": s} for global
    options: Mapping[str, Any] = field(default_factory=dict)
    # given: as above; spectral: {"all": s} spread over the groups by the MP layer budget; macs: `sparsity` is a
    # shape (relative weights per group), scaled to the cost `target` names within `bounds` (prune/target.py)
    allocation: str = "given"
    target: float | None = None  # macs: the reduction, 0 (every group at bounds[0]) to 1 (every group at bounds[1])
    bounds: tuple[float, float] | None = None  # macs: the sparsity range each group stays in


@dataclass(frozen=True)
class HealConfig:
    method: str  # a registered healing method
    calibration_images: int = 0  # drawn from the training pool
    steps: int = 0
    lr: float = 0.0
    batch_size: int = 32
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrialConfig:
    """One point of the search space, fully resolved: what `run_trial` executes."""

    prune: PruneConfig
    heal: HealConfig
    seed: int = 0

    def flat(self) -> dict[str, Any]:
        """Dotted keys → scalars, as MLflow params and table columns."""
        flat: dict[str, Any] = {"prune.method": self.prune.method, "heal.method": self.heal.method, "seed": self.seed}
        shaped = self.prune.allocation == "macs"
        flat.update({f"prune.{'shape' if shaped else 'sparsity'}.{group}": value
                     for group, value in self.prune.sparsity.items()})
        if self.prune.allocation != "given":
            flat["prune.allocation"] = self.prune.allocation
        if shaped:
            flat["prune.reduction"] = self.prune.target
        flat.update({f"prune.{self.prune.method}.{key}": value for key, value in self.prune.options.items()})
        for key in ("calibration_images", "steps", "lr", "batch_size"):
            flat[f"heal.{key}"] = getattr(self.heal, key)
        flat.update({f"heal.{self.heal.method}.{key}": value for key, value in self.heal.options.items()})
        return flat

    def to_json(self) -> str:
        return json.dumps(plain(dataclasses.asdict(self)), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrialConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "TrialConfig":
        prune_raw = dict(raw["prune"])
        if prune_raw.get("bounds") is not None:  # JSON gives a list
            prune_raw["bounds"] = tuple(prune_raw["bounds"])
        return cls(PruneConfig(**prune_raw), HealConfig(**raw["heal"]), raw["seed"])


def plain(value: Any) -> Any:
    """Dataclass dicts → YAML/JSON-safe plain data (tuples → lists, mapping proxies → dicts)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
