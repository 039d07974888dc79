"""What the user sees while a search runs, and MLflow as it fills: a Tune callback that logs each trial's child run
as the trial ends and prints one progress line."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ray.tune import Callback

from autoprune.config import SearchSpec
from autoprune.pareto import pareto_front
from autoprune.result import TrialRecord, TrialResult
from autoprune.tracking.publish import error_text, trial_record
from autoprune.tracking.store import Tracker


class TrialPublisher(Callback):
    """Tune callback: writes each trial's child run as it ends, and prints a progress line."""

    def __init__(
        self, tracker: Tracker, parent_id: str, spec: SearchSpec, say: Callable[[str], None], dense: TrialResult,
        *, downloads: Path, earlier: list[TrialRecord] = (),
    ) -> None:
        self.tracker, self.parent_id, self.spec, self.say, self.dense = tracker, parent_id, spec, say, dense
        self.downloads = downloads  # where checkpoints in remote storage are copied for registration
        self.records: list[TrialRecord] = list(earlier)  # a resumed search's trials that ended before
        self.retried = 0
        self.mlflow_error: str | None = None  # set when MLflow failed: the rest is published at the end
        self._started = time.perf_counter()

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks with the experiment state; the MLflow client and the printer stay behind.
        return {key: value for key, value in self.__dict__.items() if key not in ("tracker", "say")}

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._add(trial_record(trial, self.downloads, status="TERMINATED"), trials)

    def on_trial_recover(self, iteration, trials, trial, **info):
        """The trial's worker died and Tune starts it again (search.max_retries): nothing is recorded until it ends."""
        self.retried += 1
        self.say(f"autoprune: trial {trial.trial_id} failed ({error_text(trial).splitlines()[-1][:160]});"
                 f" starting it again")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._add(trial_record(trial, self.downloads, status="ERROR"), trials)

    def _add(self, record: TrialRecord, trials) -> None:
        self.records.append(record)
        failed_now = False
        if self.mlflow_error is None:
            try:
                self.tracker.log_trial(self.parent_id, record)
            except Exception as error:  # the search goes on: its results are in Tune's storage
                self.mlflow_error, failed_now = f"{type(error).__name__}: {str(error)[:200]}", True
        self.say(self._progress_line(record, trials))
        if failed_now:
            self.say(f"autoprune: MLflow failed ({self.mlflow_error}); the search goes on and keeps its results"
                     " in Ray Tune's storage, to publish when it ends")

    def _progress_line(self, record: TrialRecord, trials) -> str:
        total = self.spec.search.trials
        done = len(self.records)
        failed = sum(1 for r in self.records if r.result is None)
        running = sum(1 for t in trials if t.status == "RUNNING" and t.trial_id != record.trial_id)
        elapsed = time.perf_counter() - self._started
        head = f"[{done:>3}/{total} done, {running} running, {failed} failed, {elapsed:5.0f} s]"
        if record.result is None:
            return f"{head} trial {record.trial_id} FAILED: {(record.error or '').splitlines()[-1][:160]}"
        result = record.result
        this = (f"{result.config.prune.method}/{result.config.heal.method} sparsity {result.sparsity:.2f}: "
                + (f"top-1 {result.accuracy:.4f}" if result.feasible else (result.stopped or "stopped unhealed"))
                + f" @ {result.latency.median_ms:.3f} ms" + _speedup_note(result))
        front = pareto_front(self.records, self.spec.cost_metric, dense=self.dense)
        if front:
            best = max(front, key=lambda r: r.result.accuracy)
            fastest = front[0]
            this += (f" | front {len(front)}: best {best.result.accuracy:.4f} @ {best.result.latency.median_ms:.3f} ms,"
                     f" fastest {fastest.result.latency.median_ms:.3f} ms @ {fastest.result.accuracy:.4f}")
        return f"{head} {this}"


def _speedup_note(result) -> str:
    """The speedup against the dense model with its interval, flagged when the node was too busy to tell."""
    latency = result.latency
    parts = [f"{latency.describe_speedup()} vs dense"] if latency.paired else []
    if latency.wide:
        parts.append(f"IMPRECISE: ±{latency.half_width:.0%}, the node was busy")
    if result.latency_cached:
        parts.append("same structure timed before")
    return f" ({'; '.join(parts)})" if parts else ""
