"""`autoprune bench families --all`: `autoprune check` over every timm architecture, each in its own subprocess.

The population and its inputs are `autoprune.bench.population`'s. Each architecture is checked by a child process
(`python -m autoprune.bench.census --child ARCH`) under a time cap (`--cap-seconds`, `--jobs` at a time, one torch
thread each), every pruning method at 50% and one step of every healing method on each model that works; the
results are appended to `--json` as JSON Lines (one record per architecture; a re-run resumes). A child that runs
past the cap gives the methods it had not finished the outcome "timed out"; one that dies gives them "crashed" (with
its exit code or signal and the end of its stderr); a model that runs at no input size gives "does not run". These
three are "no verdict" in the tables: the method was not judged, unlike "fails", where it ran and went wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from autoprune.bench.census_tables import (
    CHECKED,
    CRASHED,
    DOES_NOT_RUN,
    NO_VERDICT,
    SKIPPED,
    SPARSITY,
    TIMED_OUT,
    duration,
    progress_line,
)
from autoprune.bench.record import Provenance
from autoprune.check import FAILS, check_model
from autoprune.models import ModelSource

CAP_SECONDS = 300.0
STDERR_LINES = 20  # the end of a crashed child's stderr kept in its reason
_MARK = "autoprune-families: "  # the child's result lines on stdout (anything else it prints is ignored)
_CHILDREN: set[subprocess.Popen] = set()  # running now: killed if the run is interrupted
_LOCK = threading.Lock()
_STOP = threading.Event()  # set when a run is interrupted: no child starts after it


def default_methods() -> list[str]:
    from autoprune import prune

    return [name for name in prune.list_methods() if name != "none"]


def read_records(path: str | Path) -> tuple[dict[str, dict], list[dict]]:
    """The JSON Lines file `run_all` appends to: the latest record of each architecture (a retried one replaces the
    earlier), in first-seen order, and the runs' records."""
    latest: dict[str, dict] = {}
    runs: list[dict] = []
    path = Path(path)
    if not path.exists():
        return latest, runs
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill mid-write: that architecture runs again
            print(f"{path}:{number}: not JSON, ignored", file=sys.stderr)
            continue
        if record.get("kind") == "run":
            runs.append(record)
        elif record.get("kind") == "architecture":
            latest[record["architecture"]] = record
    return latest, runs


def needs_run(record: dict | None, methods: list[str], retry_failed: bool) -> bool:
    """Whether an architecture is (re)checked: never recorded, recorded without one of `methods`, or — with
    `retry_failed` — recorded with no verdict (timed out, crashed, does not run) or a method that fails."""
    if record is None:
        return True
    if record["status"] == SKIPPED:
        return False
    if not set(methods) <= set(record.get("methods", ())):
        return True
    return retry_failed and (record["status"] in NO_VERDICT or any(r["outcome"] == FAILS for r in record["rows"]))


def run_all(json_path: str | Path, *, only: list[str] | None = None, methods: list[str] | None = None,
            cap_seconds: float = CAP_SECONDS, jobs: int = 1, retry_failed: bool = False, echo=print) -> dict[str, dict]:
    """Check every timm architecture (or those in `only`) in its own subprocess, `jobs` at a time, each under
    `cap_seconds`; append a record per architecture to `json_path` as it finishes (and, at the end, one for the
    run); skip those it already holds (see `needs_run`). Returns the latest record of each architecture."""
    from autoprune import prune
    from autoprune.bench import population

    methods = list(methods or default_methods())
    for method in methods:
        prune.get(method)  # an unknown name is an error here, with the registered ones listed
    everything = population.architectures()
    if only:
        unknown = [name for name in only if name not in everything]
        if unknown:
            from autoprune.errors import AutopruneError

            raise AutopruneError(f"--only: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a timm"
                                 f" architecture (one of: {', '.join(everything)})")
    chosen = [name for name in everything if not only or name in only]
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records, _ = read_records(path)
    lock = threading.Lock()

    def append(record: dict) -> None:
        with lock, path.open("a") as file:
            file.write(json.dumps(record) + "\n")
            file.flush()
            os.fsync(file.fileno())

    started, wall, provenance = datetime.now(timezone.utc), time.perf_counter(), Provenance("families")
    for name, reason in population.skipped(chosen).items():
        if name not in records:
            records[name] = _record(name, SKIPPED, methods, reason=reason)
            append(records[name])
    todo = [name for name in chosen if needs_run(records.get(name), methods, retry_failed)]
    done = len(chosen) - len(todo)
    left_out = sum(records[name]["status"] == SKIPPED for name in chosen if name in records)
    echo(f"{len(chosen)} architectures: {left_out} skipped, {done - left_out} already in {path}, {len(todo)} to check,"
         f" {jobs} at a time, each capped at {cap_seconds:g} s")
    finished = 0
    interrupted = True
    executor = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = {executor.submit(run_architecture, name, methods, cap_seconds): name for name in todo}
        for future in as_completed(futures):
            try:
                record = future.result()
            except Exception as error:  # noqa: BLE001 — a bug here must not end a run of hours; it is recorded
                reason = f"the runner failed on it: {type(error).__name__}: {error}"
                record = _record(futures[future], CRASHED, methods, reason=reason, rows=[
                    {"method": method, "sparsity": None, "outcome": CRASHED, "reason": reason} for method in methods])
            records[record["architecture"]] = record
            append(record)
            done += 1
            finished += 1
            echo(f"[{done}/{len(chosen)}] {progress_line(record)} ({record['seconds']:.0f} s;"
                 f" {duration(time.perf_counter() - wall)} elapsed)")
        interrupted = False
    finally:
        if interrupted:  # Ctrl-C, or an error here: what is running is not recorded, so a re-run redoes it
            with _LOCK:
                _STOP.set()
                for child in _CHILDREN:
                    child.kill()
        executor.shutdown(wait=True, cancel_futures=True)
        _STOP.clear()
        append(_run_record(started, time.perf_counter() - wall, len(everything), len(chosen), finished, jobs,
                           cap_seconds, methods, interrupted) | {"provenance": provenance.finish()})
    return records


