"""`autoprune check MODEL`: what each pruning method does to a given timm model, found out in seconds on a CPU.

Users bring their own model. Before a search spends trials on it, each registered pruning method is tried on it
with random weights at a few sparsities, and the outcome is one of:

- works: it removed at least 60% of what it was asked for (a method that removes channels: and the MACs fell),
  the model saves and reloads with equal outputs, and it still trains;
- removes little: it ran, but removed less than that (or, removing channels, left the MACs where they were): the
  numbers say how much;
- removes nothing: it ran without error but left every prunable weight in place (a search would spend its trials
  on unchanged models);
- refuses: the method said that this model's layout gives it nothing to work on (`errors.Unsupported`, with why);
- fails: anything else went wrong — it crashed, or its model does not save, reload or train. The reason names the
  stage (pruning, counting MACs, saving, reloading, training) and the cause, in full.

No check raises: whatever goes wrong, in the method or around it (counting the dense model's MACs included), is a
verdict with its reason.

For each it reports the achieved sparsity, the MACs and parameter ratios (dense ÷ pruned: above 1 means smaller),
the largest output difference after save → reload, whether one backward pass works, and whether each healing
method asked for trains it one step (the search's pre-flight asks for the spec's). Nothing is timed, and
no healing goes beyond that step: this says what a method can do to the structure, not how accurate or fast the result is.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from autoprune import heal, prune
from autoprune.errors import AutopruneError, Unsupported
from autoprune.measure.formats import CHANNELS_LAST, CONTIGUOUS, ExecutionRecipe
from autoprune.measure.metrics import achieved_sparsity, count_macs, count_params, prunable_weight_count
from autoprune.measure.prepared import PreparedModel
from autoprune.measure.timing import is_convolutional
from autoprune.models import ModelSource, layer_groups, pooled_group, prunable_layers
from autoprune.saved import load_model_dir, load_prepared, save_model

WORKS, REMOVES_LITTLE, REMOVES_NOTHING, REFUSES, FAILS = "works", "removes little", "removes nothing", "refuses", "fails"
ENOUGH = 0.6  # "works" needs at least this share of the sparsity asked for
SPARSITIES = (0.3, 0.5)  # what a method that takes a sparsity is asked for
RELOAD_TOLERANCE = 1e-4  # largest output difference after save → reload that still counts as equal
CALIBRATION_IMAGES = 16  # random images for the methods that gather statistics


@dataclass(frozen=True)
class MethodCheck:
    """One method at one sparsity on the model: the outcome and what was measured (None where it failed first)."""

    method: str
    sparsity: float | None  # what it was asked for; None for a method that fixes its own (N:M)
    outcome: str  # WORKS, REMOVES_NOTHING, REFUSES or FAILS
    reason: str = ""
    achieved_sparsity: float | None = None
    macs_ratio: float | None = None  # dense ÷ pruned
    params_ratio: float | None = None
    reload_max_abs_diff: float | None = None
    trains: bool | None = None
    # each healing method checked on the pruned model → "" (one optimiser step, finite loss) or why it cannot heal it
    heals: dict[str, str] = field(default_factory=dict)
    # of a structured method's model: "" when it exports to ONNX and ONNX Runtime gives PyTorch's outputs, else why
    # (its own column: a model that does not export still prunes, and runs in PyTorch)
    onnx: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class ModelCheck:
    """Every method's checks on one model, and the layer groups a `per_group` search would use."""

    model: str
    input_size: tuple[int, int, int]
    groups: tuple[str, ...]
    checks: tuple[MethodCheck, ...] = field(default_factory=tuple)

    def working(self, method: str) -> bool:
        """Whether `method` worked at every sparsity it was checked at."""
        mine = [check for check in self.checks if check.method == method]
        return bool(mine) and all(check.outcome == WORKS for check in mine)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_model(source: ModelSource, *, input_size: tuple[int, int, int] | None = None,
                methods: Sequence[str | prune.PruneMethod] | None = None, sparsities: Sequence[float] = SPARSITIES,
                heal_methods: Sequence[str] = (), seed: int = 0, echo=None) -> ModelCheck:
    """Try every registered pruning method (or `methods`: names, or methods not registered yet) on `source` with
    random weights; on each model that works, one optimiser step of each of `heal_methods` (a healing method that
    cannot train a method's model fails that row, naming it). `input_size` defaults to the model's own (timm's
    pretrained config); `echo` receives a line per check as it finishes."""
    heal_methods = [name for name in heal_methods if heal.get(name).trains]  # (an unknown name: an error, now)
    torch.manual_seed(seed)
    dense = source.create(pretrained=False).eval()  # a model timm cannot build is the user's error (one line)
    input_size = tuple(input_size or _default_input_size(dense))
    if methods is None:
        methods = [name for name in prune.list_methods() if name != "none"]
    # an unknown name is an error before anything runs, with the registered ones listed
    resolved = [prune.get(method) if isinstance(method, str) else method for method in methods]
    try:  # the dense model itself, counted once: a failure here is every method's verdict, not a traceback
        dense_size = _stage("counting the dense model's MACs",
                            lambda: {"macs": count_macs(dense, input_size), "params": count_params(dense)})
        dense_problem = None
    except _StageFailed as failed:
        dense_size, dense_problem = None, failed.reason
    checks = []
    for method in resolved:
        for sparsity in (sparsities if method.uses_sparsity else (None,)):
            check = (MethodCheck(method.name, sparsity, FAILS, dense_problem) if dense_problem
                     else _check_one(dense, dense_size, source, method, sparsity, input_size, seed, heal_methods))
            checks.append(check)
            if echo is not None:
                echo(row_text(check))
    return ModelCheck(source.name, input_size, tuple(group.name for group in layer_groups(dense)), tuple(checks))


