"""What else was running on the node while a latency was measured, recorded beside the latency.

A paired measurement (timing.py) cancels most of a shared node's load, but not all of it: a neighbour that
starts halfway through a pass, a hypervisor that steals cycles, a GPU that throttles as it heats. A latency with no
record of the node's state cannot be told from one taken on a quiet node, so every measurement is wrapped in a
`watch`, and its `NodeConditions` travel with the profile (as a dict) and onto the MLflow run (as `node.*` tags).
`sample` watches an idle second, to warn before a search starts on a node that is already busy.

A window is two snapshots, on entering and on leaving: the kernel's CPU counters (/proc/stat) and every process's
CPU time (psutil). A process busy for the whole window grew by the window's length; one that grew by half of it or
more counts as busy. Processes that started inside the window count from zero; ones that ended inside it are not
seen (their time went with them). Both snapshots are cheap (about 20 µs a process), so a window costs a few ms.

Nothing here may fail a measurement: where a counter cannot be read (no /proc on macOS, a /proc/stat that is not
readable, no NVML, a process that is another user's), the field falls back (0.0, or None for the GPU) and the
measurement goes on.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import psutil

__all__ = ["NodeConditions", "watch", "sample", "BUSY_SHARE", "STEAL_LIMIT"]

BUSY_SHARE = 0.2  # a process that used at least a fifth of a CPU during the window is busy (on an
# overloaded node every busy process gets only a share of a CPU: 4 of them on 2 CPUs get half each, or less)
STEAL_LIMIT = 0.05  # more than 5% of the CPU time stolen by the hypervisor disturbs timings
PROC_STAT = "/proc/stat"
try:
    _TICK = 1.0 / os.sysconf("SC_CLK_TCK")  # the resolution of a process's CPU time on Linux (usually 10 ms)
except (AttributeError, ValueError, OSError):
    _TICK = 0.01


@dataclass(frozen=True)
class NodeConditions:
    """The node's load during one window: the CPU's, the other processes', and the GPU's where one was timed."""

    load_1m: float  # os.getloadavg()[0] at the end of the window (0.0 where there is none)
    cpus: int  # CPUs this process may run on (0: not recorded)
    busy_processes: int  # other processes (not this one) that used at least half a CPU during the window
    cpu_busy_share: float  # share of the node's CPU time that was not idle during the window (0..1; 0.0: unknown)
    steal_share: float  # share of the node's CPU time stolen by the hypervisor during the window (0..1)
    seconds: float  # the window's length
    gpu_utilization: float | None = None  # percent of the window's end that the timed GPU ran kernels (NVML)
    gpu_clock_mhz: float | None = None  # its SM clock: a throttled GPU runs slower
    gpu_temperature_c: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "NodeConditions":
        """From `as_dict` (or JSON of it): missing fields take their defaults (a profile saved before conditions
        were recorded has none), unknown ones are ignored (a newer version's)."""
        values: dict[str, Any] = {}
        for spec in fields(cls):
            value = raw.get(spec.name, _DEFAULTS.get(spec.name))
            if value is None:
                values[spec.name] = None if spec.name.startswith("gpu_") else _DEFAULTS[spec.name]
            else:
                values[spec.name] = int(value) if spec.name in _INTS else float(value)
        return cls(**values)

    def as_tags(self) -> dict[str, str]:
        """As MLflow tags ("node.load_1m": "2.10"); fields not known (None) are left out."""
        return {f"node.{name}": _TAG_FORMATS.get(name, "{}").format(value)
                for name, value in self.as_dict().items() if value is not None}

    @property
    def busy(self) -> bool:
        """Timings taken now are disturbed: another process was busy, the hypervisor stole CPU time, or more
        threads wanted to run than there are CPUs."""
        return self.busy_processes > 0 or self.steal_share > STEAL_LIMIT or self.load_1m > max(self.cpus, 1)

    def describe(self) -> str:
        """One short phrase, e.g. "load 2.10 on 2 CPUs, 1 other busy process, 0% CPU stolen"."""
        others = f"{self.busy_processes} other busy process{'es' if self.busy_processes != 1 else ''}"
        cpus = f"{self.cpus} CPU{'s' if self.cpus != 1 else ''}"
        text = f"load {self.load_1m:.2f} on {cpus}, {others}, {self.steal_share:.0%} CPU stolen"
        gpu = [template.format(value) for template, value in (("{:.0f}% busy", self.gpu_utilization),
                                                              ("{:.0f} MHz", self.gpu_clock_mhz),
                                                              ("{:.0f} °C", self.gpu_temperature_c))
               if value is not None]
        return f"{text}; GPU {', '.join(gpu)}" if gpu else text


_INTS = {"cpus", "busy_processes"}
_DEFAULTS = {"load_1m": 0.0, "cpus": 0, "busy_processes": 0, "cpu_busy_share": 0.0, "steal_share": 0.0,
             "seconds": 0.0}
_TAG_FORMATS = {"load_1m": "{:.2f}", "cpu_busy_share": "{:.3f}", "steal_share": "{:.3f}", "seconds": "{:.2f}",
                "gpu_utilization": "{:.0f}", "gpu_clock_mhz": "{:.0f}", "gpu_temperature_c": "{:.0f}"}


class watch:
    """`with watch(device) as window: …`, then `window.conditions`: the node's conditions during the block.

    `device` is the torch.device being timed (or None): its GPU's utilisation, clock and temperature are read at
    the end of the window when it is a CUDA device. The conditions are there also when the block raised."""

    def __init__(self, device: Any = None) -> None:
        self.device = device
        self.conditions: NodeConditions | None = None
        self._start = 0.0
        self._stat: tuple[int, int, int] | None = None
        self._times: dict[int, float] = {}

    def __enter__(self) -> "watch":
        self._times = _process_times()
        self._stat = _read_stat()
        self._start = time.monotonic()
        return self

    def __exit__(self, *exc_info) -> None:
        seconds = max(time.monotonic() - self._start, 1e-9)
        stat = _read_stat()
        times = _process_times()
        # A process's CPU time moves in clock ticks: in a window of a few ticks one tick is not "half a CPU".
        threshold = max(BUSY_SHARE * seconds, 2 * _TICK)
        busy = sum(1 for pid, used in times.items() if used - self._times.get(pid, 0.0) >= threshold)
        busy_share, steal_share = _shares(self._stat, stat)
        self.conditions = NodeConditions(
            load_1m=_load(), cpus=_cpus(), busy_processes=busy, cpu_busy_share=busy_share,
            steal_share=steal_share, seconds=seconds, **_gpu(self.device))


def sample(seconds: float = 1.0, device: Any = None) -> NodeConditions:
    """The node's conditions over `seconds` of this process idling: what a search would be timed under now."""
    with watch(device) as window:
        time.sleep(seconds)
    return window.conditions


def _process_times() -> dict[int, float]:
    """User + system CPU seconds of every process but this one that may be read (another user's may not be on
    macOS: those are not seen)."""
    own = os.getpid()
    times: dict[int, float] = {}
    try:
        for process in psutil.process_iter(["pid", "cpu_times"]):
            info = process.info
            cpu = info.get("cpu_times")
            if cpu is not None and info.get("pid") != own:
                times[info["pid"]] = cpu.user + cpu.system
    except Exception:  # noqa: BLE001 — a node that cannot list its processes: none seen, the measurement goes on
        pass
    return times


def _read_stat() -> tuple[int, int, int] | None:
    """(all, idle, steal) clock ticks of the node's CPUs since boot, from /proc/stat's "cpu" line; None where it
    cannot be read (macOS, a restricted container)."""
    try:
        with open(PROC_STAT) as stat:
            line = stat.readline().split()
        # user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is already in user and nice
        ticks = [int(value) for value in line[1:9]]
        if line[0] != "cpu" or len(ticks) < 4:
            return None
        ticks += [0] * (8 - len(ticks))  # old kernels have no iowait … steal
        return sum(ticks), ticks[3] + ticks[4], ticks[7]
    except (OSError, ValueError, IndexError):
        return None


def _shares(before: tuple[int, int, int] | None, after: tuple[int, int, int] | None) -> tuple[float, float]:
    """(busy share, steal share) of the node's CPU time between two /proc/stat readings; 0.0 where unknown (a
    window shorter than a tick included)."""
    if before is None or after is None:
        return 0.0, 0.0
    total = after[0] - before[0]
    if total <= 0:
        return 0.0, 0.0
    busy = (total - (after[1] - before[1])) / total
    steal = (after[2] - before[2]) / total
    return min(max(busy, 0.0), 1.0), min(max(steal, 0.0), 1.0)


def _load() -> float:
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def _cpus() -> int:
    """The CPUs this process may run on: its affinity where the OS has one (Linux), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _gpu(device: Any) -> dict[str, float | None]:
    """The timed GPU's utilisation, SM clock and temperature, each None where NVML cannot say. The device's own
    index is asked for: the current device may be another GPU than the one timed."""
    unknown: dict[str, float | None] = {"gpu_utilization": None, "gpu_clock_mhz": None, "gpu_temperature_c": None}
    if device is None or (getattr(device, "type", None) != "cuda" and not str(device).startswith("cuda")):
        return unknown
    try:
        import torch

        device = torch.device(device)
        # torch.device("cuda") (no index) is the current device: tensors put there run there
        index = device.index if device.index is not None else torch.cuda.current_device()
    except Exception:  # noqa: BLE001 — no CUDA here: nothing to read
        return unknown
    readings = dict(unknown)
    for name, read in (("gpu_utilization", torch.cuda.utilization), ("gpu_clock_mhz", torch.cuda.clock_rate),
                       ("gpu_temperature_c", torch.cuda.temperature)):
        try:
            readings[name] = float(read(index))
        except Exception:  # noqa: BLE001 — no NVML (pynvml missing, a driver without it): not known
            pass
    return readings
