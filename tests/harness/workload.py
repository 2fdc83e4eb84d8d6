"""The script the harness's nodes run: a record of what ran when, and a register that fences by token.

The harness copies this file into the cluster's directory with a ``#!<python> -IS`` line and gives it
to every daemon as ``-s``; it needs only the standard library and starts in a few milliseconds. Each
event is one line appended to the record (``PQ_RECORD``), one write() to an O_APPEND descriptor, so the
lines of every node interleave whole::

    <PYQUORUM_NODE> <pid> <time.monotonic()> <PYQUORUM_TERM> <event> [detail]

Events: ``start`` (its first act; detail ``cluster=<PYQUORUM_CLUSTER>``), ``tick`` every ``tick_s``
(5 ms), ``term`` (SIGTERM received), ``exit`` (detail ``code=N``, its last act before a clean exit).
After SIGKILL the last line is a tick. CLOCK_MONOTONIC is one clock for all the network namespaces of
one kernel, so the times of every node compare directly.

Before each tick and once more on SIGTERM (the flush a real script makes) it writes to a downstream
register (``PQ_REGISTER``) that fences by token, as protocol.md §3.8 asks of a resource: under an
exclusive flock it reads the highest token it accepted, refuses a lower one and otherwise accepts it,
and either way appends ``<time> <node> <pid> <token> accept|reject`` to ``<register>.log`` in lock
order. A script resumed after a host pause (protocol.md §4.5) tries such a write with its stale token.

A JSON control file (``PQ_CONTROL``), re-read when it changes, sets per node or for all (``"*"``):
``tick_s``; ``exit_after_s`` and ``exit_code`` (exit by itself that long after starting);
``term_delay_s`` (go on ticking that long after SIGTERM: a script that ignores SIGTERM, so that the
SIGKILL path is exercised).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import time
from typing import Any

T0 = time.monotonic()
RECORD_VAR, REGISTER_VAR, CONTROL_VAR = "PQ_RECORD", "PQ_REGISTER", "PQ_CONTROL"
TICK_S = 0.005


def _append(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


class _Workload:
    def __init__(self) -> None:
        env = os.environ
        self.node = env.get("PYQUORUM_NODE", "?").replace(" ", "_")
        self.token = int(env.get("PYQUORUM_TERM", "-1"))
        self.cluster = env.get("PYQUORUM_CLUSTER", "?").replace(" ", "_")
        self.pid = os.getpid()
        self.record = _append(env[RECORD_VAR])
        self.register = env[REGISTER_VAR]
        self.register_log = _append(self.register + ".log")
        self.control = env.get(CONTROL_VAR, "")
        self.settings: dict[str, Any] = {}
        self.stamp: tuple[int, int] | None = None
        self.stopping = False

    def line(self, event: str, t: float | None = None) -> None:
        t = time.monotonic() if t is None else t
        os.write(self.record, f"{self.node} {self.pid} {t:.6f} {self.token} {event}\n".encode())

    def write_register(self) -> None:
        fd = os.open(self.register, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.read(fd, 64).strip()
            highest = int(raw) if raw else -1
            verdict = "reject" if self.token < highest else "accept"
            if self.token > highest:
                os.lseek(fd, 0, os.SEEK_SET)
                os.ftruncate(fd, 0)
                os.write(fd, f"{self.token}\n".encode())
            text = f"{time.monotonic():.6f} {self.node} {self.pid} {self.token} {verdict}\n"
            os.write(self.register_log, text.encode())
        finally:
            os.close(fd)  # releases the lock

    def reload(self) -> None:
        try:
            st = os.stat(self.control)
            if (st.st_mtime_ns, st.st_size) == self.stamp:
                return
            with open(self.control) as f:
                data = json.load(f)
            self.stamp = (st.st_mtime_ns, st.st_size)
        except (OSError, ValueError):
            return
        self.settings = {**data.get("*", {}), **data.get(self.node, {})}

    def tick(self) -> None:
        self.write_register()
        self.line("tick")
        time.sleep(float(self.settings.get("tick_s", TICK_S)))

    def on_term(self, signum: int, frame: object) -> None:
        self.stopping = True  # a flag, not an exception: a register write is never cut in half

    def run(self) -> int:
        # The handler before the start line: a test that saw the line may SIGTERM the run at once
        # and expect the term and exit lines (a run killed by the default action writes neither).
        signal.signal(signal.SIGTERM, self.on_term)
        self.line(f"start cluster={self.cluster}", T0)
        while not self.stopping:
            if self.control:
                self.reload()
            after = self.settings.get("exit_after_s")
            if after is not None and time.monotonic() - T0 >= after:
                return int(self.settings.get("exit_code", 0))
            self.tick()
        self.line("term")
        linger_until = time.monotonic() + float(self.settings.get("term_delay_s", 0))
        while time.monotonic() < linger_until:
            self.tick()
        self.write_register()
        return 0


def main() -> int:
    try:
        work = _Workload()
        code = work.run()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the exit line is the last line
        work.line(f"exit code={code}")
    except OSError as exc:  # the cluster's directory removed under us at the very end
        print(f"workload: {exc}", file=sys.stderr)
        return 1
    os._exit(code)  # at once: the interpreter's teardown is not part of the run


if __name__ == "__main__":
    raise SystemExit(main())
