"""The measured tables the README quotes (`autoprune bench …`): pruning and healing methods, latency, data,
serving, a cluster, faults, model families and the search's sample efficiency."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def demo_spec() -> dict:
    """The embedded demo's spec as plain data (what YAML gives), for a benchmark to change."""
    import yaml

    with resources.as_file(resources.files("autoprune.search_spaces") / "demo.yaml") as path:
        return yaml.safe_load(Path(path).read_text())
