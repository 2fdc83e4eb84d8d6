"""Script runs from the workload's record, and the checks on them that every real-process test shares.

A run is one workload process (tests/harness/workload.py). It starts at its ``start`` line, its first
effect (the interpreter's own start-up before it is not counted), and ends when its process is GONE,
not at its last line. ``RunMonitor`` follows the record as it grows, opens a pidfd for every new pid
(within a few ms of its first line) and notes the moment poll() reports the process terminated: never
before the true exit, later only by the monitor's wake-up latency, whoever killed it. A pid already
gone when the monitor first reads it ends when the monitor found out (``late``), again never early.
Each end goes to ``exits.log`` (``<pid> <time> pidfd|late``), so a run can be checked from files alone.

A run whose end was not seen: from files (the netns checker) it has none, which is a problem; on a
live cluster it is running if its process is alive, else it ended at its ``exit`` line, else at its
last line, flagged as a lower bound.

The checks (protocol.md §6): no two runs overlap in time (P4); from run to run (by start) the token
increases, or stays equal for a restart by the same node after the earlier run was gone (P5, §3.8);
a token belongs to one node (P1); the register never accepts a token lower than one it accepted, and
refuses only such tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import select
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from tests.harness.procfs import alive

RECORD, EXITS, REGISTER = "workload.log", "exits.log", "register"  # file names in a cluster's directory
Entry = tuple[float, str, int, int, str]  # a register write: time, node, pid, token, accept|reject


@dataclasses.dataclass
class Run:
    node: str
    pid: int
    token: int
    start: float
    last: float
    end: float | None = None  # None: still running (or, from files, never seen gone)
    end_how: str = ""  # pidfd, late, exit-line, last-line
    has_start: bool = False
    cluster: str | None = None
    term_at: float | None = None
    exit_at: float | None = None
    exit_code: int | None = None

    @property
    def alive(self) -> bool:
        return self.end is None

    @property
    def end_is_lower_bound(self) -> bool:
        return self.end_how == "last-line"

    @property
    def end_or_inf(self) -> float:
        return math.inf if self.end is None else self.end

    def __str__(self) -> str:
        end = (
            "running" if self.end is None else f"{self.end:.3f}" + " (lower bound)" * self.end_is_lower_bound
        )
        return f"{self.node}/{self.pid} token {self.token} [{self.start:.3f}, {end}]"


class Record:
    """The runs of a record, built line by line, and the ends seen (pid -> time, how)."""

    def __init__(self) -> None:
        self.by_pid: dict[int, Run] = {}
        self.gone: dict[int, tuple[float, str]] = {}
        self._partial = b""

    def feed(self, data: bytes) -> list[int]:
        """Read more of the record (a line cut short waits for its end); return the new pids."""
        *lines, self._partial = (self._partial + data).split(b"\n")
        new = []
        for raw in lines:
            parts = raw.decode(errors="replace").split(" ", 5)
            try:
                node, pid, t, token, event = parts[0], int(parts[1]), float(parts[2]), int(parts[3]), parts[4]
            except (IndexError, ValueError):
                continue
            detail = parts[5] if len(parts) > 5 else ""
            if (run := self.by_pid.get(pid)) is None:
                run = self.by_pid[pid] = Run(node, pid, token, t, t)
                new.append(pid)
            run.start, run.last = min(run.start, t), max(run.last, t)
            if event == "start":
                run.has_start, run.cluster = True, detail.removeprefix("cluster=")
            elif event == "term":
                run.term_at = t
            elif event == "exit":
                run.exit_at = t
                with contextlib.suppress(ValueError):
                    run.exit_code = int(detail.removeprefix("code="))
        return new

    def feed_exits(self, text: str) -> None:
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                pid, t, how = line.split()
                self.gone.setdefault(int(pid), (float(t), how))

    def runs(self, *, live: bool) -> list[Run]:
        """Every run by start; ``live``: the processes are this machine's now (see the docstring)."""
        out = []
        for run in map(dataclasses.replace, self.by_pid.values()):
            if run.pid in self.gone:
                t, run.end_how = self.gone[run.pid]
                run.end = max(t, run.last)
            elif live and not alive(run.pid):
                last = run.exit_at is None
                run.end, run.end_how = (run.last, "last-line") if last else (run.exit_at, "exit-line")
            out.append(run)
        return sorted(out, key=lambda r: r.start)


def parse_runs(record: str, exits: str = "", *, live: bool = True) -> list[Run]:
    log = Record()
    log.feed(record.encode() + b"\n")
    log.feed_exits(exits)
    return log.runs(live=live)


def read_runs(directory: Path) -> list[Run]:
    """The runs of a cluster's directory, from its files alone."""
    exits = directory / EXITS
    return parse_runs(
        (directory / RECORD).read_text(errors="replace"),
        exits.read_text() if exits.exists() else "",
        live=False,
    )


