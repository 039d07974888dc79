"""`autoprune bench TABLE`: the tables the README quotes, one entry each — the module that measures it, what it
measures, and its two functions (the flags it takes, what runs it) — so that the CLI lists, parses and runs them
from one registry. A module is imported when its table's flags are read."""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Table:
    module: str  # under autoprune.bench
    text: str  # what it measures (the CLI's help)
    add: str = "add_arguments"  # its function that adds the table's flags to a parser
    main: str = ""  # its function that runs the table from parsed arguments (default: main_<table>)
    page: str = "page"  # its function that renders what `--json` wrote as the documentation page's tables


TABLES: dict[str, Table] = {
    "demo": Table("demo", "the embedded demo's search in a fresh work directory, then again: where its time goes,"
                          " what it timed and stopped, the front"),
    "healing": Table("methods", "recovery per healing method, sparsity and budget", "add_healing_arguments",
                     "healing_table", "healing_markdown"),
    "pruning": Table("methods", "every pruning method at matched sparsity with the same healing",
                     "add_pruning_arguments", "pruning_table", "pruning_markdown"),
    "latency": Table("latency", "dense vs structured vs 2:4 latency on this device", page="markdown"),
    "noise": Table("noise", "latencies quiet and beside busy processes: timed alone (the old way) against paired"
                            " with the dense model"),
    "serve": Table("serve", "registered vs served latency of the demo's and a ResNet's fronts, loaded in fresh"
                            " processes"),
    "data": Table("data", "driver and worker memory, and start-up, of a search on ImageNet-sized data (4 trials at"
                          " once)", page="markdown"),
    "cluster": Table("cluster", "one small search: embedded vs an mlflow server vs a two-node Ray cluster on"
                                " loopback", page="markdown"),
    "faults": Table("faults", "a search where trials fail at random and a worker is killed: nothing lost, records"
                              " agree", page="text"),
    "families": Table("families", "`autoprune check` over the smallest model of each timm family (--all: of every"
                                  " timm architecture), every method at 50%%"),
    "search": Table("search", "hypervolume against trials per sampler, and a grid, over seeds, on the reference task"
                              " and Fashion-MNIST"),
    "pool": Table("pool", "a table of configurations spread over the demo's space, each evaluated at every rung and"
                          " two healing seeds, for `bench replay`"),
    "schedule": Table("schedule", "healing on the warm-up–stable–decay schedule (rungs continue) against warm-up–cosine,"
                                  " paired at the full budget"),
    "replay": Table("replay", "search strategies replayed against pools for many paired seeds: healing steps and"
                              " seconds to reach 90%% and 95%% of the pooled front's hypervolume"),
}


def _function(table: str, kind: str):
    entry = TABLES[table]
    name = getattr(entry, kind) or f"main_{table}"
    return getattr(importlib.import_module(f"autoprune.bench.{entry.module}"), name)


def render(table: str, results) -> str:
    """What a table's `--json` file holds, as the markdown its documentation page shows."""
    return _function(table, "page")(results)


def add_bench_parser(commands) -> None:
    bench = commands.add_parser("bench", help="measure the tables the README quotes")
    tables = bench.add_subparsers(dest="table", required=True, metavar="{" + ",".join(TABLES) + "}")
    for table, entry in TABLES.items():
        _function(table, "add")(tables.add_parser(table, help=entry.text))


def run_bench(args: argparse.Namespace) -> int:
    return _function(args.table, "main")(args)
