"""The dense model unchanged: the reference point on every front."""

from autoprune.prune.base import PruneMethod, PruneRequest, register
from autoprune.prune.masks import Masks


def _keep_all(model, request: PruneRequest) -> Masks:
    return Masks()


register(PruneMethod("none", _keep_all, "Keep the dense model (the baseline point).", uses_sparsity=False))
