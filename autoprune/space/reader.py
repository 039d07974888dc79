"""The validating reader: one mapping of a spec at a time (`Section`), each key taken with its type, default and
check, and every key nobody took rejected; and the value checks the sections use. Every error names the key as a
dotted path, the value and what is allowed."""

from __future__ import annotations

import difflib
import itertools
import math
import re
from typing import Any, Mapping, Sequence

from autoprune.config import Choice, Dimension, Fixed, Range
from autoprune.errors import SpecError

_REQUIRED = object()


class Section:
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

    def missing(self, key: str) -> SpecError:
        """A required key is absent: the error names a key given in its place by a slip (`names:` for `name:`)."""
        given = [other for other in self.raw if isinstance(other, str)]
        slips = difflib.get_close_matches(key, given, n=1, cutoff=0.6)
        return self.fail(key, "is required" + (f"; `{self.key(slips[0])}` is given instead: a misspelling of it?"
                                               if slips else "."))

    def section(self, key: str, *, required: bool = False) -> "Section":
        self.taken.add(key)
        if required and key not in self.raw:
            raise self.missing(key)
        return Section(self.raw.get(key), self.key(key), self.origin)

    def take(self, key: str, kind: type, default: Any = _REQUIRED, *, choices: Sequence | None = None, check=None):
        self.taken.add(key)
        if key not in self.raw or (self.raw[key] is None and default is not _REQUIRED):
            if default is _REQUIRED:
                raise self.missing(key)
            return default
        value = coerce(self.raw[key], kind)
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
                check = one_of(choices) if choices else None
                resolved_options[option] = given.take_dimension(option, type(default), Fixed(default), check=check)
            given.done()
            if problem := check_combinations(getattr(method, "check", None), resolved_options):
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
            bounds = Section(raw, self.key(key), self.origin)
            bounds.only("low", "high", "log", "step")  # a typo like `hi` is the cause, not a missing `high`
            low = bounds.take("low", kind, check=check)
            high = bounds.take("high", kind, check=check)
            log = bounds.take("log", bool, False)
            step = bounds.take("step", kind, None, check=positive)
            bounds.done()
            if low >= high:
                raise self.fail(key, f"`low < high` must hold, but got low={low}, high={high}.")
            if log and step is not None:
                raise self.fail(key, "`log` and `step` cannot be combined (Optuna's rule).")
            return Range(low, high, log, step)
        return Fixed(self._value(key, raw, kind, check))

    def _value(self, key: str, raw: Any, kind: type, check) -> Any:
        value = coerce(raw, kind)
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
            close = difflib.get_close_matches(str(unknown[0]), sorted(self.taken), n=1, cutoff=0.6)
            raise self.fail(
                str(unknown[0]), "unknown key" + (f" (did you mean {close[0]}?)" if close else "")
                + f"; valid keys here: {', '.join(sorted(self.taken))}."
            )


def coerce(value: Any, kind: type) -> Any:
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


def no_credentials(section: "Section", key: str, uri: str | None) -> str | None:
    """A spec is logged to MLflow and shared: a URI in it must not carry a secret. The value is not echoed."""
    if uri is not None and _CREDENTIALS.search(uri):
        raise section.fail(key, "holds credentials (user:password@ or a key in its query); the value is not"
                                " shown. Give them in the environment instead: MLFLOW_TRACKING_USERNAME /"
                                " MLFLOW_TRACKING_PASSWORD, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.")
    return uri


def storage_path(value: str) -> str | None:
    if not value.strip():
        return "must not be empty"
    scheme = value.split("://", 1)[0] if "://" in value else None
    if scheme is not None and scheme not in STORAGE_SCHEMES:
        return f"a path or a URI with one of the schemes {', '.join(STORAGE_SCHEMES)}"
    return None


def non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be >= 0"


def fraction(value: float) -> str | None:
    return None if 0 <= value < 1 else "`0 <= value < 1` must hold"


def open_fraction(value: float) -> str | None:
    return None if 0 < value < 1 else "`0 < value < 1` must hold"


def check_combinations(check, options: Mapping[str, Dimension]) -> str | None:
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


def one_of(choices: Sequence):
    def check(value) -> str | None:
        return None if value in choices else f"must be one of the valid choices: {', '.join(map(str, choices))}"

    return check


def at_least(minimum: int):
    def check(value: int) -> str | None:
        return None if value >= minimum else f"must be >= {minimum}"

    return check
