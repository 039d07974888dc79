"""A spec, from YAML or built in Python, → a validated `SearchSpec`, one section at a time.

Every error names the key (as a dotted path), the value and what is allowed, and is raised before any Ray worker
starts. Unknown keys are errors, never silently dropped. The reading of one mapping is reader.py's; the rules
across sections are checks.py's.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Mapping

import yaml

from autoprune import heal, prune
from autoprune.config import (
    AUTOCAST,
    DATA_SOURCES,
    DTYPES,
    HEAL_BUDGETS,
    HEALING_ENGINES,
    MEMORY_FORMATS,
    RUNTIMES,
    SAMPLERS,
    SPARSITY_MODES,
    Choice,
    DataSpec,
    Fixed,
    Halving,
    HealingEngine,
    HealSpace,
    MlflowSpec,
    ModelSpec,
    ProfileSpec,
    PruneSpace,
    Range,
    SearchSettings,
    SearchSpec,
    SparsitySpace,
    TargetHardware,
)
from autoprune.errors import SpecError
from autoprune.space import checks
from autoprune.space.reader import (
    Section,
    at_least,
    fraction,
    no_credentials,
    non_empty,
    non_negative,
    open_fraction,
    positive,
    storage_path,
)

RENAMED_SPARSITY_MODES = {"profile": "depth"}  # old name → new: still read, with a warning


def load_spec(path: str | Path) -> SearchSpec:
    """Read and validate a YAML spec file."""
    path = Path(path)
    if path.is_dir():
        raise SpecError(f"spec file {str(path)!r} is a directory; give the YAML file in it"
                        f"{_yaml_files_in(path)}.")
    if not path.is_file():
        raise SpecError(f"spec file {str(path)!r} does not exist.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise SpecError(f"spec file {str(path)!r} is not text (not UTF-8): a spec is a YAML file.") from None
    except OSError as error:
        raise SpecError(f"spec file {str(path)!r} cannot be read: {error.strerror or error}.") from None
    except yaml.YAMLError as error:  # its message spans lines (a caret under the spot): said in one
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        context = getattr(error, "context", None)
        raise SpecError(f"{path}: not valid YAML{where}: {problem}" + (f" ({context})" if context else "")) from None
    return parse_spec(raw, origin=str(path))


def _yaml_files_in(folder: Path) -> str:
    names = sorted(p.name for p in folder.glob("*.y*ml"))[:5]
    return f" (there: {', '.join(names)})" if names else ""


def validate(spec: SearchSpec) -> SearchSpec:
    """A spec built in Python, held to the same rules as one read from YAML: it is written as the YAML that would
    give it, and read back."""
    if not isinstance(spec, SearchSpec):
        raise SpecError(f"expected a SearchSpec, but got {type(spec).__name__}.")
    raw = _as_yaml(spec)
    raw["space"] = {"prune": raw.pop("prune"), "heal": raw.pop("heal")}
    raw["search"]["resources"] = {key: raw["search"].pop(key) for key in ("cpu", "gpu", "accelerator_type")
                                  if key in raw["search"]}
    return parse_spec(raw, origin="SearchSpec")


def _as_yaml(value: Any) -> Any:
    """Typed settings → the plain data a YAML spec holds (a fixed dimension as its value, a choice as a list, a
    range as {low, high, log, step}; unset values left out)."""
    if isinstance(value, Fixed):
        return _as_yaml(value.value)
    if isinstance(value, Choice):
        return [_as_yaml(item) for item in value.values]
    if isinstance(value, Range):
        return {key: item for key, item in dataclasses.asdict(value).items() if item is not None}
    if dataclasses.is_dataclass(value):
        fields = ((field.name, getattr(value, field.name)) for field in dataclasses.fields(value))
        return {name: _as_yaml(item) for name, item in fields if item is not None}
    if isinstance(value, Mapping):
        return {key: _as_yaml(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_yaml(item) for item in value]
    return value


def parse_spec(raw: Any, *, origin: str = "spec") -> SearchSpec:
    """Validate a spec given as plain data (what YAML produces)."""
    root = Section(raw, "", origin)
    name = root.take("name", str, check=non_empty)
    model = _model(root.section("model", required=True))
    data = _data(root.section("data"))
    data = dataclasses.replace(data, image_size=_image_size(data, model, origin))
    objectives = root.take("objectives", dict, {"accuracy": "max", "latency_ms": "min"})
    checks.objectives(objectives, origin)
    target = root.take("latency_target_ms", float, None, check=positive)
    profile = _profile(root.section("profile"))
    # `healing:` was its name, beside `space.heal:` (which names the methods): still read, with a warning
    healing = _heal_runtime(_renamed(root, "healing", "heal_runtime").section("heal_runtime"))
    settings = _search(root.section("search"))
    checks.whole_gpus(settings, profile, healing, objectives, origin)
    checks.halving_objective(settings, objectives, origin)
    checks.halving_engine(settings, healing, origin)
    mlflow = _mlflow(root.section("mlflow"), name)
    space = root.section("space", required=True)
    prune_space = _prune_space(space.section("prune", required=True))
    heal_space = _heal_space(space.section("heal", required=True))
    if healing.engine == "deepspeed":
        checks.deepspeed_combinations(healing, prune_space.methods, heal_space.methods, origin)
    space.done()
    root.done()
    return SearchSpec(name=name, model=model, data=data, mlflow=mlflow, prune=prune_space, heal=heal_space,
                      objectives=objectives, latency_target_ms=target, profile=profile, heal_runtime=healing,
                      search=settings)


def _renamed(root: Section, old: str, new: str) -> Section:
    """Read a section under its old name as the new one, with a warning; both at once is an error."""
    if old in root.raw:
        if new in root.raw:
            raise root.fail(old, f"is the old name of `{new}`; give one of them, not both.")
        warnings.warn(f"{root.origin}: `{old}:` is now called `{new}:`; read as `{new}:`.", FutureWarning, stacklevel=4)
        root.raw = {new if key == old else key: value for key, value in root.raw.items()}
    return root


def _model(section: Section) -> ModelSpec:
    spec = ModelSpec(
        name=section.take("name", str, check=non_empty),
        num_classes=section.take("num_classes", int, check=positive),
        pretrained=section.take("pretrained", bool, False),
        checkpoint=section.take("checkpoint", str, None),
        train_steps=section.take("train_steps", int, None, check=positive),
        kwargs=section.take("kwargs", dict, {}),
    )
    section.done()
    given = [key for key, on in (("pretrained", spec.pretrained), ("checkpoint", spec.checkpoint),
                                 ("train_steps", spec.train_steps)) if on]
    if len(given) != 1:
        raise SpecError(
            f"{section.origin}: model: give exactly one source of dense weights — `pretrained: true`,"
            f" `checkpoint: PATH` or `train_steps: N` (train once on the data and cache) — but got {given or 'none'}."
        )
    return spec


def _data(section: Section) -> DataSpec:
    spec = DataSpec(
        source=section.take("source", str, "reference", choices=DATA_SOURCES),
        train_dir=section.take("train_dir", str, None),
        val_dir=section.take("val_dir", str, None),
        dataset=section.take("dataset", str, None),
        root=section.take("root", str, None),
        image_size=section.take("image_size", int, None, check=positive),
        eval_images=section.take("eval_images", int, None, check=positive),
    )
    section.done()
    if spec.source == "imagefolder" and not (spec.train_dir and spec.val_dir):
        raise SpecError(f"{section.origin}: data: `source: imagefolder` needs both `train_dir` and `val_dir`.")
    if spec.source == "torchvision" and not (spec.dataset and spec.root):
        raise SpecError(f"{section.origin}: data: `source: torchvision` needs `dataset` (a torchvision class name such"
                        " as FashionMNIST) and `root` (the folder that holds it; nothing is downloaded).")
    return spec


def _image_size(data: DataSpec, model: ModelSpec, origin: str) -> int:
    """The side of the square images the model sees. The reference task's are 32×32. Otherwise `data.image_size`
    when given, else the model's own size (`model.kwargs.img_size`, else timm's default config for the model: 224
    for most models, 384 for a `…_384` one). A size given that the model's `img_size` contradicts is an error; one
    the model cannot run at is caught by the pre-flight's forward pass."""
    from autoprune.data import REFERENCE_IMAGE_SIZE
    from autoprune.models import native_image_size

    if data.source == "reference":
        if data.image_size not in (None, REFERENCE_IMAGE_SIZE):
            raise SpecError(f"{origin}: data.image_size: {data.image_size}, but the reference task's images are"
                            f" {REFERENCE_IMAGE_SIZE}×{REFERENCE_IMAGE_SIZE}; leave image_size out.")
        return REFERENCE_IMAGE_SIZE
    built_for = native_image_size(model.name, model.kwargs)
    if data.image_size is None:
        return built_for or 224
    fixed = model.kwargs.get("img_size")
    if fixed is not None and built_for is not None and built_for != data.image_size:
        raise SpecError(f"{origin}: data.image_size: {data.image_size}, but model.kwargs.img_size is {fixed!r}: the"
                        f" model takes {built_for}×{built_for} images. Make them agree, or leave data.image_size out"
                        " (it is then the model's).")
    return data.image_size


