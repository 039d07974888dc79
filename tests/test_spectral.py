"""The Marchenko–Pastur budget: its Tracy–Widom and MP pieces against known values, the BEMA edge on random
matrices, and the defining property — a layer with a larger spectral edge is pruned more."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TINY_VIT
from scipy.integrate import quad

from autoprune import prune
from autoprune.models import pooled_group
from autoprune.prune.spectral import (
    layer_weights,
    mp_quantiles,
    regime,
    spectral_edge,
    tracy_widom1_cdf,
    tracy_widom1_quantile,
)


def test_tracy_widom1_has_its_known_mean_and_deviation():
    s = np.linspace(-8, 6, 141)
    cdf = np.array([tracy_widom1_cdf(v) for v in s])
    density = np.gradient(cdf, s)
    mean = np.trapezoid(s * density, s)
    sd = math.sqrt(np.trapezoid((s - mean) ** 2 * density, s))
    assert mean == pytest.approx(-1.2065, abs=2e-3) and sd == pytest.approx(1.2680, abs=2e-3)
    assert tracy_widom1_cdf(tracy_widom1_quantile(0.2)) == pytest.approx(0.2, abs=1e-6)


@pytest.mark.parametrize("gamma", [0.25, 0.5, 1.0])
def test_mp_quantiles_invert_the_density(gamma):
    low, high = (1 - math.sqrt(gamma)) ** 2, (1 + math.sqrt(gamma)) ** 2
    density = lambda x: math.sqrt(max((high - x) * (x - low), 0)) / (2 * math.pi * gamma * x)  # noqa: E731
    for probability in (0.25, 0.5, 0.75):
        q = mp_quantiles(gamma, np.array([probability]))[0]
        assert quad(density, low, q, limit=200)[0] == pytest.approx(probability, abs=2e-3)


def test_bema_edge_of_a_random_matrix_is_the_marchenko_pastur_edge():
    torch.manual_seed(0)
    for sigma in (0.02, 0.1):
        weight = torch.randn(512, 256) * sigma
        expected = sigma * (math.sqrt(512) + math.sqrt(256))  # the largest singular value's MP edge
        assert spectral_edge(weight) == pytest.approx(expected, rel=0.05)


def test_the_regimes_match_the_paper():
    assert regime(0.1) == (0.5, 0.5, 0.30)
    assert regime(0.3) == (1.0, 1.0, 0.50)
    assert regime(0.5) == (1.25, 1.25, 0.70)
    assert regime(0.75) == (1.0, 2.0, 0.85)
    weights = layer_weights({"blocks.0.attn.qkv": 2.0, "blocks.0.mlp.fc1": 1.0, "blocks.0.mlp.fc2": 0.0}, 0.3,
                            {"blocks.0.attn.qkv"})
    assert weights["blocks.0.attn.qkv"] > 1 > weights["blocks.0.mlp.fc2"] >= 0.1


def test_a_larger_spectral_edge_means_more_pruning_than_magnitude_alone():
    torch.manual_seed(0)
    model = TINY_VIT.create()
    with torch.no_grad():  # make the layers' edges differ: scale a few layers' bulk up, their magnitudes with it
        model.blocks[0].mlp.fc1.weight.mul_(1.5)
        model.blocks[1].attn.proj.weight.mul_(0.7)
    group = pooled_group(model)

    def per_layer(method):
        copy = TINY_VIT.create()
        copy.load_state_dict(model.state_dict())
        masks = prune.get(method).apply(copy, prune.PruneRequest((group,), {"all": 0.5},
                                                                 dict(prune.get(method).options)))
        return {name: 1 - float(mask.float().mean()) for name, mask in masks.by_layer.items()}

    magnitude, spectral = per_layer("magnitude"), per_layer("mp_budget")
    modules = dict(model.named_modules())
    edges = {name: spectral_edge(modules[name].weight) for name in group.layers}
    widest, narrowest = max(edges, key=edges.get), min(edges, key=edges.get)
    assert spectral[widest] > magnitude[widest]
    assert spectral[narrowest] < magnitude[narrowest]
    total = sum(modules[n].weight.numel() for n in group.layers)
    achieved = sum(spectral[n] * modules[n].weight.numel() for n in group.layers) / total
    assert achieved == pytest.approx(0.5, abs=1e-3)  # the global target is still met exactly


def test_spectral_allocation_spreads_one_value_as_the_layer_budget_does():
    from autoprune.models import layer_groups
    from autoprune.prune.spectral import spectral_allocation

    torch.manual_seed(0)
    model = TINY_VIT.create()
    groups = layer_groups(model)
    allocation = spectral_allocation(model, groups, 0.7)
    modules = dict(model.named_modules())
    sizes = {g.name: sum(modules[n].weight.numel() for n in g.layers) for g in groups}
    overall = sum(allocation[g] * sizes[g] for g in allocation) / sum(sizes.values())
    assert overall == pytest.approx(0.7, abs=1e-3)  # the global value, kept
    assert len({round(v, 3) for v in allocation.values()}) > 1  # but not uniform
    # the same per-group shares as the mp_budget method's own masks
    reference = prune.get("mp_budget").apply(model, prune.PruneRequest((pooled_group(model),), {"all": 0.7},
                                                                       dict(prune.get("mp_budget").options)))
    for group in groups:
        removed = sum(int((~reference.by_layer[n]).sum()) for n in group.layers) / sizes[group.name]
        assert allocation[group.name] == pytest.approx(removed, abs=1e-6)
