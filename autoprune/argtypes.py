"""argparse types for the CLI's numbers: a value no command can use is a usage error naming its flag (exit 2),
before anything runs, not a traceback from deep inside once it has."""

from __future__ import annotations

import argparse
from typing import Callable


def _number(kind: type, holds: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, but got"
                                             f" {text!r}") from None
        if not holds(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, but got {text}")
        return value

    parse.__name__ = f"{kind.__name__} {rule}"  # what argparse names in its own messages
    return parse


positive_int = _number(int, lambda value: value > 0, "> 0")
non_negative_int = _number(int, lambda value: value >= 0, ">= 0")
positive_float = _number(float, lambda value: value > 0, "> 0")  # (NaN fails it too)
fraction = _number(float, lambda value: 0 < value < 1, "between 0 and 1 (exclusive)")
port = _number(int, lambda value: 0 < value < 65536, "a TCP port (1–65535)")