def _profile(section: Section) -> ProfileSpec:
    batch_size = section.take("batch_size", int, 1, check=positive)
    extra = tuple(section.take("extra_batch_sizes", list, []))
    for index, size in enumerate(extra):
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise section.fail(f"extra_batch_sizes[{index}]", f"expected a positive integer, but got {size!r}.")
    spec = ProfileSpec(
        batch_size=batch_size,
        extra_batch_sizes=tuple(dict.fromkeys(size for size in extra if size != batch_size)),
        dtype=section.take("dtype", str, "float32", choices=DTYPES),
        warmup=section.take("warmup", int, 10, check=non_negative),
        repeats=section.take("repeats", int, 30, check=at_least(3)),
        tolerance=section.take("tolerance", float, 0.10, check=open_fraction),
        max_seconds=section.take("max_seconds", float, 20.0, check=positive),
        memory_format=section.take("memory_format", str, "auto", choices=MEMORY_FORMATS),
        compile=section.take("compile", bool, False),
        tf32=section.take("tf32", bool, True),
        runtime=section.take("runtime", str, "torch", choices=RUNTIMES),
        target=_target_hardware(section.section("target")),
    )
    section.done()
    if spec.runtime == "onnxruntime" and (spec.dtype != "float32" or spec.compile):
        raise section.fail("runtime", f"onnxruntime runs float32 models here, uncompiled (ONNX Runtime compiles its"
                                      f" own graph): set profile.dtype: float32 (it is {spec.dtype}) and leave"
                                      " profile.compile false, or time in runtime: torch.")
    return spec


