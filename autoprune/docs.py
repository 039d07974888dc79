"""The generated parts of the documentation site: the reference pages — the spec (every key, its default and valid
values, read from the typed settings in config.py and the comments beside their fields) and the CLI (every command's
help, from the parser) — and, in the benchmark pages, every block of measured tables, rendered from the bench's JSON
file committed beside the page (with the command, machine and date it records). `tests/test_docs.py` fails when a
committed page differs from what this generates, and builds the site with `mkdocs build --strict`.

    python -m autoprune.docs            # rewrites docs/reference/*.md and the generated blocks of docs/**/*.md

A generated block in a page is written as

    <!-- generated from healing.json -->
    (anything: replaced by the file's provenance and tables)
    <!-- end of generated block -->

The prose around it is the page's own; the numbers are the file's.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import re
import sys
import tokenize
from pathlib import Path

from autoprune import config, heal, prune

REFERENCE = Path("docs") / "reference"

# Each spec section: its YAML path, the settings class it is read into, and the fields that sit elsewhere in the
# YAML (search's resources) or are sections of their own (left out here, listed on their own).
SECTIONS = (
    ("model", config.ModelSpec, {}),
    ("data", config.DataSpec, {}),
    ("profile", config.ProfileSpec, {"target": None}),
    ("profile.target", config.TargetHardware, {}),
    ("heal_runtime", config.HealingEngine, {}),
    ("search", config.SearchSettings, {"cpu": "search.resources.cpu", "gpu": "search.resources.gpu",
                                       "accelerator_type": "search.resources.accelerator_type", "halving": None}),
    ("search.halving", config.Halving, {}),
    ("mlflow", config.MlflowSpec, {}),
    ("space.prune", config.PruneSpace, {"sparsity": None}),
    ("space.prune.sparsity", config.SparsitySpace, {}),
    ("space.heal", config.HealSpace, {}),
)
TOP_LEVEL = ("name", "objectives", "latency_target_ms")  # SearchSpec's own keys


def choices() -> dict[str, tuple]:
    """The keys whose values come from a fixed vocabulary."""
    return {
        "data.source": config.DATA_SOURCES, "profile.dtype": config.DTYPES,
        "profile.memory_format": config.MEMORY_FORMATS, "heal_runtime.engine": config.HEALING_ENGINES,
        "heal_runtime.autocast": config.AUTOCAST, "heal_runtime.zero_stage": (0, 1, 2, 3),
        "search.sampler": config.SAMPLERS, "space.prune.sparsity.mode": config.SPARSITY_MODES,
        "space.prune.methods": tuple(prune.list_methods()), "space.heal.methods": tuple(heal.list_methods()),
        "objectives": tuple(f"{metric}: min" for metric in config.LATENCY_METRICS),
    }


def field_comments(source: str) -> dict[tuple[str, str], str]:
    """(class, field) → the comments on a dataclass field's line and the comment lines right above it."""
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    lines = source.splitlines()
    found = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            above, line = [], item.lineno - 1
            while line >= 1 and lines[line - 1].strip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            own = comments.get(item.lineno)
            found[(node.name, item.target.id)] = " ".join([*above, *([own] if own else [])])
    return found


def spec_page() -> str:
    comments = field_comments(Path(config.__file__).read_text())
    valid = choices()
    out = ["# Spec reference", "",
           "Every key of a search spec (YAML, or the same structure as a dict), generated from the typed settings in"
           " `autoprune/config.py` by `python -m autoprune.docs`. A key left out takes its default; a wrong key or"
           " value is refused before anything starts, naming the key and what is allowed. Annotated examples:"
           " `search_spaces/demo.yaml` (the embedded default), `deit_small.yaml`, `resnet50.yaml`.", "",
           "A *search dimension* is a scalar (fixed), a list (a categorical choice) or `{low, high, log, step}` (a"
           " range).", "", "## Top level", "", "| key | default | valid values | meaning |", "|---|---|---|---|"]
    top = {item.name: item for item in dataclasses.fields(config.SearchSpec)}
    for key in TOP_LEVEL:
        out.append(_row(key, top[key], comments.get(("SearchSpec", key), ""), valid.get(key)))
    for path, cls, elsewhere in SECTIONS:
        out += ["", f"## `{path}`", ""]
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            out += [" ".join(cls.__doc__.split()), ""]
        out += ["| key | default | valid values | meaning |", "|---|---|---|---|"]
        for item in dataclasses.fields(cls):
            if item.name in elsewhere and elsewhere[item.name] is None:
                continue
            key = elsewhere.get(item.name) or f"{path}.{item.name}"
            out.append(_row(key, item, comments.get((cls.__name__, item.name), ""), valid.get(key)))
    return "\n".join(out) + "\n"


