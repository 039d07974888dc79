"""`autoprune bench families`: `autoprune check` over the smallest model of each timm family users bring.

Random weights on the CPU, each family at a small input size it accepts (the checks are about structure, not
accuracy or speed), every pruning method at 50% (N:M methods at their own). One row per family × method: the
outcome, the MACs ratio, the save → reload difference. The targets (issue 13): `structured` at 50% reaches a MACs
ratio ≥ 1.3 on at least 90% of the families, no method crashes without a refusal, and every method that works
reloads with equal outputs (≤ 1e-5).

Without `--all` the families are the 30 hand-chosen `FAMILIES`. With `--all` they are every timm architecture, each
checked in its own subprocess (`autoprune.bench.census`).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from autoprune.bench import record
from autoprune.bench.census import CAP_SECONDS
from autoprune.check import FAILS, WORKS, check_model
from autoprune.models import ModelSource

# family → (timm name, create kwargs, input size): the smallest of each, at an input size its layout accepts.
FAMILIES: dict[str, tuple[str, dict, tuple[int, int, int]]] = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 64}, (3, 64, 64)),
    "deit": ("deit_tiny_patch16_224", {"img_size": 64}, (3, 64, 64)),
    "deit3": ("deit3_small_patch16_224", {"img_size": 64}, (3, 64, 64)),
    "beit": ("beit_base_patch16_224", {"img_size": 64}, (3, 64, 64)),
    "eva02": ("eva02_tiny_patch14_224", {"img_size": 56}, (3, 56, 56)),
    "swin": ("swin_tiny_patch4_window7_224", {}, (3, 224, 224)),
    "swinv2": ("swinv2_cr_tiny_224", {"img_size": 64, "window_size": 4}, (3, 64, 64)),
    "maxvit": ("maxvit_nano_rw_256", {"img_size": 64}, (3, 64, 64)),
    "coatnet": ("coatnet_nano_rw_224", {"img_size": 64}, (3, 64, 64)),
    "efficientvit_mit": ("efficientvit_b0", {}, (3, 64, 64)),
    "efficientvit_msra": ("efficientvit_m0", {}, (3, 224, 224)),
    "levit": ("levit_128s", {}, (3, 224, 224)),
    "fastvit": ("fastvit_t8", {}, (3, 64, 64)),
    "mobilevit": ("mobilevit_xxs", {}, (3, 64, 64)),
    "hiera": ("hiera_tiny_224", {"img_size": 64}, (3, 64, 64)),
    "mixer": ("mixer_s32_224", {"img_size": 64}, (3, 64, 64)),
    "resnet": ("resnet18", {}, (3, 64, 64)),
    "resnet_bottleneck": ("resnet50", {}, (3, 64, 64)),
    "resnet_deep_stem": ("resnet10t", {}, (3, 64, 64)),
    "resnext": ("resnext26ts", {}, (3, 64, 64)),
    "regnetx": ("regnetx_002", {}, (3, 64, 64)),
    "regnety": ("regnety_002", {}, (3, 64, 64)),
    "convnext": ("convnext_atto", {}, (3, 64, 64)),
    "efficientnet": ("efficientnet_b0", {}, (3, 64, 64)),
    "mobilenetv3": ("mobilenetv3_small_100", {}, (3, 64, 64)),
    "mobilenetv4": ("mobilenetv4_conv_small", {}, (3, 64, 64)),
    "ghostnet": ("ghostnet_100", {}, (3, 64, 64)),
    "densenet": ("densenet121", {}, (3, 64, 64)),
    "repvgg": ("repvgg_a0", {}, (3, 64, 64)),
    "vgg": ("vgg11", {}, (3, 64, 64)),
}
SPARSITY = 0.5


def run(families: dict[str, tuple[str, dict, tuple[int, int, int]]] = FAMILIES, *, methods=None,
        echo=print) -> list[dict]:
    """One row per family × method; a family whose model cannot even be built is one row that says why."""
    rows = []
    for family, (name, kwargs, input_size) in families.items():
        try:
            result = check_model(ModelSource(name, 10, kwargs), input_size=input_size, methods=methods,
                                 sparsities=(SPARSITY,))
        except Exception as error:
            rows.append({"family": family, "model": name, "method": "—", "outcome": FAILS, "reason": str(error)[:200]})
            echo(f"{family}: cannot build {name}: {str(error)[:200]}")
            continue
        for check in result.checks:
            rows.append({"family": family, "model": name, "groups": len(result.groups), **_plain(check)})
        echo(f"{family} ({name}): " + ", ".join(f"{c.method} {c.outcome}" for c in result.checks))
    return rows


def _plain(check) -> dict:
    return asdict(check)


def markdown(rows: list[dict]) -> str:
    """Families as rows, methods as columns: the outcome and, where it works, the MACs ratio."""
    methods = sorted({row["method"] for row in rows if row["method"] != "—"})
    families = list(dict.fromkeys(row["family"] for row in rows))
    cell = {(row["family"], row["method"]): row for row in rows}
    lines = ["| family | model | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for family in families:
        model = next(row["model"] for row in rows if row["family"] == family)
        cells = []
        for method in methods:
            row = cell.get((family, method))
            if row is None:
                cells.append("—")
            elif row["outcome"] == WORKS:
                cells.append(f"{row['macs_ratio']:.2f}×")
            else:
                cells.append(row["outcome"])
        lines.append(f"| {family} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    structured = [row for row in rows if row["method"] == "structured"]
    reached = [row for row in structured if row["outcome"] == WORKS and row["macs_ratio"] >= 1.3]
    crashes = [row for row in rows if row["outcome"] == FAILS]
    unequal = [row for row in rows if row["outcome"] == WORKS and not row["reload_max_abs_diff"] <= 1e-5]
    return (f"structured at {SPARSITY:.0%}: MACs ratio ≥ 1.3 on {len(reached)} of {len(structured)} families"
            f" (target: 90%); failures without a refusal: {len(crashes)} (target: 0); working rows that reload with"
            f" outputs more than 1e-5 apart: {len(unequal)} (target: 0).")


def page(rows: list[dict]) -> str:
    """The documentation page's table and verdict, from the file `--json` wrote (without --all)."""
    return markdown(rows) + "\n\n" + verdict(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from autoprune.argtypes import positive_float, positive_int

    parser.add_argument("--json", dest="json_path", help="also write every row as JSON here (with --all: JSON Lines,"
                                                         " appended per architecture; a re-run resumes)")
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), help="only these (default: all)")
    parser.add_argument("--methods", nargs="+", help="only these pruning methods (default: all registered)")
    parser.add_argument("--all", action="store_true", help="every timm architecture (its smallest model), each in"
                                                           " its own subprocess, instead of the 30 families")
    parser.add_argument("--only", nargs="+", metavar="ARCH", help="with --all: only these timm architectures"
                                                                  " (modules of timm.models; commas also separate)")
    parser.add_argument("--cap-seconds", type=positive_float, default=CAP_SECONDS,
                        help=f"with --all: the time one architecture may take (default: {CAP_SECONDS:g})")
    parser.add_argument("--jobs", type=positive_int, default=1, help="with --all: architectures checked at once"
                                                                     " (one torch thread each; default: 1)")
    parser.add_argument("--retry-failed", action="store_true", help="with --all: check again the architectures"
                                                                    " with no verdict or a method that fails")
    parser.add_argument("--table-only", action="store_true", help="with --all: print the tables from --json,"
                                                                  " running nothing")
    parser.add_argument("--list", action="store_true", help="with --all: print each architecture's smallest model"
                                                            " (2–3 min), running no checks")