def _target_hardware(section: Section) -> TargetHardware | None:
    section.only("accelerator_type", "cpu", "gpu")
    accelerator = section.take("accelerator_type", str, None, check=non_empty)
    if accelerator is None:
        if section.raw:
            raise section.fail("accelerator_type", f"is required when `{section.path}` is given (got {section.raw!r}).")
        return None
    spec = TargetHardware(
        accelerator_type=accelerator,
        cpu=section.take("cpu", float, 1.0, check=positive),
        gpu=section.take("gpu", float, 1.0, check=non_negative),
    )
    section.done()
    return spec


def _heal_runtime(section: Section) -> HealingEngine:
    spec = HealingEngine(
        engine=section.take("engine", str, "local", choices=HEALING_ENGINES),
        workers=section.take("workers", int, 2, check=positive),
        zero_stage=section.take("zero_stage", int, 2, choices=(0, 1, 2, 3)),
        bf16=section.take("bf16", bool, True),
        cpu=section.take("cpu", float, 1.0, check=positive),
        gpu=section.take("gpu", float, 1.0, check=non_negative),
        autocast=section.take("autocast", str, "auto", choices=AUTOCAST),
        tf32=section.take("tf32", bool, True),
    )
    section.done()
    return spec


def _search(section: Section) -> SearchSettings:
    resources = section.section("resources")
    spec = SearchSettings(
        trials=section.take("trials", int, 12, check=positive),
        concurrency=section.take("concurrency", int, 2, check=positive),
        sampler=section.take("sampler", str, "gp", choices=SAMPLERS),
        seed=section.take("seed", int, 0, check=non_negative),
        max_retries=section.take("max_retries", int, 1, check=non_negative),
        stop_unless_faster=section.take("stop_unless_faster", bool, True),
        halving=_halving(section),
        cpu=resources.take("cpu", float, 1.0, check=positive),
        gpu=resources.take("gpu", float, 0.0, check=one_gpu_at_most),
        accelerator_type=resources.take("accelerator_type", str, None, check=non_empty),
        storage=no_credentials(section, "storage", section.take("storage", str, None, check=storage_path)),
    )
    checks.gpu_type_needs_gpu(spec, resources)
    resources.done()
    section.done()
    return spec


