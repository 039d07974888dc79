"""What runs on Ray's workers: a Tune trial (`tune_trial`), the dense baseline, and what a worker reports about
its own memory. Each runs `run_trial` on the device and with the CPUs Ray assigned to it."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from autoprune.config import HealConfig, PruneConfig, TrialConfig
from autoprune.measure.latency import assigned_device
from autoprune.measure.timing import LatencyProfile
from autoprune.result import TrialResult
from autoprune.space.define import SearchSpace
from autoprune.tracking import schema
from autoprune.trial import TrialContext, run_trial

RESULT_FILE = "result.json"  # in a trial's checkpoint, beside the model: what it reported
EXIT_CUDA_POISONED = 75  # a trial's worker ended itself after a CUDA error that its process cannot recover from
# CUDA errors after which the context is corrupt until the process ends (CUDA's "sticky" errors)
STICKY_CUDA_ERRORS = ("illegal memory access", "device-side assert", "unspecified launch failure",
                      "misaligned address", "illegal instruction", "hardware stack error", "uncorrectable ECC")


def poisons_the_process(error: BaseException) -> bool:
    """A CUDA error that leaves this process unable to run another kernel (an out-of-memory error does not)."""
    text = str(error)
    return isinstance(error, RuntimeError) and "CUDA error" in text and any(
        sticky.lower() in text.lower() for sticky in STICKY_CUDA_ERRORS)


def dense_baseline(context: TrialContext) -> TrialResult:
    """The unpruned model measured like a trial (no latency target: it is the reference the target is set from)."""
    dense = TrialConfig(PruneConfig("none"), HealConfig("none"))
    return run_trial(dense, replace(context, latency_target_ms=None), device=assigned_device(),
                     threads=assigned_cpus())


def assigned_cpus() -> int:
    import ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


@dataclass(frozen=True)
class SharedContext:
    """The trial context's object-store reference, as a Tune parameter: every trial reads the one copy the driver
    put there (a context given to Tune itself would be put a second time)."""

    ref: Any
    # measured after the context was put: see TrialContext
    references: Mapping[int, LatencyProfile] | None = None
    stop_unless_faster: bool = False

    def get(self) -> TrialContext:
        import ray

        context = ray.get(self.ref)  # the data is shared, not copied
        return replace(context, references=self.references, stop_unless_faster=self.stop_unless_faster)


def tune_trial(params: dict, *, shared: SharedContext, space: SearchSpace) -> None:
    from ray import tune

    config = space.to_config(params)
    memory = worker_memory()
    restored = tune.get_checkpoint()
    if restored is not None:
        # This trial reported before its driver (or worker) stopped, and Tune restarts it from what it reported:
        # its result is read back from the checkpoint, not measured again.
        with restored.as_directory() as folder:
            tune.report(json.loads((Path(folder) / RESULT_FILE).read_text()))
        return
    with tempfile.TemporaryDirectory() as folder:
        import ray

        try:
            result = run_trial(config, shared.get(), save_dir=folder, device=assigned_device(),
                               threads=assigned_cpus())
        except Exception as error:
            if poisons_the_process(error):
                # This process's CUDA context is gone: every later kernel in it fails, and a reused actor would
                # fail every trial after this one as if each were its own fault. The process ends; Tune starts
                # the trial again on a new actor (search.max_retries), as for a worker that died.
                traceback.print_exc()
                sys.stderr.flush()
                os._exit(EXIT_CUDA_POISONED)
            # The trial's own failure (out of memory, a NaN loss, a combination the space allowed but the model
            # cannot take) would fail again if run again: it is reported as the trial's result, so that Tune's
            # restarts (search.max_retries) are kept for workers that died. Not BaseException: an interrupt or
            # a worker shutting down still ends the trial the usual way.
            tune.report({**schema.failure_report(config, traceback.format_exc(limit=-8)), **memory})
            return
        result = replace(result, node=ray.get_runtime_context().get_node_id())
        reported = schema.report(result)
        (Path(folder) / RESULT_FILE).write_text(json.dumps(reported))
        tune.report({**reported, **memory}, checkpoint=tune.Checkpoint.from_directory(folder))


def _trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc keeps them after a trial's many small tensors are
    freed, which reads as growth of a reused worker, trial after trial)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def worker_memory() -> dict[str, float]:
    """What this worker process holds as a trial starts, after collecting garbage and returning cached CUDA blocks:
    what the trials before it in the same process left behind (Tune reuses workers, so a leak would show as
    growth trial after trial; `autoprune bench faults` prints it)."""
    import gc

    import psutil
    import torch

    gc.collect()
    _trim_heap()
    process = psutil.Process()
    # USS: the pages only this process holds; RSS also counts the shared object-store pages a trial reads.
    memory = {"worker_pid": os.getpid(), "worker_rss_mb": process.memory_info().rss / 2**20}
    try:
        memory["worker_uss_mb"] = process.memory_full_info().uss / 2**20
    except (psutil.AccessDenied, AttributeError):  # some platforms do not let a process read its own page map
        pass
    if assigned_device().type == "cuda":  # not merely visible: touching a GPU Ray did not assign makes a context there
        torch.cuda.empty_cache()  # the caching allocator's free blocks go back to the device for other processes
        memory["worker_cuda_allocated_mb"] = torch.cuda.memory_allocated() / 2**20
        memory["worker_cuda_reserved_mb"] = torch.cuda.memory_reserved() / 2**20
    return memory
