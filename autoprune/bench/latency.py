"""`autoprune bench latency`: what each pruning format really buys in latency, measured, on this device.

For timm architectures with random weights (a ViT, a ResNet, a ConvNeXt), dense against structured removal at
25/50/75% of the block-internal channels and attention heads, and against 2:4 semi-structured sparsity: the MACs
ratio, the measured speedup, efficiency = speedup ÷ MACs ratio, and the relative spread of the timed runs.

Needs only torch and timm, so that it runs on any GPU box:

    python -m autoprune.bench.latency --device cuda --dtype bfloat16 --batch-size 64 --json latency.json

Structured widths are cut by slicing the channels private to each block (`models.hidden_channels`: ViT / ConvNeXt
MLP neurons, ResNet inner convs, rounded to multiples of `round_to`) and whole attention heads — the shapes that
`structured` leaves, without its Torch-Pruning dependency. Latency depends on shapes, not on which channels go.
2:4 keeps the two largest of every four weights of each eligible Linear layer and is timed on the sparse kernels
where the device has them (`formats.py`), else on dense kernels, with the reason in the row's `note`.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import re
import statistics
import sys
from dataclasses import dataclass

import torch
from torch import nn

from autoprune.argtypes import positive_int
from autoprune.bench import record
from autoprune.measure.formats import DENSE, SEMI_STRUCTURED, TORCH_DTYPES, semi_structured_layers
from autoprune.measure.metrics import count_macs
from autoprune.measure.timing import profile_latency
from autoprune.models import attention_modules, hidden_channels

# name → (timm model, create kwargs, input size); CPU sizes are small enough for CI, GPU sizes are ImageNet's.
CPU_MODELS = {
    "vit": ("vit_small_patch16_224", {"img_size": 64}, (3, 64, 64)),
    "resnet": ("resnet50", {}, (3, 64, 64)),
    "convnext": ("convnext_atto", {}, (3, 64, 64)),
}
GPU_MODELS = {
    "vit": ("deit_small_patch16_224", {}, (3, 224, 224)),
    "resnet": ("resnet50", {}, (3, 224, 224)),
    "convnext": ("convnext_tiny", {}, (3, 224, 224)),
}
RATIOS = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class LatencyBench:
    models: tuple[str, ...] = ("vit", "resnet", "convnext")
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 8
    round_to: int = 8
    warmup: int = 10
    repeats: int = 30
    threads: int | None = None
    memory_format: str = "contiguous"  # or channels_last, or auto (CNNs timed both ways, the faster kept)
    compile: bool = False
    rounds: int = 3  # dense and pruned are timed alternately this many times: machine drift hits both alike
    runtimes: tuple[str, ...] = ("torch",)  # each structure timed in each (onnxruntime: measure/onnx.py)


# ---- the formats -------------------------------------------------------------------------------------------


@torch.no_grad()
def _keep_rows(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep output channels `keep` of a Linear / Conv2d / norm layer (weights, bias, running statistics)."""
    for attribute in ("weight", "bias", "running_mean", "running_var"):
        tensor = getattr(module, attribute, None)
        if tensor is None:
            continue
        sliced = tensor[keep].clone()
        if isinstance(tensor, nn.Parameter):
            setattr(module, attribute, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
        else:
            setattr(module, attribute, sliced)
    width = len(keep)
    for attribute in ("out_features", "out_channels", "num_features"):
        if hasattr(module, attribute):
            setattr(module, attribute, width)
    if hasattr(module, "normalized_shape"):
        module.normalized_shape = (width,)


@torch.no_grad()
def _keep_inputs(module: nn.Module, keep: torch.Tensor) -> None:
    module.weight = nn.Parameter(module.weight[:, keep].clone(), requires_grad=module.weight.requires_grad)
    if isinstance(module, nn.Linear):
        module.in_features = len(keep)
    else:
        module.in_channels = len(keep)


def shrink(model: nn.Module, ratio: float, round_to: int) -> nn.Module:
    """A copy with `ratio` of every block's private channels (kept widths multiples of `round_to`) and of every
    attention's heads removed (largest-norm ones kept)."""
    from autoprune.prune.heads import HeadSlicing, drop_weakest, remove_heads  # torch only
    from autoprune.prune.structured import WEIGHT_SCORES

    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    for unit in hidden_channels(model):
        producer, consumer = modules[unit.producer], modules[unit.consumer]
        width = consumer.weight.shape[1]
        keep_count = max(round_to, int(round(width * (1 - ratio) / round_to)) * round_to)
        if keep_count >= width:
            continue
        norms = producer.weight.detach().reshape(width, -1).norm(dim=1)
        keep = torch.sort(torch.argsort(norms, descending=True)[:keep_count]).values
        _keep_rows(producer, keep)
        if unit.producer_norm:
            _keep_rows(modules[unit.producer_norm], keep)
        _keep_inputs(consumer, keep)
    for _, attention in attention_modules(model):
        if isinstance(getattr(attention, "proj", None), nn.Linear):  # timm's Attention: (q|k|v, head, dim) rows
            slicing = HeadSlicing(attention.num_heads, {"qkv": 3}, "parts_first")
            remove_heads(attention, drop_weakest(attention, slicing, ratio, WEIGHT_SCORES["l2"]), slicing)
    return model


@torch.no_grad()
def two_four(model: nn.Module) -> nn.Module:
    """A copy with magnitude 2:4 masks on every Linear layer whose input width allows it (not the classifier).
    Which of them the sparse kernels take depends on their shapes (`formats.semi_structured_layers`)."""
    from autoprune.prune.nm import nm_mask

    model = copy.deepcopy(model)
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    layers = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not classifier and m.in_features % 4 == 0]
    for layer in layers:
        layer.weight.mul_(nm_mask(layer.weight, 2, 4))
    return model


