"""Which timm models `autoprune bench families --all` checks: one per architecture, and an input each runs at.

An *architecture* is a module under `timm.models` that registers models (timm's own registry:
`timm.models._registry.list_modules()`; `resnet`, `vision_transformer`, `pit`, …). Its *variant* is its smallest
registered model: the fewest parameters at 10 classes, counted without allocating anything by building every
candidate on the `meta` device (`with torch.device("meta"): timm.create_model(name, num_classes=10)`; ~0.1 s a
candidate, so 20 s for `vision_transformer`'s 163 and 2–3 min for all of timm's ~1,350). A candidate whose meta
build fails is ranked after those that built, by the size word in its name (`zepto` < `atto` < … < `tiny` <
`small` < …; see `size_rank`); ties go to the name that sorts first (naturally: 2 before 10). Not candidates:
timm's unit-test configurations (`test_vit`, `test_resnet`, …: nobody brings them), and encoder-only variants
(`gemma4_vit_167m_enc`, …: built on the meta device they have `num_classes` 0 whatever they are asked for).

Its *input* is the smallest that runs, by one forward pass of the built model on a batch of random images, tried in
this order: 64×64 as built; 64×64 with `img_size=64` (ViT-like models fix their size when built); the same at 56×56
(for patch-14 ViTs and 7×7 windows, which 64 does not divide); the size it was built for (timm's pretrained config,
224×224 for most). The kwargs and size used travel with the results.

Skipped, always with the reason (the tables list them; never silently): an architecture in `SKIPPED` (left out by
hand), one whose every model is an encoder, and one whose chosen model runs but returns something other than one row
of class scores per image. With timm 1.0.31 none is: even the language models' vision towers (`deepseek_vit`,
`gemma4_vit`, `qwen3_vit`) and SAM's backbones build a classification head and run at 64×64 or 56×56.
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

NUM_CLASSES = 10
SMALL_INPUTS = (64, 56)  # 56: a multiple of 7, 8 and 14 (patch-14 ViTs, 7×7 windows) where 64 is not

# architecture → why it is left out by hand (none with timm 1.0.31: see the docstring); any other architecture is in
SKIPPED: dict[str, str] = {}

# size words in timm's names, smallest first: the fallback order for candidates the meta device cannot build
_SIZE_WORDS = ("zepto", "atto", "femto", "pico", "nano", "xxs", "xxtiny", "xs", "xtiny", "xx_small", "x_small",
               "tiny", "mini", "lite", "small", "s", "medium", "m", "base", "b", "large", "l", "xl", "huge", "h",
               "giant", "g", "gigantic")


@dataclass(frozen=True)
class Variant:
    """An architecture's smallest model: its name, its parameter count (None where only the name could rank it),
    and how many candidates it was chosen from."""

    architecture: str
    model: str
    params: int | None
    candidates: int
    seconds: float = 0.0


@dataclass(frozen=True)
class Input:
    """What a model runs at: the create kwargs and input size, and what was tried before (each with its error)."""

    kwargs: dict[str, Any]
    input_size: tuple[int, int, int]
    tried: tuple[str, ...] = field(default_factory=tuple)


class NotAClassifier(Exception):
    """Every model of an architecture is an encoder, or the chosen one runs but returns something other than class
    scores per image: the architecture is skipped, with this as the reason."""


class DoesNotRun(Exception):
    """No input size tried ran the dense model; the message has every attempt's error."""


def architectures() -> list[str]:
    """Every module under `timm.models` that registers at least one model, sorted (skipped ones included)."""
    import timm.models._registry as registry

    return sorted(module for module in registry.list_modules() if candidates(module))


def candidates(architecture: str) -> list[str]:
    """The models `architecture` registers (no pretrained tags), less timm's unit-test configurations."""
    import timm

    return [name for name in timm.list_models(module=architecture) if not name.startswith("test_")]


def skipped(names: Iterable[str] | None = None) -> dict[str, str]:
    """`SKIPPED` among `names` (default: every architecture)."""
    names = architectures() if names is None else names
    return {name: SKIPPED[name] for name in names if name in SKIPPED}


def count_params_meta(name: str, num_classes: int = NUM_CLASSES) -> tuple[int, bool]:
    """`name`'s parameter count at `num_classes`, built on the meta device (no memory, no initialisation), and
    whether it took the class count (an encoder-only variant, `…_enc`, builds with `num_classes` 0 whatever it is
    asked for)."""
    import timm
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    classes = getattr(model, "num_classes", num_classes)
    return sum(param.numel() for param in model.parameters()), classes == num_classes