def start_monitor(directory: Path) -> RunMonitor:
    """Create the record, exits and register log of ``directory`` (kept if they exist) and start a
    ``RunMonitor`` on them: what a cluster, or anything else whose jobs run the workload, needs."""
    for name in (RECORD, EXITS, f"{REGISTER}.log"):
        (directory / name).touch()
    monitor = RunMonitor(directory)
    monitor.start()
    return monitor


def read_register(directory: Path) -> list[Entry]:
    path, entries = directory / f"{REGISTER}.log", []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            t, node, pid, token, verdict = line.split()
            entries.append((float(t), node, int(pid), int(token), verdict))
    return entries


class RunMonitor(threading.Thread):
    """Follows ``<directory>/workload.log`` and notes when each process in it is gone (pidfd)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(name=f"run monitor {directory}", daemon=True)
        self.dir = directory
        self.record = Record()
        self.lock = threading.Lock()
        self.max_gap_s = 0.0  # the longest time between two polls: the worst wake-up latency seen
        self.loops = 0
        self._halt = threading.Event()
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # surfaced by stop()
            self._error = exc

    def _loop(self) -> None:
        poller, by_fd = select.poll(), dict[int, int]()
        last = time.monotonic()
        with open(self.dir / RECORD, "rb") as record, open(self.dir / EXITS, "a") as exits:

            def ended(pid: int, how: str) -> None:
                t = time.monotonic()
                with self.lock:
                    self.record.gone.setdefault(pid, (t, how))
                exits.write(f"{pid} {t:.6f} {how}\n")
                exits.flush()

            while True:
                final = self._halt.is_set()
                for fd, _ in poller.poll(2):
                    pid = by_fd.pop(fd)
                    poller.unregister(fd)
                    os.close(fd)
                    ended(pid, "pidfd")
                now = time.monotonic()
                self.max_gap_s, last = max(self.max_gap_s, now - last), now
                with self.lock:
                    new = self.record.feed(record.read())
                for pid in new:
                    try:
                        fd = os.pidfd_open(pid)  # Linux 5.3 or later
                    except ProcessLookupError:
                        ended(pid, "late")
                        continue
                    by_fd[fd] = pid
                    poller.register(fd, select.POLLIN)
                self.loops += 1
                if final:
                    break
            for fd in by_fd:
                os.close(fd)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        if self._error is not None:
            raise RuntimeError(f"the run monitor failed: {self._error!r}") from self._error

    def unended(self) -> list[int]:
        """The pids of the record whose end the monitor has not seen yet."""
        with self.lock:
            return [pid for pid in self.record.by_pid if pid not in self.record.gone]

    def runs(self) -> list[Run]:
        """The runs so far, including every line written before this call."""
        loops = self.loops
        give_up = time.monotonic() + 1.0
        while self.loops < loops + 2 and self.is_alive() and time.monotonic() < give_up:
            time.sleep(0.001)
        with self.lock:
            return self.record.runs(live=True)


def overlaps(runs: Sequence[Run]) -> list[tuple[Run, Run]]:
    """Every pair (a, b), a started first, in which b started before a was gone (P4)."""
    return [(a, b) for i, a in enumerate(runs) for b in runs[i + 1 :] if b.start < a.end_or_inf]


def run_problems(runs: Sequence[Run], register: Sequence[Entry] = ()) -> list[str]:
    """Every run has its start line; P1 and P5 (protocol.md §3.8) from the runs in order of start,
    and the register's writes in lock order."""
    problems = [f"no start line: {r}" for r in runs if not r.has_start]
    for a, b in itertools.pairwise(runs):
        if b.token > a.token or (b.node == a.node and b.token == a.token and a.end_or_inf <= b.start):
            continue  # the same token: a restart by the same master in the same term, once the first is gone
        problems.append(f"fencing: the token did not increase: {b} started after {a}")
    owner: dict[int, str] = {}
    for r in runs:
        if owner.setdefault(r.token, r.node) != r.node:
            problems.append(f"two masters of term {r.token}: {owner[r.token]} and {r.node} (P1)")
    highest = -1
    for t, node, pid, token, verdict in register:
        if verdict == "accept" and token < highest:
            problems.append(
                f"register accepted token {token} from {node}/{pid} at {t:.3f} after token {highest}"
            )
        elif verdict != "accept" and token >= highest:
            problems.append(f"register refused a current token {token} from {node}/{pid} at {t:.3f}")
        highest = max(highest, token) if verdict == "accept" else highest
    return problems


def check_runs(runs: Sequence[Run], register: Sequence[Entry] = ()) -> None:
    """Assert P1, P4 and P5 on a live cluster's runs (see the module docstring)."""
    problems = [f"overlap: {b} started before {a} was gone" for a, b in overlaps(runs)]
    problems += run_problems(runs, register)
    assert not problems, "\n".join([*problems, "runs:", *map(str, runs)])
