"""What the tests and benchmarks read from /proc, with one meaning of "alive" (a zombie is not).

``stat``, ``alive``, ``tagged_pids``, ``signal_all`` and ``sweep`` are pyquorum._localcluster's (the
demo needs them too) and are re-exported here; this module adds what only tests and benchmarks read.
supervisor/guard.py keeps its own reading of /proc: it must import nothing from pyquorum. Linux only.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

from pyquorum._localcluster import TAG_VAR, alive, signal_all, stat, sweep, tagged_pids

__all__ = ["TAG_VAR", "alive", "cmdline", "cpu_seconds", "descendants", "rss_mb", "signal_all", "stat"]
__all__ += ["freeze", "stopped", "sweep", "sweep_stale", "tagged_pids", "wait_until"]

V = TypeVar("V")


def stopped(pid: int) -> bool:
    """True if ``pid`` is stopped (SIGSTOP: state T or t)."""
    fields = stat(pid)
    return fields is not None and fields[0] in ("T", "t")


def freeze(find: Callable[[], Mapping[int, V]], rounds: int = 50) -> dict[int, V]:
    """SIGSTOP every process that ``find()`` returns (pid -> anything), again until it returns no new
    one: then none of them can fork or act any more (the moment of a host crash). What was frozen."""
    frozen: dict[int, V] = {}
    for _ in range(rounds):
        if not (new := {p: v for p, v in find().items() if p not in frozen}):
            break
        signal_all(new, signal.SIGSTOP)
        frozen.update(new)
    return frozen


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, their children ...)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and alive(int(name)) and (fields := stat(int(name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_ns(pid: int) -> int:
    """On-CPU time of ``pid`` so far, in nanoseconds (the first field of /proc/<pid>/schedstat): finer
    than ``cpu_seconds``' clock ticks, for the benchmarks' idle figures."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (utime and stime, fields 14 and 15 of stat)."""
    fields = stat(pid)
    if fields is None:
        raise ProcessLookupError(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise ProcessLookupError(pid)


def wait_until(pids: Iterable[int], state: str, timeout_s: float = 5.0) -> bool:
    """Wait until every pid is gone (``state`` "gone") or stopped or gone ("stopped"); False on time-out."""
    pids = list(pids)
    give_up = time.monotonic() + timeout_s
    while not all(not alive(p) or (state == "stopped" and stopped(p)) for p in pids):
        if time.monotonic() > give_up:
            return False
        time.sleep(0.001)
    return True


def sweep_stale(prefix: str) -> list[int]:
    """Kill the processes left by earlier runs that were killed: tagged ``<prefix><pid>x...``, where
    ``<pid>``, the test process that started them, is gone. A live run's processes are never touched."""
    victims = []
    for pid, tag in tagged_pids(prefix).items():
        owner = tag[len(prefix) :].split("x", 1)[0]
        if owner.isdigit() and not alive(int(owner)):
            victims.append(pid)
    signal_all(victims, signal.SIGCONT)
    signal_all(victims, signal.SIGKILL)
    return victims
