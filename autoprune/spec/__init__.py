"""Reading a search spec: YAML or Python → a validated `SearchSpec` (`load`), and the Optuna space it defines
(`space`). The types themselves are in `autoprune.config`."""

from autoprune.spec.load import load_spec, parse_spec

__all__ = ["load_spec", "parse_spec"]