class _StageFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _stage(name: str, step):
    """`step()`, with any exception it raises turned into one that names this stage and the cause in full."""
    try:
        return step()
    except Exception as error:  # noqa: BLE001 — every failure becomes a verdict
        raise _StageFailed(f"{name}: {_reason(error)}") from None


def _check_one(dense: nn.Module, dense_size: dict[str, int], source: ModelSource, method: prune.PruneMethod,
               sparsity: float | None, input_size: tuple[int, int, int], seed: int,
               heal_methods: Sequence[str] = ()) -> MethodCheck:
    started = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn((2, *input_size), generator=generator)
    model = copy.deepcopy(dense)
    layers = [name for name, _ in prunable_layers(dense)]
    asked = sparsity if sparsity is not None else 0.0

    def verdict(outcome: str, reason: str = "", **measured) -> MethodCheck:
        return MethodCheck(method.name, sparsity, outcome, reason, **measured, seconds=time.perf_counter() - started)

    try:
        groups = (pooled_group(model),)
        request = prune.PruneRequest(
            groups=groups,
            sparsity={group.name: asked for group in groups},
            options=dict(method.options),
            example_inputs=example,
            calibration=torch.randn((CALIBRATION_IMAGES, *input_size), generator=generator),
            seed=seed,
        )
        try:
            masks = method.apply(model, request).finish(model)
        except Unsupported as refusal:  # the method's own "nothing here for me", saying why
            return verdict(REFUSES, _reason(refusal))
        except Exception as error:  # noqa: BLE001 — a crash inside the method
            raise _StageFailed(f"pruning: {_reason(error)}") from None
        model.eval()
        achieved = _stage("measuring the sparsity",
                          lambda: achieved_sparsity(model, layers, prunable_weight_count(dense, layers)[1]))
        measured = {
            "achieved_sparsity": achieved,
            "macs_ratio": dense_size["macs"] / max(1, _stage("counting MACs", lambda: count_macs(model, input_size))),
            "params_ratio": dense_size["params"] / max(1, count_params(model)),
        }
        if achieved < 1e-3:
            return verdict(REMOVES_NOTHING, "no prunable weight was removed or zeroed", **measured)
        little = _too_little(method, sparsity, achieved, measured["macs_ratio"])
        measured["reload_max_abs_diff"] = _stage("saving and reloading",
                                                 lambda: _reload_difference(model, source, example))
        measured["trains"] = _stage("training one step", lambda: _trains(model, example))
        if method.structured:
            measured["onnx"] = _onnx_verdict(model, example)
        measured["heals"] = {name: _heals(name, model, dense, masks, request.calibration, source.num_classes, seed)
                             for name in heal_methods}
    except _StageFailed as failed:
        return verdict(FAILS, failed.reason)
    problems = [f"healing with {name}: {why}" for name, why in measured["heals"].items() if why]
    if not measured["reload_max_abs_diff"] <= RELOAD_TOLERANCE:
        problems.append(f"reloading: outputs {measured['reload_max_abs_diff']:.2g} apart")
    if not measured["trains"]:
        problems.append("training one step: its loss or gradients are not finite")
    if problems:
        return verdict(FAILS, "; ".join(problems), **measured)
    return verdict(REMOVES_LITTLE, little, **measured) if little else verdict(WORKS, **measured)


