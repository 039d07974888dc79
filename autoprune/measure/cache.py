"""Latency depends on a model's structure, not its weights: identical structures share one measurement.

The signature of a measurement is everything that decides its latency — every tensor's shape, each attention's
head count, the execution format, and the measurement settings (device, dtype, batch, input size, threads,
compile flag). Masked (unstructured) models keep the dense shapes and run the dense kernels, so they get the dense
model's measurement: the same number, not a second noisy one that could put them ahead of the dense model.

A measurement is a speedup against the dense model with its interval (timing.py). A later trial with the same
signature reads it when it is precise enough; otherwise it times the structure again and the cache merges the two
measurements (their blocks' evidence pooled), so that a structure timed once on a busy node is not stuck with that
one number. In a search the cache is one small Ray actor that every trial worker asks (`SharedLatencyCache`);
without Ray, a dict (`LocalLatencyCache`).
A cache saves time and keeps twins equal; it is never a reason for a trial to fail: the actor is restarted if it
dies (empty), and a lookup that fails meanwhile counts as a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Protocol

from torch import nn

from autoprune.measure.timing import merge_profiles
from autoprune.models import attention_settings

log = logging.getLogger(__name__)
CALL_TIMEOUT_S = 60  # a lookup is a dictionary access; longer than this, the actor is gone


def structure_signature(model: nn.Module, **settings) -> str:
    """A short hash of the model's structure and the measurement `settings` (device, dtype, batch size, …)."""
    shapes = [(name, list(tensor.shape)) for name, tensor in model.state_dict().items()]
    heads = attention_settings(model)
    text = json.dumps({"class": type(model).__name__, "shapes": shapes, "heads": heads, "settings": settings},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class LatencyCache(Protocol):
    def get(self, key: str): ...

    def put(self, key: str, profile):
        """Store `profile`, merged with what the key holds already; return what it holds now."""


class LocalLatencyCache:
    """The cache within one process (`run_trial` without Ray, benchmarks)."""

    def __init__(self) -> None:
        self.entries: dict[str, object] = {}

    def get(self, key: str):
        return self.entries.get(key)

    def put(self, key: str, profile):
        stored = self.entries.get(key)
        self.entries[key] = profile if stored is None else merge_profiles(stored, profile)
        return self.entries[key]

    def __len__(self) -> int:
        return len(self.entries)


class SharedLatencyCache:
    """A handle on one Ray actor holding the search's measurements; it pickles, so trial workers can use it."""

    def __init__(self, actor) -> None:
        self.actor = actor

    @classmethod
    def start(cls) -> "SharedLatencyCache":
        import ray

        # num_cpus=0: a dictionary lookup must not take a trial's CPU slot. Restarted without end if it dies.
        return cls(ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(LocalLatencyCache).remote())

    def get(self, key: str):
        return self._call("get", key, default=None)

    def put(self, key: str, profile):
        return self._call("put", key, profile, default=profile)

    def _call(self, method: str, *args, default):
        import ray
        from ray.exceptions import RayActorError

        try:
            return ray.get(getattr(self.actor, method).remote(*args), timeout=CALL_TIMEOUT_S)
        except (RayActorError, ray.exceptions.GetTimeoutError) as error:  # dead or restarting: a miss, not a failure
            log.warning("latency cache unavailable (%s): measuring without it", type(error).__name__)
            return default

    def __len__(self) -> int:
        import ray

        return ray.get(self.actor.__len__.remote())
