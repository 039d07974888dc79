"""`autoprune bench families`: `autoprune check` over the smallest model of each timm family users bring.

Random weights on the CPU, each family at a small input size it accepts (the checks are about structure, not
accuracy or speed), every pruning method at 50% (N:M methods at their own). One row per family × method: the
outcome, the MACs ratio, the save → reload difference. The targets (issue 13): `structured` at 50% reaches a MACs
ratio ≥ 1.3 on at least 90% of the families, no method crashes without a refusal, and every method that works
reloads with equal outputs (≤ 1e-5).

Without `--all` the families are the 30 hand-chosen `FAMILIES`. With `--all` they are every timm architecture (the
population and its inputs: `autoprune.bench.population`), each checked in its own subprocess under a time cap
(`--cap-seconds`, `--jobs` at a time, one torch thread each), results appended to `--json` as JSON Lines (one record
per architecture; a re-run resumes). A child that runs past the cap gives the methods it had not finished the outcome
"timed out"; one that dies gives them "crashed" (with its exit code or signal and the end of its stderr); a model
that runs at no input size gives "does not run". These three are "no verdict" in the tables: the method was not
judged, unlike "fails", where it ran and went wrong.
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

from autoprune.check import FAILS, REFUSES, WORKS, check_model
from autoprune.models import ModelSource

# family → (timm name, create kwargs, input size): the smallest of each, at an input size its layout accepts.
FAMILIES: dict[str, tuple[str, dict, tuple[int, int, int]]] = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 64}, (3, 64, 64)),
    "deit": ("deit_tiny_patch16_224", {"img_size": 64}, (3, 64, 64)),
    "deit3": ("deit3_small_patch16_224", {"img_size": 64}, (3, 64, 64)),
    "beit": ("beit_base_patch16_224", {"img_size": 64}, (3, 64, 64)),
    "eva02": ("eva02_tiny_patch14_224", {"img_size": 56}, (3, 56, 56)),
    "swin": ("swin_tiny_patch4_window7_224", {}, (3, 224, 224)),
    "swinv2": ("swinv2_cr_tiny_224", {"img_size": 64, "window_size": 4}, (3, 64, 64)),
    "maxvit": ("maxvit_nano_rw_256", {"img_size": 64}, (3, 64, 64)),
    "coatnet": ("coatnet_nano_rw_224", {"img_size": 64}, (3, 64, 64)),
    "efficientvit_mit": ("efficientvit_b0", {}, (3, 64, 64)),
    "efficientvit_msra": ("efficientvit_m0", {}, (3, 224, 224)),
    "levit": ("levit_128s", {}, (3, 224, 224)),
    "fastvit": ("fastvit_t8", {}, (3, 64, 64)),
    "mobilevit": ("mobilevit_xxs", {}, (3, 64, 64)),
    "hiera": ("hiera_tiny_224", {"img_size": 64}, (3, 64, 64)),
    "mixer": ("mixer_s32_224", {"img_size": 64}, (3, 64, 64)),
    "resnet": ("resnet18", {}, (3, 64, 64)),
    "resnet_bottleneck": ("resnet50", {}, (3, 64, 64)),
    "resnet_deep_stem": ("resnet10t", {}, (3, 64, 64)),
    "resnext": ("resnext26ts", {}, (3, 64, 64)),
    "regnetx": ("regnetx_002", {}, (3, 64, 64)),
    "regnety": ("regnety_002", {}, (3, 64, 64)),
    "convnext": ("convnext_atto", {}, (3, 64, 64)),
    "efficientnet": ("efficientnet_b0", {}, (3, 64, 64)),
    "mobilenetv3": ("mobilenetv3_small_100", {}, (3, 64, 64)),
    "mobilenetv4": ("mobilenetv4_conv_small", {}, (3, 64, 64)),
    "ghostnet": ("ghostnet_100", {}, (3, 64, 64)),
    "densenet": ("densenet121", {}, (3, 64, 64)),
    "repvgg": ("repvgg_a0", {}, (3, 64, 64)),
    "vgg": ("vgg11", {}, (3, 64, 64)),
}
SPARSITY = 0.5


def run(families: dict[str, tuple[str, dict, tuple[int, int, int]]] = FAMILIES, *, methods=None,
        echo=print) -> list[dict]:
    """One row per family × method; a family whose model cannot even be built is one row that says why."""
    rows = []
    for family, (name, kwargs, input_size) in families.items():
        try:
            result = check_model(ModelSource(name, 10, kwargs), input_size=input_size, methods=methods,
                                 sparsities=(SPARSITY,))
        except Exception as error:
            rows.append({"family": family, "model": name, "method": "—", "outcome": FAILS, "reason": str(error)[:200]})
            echo(f"{family}: cannot build {name}: {str(error)[:200]}")
            continue
        for check in result.checks:
            rows.append({"family": family, "model": name, "groups": len(result.groups), **_plain(check)})
        echo(f"{family} ({name}): " + ", ".join(f"{c.method} {c.outcome}" for c in result.checks))
    return rows


def _plain(check) -> dict:
    return asdict(check)


def markdown(rows: list[dict]) -> str:
    """Families as rows, methods as columns: the outcome and, where it works, the MACs ratio."""
    methods = sorted({row["method"] for row in rows if row["method"] != "—"})
    families = list(dict.fromkeys(row["family"] for row in rows))
    cell = {(row["family"], row["method"]): row for row in rows}
    lines = ["| family | model | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for family in families:
        model = next(row["model"] for row in rows if row["family"] == family)
        cells = []
        for method in methods:
            row = cell.get((family, method))
            if row is None:
                cells.append("—")
            elif row["outcome"] == WORKS:
                cells.append(f"{row['macs_ratio']:.2f}×")
            else:
                cells.append(row["outcome"])
        lines.append(f"| {family} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    structured = [row for row in rows if row["method"] == "structured"]
    reached = [row for row in structured if row["outcome"] == WORKS and row["macs_ratio"] >= 1.3]
    crashes = [row for row in rows if row["outcome"] == FAILS]
    unequal = [row for row in rows if row["outcome"] == WORKS and not row["reload_max_abs_diff"] <= 1e-5]
    return (f"structured at {SPARSITY:.0%}: MACs ratio ≥ 1.3 on {len(reached)} of {len(structured)} families"
            f" (target: 90%); failures without a refusal: {len(crashes)} (target: 0); working rows that reload with"
            f" outputs more than 1e-5 apart: {len(unequal)} (target: 0).")


# --all: the whole timm population, one subprocess per architecture -------------------------------------------------

CHECKED, SKIPPED, TIMED_OUT, CRASHED, DOES_NOT_RUN = "checked", "skipped", "timed out", "crashed", "does not run"
NO_VERDICT = (TIMED_OUT, CRASHED, DOES_NOT_RUN)  # an architecture's status, and the outcome of the rows it left
CAP_SECONDS = 300.0
RATIO_TARGET = 1.3
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

    started, wall = datetime.now(timezone.utc), time.perf_counter()
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
                 f" {_duration(time.perf_counter() - wall)} elapsed)")
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
                           cap_seconds, methods, interrupted))
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
    return [sys.executable, "-m", "autoprune.bench.families", "--child", architecture, "--methods", *methods]


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
    parser = argparse.ArgumentParser(prog="python -m autoprune.bench.families")
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


def progress_line(record: dict) -> str:
    """`architecture: model at input — each method's cell`, then the status and why where it is not "checked"."""
    where = record["architecture"] + (f": {record['model']}" if record["model"] else "")
    if record["input_size"]:
        where += f" at {_input_text(record)}"
    if record["status"] == SKIPPED:
        return f"{where} — skipped: {_first(record['reason'])}"
    parts = [f"{row['method']} {_cell(row)}" for row in record["rows"] if row["outcome"] not in NO_VERDICT]
    if record["status"] != CHECKED:
        parts.append(f"{record['status']}: {_first(record['reason'])}")
    return f"{where} — {', '.join(parts)}"


def _first(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _input_text(record: dict) -> str:
    size = record["input_size"]
    text = f"{size[1]}×{size[2]}" if size else "—"
    extra = ", ".join(f"{key}={value}" for key, value in (record.get("kwargs") or {}).items())
    return f"{text} ({extra})" if extra else text


def _cell(row: dict) -> str:
    ratio = row.get("macs_ratio")
    if row["outcome"] == WORKS and ratio is not None:
        return f"{ratio:.2f}×"
    return f"{row['outcome']} ({ratio:.2f}×)" if ratio is not None else row["outcome"]


def _column(row: dict) -> str:
    """Which count of the summary table a row falls in (an outcome this module does not know is its own column)."""
    outcome = row["outcome"]
    if outcome == WORKS:
        ratio = row.get("macs_ratio")
        return f"works ≥ {RATIO_TARGET}×" if ratio is not None and ratio >= RATIO_TARGET else f"works < {RATIO_TARGET}×"
    if outcome.startswith("removes"):  # removes nothing, removes little
        return "removes little/nothing"
    if outcome in NO_VERDICT:
        return "no verdict (timed out, crashed, does not run)"
    return outcome  # refuses, fails, or a new one


def population_markdown(records: dict[str, dict], runs: list[dict]) -> str:
    """The README's tables from `run_all`'s records: per method, how many architectures fall in each outcome; per
    architecture, each method's outcome and MACs ratio; the failures with their reasons; the skipped ones with
    theirs; and how long it took."""
    ordered = [records[name] for name in sorted(records)]
    checked = [r for r in ordered if r["status"] != SKIPPED]
    skipped = [r for r in ordered if r["status"] == SKIPPED]
    methods = list(dict.fromkeys(row["method"] for r in checked for row in r["rows"]))
    fixed = [f"works ≥ {RATIO_TARGET}×", f"works < {RATIO_TARGET}×", "removes little/nothing", REFUSES, FAILS,
             "no verdict (timed out, crashed, does not run)"]
    extra = sorted({_column(row) for r in checked for row in r["rows"]} - set(fixed))
    columns = fixed[:5] + extra + fixed[5:]
    last = runs[-1] if runs else {}
    sparsity = last.get("sparsity", SPARSITY)
    lines = [f"{len(checked)} timm architectures checked (the smallest model of each; random weights, CPU, every"
             f" method at {sparsity:.0%}, N:M at its own), {len(skipped)} skipped"
             + (f", of {last['population']} in timm {last['timm']}" if last else "") + ".", "",
             "| method | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for method in methods:
        counts = {column: 0 for column in columns}
        for record in checked:
            for row in record["rows"]:
                if row["method"] == method:
                    counts[_column(row)] += 1
        lines.append(f"| {method} | " + " | ".join(str(counts[column]) for column in columns) + " |")
    structured = [row for r in checked for row in r["rows"] if row["method"] == "structured"]
    if structured:
        reached = sum(_column(row) == fixed[0] for row in structured)
        lines += ["", f"structured at {sparsity:.0%}: MACs ratio ≥ {RATIO_TARGET} on {reached} of {len(structured)}"
                      f" architectures ({reached / len(structured):.0%}; target: 90%)."]
    lines += ["", "| architecture | model | params | input | s | " + " | ".join(methods) + " |",
              "|---|---|---:|---|---:|" + "---|" * len(methods)]
    for record in checked:
        by_method = {row["method"]: row for row in record["rows"]}
        params = "—" if record["params"] is None else f"{record['params'] / 1e6:.1f}M"
        lines.append(f"| {record['architecture']} | {record['model'] or '—'} | {params} | {_input_text(record)} |"
                     f" {record['seconds']:.0f} | "
                     + " | ".join(_cell(by_method[m]) if m in by_method else "—" for m in methods) + " |")
    failures = [f"- {r['architecture']}{f' ({m})' if (m := r['model']) else ''}, {r['status']}: {_first(r['reason'])}"
                for r in checked if r["status"] in NO_VERDICT]
    failures += [f"- {r['architecture']} ({r['model']}) / {row['method']}: {_first(row.get('reason', ''))}"
                 for r in checked if r["status"] not in NO_VERDICT for row in r["rows"] if row["outcome"] == FAILS]
    if failures:
        lines += ["", "Failures (a method that ran and went wrong), and architectures with no verdict:", "", *failures]
    if skipped:
        lines += ["", "Skipped:", "", *(f"- {r['architecture']}: {_first(r['reason'])}" for r in skipped)]
    ran = [run for run in runs if run.get("checked")] or runs  # a re-run that found everything done took no time
    if ran:
        own = sum(r["seconds"] for r in checked)
        caps = ", ".join(dict.fromkeys(f"{run['cap_seconds']:g} s" for run in ran))
        lines += ["", f"Wall time: {_duration(sum(run['wall_s'] for run in ran))} over {len(ran)}"
                      f" run{'s' if len(ran) != 1 else ''} ({', '.join(str(run['jobs']) for run in ran)} at a time;"
                      f" capped at {caps} an architecture; {ran[-1]['cpus']} CPUs); the architectures' own times add"
                      f" up to {_duration(own)}."]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def list_population(only: list[str] | None = None, echo=print) -> None:
    """`--all --list`: each architecture's smallest model, as the children would choose it (no checks)."""
    from autoprune.bench import population

    names = [name for name in population.architectures() if not only or name in only]
    variants, left_out = population.population(names, echo=echo)
    echo(f"{len(variants)} architectures; {len(left_out)} skipped"
         + "".join(f"\n  {name}: {reason}" for name, reason in left_out.items()))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from autoprune.argtypes import positive_float, positive_int

    parser.add_argument("--json", dest="json_path", help="also write every row as JSON here (with --all: JSON Lines,"
                                                         " appended per architecture; a re-run resumes)")
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), help="only these (default: all)")
    parser.add_argument("--methods", nargs="+", help="only these pruning methods (default: all registered)")
    parser.add_argument("--all", action="store_true", help="every timm architecture (its smallest model), each in"
                                                           " its own subprocess, instead of the 30 families")
    parser.add_argument("--only", nargs="+", metavar="ARCH", help="with --all: only these timm architectures"
                                                                  " (modules of timm.models; commas also separate)")
    parser.add_argument("--cap-seconds", type=positive_float, default=CAP_SECONDS,
                        help=f"with --all: the time one architecture may take (default: {CAP_SECONDS:g})")
    parser.add_argument("--jobs", type=positive_int, default=1, help="with --all: architectures checked at once"
                                                                     " (one torch thread each; default: 1)")
    parser.add_argument("--retry-failed", action="store_true", help="with --all: check again the architectures"
                                                                    " with no verdict or a method that fails")
    parser.add_argument("--table-only", action="store_true", help="with --all: print the tables from --json,"
                                                                  " running nothing")
    parser.add_argument("--list", action="store_true", help="with --all: print each architecture's smallest model"
                                                            " (2–3 min), running no checks")


