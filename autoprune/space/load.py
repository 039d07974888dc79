"""The search spec: typed, frozen dataclasses loaded from YAML and validated at the boundary.

Every error names the key (as a dotted path), the value and what is allowed, and is raised before any Ray worker
starts. Unknown keys are errors, never silently dropped.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from autoprune.config import (
    DATA_SOURCES,
    DTYPES,
    HEALING_ENGINES,
    LATENCY_METRICS,
    MEMORY_FORMATS,
    SAMPLERS,
    SPARSITY_MODES,
    Choice,
    DataSpec,
    Dimension,
    Fixed,
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

# ---- loading -----------------------------------------------------------------------------------------------


def load_spec(path: str | Path) -> SearchSpec:
    """Read and validate a YAML spec file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {str(path)!r} does not exist.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from None
    return parse_spec(raw, origin=str(path))


def parse_spec(raw: Any, *, origin: str = "spec") -> SearchSpec:
    """Validate a spec given as plain data (what YAML produces)."""
    from autoprune import heal, prune  # the registries the method names are checked against

    root = _Section(raw, "", origin)
    name = root.take("name", str, check=_non_empty)
    model = root.section("model", required=True)
    model_spec = ModelSpec(
        name=model.take("name", str, check=_non_empty),
        num_classes=model.take("num_classes", int, check=_positive),
        pretrained=model.take("pretrained", bool, False),
        checkpoint=model.take("checkpoint", str, None),
        train_steps=model.take("train_steps", int, None, check=_positive),
        kwargs=model.take("kwargs", dict, {}),
    )
    model.done()
    given = [key for key, on in (("pretrained", model_spec.pretrained), ("checkpoint", model_spec.checkpoint),
                                 ("train_steps", model_spec.train_steps)) if on]
    if len(given) != 1:
        raise SpecError(
            f"{origin}: model: give exactly one source of dense weights — `pretrained: true`, `checkpoint: PATH`"
            f" or `train_steps: N` (train once on the data and cache) — but got {given or 'none'}."
        )

    data = root.section("data")
    data_spec = DataSpec(
        source=data.take("source", str, "reference", choices=DATA_SOURCES),
        train_dir=data.take("train_dir", str, None),
        val_dir=data.take("val_dir", str, None),
        image_size=data.take("image_size", int, 224, check=_positive),
        eval_images=data.take("eval_images", int, None, check=_positive),
    )
    data.done()
    if data_spec.source == "imagefolder" and not (data_spec.train_dir and data_spec.val_dir):
        raise SpecError(f"{origin}: data: `source: imagefolder` needs both `train_dir` and `val_dir`.")

    objectives = root.take("objectives", dict, {"accuracy": "max", "latency_ms": "min"})
    _check_objectives(objectives, origin)

    target = root.take("latency_target_ms", float, None, check=_positive)

    profile = root.section("profile")
    hardware = profile.section("target")
    hardware.only("accelerator_type", "cpu", "gpu")
    accelerator = hardware.take("accelerator_type", str, None, check=_non_empty)
    target_hardware = None if accelerator is None else TargetHardware(
        accelerator_type=accelerator,
        cpu=hardware.take("cpu", float, 1.0, check=_positive),
        gpu=hardware.take("gpu", float, 1.0, check=_non_negative),
    )
    if accelerator is None and hardware.raw:
        raise hardware.fail("accelerator_type", f"is required when `{hardware.path}` is given (got {hardware.raw!r}).")
    hardware.done()
    batch_size = profile.take("batch_size", int, 1, check=_positive)
    extra = tuple(profile.take("extra_batch_sizes", list, []))
    for index, size in enumerate(extra):
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise profile.fail(f"extra_batch_sizes[{index}]", f"expected a positive integer, but got {size!r}.")
    profile_spec = ProfileSpec(
        batch_size=batch_size,
        extra_batch_sizes=tuple(dict.fromkeys(size for size in extra if size != batch_size)),
        dtype=profile.take("dtype", str, "float32", choices=DTYPES),
        warmup=profile.take("warmup", int, 10, check=_non_negative),
        repeats=profile.take("repeats", int, 30, check=_at_least(3)),
        memory_format=profile.take("memory_format", str, "auto", choices=MEMORY_FORMATS),
        compile=profile.take("compile", bool, False),
        target=target_hardware,
    )
    profile.done()

    healing = root.section("healing")
    engine = healing.take("engine", str, "local", choices=HEALING_ENGINES)
    healing_engine = HealingEngine(
        engine=engine,
        workers=healing.take("workers", int, 2, check=_positive),
        zero_stage=healing.take("zero_stage", int, 2, choices=(0, 1, 2, 3)),
        bf16=healing.take("bf16", bool, True),
        cpu=healing.take("cpu", float, 1.0, check=_positive),
        gpu=healing.take("gpu", float, 1.0, check=_non_negative),
    )
    healing.done()

    search = root.section("search")
    resources = search.section("resources")
    settings = SearchSettings(
        trials=search.take("trials", int, 12, check=_positive),
        concurrency=search.take("concurrency", int, 2, check=_positive),
        sampler=search.take("sampler", str, "tpe", choices=SAMPLERS),
        seed=search.take("seed", int, 0, check=_non_negative),
        max_retries=search.take("max_retries", int, 1, check=_non_negative),
        cpu=resources.take("cpu", float, 1.0, check=_positive),
        gpu=resources.take("gpu", float, 0.0, check=_non_negative),
        storage=_no_credentials(search, "storage", search.take("storage", str, None, check=_storage)),
    )
    resources.done()
    search.done()
    _check_whole_gpus(settings, profile_spec, healing_engine, objectives, origin)

    tracking = root.section("mlflow")
    mlflow_spec = MlflowSpec(
        experiment=tracking.take("experiment", str, f"autoprune-{name}", check=_non_empty),
        registered_model=tracking.take("registered_model", str, f"{name}-pruned", check=_non_empty),
        tracking_uri=_no_credentials(tracking, "tracking_uri", tracking.take("tracking_uri", str, None)),
    )
    tracking.done()

    space = root.section("space", required=True)
    prune_section = space.section("prune", required=True)
    prune_methods = prune_section.take_names("methods", prune.PRUNE_METHODS)
    sparsity = prune_section.section("sparsity")
    sparsity_space = SparsitySpace(
        mode=sparsity.take("mode", str, "global", choices=SPARSITY_MODES),
        low=sparsity.take("low", float, 0.3, check=_fraction),
        high=sparsity.take("high", float, 0.9, check=_fraction),
        step=sparsity.take("step", float, None, check=_positive),
        knots=sparsity.take("knots", int, 3, check=_at_least(2)),
    )
    if sparsity_space.low > sparsity_space.high:
        raise SpecError(
            f"{origin}: space.prune.sparsity: `low <= high` must hold, but got"
            f" low={sparsity_space.low}, high={sparsity_space.high}."
        )
    sparsity.done()
    for method in prune_methods:
        allowed = prune.get(method).sparsity_modes
        if prune.get(method).uses_sparsity and sparsity_space.mode not in allowed:
            raise SpecError(
                f"{origin}: space.prune.sparsity.mode: {sparsity_space.mode!r} does not apply to method {method!r},"
                f" which takes: {', '.join(allowed)}."
            )
    prune_options = prune_section.take_options("options", prune.PRUNE_METHODS, prune_methods)
    prune_section.done()

    heal_section = space.section("heal", required=True)
    heal_methods = heal_section.take_names("methods", heal.HEAL_METHODS)
    heal_space = HealSpace(
        methods=heal_methods,
        calibration_images=heal_section.take_dimension("calibration_images", int, Fixed(256), check=_positive),
        steps=heal_section.take_dimension("steps", int, Fixed(100), check=_positive),
        lr=heal_section.take_dimension("lr", float, Fixed(1e-3), check=_positive),
        batch_size=heal_section.take("batch_size", int, 32, check=_positive),
        options=heal_section.take_options("options", heal.HEAL_METHODS, heal_methods),
    )
    if healing_engine.engine == "deepspeed":
        _check_deepspeed(healing_engine, prune_methods, heal_methods, origin)
    heal_section.done()
    space.done()
    root.done()
    return SearchSpec(
        name=name,
        model=model_spec,
        data=data_spec,
        mlflow=mlflow_spec,
        prune=PruneSpace(prune_methods, sparsity_space, prune_options),
        heal=heal_space,
        objectives=objectives,
        latency_target_ms=target,
        profile=profile_spec,
        healing=healing_engine,
        search=settings,
    )