def _run_record(started, wall_s, population_size, chosen, finished, jobs, cap_seconds, methods, interrupted):
    import timm
    import torch

    return {"kind": "run", "started": started.isoformat(timespec="seconds"), "wall_s": round(wall_s, 1),
            "population": population_size, "chosen": chosen, "checked": finished, "jobs": jobs,
            "cap_seconds": cap_seconds, "methods": methods, "sparsity": SPARSITY, "interrupted": interrupted,
            "timm": timm.__version__, "torch": torch.__version__, "cpus": os.cpu_count()}


def _record(architecture: str, status: str, methods: list[str], **fields) -> dict:
    return {"kind": "architecture", "architecture": architecture, "status": status, "model": None, "params": None,
            "candidates": None, "kwargs": {}, "input_size": None, "tried": [], "groups": None, "reason": "",
            "seconds": 0.0, "methods": methods, "sparsity": SPARSITY, "rows": [],
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), **fields}


def child_command(architecture: str, methods: list[str]) -> list[str]:
    """The subprocess that checks one architecture (see `_child_main`)."""
    return [sys.executable, "-m", "autoprune.bench.census", "--child", architecture, "--methods", *methods]


def run_architecture(architecture: str, methods: list[str], cap_seconds: float = CAP_SECONDS) -> dict:
    """One architecture's record: its child's results, or — where it ran past `cap_seconds` or died — the results
    it gave before, and every method it had not finished with the outcome "timed out" or "crashed" and why. Never
    raises for what the child does."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                               os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    status = reason = None
    try:
        child = subprocess.Popen(child_command(architecture, methods), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=environment)
    except OSError as error:
        child, stdout, stderr = None, "", ""
        status, reason = CRASHED, f"the child did not start: {error}"
    else:
        with _LOCK:
            _CHILDREN.add(child)
            if _STOP.is_set():
                child.kill()
        try:
            stdout, stderr = child.communicate(timeout=cap_seconds)
        except subprocess.TimeoutExpired:
            child.kill()
            stdout, stderr = child.communicate()  # what it printed before the kill
            status = TIMED_OUT
            reason = f"still running after the {cap_seconds:g} s cap, killed"
        finally:
            with _LOCK:
                _CHILDREN.discard(child)
    seconds = time.perf_counter() - started
    events = []
    for line in stdout.splitlines():
        if line.startswith(_MARK):
            try:
                events.append(json.loads(line[len(_MARK):]))
            except json.JSONDecodeError:  # cut short by the kill
                pass
    record = _record(architecture, CHECKED, methods, seconds=round(seconds, 1))
    ended = False  # the child said it was done (or why it stopped early)
    for event in events:
        kind = event.pop("event")
        if kind == "row":
            record["rows"].append(event["row"])
        elif kind in ("skip", "does_not_run"):
            ended, status, reason = True, (SKIPPED if kind == "skip" else DOES_NOT_RUN), event["reason"]
        elif kind == "done":
            ended = True
        else:
            record.update(event)
    reached = {row["method"] for row in record["rows"]}
    if status is None and not ended:
        status, reason = CRASHED, _crash_reason(child.returncode, stderr)
    if status in (TIMED_OUT, CRASHED) and child is not None:  # what it was doing
        doing = ("choosing its smallest model" if record["model"] is None else
                 "finding an input it runs at" if record["input_size"] is None else
                 f"checking {next((m for m in methods if m not in reached), '?')}")
        how, _, rest = reason.partition("\n")
        reason = f"{how} (while {doing})" + (f"\n{rest}" if rest else "")
        if status == TIMED_OUT and stderr.strip():
            reason += "\nthe end of its stderr:\n" + _tail(stderr)
    record.update(status=status or CHECKED, reason=reason or "")
    if status in NO_VERDICT:  # the methods it had not finished: no verdict, and why
        record["rows"] += [{"method": method, "sparsity": SPARSITY if _uses_sparsity(method) else None,
                            "outcome": status, "reason": reason} for method in methods if method not in reached]
    return record


def _crash_reason(code: int | None, stderr: str) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        how = f"the child was killed by {name} (exit status {code}{'; out of memory?' if -code == 9 else ''})"
    else:
        how = f"the child exited with status {code} before it finished"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else "(no stderr)"
    return f"{how}; its last stderr line: {last}" + (f"\nthe end of its stderr:\n{_tail(stderr)}" if stderr.strip() else "")


def _tail(text: str, lines: int = STDERR_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _child_main(argv: list[str]) -> int:
    """The subprocess: choose the architecture's smallest model and its input, then `check_model` each method (one
    at a time, so that a run cut short keeps what it finished); each result is one JSON line on stdout."""
    parser = argparse.ArgumentParser(prog="python -m autoprune.bench.census")
    parser.add_argument("--child", required=True, metavar="ARCHITECTURE")
    parser.add_argument("--methods", nargs="+", required=True)
    args = parser.parse_args(argv)

    import warnings

    import torch

    from autoprune import heal
    from autoprune.bench import population

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    def emit(event: str, **data) -> None:
        print(_MARK + json.dumps({"event": event, **data}), flush=True)

    try:
        variant = population.smallest(args.child)
    except population.NotAClassifier as error:
        emit("skip", reason=str(error))
        return 0
    emit("variant", model=variant.model, params=variant.params, candidates=variant.candidates,
         choose_seconds=round(variant.seconds, 1))
    try:
        chosen = population.small_input(variant.model)
    except population.NotAClassifier as error:
        emit("skip", reason=f"{variant.model}: {error}")
        return 0
    except population.DoesNotRun as error:
        emit("does_not_run", reason=f"{variant.model}: {error}")
        return 0
    emit("input", kwargs=chosen.kwargs, input_size=list(chosen.input_size), tried=list(chosen.tried))
    source = _BuiltOnce(variant.model, population.NUM_CLASSES, chosen.kwargs)
    sent_groups = False
    for method in args.methods:
        started = time.perf_counter()
        try:
            # and one step of every healing method on what it leaves: a working row must also heal
            result = check_model(source, input_size=chosen.input_size, methods=[method], sparsities=(SPARSITY,),
                                 heal_methods=heal.list_methods())
        except Exception as error:  # noqa: BLE001 — check_model means not to raise; if it does, that is the row
            emit("row", row={"method": method, "sparsity": SPARSITY if _uses_sparsity(method) else None,
                             "outcome": FAILS, "reason": f"check_model raised {type(error).__name__}: {error}",
                             "seconds": round(time.perf_counter() - started, 2)})
            continue
        if not sent_groups:
            emit("groups", groups=len(result.groups))
            sent_groups = True
        for check in result.checks:
            emit("row", row=asdict(check))
    emit("done")
    return 0


class _BuiltOnce(ModelSource):
    """A source the child builds once: each method's `check_model` gets a copy of the same dense model — what a
    rebuild gives, since it seeds before building — without building a 400M-parameter model eight times."""

    def create(self, *, pretrained: bool = False):
        import copy

        key = (self.name, json.dumps(dict(self.kwargs), sort_keys=True), pretrained)
        if key not in _DENSE:
            _DENSE.clear()
            _DENSE[key] = super().create(pretrained=pretrained)
        return copy.deepcopy(_DENSE[key])


_DENSE: dict = {}


def _uses_sparsity(method: str) -> bool:
    from autoprune import prune

    try:
        return prune.get(method).uses_sparsity
    except Exception:  # noqa: BLE001
        return True


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1:]))
