"""Healing (recovery) methods, found by name. Each method module registers one `HealMethod` (in
`base.HEAL_METHODS`).

A method gets the pruned model and a `HealRequest` (the calibration images drawn from the training pool, the
budget, the dense teacher) and optimises the model in place, keeping the pruning masks fixed.
"""

from autoprune.heal import align, basic, recalibrate  # noqa: F401 (registers)
from autoprune.heal.base import HEAL_METHODS, HealMethod, HealRequest, get, list_methods, register, start, trained

__all__ = ["HealMethod", "HealRequest", "HEAL_METHODS", "get", "list_methods", "register", "start", "trained"]