def _check_whole_gpus(settings: SearchSettings, profile: ProfileSpec, healing: HealingEngine,
                      objectives: Mapping[str, Any], origin: str) -> None:
    """A GPU shared by several trials while one of them is timed measures the others' work too; NCCL refuses two
    DeepSpeed workers on one GPU. Fractions are refused where they would do that."""
    times_latency = any(metric.startswith("latency") for metric in objectives)
    shares = []
    if profile.target is None and times_latency:
        shares.append(("search.resources.gpu", settings.gpu,
                       "trials time their latency on their own GPU; a fraction lets other trials run on it meanwhile"
                       " (give whole GPUs, or measure on `profile.target`)"))
    if profile.target is not None:
        shares.append(("profile.target.gpu", profile.target.gpu,
                       "latency is timed on it; a fraction lets other work share it meanwhile"))
    if healing.engine == "deepspeed":
        shares.append(("healing.gpu", healing.gpu, "NCCL cannot run two DeepSpeed workers on one GPU"))
    for key, value, why in shares:
        if value != int(value):
            raise SpecError(f"{origin}: {key}: must be 0 or a whole number of GPUs, but got {value:g}: {why}.")


def _check_deepspeed(healing: HealingEngine, prune_methods: Sequence[str], heal_methods: Sequence[str],
                     origin: str) -> None:
    """Combinations a DeepSpeed healing job cannot run, refused before anything starts."""
    from autoprune import heal, prune

    for index, method in enumerate(heal_methods):
        if healing.zero_stage > heal.get(method).max_zero_stage:
            raise SpecError(
                f"{origin}: healing.zero_stage: {healing.zero_stage} does not work with"
                f" space.heal.methods[{index}] {method!r} (at most ZeRO stage {heal.get(method).max_zero_stage});"
                f" lower the stage or drop the method."
            )
    for index, method in enumerate(prune_methods):
        if not prune.get(method).distributable:
            raise SpecError(
                f"{origin}: space.prune.methods[{index}]: {method!r} cannot heal with `healing.engine: deepspeed`"
                f" ({prune.get(method).distributable_why}); drop the method or heal locally."
            )


