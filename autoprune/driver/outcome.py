"""What a finished search produced (`SearchOutcome`), where its time went, and the summary it prints."""

from __future__ import annotations

from dataclasses import dataclass, field

from autoprune.config import SearchSpec
from autoprune.result import TrialRecord, TrialResult
from autoprune.tracking.report import table
from autoprune.tracking.schema import trial_row


@dataclass(frozen=True)
class SearchOutcome:
    """What a finished search produced, and where to find it."""

    spec: SearchSpec
    tracking_uri: str
    parent_run_id: str
    dense: TrialResult
    records: list[TrialRecord]
    front: list[TrialRecord]  # Pareto-optimal, fastest first
    registered_versions: list[str]
    wall_seconds: float
    ui_hint: str  # where MLflow's UI shows the front (tracking/ui.py `ui_hint`)
    failed: list[TrialRecord] = field(default_factory=list)
    accounting: dict[str, float] = field(default_factory=dict)  # where the time went (see `time_accounting`)
    retried: int = 0  # trial restarts after a worker died (search.max_retries); a trial's own error is final


WORK_STAGES = ("prune", "profile", "heal", "evaluate", "count")  # the rest of a trial's time is overhead


def time_accounting(records: list[TrialRecord], *, setup_seconds: float, tune_seconds: float,
                    concurrency: int) -> dict[str, float]:
    """Where a search's time went: the trials' work stages against the trial slots Tune held.

    `overhead_share` = 1 − work ÷ (Tune wall time × concurrent slots): what Ray scheduling, worker start-up, model
    loading and saving, checkpoint transfer, MLflow writes and idle slots cost, as a share of the slot time.
    """
    timings = [r.result.timings for r in records if r.result is not None]
    work = sum(t.get(stage, 0.0) for t in timings for stage in WORK_STAGES)
    load_save = sum(t.get("load", 0.0) + t.get("save", 0.0) for t in timings)
    slot_seconds = tune_seconds * concurrency
    done = [r.result for r in records if r.result is not None]
    return {
        "latency_measured": sum(1 for result in done if not result.latency_cached),
        "latency_reused": sum(1 for result in done if result.latency_cached),
        # speedups whose interval stayed wider than ±15% (timing.WIDE): the node was too busy to tell
        "latency_imprecise": sum(1 for result in done if result.latency.wide),
        "profile_s": sum(result.timings.get("profile", 0.0) for result in done),
        "setup_s": setup_seconds,  # data, dense weights, Ray start, dense baseline
        "tune_wall_s": tune_seconds,
        "trial_work_s": work,
        "trial_load_save_s": load_save,
        "overhead_share": 1.0 - work / slot_seconds if slot_seconds else 0.0,
    }


def summary_text(outcome: SearchOutcome) -> str:
    front_rows = [trial_row(record, on_front=True) for record in outcome.front]
    model = outcome.spec.mlflow.registered_model
    if outcome.registered_versions:
        registered = (f"Registered as {model!r} versions {', '.join(outcome.registered_versions)}"
                      " (aliases: most-accurate, fastest).")
    # an empty front is the search's answer, not a failure: say plainly that `best` got nothing new from it, and why
    elif not any(record.result is not None for record in outcome.records):
        registered = (f"Nothing was registered as {model!r} by this search: no trial finished (each failed trial's"
                      " error is on its MLflow run).")
    else:
        registered = (f"Nothing was registered as {model!r} by this search: no trial beat the dense model on latency"
                      " or accuracy, so the dense model stays the best choice.")
    lines = [
        "",
        f"Search {outcome.spec.name!r} finished in {outcome.wall_seconds:.0f} s: {len(outcome.records)} trials,"
        f" {len(outcome.failed)} failed" + (f" ({outcome.retried} restarts)" if outcome.retried else "")
        + f", {len(outcome.front)} on the Pareto front.",
        f"Dense model: top-1 {outcome.dense.accuracy:.4f}, {outcome.dense.latency.median_ms:.3f} ms"
        f" ({outcome.dense.latency.device}, batch {outcome.dense.latency.batch_size}, {outcome.dense.latency.dtype})."
        + (" Latencies are speedups against it, timed interleaved; the front was timed again with it in one final"
           " pass (the registered numbers)." if any(r.result.searched_latency_ms is not None for r in outcome.front)
           else ""),
        "",
        table(front_rows) if front_rows else "(no trial beat the dense model on latency or accuracy: the front is empty)",
        "",
        registered,
        f"The front in MLflow's UI: {outcome.ui_hint}",
    ]
    if outcome.accounting:
        a = outcome.accounting
        lines.insert(3, f"Time: setup {a['setup_s']:.0f} s; trials {a['tune_wall_s']:.0f} s, of which pruning, profiling,"
                        f" healing, evaluating and counting filled {1 - a['overhead_share']:.0%} of the trial slots"
                        f" (model load/save {a['trial_load_save_s']:.1f} s; the rest is Ray, MLflow and idle slots)."
                        f" Latency: {a['latency_measured']:.0f} structures timed, {a['latency_reused']:.0f} trials"
                        f" reused an identical structure's measurement"
                        + (f"; {a['latency_imprecise']:.0f} stayed imprecise (interval wider than ±15%: the node was"
                           " busy)." if a.get("latency_imprecise") else "."))
    return "\n".join(lines)
