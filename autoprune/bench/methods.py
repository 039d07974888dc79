"""Benchmarks that print the tables the README quotes: `autoprune bench healing | pruning`.

Healing: for a small ViT and a small CNN trained on the reference task, prune with global magnitude at each
sparsity, heal with each method on a calibration set that is a fraction of the training images, and measure top-1 on
the held-out split, over several seeds (the seed draws the calibration images and the batches).

Pruning: every registered pruning method at the same target sparsity and the same healing, each run being exactly
a search trial (`run_trial`), reporting the achieved sparsity and the MACs ratio so that structured methods (which
remove less, but physically) compare at matched cost.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from autoprune import heal, prune
from autoprune.bench import record
from autoprune.config import DataSpec, ModelSpec
from autoprune.data import DataBundle, reference_task
from autoprune.driver.prepare import dense_weights, model_source
from autoprune.errors import AutopruneError
from autoprune.measure.metrics import accuracy
from autoprune.models import pooled_group

BENCH_MODELS = {
    "vit": ModelSpec(
        "vit_tiny_patch16_224", 10, train_steps=1500,
        kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2, "global_pool": "avg",
                "class_token": False},
    ),
    # Half as wide, MLP ratio 2: less redundancy, so pruning costs more accuracy before healing.
    "vit_narrow": ModelSpec(
        "vit_tiny_patch16_224", 10, train_steps=1500,
        kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "mlp_ratio": 2.0,
                "global_pool": "avg", "class_token": False},
    ),
    "cnn": ModelSpec("resnet18", 10, train_steps=600, kwargs={"layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128)}),
}
HEAL_METHODS = ("none", "recalibrate", "finetune", "distill", "align", "align_logits")
FASHION_TRAIN_IMAGES = 10_000


@dataclass(frozen=True)
class HealingBench:
    """One healing benchmark's settings: every healing method gets the same budget."""

    models: Sequence[str] = ("vit", "cnn")
    methods: Sequence[str] = HEAL_METHODS
    sparsities: Sequence[float] = (0.5, 0.75, 0.9)
    calibration_fractions: Sequence[float] = (0.01, 0.05)  # of the training images
    seeds: Sequence[int] = (0, 1, 2)
    steps: int = 150
    lr: float = 1e-3
    batch_size: int = 32
    prune_method: str = "magnitude"
    options: dict = field(default_factory=dict)  # heal method → option overrides
    data: str = "reference"  # or "fashion-mnist" (bench_data)


def bench_data(name: str, cache_dir: Path) -> tuple[DataSpec, DataBundle]:
    """The healing benchmark's task: the reference digits, or real Fashion-MNIST (10,000 training images: the
    dense models train on them, the calibration sets are drawn from them)."""
    if name == "reference":
        return DataSpec(), reference_task(seed=0)
    from autoprune.bench import FASHION_HOWTO, fashion_mnist_data, fashion_mnist_present
    from autoprune.data import torchvision_dataset

    if not fashion_mnist_present():
        raise AutopruneError(f"bench healing --data fashion-mnist: the files are not here; {FASHION_HOWTO}.")
    spec = DataSpec(**fashion_mnist_data())
    return spec, torchvision_dataset(name=spec.dataset, root=spec.root, image_size=spec.image_size,
                                     train_images=FASHION_TRAIN_IMAGES, eval_images=spec.eval_images,
                                     staging_dir=cache_dir)


def run_healing(bench: HealingBench, *, cache_dir: Path, echo: Callable[[str], None] = print) -> list[dict]:
    data_spec, data = bench_data(bench.data, cache_dir)
    rows = []
    for model_name in bench.models:
        spec = BENCH_MODELS[model_name]
        source = model_source(spec)
        dense = source.create()
        dense.load_state_dict(dense_weights(spec, data_spec, data, cache_dir=cache_dir))
        dense.eval()
        dense_accuracy = accuracy(dense, data.eval, data)
        echo(f"{model_name}: dense top-1 {dense_accuracy:.4f}")
        for sparsity in bench.sparsities:
            for fraction in bench.calibration_fractions:
                images = max(1, round(fraction * len(data.train)))
                for seed in bench.seeds:
                    for method in bench.methods:
                        started = time.perf_counter()
                        top1 = _heal_once(dense, data, bench, method, sparsity, images, seed)
                        rows.append({
                            "model": model_name, "data": bench.data, "method": bench.prune_method, "heal": method,
                            "sparsity": sparsity, "calibration_fraction": fraction, "calibration_images": images,
                            "seed": seed, "accuracy": top1, "dense_accuracy": dense_accuracy,
                            "steps": bench.steps if heal.get(method).trains else 0, "lr": bench.lr,
                            "seconds": time.perf_counter() - started,
                        })
                    echo(f"  {model_name} sparsity {sparsity:.2f} calibration {fraction:.0%} ({images} images) seed"
                         f" {seed}: " + ", ".join(f"{r['heal']} {r['accuracy']:.3f}" for r in rows[-len(bench.methods):]))
    return rows