def _too_little(method: prune.PruneMethod, asked: float | None, achieved: float, macs_ratio: float) -> str:
    """Why a method that ran removed too little to count as working ("" when it removed enough)."""
    if asked is not None and achieved < ENOUGH * asked:
        return (f"achieved sparsity {achieved:.2f} of {asked:.2f} asked ({achieved / asked:.0%}; works needs"
                f" {ENOUGH:.0%})")
    if method.structured and macs_ratio <= 1.0:
        return f"removes channels, but the MACs did not fall (×{macs_ratio:.2f})"
    return ""


def _heals(name: str, model: nn.Module, dense: nn.Module, masks, images: torch.Tensor, num_classes: int,
           seed: int) -> str:
    """One optimiser step of healing method `name` on the pruned model, as a trial would heal it: "" when its loss
    is finite, else why not (its error in full, or a loss that is not finite). In place, without copies (a large
    model's copies cost more than its step): the row's measurements are taken, and the dense teacher is only read."""
    from autoprune.data import DataBundle, ImageSet

    pixels = ((images - images.min()) / (images.max() - images.min()).clamp_min(1e-6) * 255).to(torch.uint8)
    labels = torch.arange(len(pixels)) % num_classes
    data = DataBundle(ImageSet(pixels, labels), ImageSet(pixels, labels), num_classes, (0.5,) * 3, (0.25,) * 3)
    method = heal.get(name)
    try:
        losses = method.apply(model, heal.HealRequest(
            calibration=data.train, data=data, steps=1, lr=1e-4, batch_size=min(4, len(pixels)), masks=masks,
            teacher=dense, options=dict(method.options), seed=seed))
    except Exception as error:  # noqa: BLE001 — the verdict says why
        return _reason(error)
    return "" if losses and all(torch.isfinite(torch.tensor(losses))) else f"its loss is not finite ({losses})"


def _reload_difference(model: nn.Module, source: ModelSource, example: torch.Tensor) -> float:
    """Largest output difference between the pruned model and the one saved and loaded back: as float32, and as
    served in a bf16 recipe (channels-last for a CNN) against the pruned model prepared in that recipe here — the
    same path, so any difference is the saved structure's (a model that does not reload raises, and the check
    fails with that reason)."""
    recipe = ExecutionRecipe(dtype="bfloat16", memory_format=CHANNELS_LAST if is_convolutional(model) else CONTIGUOUS)
    try:
        served = PreparedModel.build(model, recipe, "cpu", tuple(example.shape))
    except Exception:  # noqa: BLE001 — an op without a bf16 kernel on this CPU: the model's, not its reload's
        served = None
    with tempfile.TemporaryDirectory() as folder:
        save_model(model, source, folder, recipe=recipe if served else None, example_shape=tuple(example.shape))
        again = load_model_dir(folder, recipe=False)
        served_again = load_prepared(folder, device="cpu", warm_passes=0) if served else None
    with torch.no_grad():
        plain = float((model(example) - again(example)).abs().max())
    if served is None:
        return plain
    return max(plain, float((served.logits(example) - served_again.logits(example)).abs().max()))


