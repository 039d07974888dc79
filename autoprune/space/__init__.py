"""The search space: a spec (YAML or Python) → a validated `SearchSpec` (`load`), and that space as Optuna samples
it, point by point, into `TrialConfig`s (`define`). The types themselves are in `autoprune.config`."""

from autoprune.space.load import load_spec, parse_spec, validate

__all__ = ["load_spec", "parse_spec", "validate"]
