"""The node's conditions beside a latency (measure/conditions.py), against a real co-running load
(testing/load.py): a busy neighbour is seen, a node without /proc or NVML still gives conditions."""

from __future__ import annotations

import json
import os
import re
import time

import psutil
import pytest
import torch

from autoprune.measure import conditions
from autoprune.measure.conditions import NodeConditions, sample, watch
from autoprune.testing.load import busy_processes

PROC_STAT_READABLE = os.access("/proc/stat", os.R_OK)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_window_records_the_node_and_survives_json():
    measured = sample(0.2)
    assert isinstance(measured.load_1m, float) and measured.load_1m >= 0
    assert isinstance(measured.cpus, int) and measured.cpus >= 1
    assert isinstance(measured.busy_processes, int) and measured.busy_processes >= 0
    assert 0.0 <= measured.cpu_busy_share <= 1.0 and 0.0 <= measured.steal_share <= 1.0
    assert 0.2 <= measured.seconds < 2.0
    assert measured.gpu_utilization is measured.gpu_clock_mhz is measured.gpu_temperature_c is None  # no device
    assert NodeConditions.from_dict(json.loads(json.dumps(measured.as_dict()))) == measured
    tags = measured.as_tags()
    assert tags and all(key.startswith("node.") and isinstance(value, str) for key, value in tags.items())
    assert tags["node.cpus"] == str(measured.cpus) and tags["node.load_1m"] == f"{measured.load_1m:.2f}"
    assert "node.gpu_utilization" not in tags  # not known: left out, not "None"


def test_a_busy_neighbour_is_counted_and_its_processes_end_with_the_block():
    with busy_processes(1, max_seconds=60) as pids:
        assert len(pids) == 1 and psutil.pid_exists(pids[0])
        measured = sample(1.0)
    assert measured.busy_processes >= 1 and measured.busy
    assert re.search(r"\b[1-9]\d* other busy process", measured.describe()), measured.describe()
    if PROC_STAT_READABLE:  # one CPU of this machine's was kept busy for the whole window
        assert measured.cpu_busy_share >= 0.8 / os.cpu_count()
    assert all(_gone(pid) for pid in pids)


def test_no_load_starts_nothing():
    with busy_processes(0) as pids:
        assert pids == []


def test_a_load_is_stopped_when_the_block_fails():
    with pytest.raises(KeyError), busy_processes(2, max_seconds=60) as pids:
        raise KeyError("the test failed")
    assert len(pids) == 2 and all(_gone(pid) for pid in pids)


def test_a_fast_block_still_gives_conditions():
    with watch(None) as window:
        sum(range(100))
    assert window.conditions is not None and 0 < window.conditions.seconds < 1.0


def test_conditions_are_recorded_when_the_block_raised():
    with pytest.raises(ValueError), watch() as window:
        raise ValueError("timing failed")
    assert window.conditions is not None and window.conditions.cpus >= 1


def test_this_process_is_not_counted_and_a_neighbour_is_seen():
    with busy_processes(1, max_seconds=60) as pids:
        times = conditions._process_times()
    assert os.getpid() not in times and pids[0] in times


def test_a_node_without_proc_loadavg_or_affinity_still_gives_conditions(monkeypatch):
    """macOS (no sched_getaffinity, no /proc) and a container whose /proc/stat is not readable."""
    monkeypatch.setattr(conditions, "PROC_STAT", "/nonexistent/stat")
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (_ for _ in ()).throw(OSError("no load average")))
    monkeypatch.setattr(psutil, "process_iter", lambda *args, **kwargs: iter(()))
    measured = sample(0.05)
    assert measured.cpu_busy_share == measured.steal_share == 0.0 and measured.load_1m == 0.0
    assert measured.cpus == os.cpu_count() and measured.busy_processes == 0


def test_a_gpu_that_cannot_be_read_leaves_its_fields_unknown(monkeypatch):
    def no_nvml(device=None):
        raise RuntimeError("pynvml does not seem to be installed")

    asked = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "utilization", no_nvml)
    monkeypatch.setattr(torch.cuda, "clock_rate", lambda device=None: asked.append(device) or 1980)
    monkeypatch.setattr(torch.cuda, "temperature", lambda device=None: asked.append(device) or 54)
    with watch(torch.device("cuda", 1)) as window:
        pass
    measured = window.conditions
    assert measured.gpu_utilization is None and measured.gpu_clock_mhz == 1980.0 and measured.gpu_temperature_c == 54.0
    assert asked == [1, 1]  # the timed device's index, not the current device (0)
    assert measured.describe().endswith("; GPU 1980 MHz, 54 °C")
    assert "node.gpu_utilization" not in measured.as_tags() and measured.as_tags()["node.gpu_clock_mhz"] == "1980"


def test_what_makes_a_node_busy():
    quiet = NodeConditions(load_1m=0.5, cpus=2, busy_processes=0, cpu_busy_share=0.3, steal_share=0.0, seconds=1.0)
    assert not quiet.busy
    assert quiet.describe() == "load 0.50 on 2 CPUs, 0 other busy processes, 0% CPU stolen"
    assert NodeConditions(**{**quiet.as_dict(), "busy_processes": 1}).busy
    assert NodeConditions(**{**quiet.as_dict(), "steal_share": 0.06}).busy
    assert NodeConditions(**{**quiet.as_dict(), "load_1m": 2.5}).busy
    assert "1 other busy process," in NodeConditions(**{**quiet.as_dict(), "busy_processes": 1}).describe()


def test_conditions_saved_before_they_were_recorded_read_as_quiet():
    old = NodeConditions.from_dict({})
    assert not old.busy and old.gpu_utilization is None
    assert NodeConditions.from_dict({"load_1m": "1.5", "cpus": "4", "added_later": 1}).cpus == 4


def test_two_snapshots_are_cheap():
    started = time.perf_counter()
    with watch():
        pass
    assert time.perf_counter() - started < 0.1
