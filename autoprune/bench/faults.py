"""`autoprune bench faults`: a search that loses nothing while trials fail at random and a worker is killed.

One search of N trials (20 by default) on a local Ray with 2 CPUs, its MLflow store in a temporary folder, where:

- trials fail at random: the space offers fine-tuning at a learning rate that makes the loss NaN, and the
  sampler picks it for some trials (a real failure inside the trial, not a stub);
- one trial worker is killed with SIGKILL once a quarter of the trials have ended (Tune restarts its trial).

At the end it checks the search against every record of it and prints: trials planned, finished, failed,
retried, lost (planned − accounted for in Tune's storage; must be 0), and whether MLflow (one child run per
trial, status matching, the parent's counts) and the registry (one version per front model) agree with Tune.
It also prints each worker process's memory at the start of its trials: a leak shows as growth trial after trial.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

from autoprune.argtypes import positive_int
from autoprune.bench import cluster as bench_cluster
from autoprune.bench import record

SPEC = {
    "name": "bench-faults",
    "model": {**bench_cluster.SPEC["model"], "train_steps": 100},  # the same tiny ViT, trained less
    "data": {"source": "reference", "eval_images": 100},
    "profile": {"batch_size": 16, "warmup": 3, "repeats": 5},
    "search": {"trials": 20, "concurrency": 2, "sampler": "random", "seed": 0, "resources": {"cpu": 1},
               "max_retries": 1},
    "mlflow": {"experiment": "bench-faults", "registered_model": "bench-faults-model"},
    "space": {"prune": {"methods": ["magnitude", "structured"], "sparsity": {"low": 0.5, "high": 0.8}},
              # lr 1e6 makes fine-tuning's loss NaN at once: those trials fail by themselves
              "heal": {"methods": ["none", "finetune"], "calibration_images": 32, "steps": 20, "lr": [1e-3, 1e6],
                       "batch_size": 16}},
}


class WorkerKiller:
    """Kills one Ray Tune trial worker (found by Ray's process title) once `after` trials have ended."""

    def __init__(self, after: int) -> None:
        self.after, self.ended, self.killed_pid = after, 0, None
        self._armed = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def trial_ended(self) -> None:
        self.ended += 1
        if self.ended >= self.after:
            self._armed.set()

    def _run(self) -> None:
        import psutil

        self._armed.wait()
        deadline = time.monotonic() + 120
        while self.killed_pid is None and time.monotonic() < deadline:
            for process in psutil.process_iter(["pid", "cmdline"]):
                if "ImplicitFunc" in " ".join(process.info["cmdline"] or []):
                    time.sleep(0.5)  # into its trial's work
                    process.send_signal(signal.SIGKILL)
                    self.killed_pid = process.info["pid"]
                    return
            time.sleep(0.1)


def run(root: Path, trials: int, echo=print) -> dict:
    import ray

    from autoprune.driver.search import search
    from autoprune.space.load import parse_spec
    from autoprune.tracking.publish import experiment_path
    from autoprune.tracking.schema import KEY_TAG, TRIAL_TAG
    from autoprune.tracking.store import Tracker

    raw = json.loads(json.dumps(SPEC))
    raw["search"]["trials"] = trials
    spec = parse_spec(raw)
    killer = WorkerKiller(after=max(1, trials // 4))

    def progress(line: str) -> None:
        if line.startswith("["):  # one line per ended trial
            killer.trial_ended()
        echo(line)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        outcome = search(spec, workdir=root, echo=progress)
    finally:
        ray.shutdown()

    from ray.tune import ExperimentAnalysis

    tune_trials = ExperimentAnalysis(experiment_path(str(root / "ray"), outcome.parent_run_id)).trials
    ended = {t.trial_id for t in tune_trials if t.status in ("TERMINATED", "ERROR")}
    tracker = Tracker(outcome.tracking_uri, spec.mlflow.experiment)
    children = tracker.child_runs(outcome.parent_run_id)
    statuses = {run.data.tags[TRIAL_TAG]: run.info.status for run in children}
    expected = {r.trial_id: ("FINISHED" if r.result is not None else "FAILED") for r in outcome.records}
    parent = tracker.client.get_run(outcome.parent_run_id).data.metrics
    versions = [v for v in tracker.client.search_model_versions(f"name='{spec.mlflow.registered_model}'")
                if v.tags.get(KEY_TAG, "").startswith(f"{outcome.parent_run_id}/")]
    front_keys = {f"{outcome.parent_run_id}/{r.trial_id}" for r in outcome.front}
    report = {
        "planned": trials,
        "finished": len(outcome.records) - len(outcome.failed),
        "failed": len(outcome.failed),
        "retried": outcome.retried,
        "lost": trials - len(ended),
        "worker_killed": killer.killed_pid is not None,
        "failures": sorted({(r.error or "").strip().splitlines()[-1][:90].rstrip(".") for r in outcome.failed}),
        "mlflow_agrees": (len(children) == len(statuses) == trials and statuses == expected
                          and parent["trials_finished"] == len(outcome.records) - len(outcome.failed)
                          and parent["trials_failed"] == len(outcome.failed)),
        "registry_agrees": {v.tags[KEY_TAG] for v in versions} == front_keys and len(versions) == len(front_keys),
        "front": len(outcome.front),
        "wall_s": outcome.wall_seconds,
        "workers": _worker_memory(tune_trials),
    }
    return report


def _worker_memory(tune_trials) -> list[dict]:
    """Per worker process, its resident memory (RSS) at the start of its trials: at the first (imports and data
    only), at the second (after one trial: libraries warmed up), at the last, and the trend over its later half
    (MB per trial; a leak keeps growing there, a warm-up does not)."""
    by_pid: dict[int, list[tuple[float, float]]] = {}
    for trial in tune_trials:
        result = trial.last_result or {}
        if "worker_pid" in result:
            by_pid.setdefault(int(result["worker_pid"]), []).append(
                (result["timestamp"], result["worker_rss_mb"], result.get("worker_cuda_allocated_mb")))
    rows = []
    for pid, points in by_pid.items():
        points.sort()
        rss = [mb for _, mb, _ in points]
        later = rss[len(rss) // 2:]
        trend = statistics.linear_regression(range(len(later)), later).slope if len(later) >= 3 else None
        rows.append({"pid": pid, "trials": len(rss), "first_mb": rss[0], "second_mb": rss[min(1, len(rss) - 1)],
                     "last_mb": rss[-1], "later_trend_mb_per_trial": trend,
                     "cuda_allocated_last_mb": points[-1][2]})  # None without a GPU: what earlier trials left
    return sorted(rows, key=lambda row: -row["trials"])


def _trend(mb_per_trial) -> str:
    """A worker with too few trials for a trend has none (None, or NaN in a file written before)."""
    return "—" if mb_per_trial is None or mb_per_trial != mb_per_trial else f"{mb_per_trial:+.1f}"


def text(report: dict) -> str:
    yes = {True: "yes", False: "NO"}
    lines = [
        "| planned | finished | failed | retried | lost | MLflow agrees | registry agrees | front | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {report['planned']} | {report['finished']} | {report['failed']} | {report['retried']} | {report['lost']}"
        f" | {yes[report['mlflow_agrees']]} | {yes[report['registry_agrees']]} | {report['front']}"
        f" | {report['wall_s']:.0f} |",
        "",
        "Failures: " + ("; ".join(report["failures"]) or "none") + ".",
        f"Worker killed: {yes[report['worker_killed']]}.",
        "",
        "Worker memory (RSS at the start of a trial, after garbage collection and trimming the C heap):",
        "",
        "| worker | trials | 1st trial MB | 2nd trial MB | last trial MB | later half, MB/trial |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {i + 1} | {w['trials']} | {w['first_mb']:.0f} | {w['second_mb']:.0f} | {w['last_mb']:.0f}"
              f" | {_trend(w['later_trend_mb_per_trial'])} |" for i, w in enumerate(report["workers"])]
    cuda = [w["cuda_allocated_last_mb"] for w in report["workers"] if w["cuda_allocated_last_mb"] is not None]
    if cuda:
        lines += ["", "GPU memory still allocated when each worker's last trial started: "
                  + ", ".join(f"{mb:.0f} MB" for mb in cuda) + " (0 = released between trials)."]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trials", type=positive_int, default=20, help="trials in the search (default 20)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the report here")


def main_faults(args) -> int:
    provenance = record.Provenance("faults")
    with tempfile.TemporaryDirectory(prefix="autoprune-bench-faults-") as folder:
        report = run(Path(folder), args.trials)
    if args.json_path:
        record.write(args.json_path, provenance, report)
    print()
    print(text(report))
    ok = report["lost"] == 0 and report["mlflow_agrees"] and report["registry_agrees"]
    return 0 if ok else 1
