"""The shipped search specs, installed as the package `autoprune.search_spaces` (see pyproject.toml)."""
