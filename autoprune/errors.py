"""Errors that reach users: one line that says what is wrong and how to fix it (the CLI prints no traceback)."""


class AutopruneError(Exception):
    """A failure the user can fix: bad input, a missing file, nothing that meets a target."""


class SpecError(AutopruneError, ValueError):
    """An invalid search spec, raised before any Ray worker starts. The message names the key and the value."""


class NoModelMeetsTarget(AutopruneError):
    """No registered version meets the latency target."""


class Unsupported(AutopruneError):
    """A pruning method cannot prune this model, by design: its layout offers the method nothing to work on (no
    block-internal channel, a graph that cannot be traced). The message says why and what would work instead.
    `autoprune check` calls it "refuses"; any other failure inside a method is a crash, "fails"."""
