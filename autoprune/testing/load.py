"""A co-running CPU load, for the tests and benchmarks that show what a busy neighbour does to a measurement.

The load is real processes (a Python busy loop each), not threads of the caller: a neighbour on a shared node is
another process, and threads would share this process's interpreter lock and CPU time, which is not what is being
shown. Each is started in its own session and killed (and waited for) when the block ends, also when it raised;
each also ends by itself after `max_seconds`, so that a test run that was killed outright leaves nothing spinning.
Importable without pytest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from typing import Iterator

__all__ = ["busy_processes"]

# Says it is running once it is in its loop (so that the block starts under load, not under Python's start-up),
# then spins until its deadline.
_BUSY_LOOP = """
import sys, time
deadline = time.monotonic() + float(sys.argv[1])
sys.stdout.write("ready\\n")
sys.stdout.flush()
sys.stdout.close()
while time.monotonic() < deadline:
    pass
"""


@contextlib.contextmanager
def busy_processes(count: int, *, max_seconds: float = 900) -> Iterator[list[int]]:
    """`count` CPU-bound processes (a Python busy loop) running while the block runs; their pids are yielded.
    Each ends by itself after max_seconds, so that a test that crashed leaves nothing running; all are killed on
    exit."""
    if count < 0:
        raise ValueError(f"`count >= 0` must hold, but got {count=}.")
    processes: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            processes.append(subprocess.Popen(
                [sys.executable, "-I", "-c", _BUSY_LOOP, str(max_seconds)], stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, start_new_session=True))
        for process in processes:
            ready = process.stdout.readline()
            process.stdout.close()
            if ready.strip() != b"ready":
                raise RuntimeError(f"a busy process (pid {process.pid}) did not start: exit code {process.wait()}")
        yield [process.pid for process in processes]
    finally:
        for process in processes:
            _kill(process)
        for process in processes:
            process.wait()
            if process.stdout is not None:
                process.stdout.close()


def _kill(process: subprocess.Popen) -> None:
    """Kill the process's group (its session: whatever it started too); a process already gone is fine."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):  # no process groups (Windows): the process alone
        with contextlib.suppress(ProcessLookupError):
            process.kill()
