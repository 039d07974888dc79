"""Pruning methods, found by name. Each method module registers one `PruneMethod` (in `base.PRUNE_METHODS`).

A method gets the model and a `PruneRequest` and either masks weights (returns `Masks`, held fixed while the model
heals), removes units physically (modifies the model, returns empty `Masks`), or prunes gradually (returns a
sparsifier that the healing loop steps; see `masks.py`).
"""

from autoprune.prune import cast, gradual, magnitude, nm, none, spectral, structured, variance  # noqa: F401 (registers)
from autoprune.prune.base import PRUNE_METHODS, PruneMethod, PruneRequest, get, list_methods, register
from autoprune.prune.masks import Masks, Sparsifier

__all__ = ["Masks", "Sparsifier", "PruneMethod", "PruneRequest", "PRUNE_METHODS", "get", "list_methods", "register"]
