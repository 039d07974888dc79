"""A small name → entry registry, shared by the pruning and the healing methods (timm's `list_models` style)."""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

from autoprune.errors import AutopruneError


class _Named(Protocol):
    name: str


T = TypeVar("T", bound=_Named)


class Registry(Generic[T]):
    """Entries found by name; the spec names them, so an unknown name is reported with the valid choices."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, entry: T) -> T:
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} {entry.name!r} is registered twice.")
        self._entries[entry.name] = entry
        return entry

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise AutopruneError(
                f"{name!r} is not a registered {self.kind}; valid choices: {', '.join(self.names())}."
            ) from None

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._entries))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries[name] for name in self.names())