def one_gpu_at_most(value: float) -> str | None:
    if value < 0:
        return "must be >= 0"
    if value > 1:
        return ("must be at most 1: a trial heals, times and evaluates on one GPU and would leave the others idle;"
                " for more GPUs per trial, heal with heal_runtime.engine: deepspeed and its workers")
    return None


def at_least_two(value: int) -> str | None:
    return None if value >= 2 else "must be at least 2"


def _halving(search: Section) -> Halving | None:
    """`search.halving`: true (the default rungs and margin), false / absent, or {rungs: [...], margin: ...}."""
    raw = search.raw.get("halving") if isinstance(search.raw, dict) else None
    if raw is None or isinstance(raw, bool):
        search.take("halving", bool, False)
        return Halving() if raw else None
    section = search.section("halving")
    rungs = section.take("rungs", list, list(Halving.rungs))
    if not rungs or any(not isinstance(r, (int, float)) or isinstance(r, bool) or not 0 <= r < 1 for r in rungs):
        raise section.fail("rungs", f"must be fractions of the full healing budget, each at least 0 (the pruned model"
                                    f" before training) and below 1 (say [0, 0.11, 0.33]), but got {rungs!r}.")
    halving = Halving(rungs=tuple(sorted({float(r) for r in rungs})),
                      margin=section.take("margin", float, Halving.margin, check=non_negative),
                      eta=section.take("eta", int, Halving.eta, check=at_least_two))
    section.done()
    return halving


def _mlflow(section: Section, name: str) -> MlflowSpec:
    spec = MlflowSpec(
        experiment=section.take("experiment", str, f"autoprune-{name}", check=non_empty),
        registered_model=section.take("registered_model", str, f"{name}-pruned", check=non_empty),
        tracking_uri=no_credentials(section, "tracking_uri", section.take("tracking_uri", str, None)),
    )
    section.done()
    return spec


def _prune_space(section: Section) -> PruneSpace:
    methods = section.take_names("methods", prune.PRUNE_METHODS)
    sparsity = _sparsity(section.section("sparsity"))
    checks.sparsity_mode(sparsity, methods, section.origin)
    options = section.take_options("options", prune.PRUNE_METHODS, methods)
    section.done()
    return PruneSpace(methods, sparsity, options)


def _sparsity(section: Section) -> SparsitySpace:
    old = section.raw.get("mode")
    if isinstance(old, str) and old in RENAMED_SPARSITY_MODES:
        new = RENAMED_SPARSITY_MODES[old]
        warnings.warn(f"{section.origin}: {section.key('mode')}: {old!r} is now called {new!r}; read as {new!r}.",
                      FutureWarning, stacklevel=4)
        section.raw = {**section.raw, "mode": new}
    spec = SparsitySpace(
        mode=section.take("mode", str, "global", choices=SPARSITY_MODES),
        low=section.take("low", float, 0.3, check=fraction),
        high=section.take("high", float, 0.9, check=fraction),
        step=section.take("step", float, None, check=positive),
        knots=section.take("knots", int, 3, check=at_least(2)),
    )
    if spec.low > spec.high:
        raise SpecError(f"{section.origin}: space.prune.sparsity: `low <= high` must hold, but got"
                        f" low={spec.low}, high={spec.high}.")
    section.done()
    return spec


def _heal_space(section: Section) -> HealSpace:
    methods = section.take_names("methods", heal.HEAL_METHODS)
    spec = HealSpace(
        methods=methods,
        calibration_images=section.take_dimension("calibration_images", int, Fixed(256), check=positive),
        steps=section.take_dimension("steps", int, Fixed(100), check=positive),
        lr=section.take_dimension("lr", float, Fixed(1e-3), check=positive),
        batch_size=section.take("batch_size", int, 32, check=positive),
        options=section.take_options("options", heal.HEAL_METHODS, methods),
        budget=section.take("budget", str, "fixed", choices=HEAL_BUDGETS),
    )
    checks.fixed_budget(spec, section)
    section.done()
    return spec



__all__ = ["load_spec", "parse_spec", "validate"]


def demo_document() -> dict:
    """The embedded demo's spec (`autoprune/search_spaces/demo.yaml`) as plain data, for a caller to change."""
    from importlib import resources

    with resources.as_file(resources.files("autoprune.search_spaces") / "demo.yaml") as path:
        return yaml.safe_load(Path(path).read_text())
