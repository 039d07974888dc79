"""The census's tables (`autoprune bench families --all`): its JSON-lines records as the markdown the README quotes,
and the one line per architecture printed as a run goes."""

from __future__ import annotations

from autoprune.bench.record import duration
from autoprune.check import FAILS, REFUSES, WORKS

SPARSITY = 0.5  # what every method that takes a sparsity is asked for
RATIO_TARGET = 1.3  # the MACs ratio structured removal must reach (issue 24: on 85% of the architectures)
CHECKED, SKIPPED, TIMED_OUT, CRASHED, DOES_NOT_RUN = "checked", "skipped", "timed out", "crashed", "does not run"
NO_VERDICT = (TIMED_OUT, CRASHED, DOES_NOT_RUN)  # an architecture's status, and the outcome of the rows it left

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
    asked = "every method" if len(methods) > 1 else methods[0] if methods else "no method"
    lines = [f"{len(checked)} timm architectures checked (the smallest model of each; random weights, CPU, {asked}"
             f" at {sparsity:.0%}{', N:M at its own' if 'nm' in methods else ''}), {len(skipped)} skipped"
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
                      f" architectures ({reached / len(structured):.0%}; target: 85%)."]
        exported = [row for row in structured if _column(row) == fixed[0] and row.get("onnx") is not None]
        if exported:  # checked by a census that ran the ONNX check (`check`'s onnx column)
            running = sum(not row["onnx"] for row in exported)
            lines += ["", f"ONNX Runtime: {running} of the {len(exported)} where structured works export and give"
                          f" PyTorch's outputs ({running / len(exported):.0%}; target: 80%)."]
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
        lines += ["", f"Wall time: {duration(sum(run['wall_s'] for run in ran))} over {len(ran)}"
                      f" run{'s' if len(ran) != 1 else ''} ({', '.join(str(run['jobs']) for run in ran)} at a time;"
                      f" capped at {caps} an architecture; {ran[-1]['cpus']} CPUs); the architectures' own times add"
                      f" up to {duration(own)}."]
    return "\n".join(lines)


def runs_text(runs: list[dict], *, rows_file: str) -> str:
    """Where a census file's rows come from: each run that added to it — its command (runs written before runs
    recorded their command: what they checked), date, code, machine and wall time."""
    parts = []
    for run in runs:
        if not run.get("checked"):
            continue  # a re-run that found everything done
        where = run.get("provenance")
        what = (f"`{where['command']}`" if where else
                f"`--all` over {run['chosen']} architecture{'s' if run['chosen'] != 1 else ''}"
                f" at {run['jobs']} job{'s' if run['jobs'] != 1 else ''}, capped at {run['cap_seconds']:g} s,")
        code = f", code {where['code']}" if where else ""
        parts.append(f"{what} on {run['started'][:10]}{code} ({run['checked']} checked, {duration(run['wall_s'])})")
    last = runs[-1] if runs else {}
    box = (last.get("provenance") or {}).get("machine") or {"cpus": last.get("cpus"), "cpu": "", "gpu": None}
    machine = f"{box['cpus']} CPUs" + (f" ({box['cpu']})" if box.get("cpu") else "") + ", no GPU" * (not box.get("gpu"))
    versions = f"timm {last.get('timm')}, torch {last.get('torch')}" if last else ""
    return (f"Measured by {'; then '.join(parts) or 'no run'}, on {machine}; {versions}. A later run replaces the"
            f" rows of the architectures it checks. Every row is in [{rows_file}]({rows_file}).")


def list_population(only: list[str] | None = None, echo=print) -> None:
    """`--all --list`: each architecture's smallest model, as the children would choose it (no checks)."""
    from autoprune.bench import population

    names = [name for name in population.architectures() if not only or name in only]
    variants, left_out = population.population(names, echo=echo)
    echo(f"{len(variants)} architectures; {len(left_out)} skipped"
         + "".join(f"\n  {name}: {reason}" for name, reason in left_out.items()))