def _row(key: str, item: dataclasses.Field, meaning: str, values) -> str:
    if item.default is not dataclasses.MISSING:
        default = f"`{_plain(item.default)}`"
    elif item.default_factory is not dataclasses.MISSING:
        default = f"`{_plain(item.default_factory())}`"
    else:
        default = "required"
    shown = ", ".join(f"`{value}`" for value in values) if values else _kind(item.type)
    return f"| `{key}` | {default} | {shown} | {meaning.replace('|', '/')} |"


def _plain(value) -> str:
    """A default as YAML writes it."""
    import json

    if isinstance(value, (config.Fixed, config.Choice, config.Range)):
        value = dataclasses.asdict(value)
        value = value.get("value", value)  # a fixed dimension is its value
    elif dataclasses.is_dataclass(value):
        return "{…}"
    return json.dumps(config.plain(value)).replace('"', "")


def _kind(annotation) -> str:
    text = str(annotation)
    for name, shown in (("Mapping", "a mapping"), ("Dimension", "a search dimension"),
                        ("tuple[str", "a list of names"), ("tuple[int", "a list of integers"),
                        ("tuple[float", "a list of numbers"), ("bool", "true / false"), ("float", "a number"),
                        ("int", "an integer"), ("str", "a string")):
        if name in text:
            return shown + (" or null" if "None" in text else "")
    return text


def cli_page() -> str:
    import os

    from autoprune.cli import build_parser

    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "110"  # argparse wraps help to the terminal: the page is the same on every machine
    try:
        return _cli_page(build_parser())
    finally:
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns


def _cli_page(parser) -> str:
    out = ["# CLI reference", "", "Every command's `--help`, generated from the parser by `python -m autoprune.docs`.",
           "", "```text", parser.format_help().rstrip(), "```"]
    commands = next(action for action in parser._actions if action.__class__.__name__ == "_SubParsersAction")
    for name, command in commands.choices.items():
        out += ["", f"## `autoprune {name}`", "", "```text", command.format_help().rstrip(), "```"]
    return "\n".join(out) + "\n"


def pages() -> dict[str, str]:
    return {"spec.md": spec_page(), "cli.md": cli_page()}


BLOCK = re.compile(r"(<!-- generated from (?P<file>[^ ]+) -->\n)(?P<body>.*?)(<!-- end of generated block -->)", re.S)


def measured_block(json_path: Path, link: str) -> str:
    """A bench file as a page shows it: where it comes from (`link`: the file, relative to the page), then its
    tables."""
    from autoprune.bench import commands, record

    if not json_path.exists():
        raise FileNotFoundError(f"{json_path} is not there, and a page's generated block names it: measure it with"
                                f" the bench's --json, beside the page")
    if json_path.suffix == ".jsonl":  # the census: JSON Lines, a record per architecture and one per run
        from autoprune.bench.census import read_records
        from autoprune.bench.census_tables import population_markdown, runs_text

        records, runs = read_records(json_path)
        return f"{runs_text(runs, rows_file=link)}\n\n{population_markdown(records, runs)}\n"
    provenance, results = record.read(json_path)
    if provenance is None:
        raise ValueError(f"{json_path} records no command or machine: measure it again with the bench's --json")
    return f"{record.describe(provenance, rows_file=link)}\n\n{commands.render(provenance['bench'], results)}\n"


def with_measurements(page: Path) -> str:
    """A page's text with each generated block rendered again from the JSON file it names (beside the page)."""
    return BLOCK.sub(lambda m: m.group(1) + measured_block(page.parent / m.group("file"), m.group("file")) + m.group(4),
                     page.read_text())


def measured_pages(root: Path, missing: list[str] | None = None) -> dict[Path, str]:
    """Every page of the site that has a generated block, as it should read. With `missing`, a page whose block
    names a file that is not there is left out and its reason appended (else it raises)."""
    pages = {}
    for page in sorted((root / "docs").rglob("*.md")):
        if BLOCK.search(page.read_text()):
            try:
                pages[page] = with_measurements(page)
            except FileNotFoundError as error:
                if missing is None:
                    raise
                missing.append(f"{page}: {error}")
    return pages


def main(argv: list[str] | None = None) -> int:
    root = Path(argv[0]) if argv else Path.cwd()
    folder = root / REFERENCE
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in pages().items():
        (folder / name).write_text(text)
        print(folder / name)
    missing: list[str] = []
    for page, text in measured_pages(root, missing).items():
        if page.read_text() != text:
            page.write_text(text)
            print(page)
    for line in missing:
        print(f"not generated: {line}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