def _check_objectives(objectives: Mapping[str, Any], origin: str) -> None:
    if objectives.get("accuracy") != "max":
        raise SpecError(f"{origin}: objectives: must contain `accuracy: max`, but got {dict(objectives)!r}.")
    costs = [metric for metric in objectives if metric != "accuracy"]
    if len(costs) != 1 or costs[0] not in LATENCY_METRICS:
        raise SpecError(
            f"{origin}: objectives: besides accuracy, name exactly one cost to minimise from"
            f" {', '.join(LATENCY_METRICS)}, but got {costs!r}."
        )
    if objectives[costs[0]] != "min":
        raise SpecError(f"{origin}: objectives.{costs[0]}: must be `min`, but got {objectives[costs[0]]!r}.")


# ---- the validating reader ---------------------------------------------------------------------------------

_REQUIRED = object()


class _Section:
    """One mapping of the spec; every `take` records its key, and `done` rejects the keys nobody took."""

    def __init__(self, raw: Any, path: str, origin: str) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise SpecError(f"{origin}: {path or 'the spec'}: expected a mapping, but got {raw!r}.")
        self.raw, self.path, self.origin, self.taken = raw, path, origin, set()

    def key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, message: str) -> SpecError:
        return SpecError(f"{self.origin}: {self.key(key)}: {message}")

    def section(self, key: str, *, required: bool = False) -> "_Section":
        self.taken.add(key)
        if required and key not in self.raw:
            raise self.fail(key, "is required.")
        return _Section(self.raw.get(key), self.key(key), self.origin)

    def take(self, key: str, kind: type, default: Any = _REQUIRED, *, choices: Sequence | None = None, check=None):
        self.taken.add(key)
        if key not in self.raw or (self.raw[key] is None and default is not _REQUIRED):
            if default is _REQUIRED:
                raise self.fail(key, "is required.")
            return default
        value = _coerce(self.raw[key], kind)
        if value is None:
            raise self.fail(key, f"expected {kind.__name__}, but got {self.raw[key]!r}.")
        if choices is not None and value not in choices:
            raise self.fail(key, f"{value!r} is not one of the valid choices: {', '.join(map(str, choices))}.")
        if check is not None and (problem := check(value)):
            raise self.fail(key, f"{problem}, but got {value!r}.")
        return value

    def take_names(self, key: str, registry) -> tuple[str, ...]:
        """A non-empty list of registered method names."""
        raw = self.take(key, list)
        if not raw:
            raise self.fail(key, f"must name at least one of: {', '.join(registry.names())}.")
        for index, name in enumerate(raw):
            if not isinstance(name, str) or name not in registry:
                raise self.fail(
                    f"{key}[{index}]",
                    f"{name!r} is not a registered {registry.kind}; valid choices: {', '.join(registry.names())}.",
                )
        return tuple(raw)

    def take_options(self, key: str, registry, methods: Sequence[str]) -> dict[str, dict[str, Dimension]]:
        """Per-method options over each method's defaults, each a search dimension like the budget's (a value, a
        list to choose from, or {low, high}); unknown methods, option names and values are errors."""
        options = self.section(key)
        resolved = {}
        for method in registry:
            given = options.section(method.name)
            resolved_options = {}
            for option, default in method.options.items():
                choices = method.choices.get(option)
                check = _one_of(choices) if choices else None
                resolved_options[option] = given.take_dimension(option, type(default), Fixed(default), check=check)
            given.done()
            if problem := _check_combinations(getattr(method, "check", None), resolved_options):
                raise options.fail(method.name, f"{problem}.")
            if method.name in methods:
                resolved[method.name] = resolved_options
        options.done()
        return resolved

    def take_dimension(self, key: str, kind: type, default: Dimension, *, check=None) -> Dimension:
        self.taken.add(key)
        raw = self.raw.get(key)
        if raw is None:
            return default
        if isinstance(raw, list):
            if not raw:
                raise self.fail(key, "an empty list offers no choice.")
            values = tuple(self._value(f"{key}[{i}]", item, kind, check) for i, item in enumerate(raw))
            return Choice(values)
        if isinstance(raw, dict):
            if kind not in (int, float):
                raise self.fail(key, f"expected {kind.__name__} (a value or a list of choices), but got {raw!r}.")
            bounds = _Section(raw, self.key(key), self.origin)
            bounds.only("low", "high", "log", "step")  # a typo like `hi` is the cause, not a missing `high`
            low = bounds.take("low", kind, check=check)
            high = bounds.take("high", kind, check=check)
            log = bounds.take("log", bool, False)
            step = bounds.take("step", kind, None, check=_positive)
            bounds.done()
            if low >= high:
                raise self.fail(key, f"`low < high` must hold, but got low={low}, high={high}.")
            if log and step is not None:
                raise self.fail(key, "`log` and `step` cannot be combined (Optuna's rule).")
            return Range(low, high, log, step)
        return Fixed(self._value(key, raw, kind, check))

    def _value(self, key: str, raw: Any, kind: type, check) -> Any:
        value = _coerce(raw, kind)
        if value is None:
            raise self.fail(key, f"expected {kind.__name__} (a value, a list of choices or {{low, high}}),"
                                 f" but got {raw!r}.")
        if check is not None and (problem := check(value)):
            raise self.fail(key, f"{problem}, but got {value!r}.")
        return value

    def only(self, *keys: str) -> None:
        """Reject unknown keys before reading any (done() does the same after reading)."""
        self.taken.update(keys)
        self.done()
        self.taken.clear()

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.taken, key=str)
        if unknown:
            raise self.fail(
                str(unknown[0]), f"unknown key; valid keys here: {', '.join(sorted(self.taken))}."
            )


