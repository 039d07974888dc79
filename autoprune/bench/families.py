"""`autoprune bench families`: `autoprune check` over the smallest model of each timm family users bring.

Random weights on the CPU, each family at a small input size it accepts (the checks are about structure, not
accuracy or speed), every pruning method at 50% (N:M methods at their own). One row per family × method: the
outcome, the MACs ratio, the save → reload difference. The targets (issue 13): `structured` at 50% reaches a MACs
ratio ≥ 1.3 on at least 90% of the families, no method crashes without a refusal, and every method that works
reloads with equal outputs (≤ 1e-5).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
    from dataclasses import asdict

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", dest="json_path", help="also write every row as JSON here")
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), help="only these (default: all)")
    parser.add_argument("--methods", nargs="+", help="only these pruning methods (default: all registered)")


def main_families(args) -> int:
    chosen = {family: FAMILIES[family] for family in (args.families or FAMILIES)}
    rows = run(chosen, methods=args.methods)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rows, indent=1))
    print()
    print(markdown(rows))
    print()
    print(verdict(rows))
    return 0