def main_families(args) -> int:
    if getattr(args, "all", False):
        return _main_all(args)
    from autoprune.errors import AutopruneError

    for flag in ("only", "retry_failed", "table_only", "list"):
        if getattr(args, flag, None):
            raise AutopruneError(f"bench families: --{flag.replace('_', '-')} goes with --all")
    chosen = {family: FAMILIES[family] for family in (args.families or FAMILIES)}
    rows = run(chosen, methods=args.methods)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rows, indent=1))
    print()
    print(markdown(rows))
    print()
    print(verdict(rows))
    return 0


def _main_all(args) -> int:
    from autoprune.errors import AutopruneError

    if args.families:
        raise AutopruneError("bench families: --families names the 30 hand-chosen families; with --all use --only")
    only = [name for item in (args.only or []) for name in item.split(",") if name] or None
    if args.list:
        list_population(only)
        return 0
    if not args.json_path:
        raise AutopruneError("bench families --all: --json PATH is required (results are appended there, and a"
                             " re-run with the same path resumes)")
    if args.table_only:
        if not Path(args.json_path).exists():
            raise AutopruneError(f"bench families --table-only: {args.json_path} does not exist")
    else:
        run_all(args.json_path, only=only, methods=args.methods, cap_seconds=args.cap_seconds, jobs=args.jobs,
                retry_failed=args.retry_failed)
        print()
    records, runs = read_records(args.json_path)
    if only:
        records = {name: record for name, record in records.items() if name in only}
    print(population_markdown(records, runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1:]))