def _heal_once(dense, data: DataBundle, bench: HealingBench, method: str, sparsity: float, images: int,
               seed: int) -> float:
    torch.manual_seed(seed)
    model = copy.deepcopy(dense)
    masks = prune.get(bench.prune_method).apply(model, prune.PruneRequest((pooled_group(model),), {"all": sparsity}))
    entry = heal.get(method)
    entry.apply(model, heal.HealRequest(
        calibration=data.train.subset(images, seed=seed), data=data, steps=bench.steps, lr=bench.lr,
        batch_size=bench.batch_size, masks=masks, teacher=dense,
        options={**entry.options, **bench.options.get(method, {})}, seed=seed,
    ))
    return accuracy(model, data.eval, data)


def healing_markdown(rows: list[dict]) -> str:
    """Per model: rows = healing methods, columns = sparsity × calibration fraction; mean ± std over seeds of
    top-1 and of the share of dense accuracy recovered."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        columns = list(dict.fromkeys((r["sparsity"], r["calibration_fraction"]) for r in mine))
        dense = mine[0]["dense_accuracy"]
        images = {(r["sparsity"], r["calibration_fraction"]): r["calibration_images"] for r in mine}
        out.append(f"**{model}** on {mine[0].get('data', 'reference')} (dense top-1 {dense:.3f}; magnitude pruning, global threshold; cell: top-1 mean ± std"
                   f" over {len({r['seed'] for r in mine})} seeds, and the share of dense accuracy recovered)\n")
        out.append("| heal | " + " | ".join(f"{s:.0%} sparse, {f:.0%} calib ({images[(s, f)]} img)" for s, f in columns)
                   + " |")
        out.append("|---|" + "---|" * len(columns))
        for method in dict.fromkeys(r["heal"] for r in mine):
            cells = []
            for column in columns:
                values = [r["accuracy"] for r in mine if r["heal"] == method
                          and (r["sparsity"], r["calibration_fraction"]) == column]
                mean = statistics.mean(values)
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{mean:.3f} ± {std:.3f} ({mean / dense:.0%})")
            out.append(f"| {method} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main_healing(*, json_path: str | None, cache_dir: str, seeds: int, quick: bool,
                 models: Sequence[str] = ("vit", "cnn"), data: str = "reference") -> int:
    provenance = record.Provenance("healing")
    bench = HealingBench(models=tuple(models), seeds=tuple(range(seeds)), data=data)
    if quick:  # a smoke run: one model, one setting
        bench = HealingBench(models=("vit",), sparsities=(0.75,), calibration_fractions=(0.01,), seeds=(0,), steps=20,
                             data=data)
    return _emit(run_healing(bench, cache_dir=Path(cache_dir)), healing_markdown, json_path, provenance)


# ---- pruning methods at matched sparsity ---------------------------------------------------------------------

PRUNE_METHODS = ("magnitude", "mp_budget", "nm", "cast", "cast+permute", "structured", "structured+taylor", "vbp",
                 "progressive", "feather")
# Table rows that are a registered method with other options: label → (method, options)
PRUNE_VARIANTS = {"cast+permute": ("cast", {"permute": True}), "structured+taylor": ("structured", {"importance": "taylor"})}


@dataclass(frozen=True)
class PruningBench:
    models: Sequence[str] = ("vit", "cnn")
    methods: Sequence[str] = PRUNE_METHODS
    sparsities: Sequence[float] = (0.5, 0.75)
    seeds: Sequence[int] = (0, 1, 2)
    heal: str = "distill"
    calibration_fraction: float = 0.05
    steps: int = 150
    lr: float = 1e-3
    batch_size: int = 32


def run_pruning(bench: PruningBench, *, cache_dir: Path, echo: Callable[[str], None] = print) -> list[dict]:
    from autoprune.config import HealConfig, ProfileSpec, PruneConfig, TrialConfig
    from autoprune.trial import TrialContext, run_trial

    data = reference_task(seed=0)
    images = max(1, round(bench.calibration_fraction * len(data.train)))
    rows = []
    for model_name in bench.models:
        spec = BENCH_MODELS[model_name]
        source = model_source(spec)
        context = TrialContext(source, dense_weights(spec, DataSpec(), data, cache_dir=cache_dir), data,
                               ProfileSpec(batch_size=1, warmup=1, repeats=3))
        dense = run_trial(TrialConfig(PruneConfig("none"), HealConfig("none")), context, threads=1)
        echo(f"{model_name}: dense top-1 {dense.accuracy:.4f}")
        for sparsity in bench.sparsities:
            for label in bench.methods:
                method, options = PRUNE_VARIANTS.get(label, (label, {}))
                entry = prune.get(method)
                options = {**entry.options, **options}
                for seed in bench.seeds:
                    config = TrialConfig(
                        PruneConfig(method, {"all": sparsity} if entry.uses_sparsity else {}, options),
                        HealConfig(bench.heal, images, bench.steps, bench.lr, bench.batch_size,
                                   dict(heal.get(bench.heal).options)),
                        seed=seed,
                    )
                    result = run_trial(config, context, threads=1)
                    rows.append({
                        "model": model_name, "method": method, "variant": label, "options": options,
                        "heal": bench.heal, "sparsity": sparsity,
                        "achieved_sparsity": result.sparsity, "macs_ratio": dense.macs / result.macs,
                        "calibration_fraction": bench.calibration_fraction, "seed": seed,
                        "accuracy": result.accuracy, "dense_accuracy": dense.accuracy,
                    })
                mine = rows[-len(bench.seeds):]
                echo(f"  {model_name} {label} target {sparsity:.2f}: achieved {mine[0]['achieved_sparsity']:.2f},"
                     f" MACs ÷{mine[0]['macs_ratio']:.2f}, top-1 "
                     + ", ".join(f"{r['accuracy']:.3f}" for r in mine))
    return rows


def pruning_markdown(rows: list[dict]) -> str:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        first = mine[0]
        healing = (f"{first['heal']} on {first['calibration_fraction']:.0%} of the training images"
                   if first["heal"] != "none" else "none")
        out.append(f"**{model}** (dense top-1 {first['dense_accuracy']:.3f}; healing: {healing};"
                   f" mean ± std over seeds)\n")
        out.append("| method | target sparsity | achieved sparsity | MACs ÷ | top-1 | of dense |")
        out.append("|---|---|---|---|---|---|")
        for key in dict.fromkeys((r["sparsity"], r["variant"]) for r in mine):
            group = [r for r in mine if (r["sparsity"], r["variant"]) == key]
            accs = [r["accuracy"] for r in group]
            mean = statistics.mean(accs)
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            out.append(f"| {key[1]} | {key[0]:.0%} | {group[0]['achieved_sparsity']:.0%} | {group[0]['macs_ratio']:.2f}"
                       f" | {mean:.3f} ± {std:.3f} | {mean / group[0]['dense_accuracy']:.0%} |")
        out.append("")
    return "\n".join(out)


def main_pruning(*, json_path: str | None, cache_dir: str, seeds: int, quick: bool,
                 models: Sequence[str] = ("vit", "cnn"), heal_method: str = "distill") -> int:
    provenance = record.Provenance("pruning")
    bench = PruningBench(models=tuple(models), seeds=tuple(range(seeds)), heal=heal_method)
    if quick:
        bench = PruningBench(models=("vit",), sparsities=(0.5,), seeds=(0,), steps=10, heal=heal_method)
    return _emit(run_pruning(bench, cache_dir=Path(cache_dir)), pruning_markdown, json_path, provenance)


def _emit(rows: list[dict], markdown: Callable[[list[dict]], str], json_path: str | None,
          provenance: record.Provenance) -> int:
    """Every measurement as JSON rows (if asked, with the command and machine), then the table."""
    if json_path:
        record.write(json_path, provenance, rows)
    print()
    print(markdown(rows))
    return 0


# ---- the CLI: `autoprune bench healing | pruning` ------------------------------------------------------------------

def _add_common_arguments(parser) -> None:
    from autoprune.argtypes import positive_int
    from autoprune.tracking.store import DEFAULT_WORKDIR

    parser.add_argument("--json", dest="json_path", help="also write every measurement as JSON rows here")
    parser.add_argument("--seeds", type=positive_int, default=3)
    parser.add_argument("--models", nargs="+", default=["vit", "cnn"], choices=["vit", "vit_narrow", "cnn"],
                        help="which benchmark models (default: vit cnn)")
    parser.add_argument("--quick", action="store_true", help="a one-setting smoke run")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR, help="where the trained dense models are cached")


def add_healing_arguments(parser) -> None:
    _add_common_arguments(parser)
    parser.add_argument("--data", default="reference", choices=["reference", "fashion-mnist"],
                        help="the task (default: reference; fashion-mnist reads Debian's dataset-fashion-mnist)")


def add_pruning_arguments(parser) -> None:
    _add_common_arguments(parser)
    parser.add_argument("--heal", default="distill", help="the healing every method gets (default: distill;"
                                                          " `none` compares the pruning criteria alone)")


def _common(args) -> dict:
    return dict(json_path=args.json_path, cache_dir=str(Path(args.workdir) / "cache"), seeds=args.seeds,
                quick=args.quick, models=args.models)


def healing_table(args) -> int:
    return main_healing(**_common(args), data=args.data)


def pruning_table(args) -> int:
    return main_pruning(**_common(args), heal_method=args.heal)