def size_rank(name: str) -> int:
    """Where `name`'s size word sits in `_SIZE_WORDS` (len(_SIZE_WORDS) where it has none): the fallback order."""
    words = re.split(r"[_\-]", name.lower())
    ranks = [_SIZE_WORDS.index(word) for word in words if word in _SIZE_WORDS]
    joined = [i for i, word in enumerate(_SIZE_WORDS) if "_" in word and f"_{word}" in f"_{name.lower()}"]
    return min(ranks + joined, default=len(_SIZE_WORDS))


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def smallest(architecture: str) -> Variant:
    """`architecture`'s smallest model by parameter count (see the module's docstring for the rule)."""
    started = time.perf_counter()
    names = candidates(architecture)
    if not names:
        raise ValueError(f"{architecture!r} registers no model (see `architectures()`)")
    counted: list[tuple[int, list, str]] = []
    unbuilt: list[tuple[int, list, str]] = []
    encoders = []
    for name in names:
        try:
            params, classifies = count_params_meta(name)
        except Exception:  # noqa: BLE001 — a constructor that needs real tensors: ranked by its name instead
            unbuilt.append((size_rank(name), _natural(name), name))
            continue
        if classifies:
            counted.append((params, _natural(name), name))
        else:
            encoders.append(name)
    if counted:
        params, _, name = min(counted)
    elif unbuilt:
        params, name = None, min(unbuilt)[2]
    else:
        raise NotAClassifier(f"none of its {len(names)} models builds a head for {NUM_CLASSES} classes (all"
                             f" encoders: {', '.join(encoders)})")
    return Variant(architecture, name, params, len(names), time.perf_counter() - started)


def population(only: Iterable[str] | None = None, *, echo: Callable[[str], None] | None = None
               ) -> tuple[list[Variant], dict[str, str]]:
    """One `Variant` per architecture (or per name in `only`), and the skipped architectures with their reasons.
    Slow for all of timm (2–3 min: every candidate is built on the meta device); `bench families --all` chooses
    each architecture's variant in that architecture's own subprocess instead."""
    names = architectures() if only is None else list(only)
    left_out = skipped(names)
    variants = []
    for architecture in names:
        if architecture in left_out:
            continue
        try:
            variant = smallest(architecture)
        except NotAClassifier as error:
            left_out[architecture] = str(error)
            continue
        variants.append(variant)
        if echo is not None:
            echo(f"{architecture}: {variant.model} ({_millions(variant.params)} of {variant.candidates} candidates,"
                 f" {variant.seconds:.1f} s)")
    return variants, left_out


def _millions(params: int | None) -> str:
    return "size unknown" if params is None else f"{params / 1e6:.2f}M params"


def default_input_size(name: str) -> tuple[int, int, int]:
    """The size `name` is built for: timm's pretrained config (224×224 where it says nothing)."""
    from timm.models import get_pretrained_cfg

    config = get_pretrained_cfg(name)
    size = tuple(config.input_size) if config is not None and config.input_size else (3, 224, 224)
    return int(size[0]), int(size[1]), int(size[2])


def small_input(name: str, *, sizes: Sequence[int] = SMALL_INPUTS, num_classes: int = NUM_CLASSES) -> Input:
    """The first of (each of `sizes` as built, then with `img_size=` it; then its own size) at which one forward
    pass of the built model gives one row of `num_classes` scores per image. Raises NotAClassifier where a model
    runs but gives something else, DoesNotRun where no attempt ran."""
    own = default_input_size(name)
    attempts = [(kwargs, (own[0], size, size)) for size in sizes for kwargs in ({}, {"img_size": size})]
    attempts += [({}, own)] if ({}, own) not in attempts else []
    tried: list[str] = []
    not_scores = None
    takes_img_size = True
    for kwargs, input_size in attempts:
        if "img_size" in kwargs and not takes_img_size:
            continue
        label = f"{'x'.join(map(str, input_size[1:]))}{f' with {kwargs}' if kwargs else ''}"
        try:
            shape = _forward_shape(name, kwargs, input_size, num_classes)
        except Exception as error:  # noqa: BLE001 — any failure means: try the next size
            tried.append(f"{label}: {type(error).__name__}: {_first_line(error)}")
            takes_img_size &= not (isinstance(error, TypeError) and "img_size" in str(error))
            continue
        if shape != (2, num_classes):
            not_scores = f"its output at {label} has shape {shape}, not (batch, {num_classes}) class scores"
            tried.append(f"{label}: {not_scores}")
            continue
        return Input(dict(kwargs), input_size, tuple(tried))
    if not_scores is not None:
        raise NotAClassifier(not_scores)
    raise DoesNotRun("the dense model ran at no input size tried: " + "; ".join(tried))


def _forward_shape(name: str, kwargs: dict, input_size: tuple[int, int, int], num_classes: int) -> tuple:
    import timm
    import torch

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs).eval()
    with torch.no_grad():
        output = model(torch.randn(2, *input_size))
    return tuple(output.shape) if isinstance(output, torch.Tensor) else (type(output).__name__,)


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else ""