def _coerce(value: Any, kind: type) -> Any:
    """The value as `kind`, or None when it is not one (bool is not an int; an int is a valid float)."""
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) if math.isfinite(value) else None
    if kind is float and isinstance(value, str):  # YAML reads 1e-3 (without a dot) as a string
        try:
            return float(value)
        except ValueError:
            return None
    if kind is int and isinstance(value, bool):
        return None
    return value if isinstance(value, kind) else None


STORAGE_SCHEMES = ("s3", "gs", "gcs", "abfs", "hdfs", "file")  # what pyarrow's filesystems (Ray Tune's storage) read


_CREDENTIALS = re.compile(r"^[a-z][a-z0-9+.-]*://[^/?#]*@|[?&](access_key|secret_key|session_token|password)=", re.I)


def _no_credentials(section: "_Section", key: str, uri: str | None) -> str | None:
    """A spec is logged to MLflow and shared: a URI in it must not carry a secret. The value is not echoed."""
    if uri is not None and _CREDENTIALS.search(uri):
        raise section.fail(key, "holds credentials (user:password@ or a key in its query); the value is not"
                                " shown. Give them in the environment instead: MLFLOW_TRACKING_USERNAME /"
                                " MLFLOW_TRACKING_PASSWORD, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.")
    return uri


def _storage(value: str) -> str | None:
    if not value.strip():
        return "must not be empty"
    scheme = value.split("://", 1)[0] if "://" in value else None
    if scheme is not None and scheme not in STORAGE_SCHEMES:
        return f"a path or a URI with one of the schemes {', '.join(STORAGE_SCHEMES)}"
    return None


def _non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be >= 0"


def _fraction(value: float) -> str | None:
    return None if 0 <= value < 1 else "`0 <= value < 1` must hold"


def _check_combinations(check, options: Mapping[str, Dimension]) -> str | None:
    """A method's rule over its options, tried on every combination the search could sample (a range's ends)."""
    if check is None:
        return None
    candidates = [dimension.values if isinstance(dimension, Choice) else
                  (dimension.low, dimension.high) if isinstance(dimension, Range) else (dimension.value,)
                  for dimension in options.values()]
    for values in itertools.product(*candidates):
        if problem := check(dict(zip(options, values))):
            return problem
    return None


def _one_of(choices: Sequence):
    def check(value) -> str | None:
        return None if value in choices else f"must be one of the valid choices: {', '.join(map(str, choices))}"

    return check


def _at_least(minimum: int):
    def check(value: int) -> str | None:
        return None if value >= minimum else f"must be >= {minimum}"

    return check
