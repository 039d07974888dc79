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


def test_the_benchmark_pages_are_what_their_json_files_generate():
    """Every measured table on a page is rendered from the bench's JSON file beside it, with the command, machine
    and date the file records: a table edited by hand, or a file measured again without regenerating, fails here."""
    measured = docs.measured_pages(ROOT)
    assert ROOT / "docs" / "benchmarks" / "census.md" in measured
    for page, text in measured.items():
        assert page.read_text() == text, f"{page.relative_to(ROOT)} is out of date: run `python -m autoprune.docs`"


def test_a_bench_file_records_its_command_machine_and_date_and_a_page_shows_them(tmp_path, monkeypatch):
    from autoprune.bench import record

    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/autoprune", "bench", "faults", "--trials", "20", "--json",
                                      str(tmp_path / "faults.json")])
    assert record.command_line() == "autoprune bench faults --trials 20 --json faults.json"  # no path of this machine
    report = {"planned": 20, "finished": 15, "failed": 5, "retried": 1, "lost": 0, "mlflow_agrees": True,
              "registry_agrees": True, "front": 3, "wall_s": 37.0, "workers": [], "failures": [],
              "worker_killed": True}
    record.write(tmp_path / "faults.json", record.Provenance("faults"), report)
    provenance, results = record.read(tmp_path / "faults.json")
    assert results == report
    assert provenance["bench"] == "faults" and provenance["machine"]["cpus"] == os.cpu_count()
    assert provenance["date"][:4].isdigit() and provenance["code"]
    page = tmp_path / "faults.md"
    page.write_text("# Faults\n\nProse.\n\n<!-- generated from faults.json -->\nstale\n<!-- end of generated block -->\n")
    text = docs.with_measurements(page)
    assert "stale" not in text and "Prose." in text
    assert "Measured with `autoprune bench faults --trials 20 --json faults.json`" in text
    assert "| 20 | 15 | 5 | 1 | 0 | yes | yes | 3 |" in text
    assert "[faults.json](faults.json)" in text
    (tmp_path / "old.json").write_text("[]")  # written before files recorded where they came from
    page.write_text("<!-- generated from old.json -->\n<!-- end of generated block -->\n")
    with pytest.raises(ValueError, match="records no command or machine"):
        docs.with_measurements(page)


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