def _linear_macs(model: nn.Module, layers: list[nn.Module], input_size) -> int:
    """MACs of one image in `layers` (tokens × in × out each)."""
    total = []
    handles = [layer.register_forward_hook(
        lambda m, i, o: total.append(i[0].numel() // m.in_features * m.in_features * m.out_features))
        for layer in layers]
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, *input_size, dtype=next(model.parameters()).dtype,
                                     device=next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    return sum(total)


# ---- the measurement ---------------------------------------------------------------------------------------


def run(bench: LatencyBench, echo=print, table: dict | None = None) -> list[dict]:
    import timm

    table = table or (GPU_MODELS if bench.device.startswith("cuda") else CPU_MODELS)
    device = torch.device(bench.device)
    rows = []
    for key in bench.models:
        name, kwargs, input_size = table[key]
        torch.manual_seed(0)
        dense = timm.create_model(name, pretrained=False, **kwargs).eval()

        def measure(model, fmt=DENSE, runtime="torch"):
            return profile_latency(model, input_size=input_size, batch_size=bench.batch_size, dtype=bench.dtype,
                                   warmup=bench.warmup, repeats=bench.repeats, device=device, threads=bench.threads,
                                   execution_format=fmt, memory_format=bench.memory_format, compile=bench.compile,
                                   runtime=runtime)

        reference = copy.deepcopy(dense)  # float32 on the CPU: what the variants are cut from
        base = measure(dense)
        dense_macs = count_macs(reference, input_size)
        echo(f"{key} ({name}, input {input_size[1]}×{input_size[2]}): dense {base.median_ms:.3f} ms on {base.device}")
        variants = [("structured", ratio, shrink(reference, ratio, bench.round_to), DENSE) for ratio in RATIOS]
        variants.append(("2:4", 0.5, two_four(reference), SEMI_STRUCTURED))
        for (fmt, ratio, model, execution), runtime in itertools.product(variants, bench.runtimes):
            if execution == SEMI_STRUCTURED:
                # what the 2:4 kernels would execute: half the MACs of the layers they take (pattern and shape)
                converted = [layer for _, layer in semi_structured_layers(model, TORCH_DTYPES[bench.dtype])]
                macs = dense_macs - _linear_macs(model, converted, input_size) // 2
            else:
                macs = count_macs(model, input_size)
            dense_runs, pruned_runs = [], []
            for _ in range(bench.rounds):
                dense_runs.append(measure(dense, runtime=runtime))
                pruned_runs.append(measure(model, execution, runtime))
            profile = pruned_runs[-1]
            if profile.format == DENSE and execution == SEMI_STRUCTURED:
                macs = dense_macs  # no sparse kernels here: the dense MACs ran
            dense_ms = statistics.median(run.median_ms for run in dense_runs)
            pruned_ms = statistics.median(run.median_ms for run in pruned_runs)
            per_round = [d.median_ms / p.median_ms for d, p in zip(dense_runs, pruned_runs)]
            speedup = dense_ms / pruned_ms
            row = {
                "model": key, "timm_name": name, "format": fmt, "ratio": ratio, "batch_size": bench.batch_size,
                "dtype": bench.dtype, "device": profile.device, "input_size": list(input_size),
                "dense_ms": dense_ms, "pruned_ms": pruned_ms, "macs_ratio": dense_macs / macs,
                "speedup": speedup, "efficiency": speedup / (dense_macs / macs),
                "spread": max(run.spread for run in dense_runs + pruned_runs),
                "speedup_range": [min(per_round), max(per_round)], "rounds": bench.rounds,
                "ran_as": profile.format, "note": profile.note,
                "memory_format": profile.memory_format, "compiled": profile.compiled, "runtime": profile.runtime,
            }
            rows.append(row)
            echo(f"  {fmt} {ratio:.0%} ({profile.runtime}): {pruned_ms:.3f} ms, MACs ÷{row['macs_ratio']:.2f},"
                 f" speedup {speedup:.2f}× (efficiency {row['efficiency']:.2f})" + (f" [{profile.note}]" if profile.note else ""))
    return rows


_RUNTIME_NAMES = {"torch": "PyTorch", "onnxruntime": "ONNX Runtime"}
_LAYOUT_NOTE = re.compile(r"(; )?\w+ kept: [\d.]+× faster than the other memory format")


def _range(row: dict) -> str:
    low, high = row.get("speedup_range", [row["speedup"]] * 2)
    return f"{low:.2f}–{high:.2f}"


_ONNX_DIFFERENCE = re.compile(r",? ?outputs within ([0-9.e+-]+) of PyTorch's")


def markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    first = rows[0]
    out = [f"Device: {first['device']}; batch {first['batch_size']}, {first['dtype']}"
           f"{', compiled' if first.get('compiled') else ''}; dense and pruned timed alternately"
           f" {first.get('rounds', 1)}×, medians; speedup range over the rounds; spread = (p90 − p10) ÷ median of"
           f" the worst single run.\n",
           "| model | format | removed | runtime | MACs ÷ | dense ms | pruned ms | speedup (range) | efficiency |"
           " spread |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = r["format"] if r["ran_as"] == DENSE or r["format"] != "2:4" else "2:4 (sparse kernels)"
        if r["format"] == "2:4" and r["ran_as"] == DENSE:
            fmt = "2:4 (dense kernels)"
        if r.get("memory_format", "contiguous") != "contiguous":
            fmt += ", channels-last"
        out.append(f"| {r['model']} | {fmt} | {r['ratio']:.0%} | {_RUNTIME_NAMES[r.get('runtime', 'torch')]} |"
                   f" {r['macs_ratio']:.2f} | {r['dense_ms']:.2f} |"
                   f" {r['pruned_ms']:.2f} | {r['speedup']:.2f}× ({_range(r)}) | {r['efficiency']:.2f} |"
                   f" {r['spread']:.1%} |")
    # which memory format won is in the format column; the notes keep what the reader must know
    notes = {note for r in rows if (note := _LAYOUT_NOTE.sub("", r["note"]).strip("; "))}
    # each exported model's note names its own largest difference from PyTorch: one line gives the largest of all
    differences = [float(m.group(1)) for note in notes if (m := _ONNX_DIFFERENCE.search(note))]
    notes = sorted({_ONNX_DIFFERENCE.sub("", note).strip("; ,") for note in notes})
    if differences:
        notes.append(f"ONNX Runtime's outputs are within {max(differences):.1e} of PyTorch's on every model")
    if notes:
        out.append("")
        out.extend(f"Note: {note}." for note in notes)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autoprune.bench.latency", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return main_latency(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=list(CPU_MODELS), choices=list(CPU_MODELS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="default: 64 on a GPU, 8 on a CPU")
    parser.add_argument("--round-to", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=30)
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--memory-format", default="contiguous", choices=["contiguous", "channels_last", "auto"],
                        help="auto: CNNs are timed both ways and the faster is kept (dense and pruned alike)")
    parser.add_argument("--compile", action="store_true", help="time torch.compile(model)")
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="dense and pruned timed alternately this many times (median of the rounds)")
    parser.add_argument("--runtime", nargs="+", default=["torch"], choices=["torch", "onnxruntime"],
                        help="time each structure in these runtimes (both: ONNX Runtime's speedups beside PyTorch's)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write every row here")


def main_latency(args) -> int:
    provenance = record.Provenance("latency")
    gpu = args.device.startswith("cuda")
    bench = LatencyBench(models=tuple(args.models), device=args.device,
                         dtype=args.dtype or ("bfloat16" if gpu else "float32"),
                         batch_size=args.batch_size or (64 if gpu else 8), round_to=args.round_to,
                         repeats=args.repeats, threads=args.threads, memory_format=args.memory_format,
                         compile=args.compile, rounds=args.rounds, runtimes=tuple(dict.fromkeys(args.runtime)))
    rows = run(bench)
    if args.json_path:
        record.write(args.json_path, provenance, rows)
    print()
    print(markdown(rows))
    efficiencies = [r["efficiency"] for r in rows if r["format"] == "structured"]
    if efficiencies:
        print(f"\nstructured: median efficiency {statistics.median(efficiencies):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