def _onnx_verdict(model: nn.Module, example: torch.Tensor) -> str:
    """"" when `model` exports to ONNX and ONNX Runtime gives its outputs (measure/onnx.py), else why."""
    try:
        from autoprune.measure.onnx import OnnxModel, export_onnx, exportable_copy, largest_difference
        from autoprune.measure.prepared import ONNX_TOLERANCE

        plain = exportable_copy(model)
        session = OnnxModel(export_onnx(plain, example), torch.device("cpu"), 1)
        with torch.no_grad():
            expected = plain(example)
        difference = largest_difference(expected, session, example)
    except Exception as error:  # noqa: BLE001 — the verdict says why
        return _reason(error)
    if not difference <= ONNX_TOLERANCE * max(float(expected.abs().max()), 1.0):
        return f"ONNX Runtime's outputs are {difference:.2g} from PyTorch's"
    return ""


def _trains(model: nn.Module, example: torch.Tensor) -> bool:
    """One forward and backward pass on random labels: finite loss, and every gradient finite."""
    model = copy.deepcopy(model).train()
    logits = model(example)
    loss = F.cross_entropy(logits, torch.zeros(len(example), dtype=torch.long))
    loss.backward()
    grads = [param.grad for param in model.parameters() if param.grad is not None]
    return bool(torch.isfinite(loss)) and bool(grads) and all(bool(torch.isfinite(g).all()) for g in grads)


def _default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The size the model was built for: a patch embedding's image size (which `img_size=` changes), else timm's
    pretrained config (224 × 224 for most)."""
    config = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    channels, height, width = config.get("input_size", (3, 224, 224))
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if built is not None:
        height, width = (built, built) if isinstance(built, int) else tuple(built)
    return int(channels), int(height), int(width)


def _reason(error: Exception) -> str:
    """The error in full, on one line (a table row, a spec error): its own message for autoprune's errors, else its
    type and message."""
    text = " ".join(str(error).split())
    return text if isinstance(error, AutopruneError) else f"{type(error).__name__}: {text}".rstrip(": ")


COLUMNS = ("method", "sparsity", "outcome", "achieved", "MACs ×", "params ×", "reload diff", "trains", "heals", "onnx",
           "s", "reason")


def row_text(check: MethodCheck) -> str:
    return " | ".join(_cells(check))


def _cells(check: MethodCheck) -> list[str]:
    def number(value, fmt):
        return "—" if value is None else fmt.format(value)

    return [check.method, "own" if check.sparsity is None else f"{check.sparsity:.2f}", check.outcome,
            number(check.achieved_sparsity, "{:.2f}"), number(check.macs_ratio, "{:.2f}"),
            number(check.params_ratio, "{:.2f}"), number(check.reload_max_abs_diff, "{:.1e}"),
            number(check.trains, "{}"), _heal_cell(check.heals),
            "—" if check.onnx is None else "yes" if not check.onnx else "no", f"{check.seconds:.1f}",
            "; ".join(part for part in (check.reason, check.onnx and f"onnx: {check.onnx}") if part)]


def _heal_cell(heals: dict[str, str]) -> str:
    if not heals:
        return "—"
    failing = [name for name, why in heals.items() if why]
    return f"all {len(heals)}" if not failing else f"not {', '.join(failing)}"


def table(result: ModelCheck) -> str:
    """The checks as a fixed-width (markdown-compatible) table, with the model and its groups above."""
    rows = [list(COLUMNS), *(_cells(check) for check in result.checks)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    head = (f"{result.model} at {'x'.join(map(str, result.input_size))}: {len(result.groups)} layer groups"
            f" ({', '.join(result.groups[:6])}{', …' if len(result.groups) > 6 else ''})")
    return "\n".join([head, "", line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *map(line, rows[1:])])
