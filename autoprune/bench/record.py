"""What a benchmark's JSON file holds besides its measurements: the command that wrote it, the machine, the date,
the code and the wall time. The documentation's benchmark pages are generated from these files
(`python -m autoprune.docs`), so every table a page shows says which command, on which machine, measured it.

A file is `{"provenance": {...}, "results": ...}`, where `results` is what the bench measured (its rows, report or
runs). The census writes JSON Lines instead; its run records carry the same provenance (see `census.run_all`).
Files written before provenance existed (bare results) still read, with no provenance."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path


def command_line(argv: list[str] | None = None) -> str:
    """The command as a user would type it: `autoprune …`, each path cut to its name, since the file is committed
    beside the page and a path of the machine that measured it means nothing elsewhere."""
    argv = list(sys.argv if argv is None else argv)
    words = []
    for word in argv[1:]:
        if os.sep in word and not word.startswith("-") and (os.path.isabs(word) or os.path.exists(word)):
            word = Path(word).name
        words.append(shlex.quote(word))
    return " ".join(["autoprune", *words])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or no version: the page says "—"
        return None


def _code() -> str:
    """The commit the package was imported from (with `+changes` when its tree differs), else its version."""
    import autoprune

    where = Path(autoprune.__file__).parent
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+changes" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return f"autoprune {autoprune.__version__}"


def machine() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": _cpu_model(), "cpus": os.cpu_count(), "memory_gib": _memory_gib(), "gpu": gpu,
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "torch": torch.__version__, "timm": _version("timm"), "onnxruntime": _version("onnxruntime"),
            "mlflow": _version("mlflow"), "ray": _version("ray"), "optuna": _version("optuna")}


class Provenance:
    """Started when a bench starts, finished when it writes its file: the load average at both ends says whether
    the machine was quiet."""

    def __init__(self, table: str):
        self.table = table
        self.date = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.load_start = _load()
        self.clock = time.perf_counter()

    def finish(self) -> dict:
        return {"bench": self.table, "command": command_line(), "date": self.date, "code": _code(),
                "wall_s": round(time.perf_counter() - self.clock, 1), "machine": machine(),
                "load_average": [self.load_start, _load()]}


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def write(path: str | Path, provenance: Provenance, results, *, earlier: dict | None = None) -> None:
    """`earlier`: the provenance of the file this run resumed (a bench that adds to its file keeps who wrote what)."""
    document = provenance.finish()
    if earlier:
        document["earlier"] = [*earlier.get("earlier", []), {k: v for k, v in earlier.items() if k != "earlier"}]
    Path(path).write_text(json.dumps({"provenance": document, "results": results}, indent=1) + "\n")


def read(path: str | Path) -> tuple[dict | None, object]:
    """(provenance or None, results) of a bench's JSON file."""
    document = json.loads(Path(path).read_text())
    if isinstance(document, dict) and set(document) == {"provenance", "results"}:
        return document["provenance"], document["results"]
    return None, document


def describe(provenance: dict, *, rows_file: str) -> str:
    """One paragraph for a page: the command, the machine, the date, the code, the wall time and the load."""
    box = provenance["machine"]
    device = box["gpu"] or "no GPU"
    memory = f", {box['memory_gib']:g} GiB" if box.get("memory_gib") else ""
    versions = ", ".join(f"{name} {box[name]}" for name in ("torch", "timm", "onnxruntime") if box.get(name))
    load = provenance.get("load_average") or [None, None]
    load_text = (f"; load average {load[0]:g} at the start, {load[1]:g} at the end"
                 if None not in load else "")
    return (f"Measured with `{provenance['command']}` on {provenance['date'][:10]}, code {provenance['code']}: "
            f"{box['cpus']} CPUs ({box['cpu']}){memory}, {device}; {versions}; wall time "
            f"{duration(provenance['wall_s'])}{load_text}. Every row is in [{rows_file}]({rows_file}).")


def duration(seconds: float) -> str:
    """A wall time as a page writes it: `50 s`, `5 min 32 s`, `1 h 05 min`."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"