def main_families(args) -> int:
    if getattr(args, "all", False):
        return _main_all(args)
    from autoprune.errors import AutopruneError

    for flag in ("only", "retry_failed", "table_only", "list"):
        if getattr(args, flag, None):
            raise AutopruneError(f"bench families: --{flag.replace('_', '-')} goes with --all")
    provenance = record.Provenance("families")
    chosen = {family: FAMILIES[family] for family in (args.families or FAMILIES)}
    rows = run(chosen, methods=args.methods)
    if args.json_path:
        record.write(args.json_path, provenance, rows)
    print()
    print(markdown(rows))
    print()
    print(verdict(rows))
    return 0


def _main_all(args) -> int:
    from autoprune.bench.census import read_records, run_all
    from autoprune.bench.census_tables import list_population, population_markdown
    from autoprune.errors import AutopruneError

    if args.families:
        raise AutopruneError("bench families: --families names the 30 hand-chosen families; with --all use --only")
    only = [name for item in (args.only or []) for name in item.split(",") if name] or None
    if args.list:
        list_population(only)
        return 0
    if not args.json_path:
        raise AutopruneError("bench families --all: --json PATH is required (results are appended there, and a"
                             " re-run with the same path resumes)")
    if args.table_only:
        if not Path(args.json_path).exists():
            raise AutopruneError(f"bench families --table-only: {args.json_path} does not exist")
    else:
        run_all(args.json_path, only=only, methods=args.methods, cap_seconds=args.cap_seconds, jobs=args.jobs,
                retry_failed=args.retry_failed)
        print()
    records, runs = read_records(args.json_path)
    if only:
        records = {name: record for name, record in records.items() if name in only}
    print(population_markdown(records, runs))
    return 0

