"""The documentation: the README is a landing page, the reference pages are what the code generates, every page is
in the site's navigation, and the site builds with `mkdocs build --strict` (a broken link fails it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autoprune import docs

ROOT = Path(__file__).parents[1]
README_LINES = 250


def test_the_reference_pages_are_what_the_code_generates():
    """Every spec key with its default and valid values, and every command's help: a key or option added without
    regenerating the pages (`python -m autoprune.docs`) fails here."""
    for name, text in docs.pages().items():
        committed = (ROOT / docs.REFERENCE / name).read_text()
        assert committed == text, f"docs/reference/{name} is out of date: run `python -m autoprune.docs`"


def test_the_spec_reference_has_every_key_the_spec_reader_takes():
    page = (ROOT / docs.REFERENCE / "spec.md").read_text()
    for key in ("data.image_size", "profile.tf32", "heal_runtime.autocast", "search.resources.accelerator_type",
                "search.halving.eta", "space.prune.sparsity.mode", "latency_target_ms"):
        assert f"| `{key}` |" in page, key
    assert "| `data.source` | `reference` | `reference`, `imagefolder`, `torchvision` |" in page


def _nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_page_is_in_the_navigation_and_the_readme_is_a_landing_page():
    nav = _nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    pages = sorted(str(path.relative_to(ROOT / "docs")) for path in (ROOT / "docs").rglob("*.md"))
    assert sorted(nav) == pages
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_LINES
    for target in re.findall(r"\]\((docs/[^)#\s]+)", readme):  # the README's links into the docs exist
        assert (ROOT / target).exists(), target


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=300)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "spec" / "index.html").exists()
