"""`autoprune bench replay`'s sparsity chosen by cost (`space.prune.sparsity.mode: macs`): a sampler's reduction and
shape → the pool's depth knots, so that a `+macs` arm's trials are answered from the same table as every other.

The live trial solves the shape's scale by pruning copies of the model and counting their MACs (prune/target.py).
The replay solves it with the same `solve`, on MACs interpolated from the pool's own counts — every configuration
recorded its MACs (its non-zero weights, for a method that masks) — linearly between the pool's knot vectors (in log MACs; nearest outside their hull), per
pruning method. It solves on the knots, not on every layer group: the groups are the knots interpolated, so the
two agree wherever no knot is clipped at the range's top. The solved knots are then looked up like any other
arm's parameters.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from autoprune.prune.target import solve


def _cost(config: Mapping) -> float | None:
    """What the live solve counts for a pool configuration: its MACs where its method removes structure, its share
    of non-zero prunable weights where it masks (masked zeros still count as MACs; prune/target.py)."""
    from autoprune import prune

    method = config["params"].get("prune.method")
    if method in prune.PRUNE_METHODS and not prune.get(method).structured:
        return 1.0 - float(config["sparsity"]) if config.get("sparsity") is not None else None
    return float(config["macs"]) if config.get("macs") else None


class KnotSolver:
    """Per pruning method, MACs as a function of the knots, and the solve of a reduction and shape onto knots."""

    def __init__(self, configs: list[Mapping], knots: int, low: float, high: float) -> None:
        from scipy.interpolate import LinearNDInterpolator, NearestNDInterpolator

        self.names = [f"prune.sparsity.knot{index}" for index in range(knots)]
        self.low, self.high = low, high
        self.models: dict[str, tuple] = {}
        by_method: dict[str, dict[tuple, float]] = {}
        for config in configs:
            params = config["params"]
            cost = _cost(config)
            if all(name in params for name in self.names) and cost:
                point = tuple(round(float(params[name]), 9) for name in self.names)
                by_method.setdefault(params["prune.method"], {})[point] = float(np.log(cost))
        for method, points in by_method.items():
            x, y = np.array(list(points)), np.array(list(points.values()))
            inside = LinearNDInterpolator(x, y) if len(points) > knots + 1 else None
            self.models[method] = (inside, NearestNDInterpolator(x, y))

    def macs(self, method: str, knots: list[float]) -> float:
        inside, nearest = self.models[method]
        point = np.array([knots])
        value = inside(point)[0] if inside is not None else np.nan
        return float(np.exp(nearest(point)[0] if np.isnan(value) else value))

    def to_knots(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The trial's parameters with its reduction and shape replaced by the knots they solve to (a method that
        takes no sparsity, or one the pool never counted, keeps the shape's knots as they are)."""
        method = params.get("prune.method")
        shape = {name: float(params[f"prune.shape.knot{index}"]) for index, name in enumerate(self.names)}
        rest = {name: value for name, value in params.items()
                if name != "prune.reduction" and not name.startswith("prune.shape.")}
        if method not in self.models:
            return {**rest, **shape}
        knots, _ = solve(lambda sparsity: self.macs(method, [sparsity[name] for name in self.names]), shape,
                         float(params["prune.reduction"]), low=self.low, high=self.high)
        return {**rest, **knots}
