"""One guard process and the run of the script it carries, as an explicit state machine.

What this owns. A ``GuardRun`` is one ``guard.py`` process from its spawn until it is reaped and,
if it started the script, until the script's process group is gone. It speaks the guard's line
protocol (guard.py's docstring): it writes the start line, renewals and the stop; it reads the
guard's reports and turns them into transitions of ``RunState``; it reaps the guard; after a guard's
death it kills the script's group and waits until none of it is left. It does not know the daemon,
the core, or when to start or stop: ``ScriptSupervisor`` (supervisor.py) decides that for a run,
``StandbyPool`` (standby.py) for a guard kept in standby.

The life cycle: every transition there is (``_NEXT``; ``_to`` refuses any other, as a bug)::

    SPAWNED  -> READY | CLOSING | EXITED
    READY    -> STARTING | CLOSING | EXITED
    STARTING -> RUNNING | EXITED             (a guard started for one run begins here)
    RUNNING  -> STOPPING | EXITED
    STOPPING -> EXITED
    CLOSING  -> EXITED
    EXITED   -> ORPHANED | REAPED
    ORPHANED -> REAPED

- SPAWNED: a standby guard, starting up (no deadline, no script yet).
- READY: the standby guard reported ``ready``: it sleeps until its start line.
- STARTING: the guard has a kill deadline and the script's environment; the script is being started.
  A ``stop()`` now is remembered (``stop_deadline``) and sent to the guard at once, which holds it
  until the script has started; the start goes on, and the run is STOPPING the moment it reports
  ``started``.
- RUNNING: the script runs (``pid`` set). STOPPING: a stop was asked (and sent).
- CLOSING: a standby guard we closed before any start line: it exits, starting nothing.
- EXITED: the guard's report pipe is at EOF: it has exited or is exiting; nothing more will be said.
- ORPHANED: the guard died without reporting the script's end (killed, crashed, or abandoned by us):
  the script's process group is SIGKILLed and waited for, for as long as it takes (protocol.md §4.4).
- REAPED: the guard is reaped and nothing of the script is left alive. Final.

The rule that ORPHANED enforces. When a guard dies, its script dies of PR_SET_PDEATHSIG, and the rest
of its process group is SIGKILLed here; but a SIGKILLed process in uninterruptible sleep (D state: a
hung NFS mount, a device) lives on until its system call returns, and that call can still complete a
write. So nothing is reported, no ``on_exit`` and no ``ScriptStartError``, until the group is really
gone: an ERROR line each second names the pids still alive. Meanwhile the core still counts the
script as running: a master keeps its role and lease, a node that was stopping keeps waiting, and if
it had stepped down the cluster fails over after the lease, as for any silent master.

Writes to the guard never block the event loop: its stdin and its renewal pipe are non-blocking, a
renewal that does not fit is dropped (the guard keeps the earlier, safer deadline), and a stop that
does not fit closes the pipes, which the guard reads as "stop now". Renewals go to a pipe of their
own that the guard reads whenever it wakes up but is never woken by (guard.py, "Renewals without a
wake-up"): ten renewals a second would otherwise wake it ten times a second for nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import io
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from pyquorum.core.errors import PyquorumError
from pyquorum.runtime.logs import log_event, log_exception
from pyquorum.supervisor.guard import group_alive, group_members, start_line

__all__ = [
    "COMPLAIN_S",
    "GUARD_PATH",
    "POLL_MAX_S",
    "GuardLost",
    "GuardRun",
    "RunState",
    "ScriptExit",
    "ScriptStartError",
    "poll_until",
]

GUARD_PATH: Final = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guard.py")
# -I: ignore PYTHON* variables and the user's site directory (the script's environment is not ours
# to interpret); -S: no site-packages, the guard needs only the standard library and starts faster.
_GUARD_FLAGS: Final = ("-I", "-S")
# guard.py is run as a module imported from its directory, so that its compiled bytecode
# (__pycache__) is used: a script run by its path is compiled from source at every start, a few
# milliseconds of the guard's start-up, and the compiler's high-water memory stays in the guard's
# image, which it then locks (1.4 MB of its 15.9). GUARD_PATH stays the first argument, so that ps
# and the tests still see guard.py in its command line. Its directory goes first on the guard's
# sys.path: no module there may take the name of one that guard.py imports (all are the stdlib's).
_GUARD_BOOT: Final = (
    "import os, sys; sys.path.insert(0, os.path.dirname(sys.argv.pop(1))); import guard; "
    "sys.exit(guard.main(sys.argv[1:]))"
)
# While a process or group that should be gone is still alive (a dead guard's script group, a
# guard that closed its report pipe, a SIGKILLed hook): how often to say so (ERROR), and to SIGKILL
# it again where that applies.
COMPLAIN_S: Final = 1.0
# Polling for a process's exit or a group's death: from 0.2 ms, doubling, up to this.
POLL_MAX_S: Final = 0.02


async def poll_until(done: Callable[[], bool], complain: Callable[[float], None], complain_at: float) -> None:
    """Return once ``done()`` is true, polling from 0.2 ms, doubling, up to ``POLL_MAX_S``, without
    blocking the loop; while it is not, call ``complain(now)`` at ``complain_at`` and every
    ``COMPLAIN_S`` after. The one wait for what must end (run.py's guard and script group, a hook's
    group) however long it takes: nothing is reported gone before it is."""
    delay = 0.0002
    while not done():
        await asyncio.sleep(delay)
        delay = min(delay * 2, POLL_MAX_S)
        if (now := time.monotonic()) >= complain_at:
            complain_at = now + COMPLAIN_S
            complain(now)


class RunState(enum.Enum):
    SPAWNED = "spawned"
    READY = "ready"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    CLOSING = "closing"
    EXITED = "exited"
    ORPHANED = "orphaned"
    REAPED = "reaped"


_S = RunState
_NEXT: Final[dict[RunState, frozenset[RunState]]] = {
    _S.SPAWNED: frozenset({_S.READY, _S.CLOSING, _S.EXITED}),
    _S.READY: frozenset({_S.STARTING, _S.CLOSING, _S.EXITED}),
    _S.STARTING: frozenset({_S.RUNNING, _S.EXITED}),
    _S.RUNNING: frozenset({_S.STOPPING, _S.EXITED}),
    _S.STOPPING: frozenset({_S.EXITED}),
    _S.CLOSING: frozenset({_S.EXITED}),
    _S.EXITED: frozenset({_S.ORPHANED, _S.REAPED}),
    _S.ORPHANED: frozenset({_S.REAPED}),
    _S.REAPED: frozenset(),
}
# The guard may still read commands (a renewal, a stop) in these states.
_LISTENING: Final = frozenset({_S.STARTING, _S.RUNNING, _S.STOPPING})


@dataclass(frozen=True, slots=True)
class ScriptExit:
    """How one run ended; passed to ``on_exit`` once the script's process group is gone.

    ``returncode`` is as in ``subprocess`` (-N: killed by signal N), or None when it is unknown
    because the guard died (then ``error`` says so). ``reaped_at`` is the ``time.monotonic()`` at
    which the group was dead and reaped. ``requested`` is True if ``stop()`` or ``aclose()`` was
    called for this run (also during its start), False if the script exited by itself or the kill
    deadline passed. ``deadline`` is the kill deadline in force at the end (None if unknown), so
    ``deadline - reaped_at`` is the slack that was left; ``kill_late_s`` is how long after its
    planned moment the guard's SIGKILL went out (None if none was needed)."""

    returncode: int | None
    reaped_at: float
    error: str | None
    requested: bool
    deadline: float | None = None
    kill_late_s: float | None = None


class ScriptStartError(PyquorumError):
    """The script could not be started (no such program, not executable, deadline too close, the
    guard could not run). Nothing is left running; ``on_exit`` is not called for this attempt."""


class GuardLost(ScriptStartError):
    """The guard exited before it reported the script started or failed: it was killed, or it
    crashed. Raised only once the guard is reaped and any script it forked is gone."""


@dataclass(frozen=True, slots=True)
class _Exited:
    # The guard's ``exited`` report.
    returncode: int
    reaped_at: float
    deadline: float | None
    kill_due_at: float | None
    kill_sent_at: float | None


class GuardRun:
    """One guard process: spawn it with ``spawn()``; its watcher task then drives it to REAPED and
    calls ``on_reaped`` (which its owner may replace) exactly once, from the event loop."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        stdin_fd: int,
        renew_fd: int,
        report: io.FileIO,
        *,
        deadline: float | None,
        logger: logging.Logger,
        on_reaped: Callable[[GuardRun], None],
    ) -> None:
        self.proc = proc
        self.state = RunState.SPAWNED if deadline is None else RunState.STARTING
        # The kill deadline the guard was last given (-inf: a standby guard given none yet).
        self.deadline = -math.inf if deadline is None else deadline
        # stop() was called (the earliest deadline it gave); for a standby guard, close() was.
        self.stop_deadline: float | None = None
        self.pgid: int | None = None  # the script's process group, from "forked"
        self.pid: int | None = None  # the script's pid (= pgid), from "started"
        self.error: str | None = None  # the guard's "error" report: nothing started
        self.abandoned: str | None = None  # why we SIGKILLed the guard during the start
        self.abandoned_at = 0.0
        self.exited: _Exited | None = None
        self.guard_status: int | None = None
        self.ended_at = 0.0  # when it was REAPED
        self.hardened: str | None = None  # the guard's "hardened" report, once the script runs
        self.on_hardened: Callable[[GuardRun], None] | None = None  # called when it comes
        self.spawned_at = time.monotonic()
        self.ready_at: float | None = None
        self.dropped_renewals = 0
        self.start_task: asyncio.Future[None] | None = None  # set by ScriptSupervisor.start()
        self.on_reaped = on_reaped
        self._stdin_fd: int | None = stdin_fd  # commands: the start line and the stop
        self._renew_fd: int | None = renew_fd  # renewals (guard.py: "Renewals without a wake-up")
        self._log = logger
        self._changed = asyncio.Event()
        self._watcher = asyncio.get_running_loop().create_task(self._watch(report))

    @classmethod
    def spawn(
        cls,
        argv: list[str],
        *,
        stop_timeout_s: float,
        kill_margin_s: float,
        deadline: float | None,
        env: dict[str, str] | None,
        logger: logging.Logger,
        on_reaped: Callable[[GuardRun], None],
    ) -> GuardRun:
        """A guard for one run, in STARTING, with ``deadline`` and exactly the environment ``env``;
        or, with ``deadline`` None, a standby guard, in SPAWNED, with our environment. Raises
        ScriptStartError if it cannot start."""
        # Synchronous, like asyncio's own subprocess support: fork and exec take a millisecond or two.
        mode = ["--standby"] if deadline is None else ["--deadline", repr(deadline)]
        report_r, report_w = os.pipe()
        stdin_r, stdin_w = os.pipe()
        renew_r, renew_w = os.pipe()  # renewals, which the guard reads without being woken
        args = [
            sys.executable,
            *_GUARD_FLAGS,
            "-c",
            _GUARD_BOOT,
            GUARD_PATH,
            "--report-fd",
            str(report_w),
            "--renew-fd",
            str(renew_r),
            "--stop-timeout",
            repr(stop_timeout_s),
            "--kill-margin",
            repr(kill_margin_s),
            *mode,
            "--",
            *argv,
        ]
        try:
            if not sys.executable:
                raise FileNotFoundError("sys.executable is empty: cannot find a Python for the guard")
            proc = subprocess.Popen(
                args, stdin=stdin_r, pass_fds=(report_w, renew_r), env=env, start_new_session=True
            )
        except (OSError, ValueError) as e:
            for fd in (report_r, stdin_w, renew_w):
                os.close(fd)
            raise ScriptStartError(f"cannot start the guard: {e}") from e
        finally:
            for fd in (report_w, stdin_r, renew_r):
                os.close(fd)
        os.set_blocking(stdin_w, False)
        os.set_blocking(renew_w, False)
        report = open(report_r, "rb", buffering=0)  # noqa: SIM115 - the watcher's transport closes it
        return cls(proc, stdin_w, renew_w, report, deadline=deadline, logger=logger, on_reaped=on_reaped)

    # ---- what the owner asks --------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """The script was exec'd (it may have ended since)."""
        return self.pid is not None

    @property
    def requested(self) -> bool:
        return self.stop_deadline is not None

    async def changed(self) -> None:
        """Return at the next transition."""
        await self._changed.wait()

    async def reached(self, *states: RunState) -> None:
        while self.state not in states:
            await self.changed()

    def give_start(self, deadline: float, env: dict[str, str]) -> bool:
        """READY -> STARTING: hand a standby guard its start line. False if it is not ready or the
        line did not fit whole; the caller then closes it and starts a fresh guard instead."""
        line = start_line(deadline, env)  # first: it raises for a bad environment
        if self.state is not RunState.READY or self.proc.poll() is not None or self._stdin_fd is None:
            return False
        try:
            # Its stdin pipe is empty: the whole line fits unless the environment is larger than
            # the pipe (64 KiB, but a page or two once the user's pipe quota is spent).
            written = os.write(self._stdin_fd, line)
        except OSError as e:  # EAGAIN: nothing fitted; EPIPE: it has just died
            log_event(
                self._log, logging.DEBUG, "standby_guard_write_failed", guard_pid=self.proc.pid, error=repr(e)
            )
            written = 0
        if written < len(line):
            return False  # a partial start line is no command: at EOF the guard starts nothing
        self.deadline = deadline
        self._to(RunState.STARTING)
        return True

    def renew(self, deadline: float) -> None:
        """Move the kill deadline later; earlier or equal values, and any after a stop, are ignored.
        A guard that died before the script started cannot take it, but a fresh guard that replaces
        it starts with it (``ScriptSupervisor``)."""
        if self.requested or not deadline > self.deadline:
            return
        if self.state in _LISTENING:
            if self._send(f"renew {deadline!r}\n", urgent=False, fd=self._renew_fd):
                self.deadline = deadline
        elif self.state in (RunState.EXITED, RunState.ORPHANED, RunState.REAPED) and not self.started:
            self.deadline = deadline

    def stop(self, deadline: float) -> None:
        """Stop: SIGTERM now, SIGKILL at min(now + G, ``deadline`` - K) (protocol.md §4.3). During
        the start it is remembered and sent at once; the guard holds it until the script has
        started. A repeated call only matters if it brings the deadline earlier."""
        if self.requested and not deadline < self.deadline:
            return
        if not self.requested:
            log_event(self._log, logging.INFO, "script_stop_requested", pid=self.pid, state=self.state.value)
        self.stop_deadline = deadline if self.stop_deadline is None else min(self.stop_deadline, deadline)
        self.deadline = min(self.deadline, deadline)
        if self.state in _LISTENING:
            self._send(f"stop {self.deadline!r}\n", urgent=True)
        if self.state is RunState.RUNNING:
            self._to(RunState.STOPPING)

    def close(self) -> None:
        """A standby guard given no start line: EOF and SIGTERM (which also ends it while it is still
        starting up). It exits without starting anything."""
        if self.state not in (RunState.SPAWNED, RunState.READY):
            return
        self.stop_deadline = -math.inf
        self._to(RunState.CLOSING)
        self._close_stdin()
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()  # Popen does nothing once it has reaped the guard

    def abandon(self, why: str) -> None:
        """Give up on a start: SIGKILL the guard. The script, if it was forked, dies of PDEATHSIG,
        and its group is killed and waited for (ORPHANED) before the run is REAPED."""
        if self.abandoned is None and self.state is not RunState.REAPED:
            self.abandoned = why
            self.abandoned_at = time.monotonic()
        self.kill()

    def kill(self) -> None:
        """SIGKILL the guard (Popen checks that it has not reaped it yet)."""
        self.proc.kill()

    def start_failure(self) -> ScriptStartError:
        """Why this run never started, once it is REAPED without having started."""
        if self.error is not None:
            return ScriptStartError(self.error)
        if self.abandoned is not None:
            return ScriptStartError(self.abandoned)
        return GuardLost(self._lost_message())

    def outcome(self) -> ScriptExit:
        """How the run ended, once it is REAPED after its start."""
        requested = self.requested
        if self.exited is not None:
            e = self.exited
            late = None if e.kill_due_at is None or e.kill_sent_at is None else e.kill_sent_at - e.kill_due_at
            return ScriptExit(e.returncode, e.reaped_at, None, requested, e.deadline, late)
        error = self.abandoned or self.error or self._lost_message()
        if self.pgid is not None:
            error += "; killed the script's process group"
        return ScriptExit(None, self.ended_at, error, requested, self.deadline)

    # ---- the guard ------------------------------------------------------------------------------

    def _to(self, state: RunState) -> None:
        if state not in _NEXT[self.state]:
            raise RuntimeError(f"guard {self.proc.pid}: no transition from {self.state.name} to {state.name}")
        log_event(
            self._log,
            logging.DEBUG,
            "guard_state",
            guard_pid=self.proc.pid,
            from_state=self.state.value,
            to_state=state.value,
        )
        self.state = state
        # Wake every waiter of this transition; later ones wait for the next.
        self._changed.set()
        self._changed = asyncio.Event()

    def _lost_message(self) -> str:
        status = self.guard_status
        how = "still running" if status is None else _describe(status)
        return f"the guard exited unexpectedly ({how})"

    def _send(self, line: str, *, urgent: bool, fd: int | None = None) -> bool:
        # To the guard's stdin, or with ``fd`` to its renewal pipe; both close together.
        fd = self._stdin_fd if fd is None else fd
        if self._stdin_fd is None or fd is None:
            return False
        try:
            # < PIPE_BUF bytes to a non-blocking pipe: written whole, or not at all.
            os.write(fd, line.encode())
            return True
        except BlockingIOError:
            if urgent:
                log_event(self._log, logging.WARNING, "guard_not_reading", action="close_pipe", pid=self.pid)
                self._close_stdin()  # the guard reads EOF as "stop now"
            else:
                self.dropped_renewals += 1
                if self.dropped_renewals == 1:  # once per run: this repeats at every renewal
                    log_event(
                        self._log, logging.WARNING, "guard_not_reading", action="drop_renewal", pid=self.pid
                    )
        except OSError as e:  # EPIPE: the guard is gone, and the watcher will say so
            log_event(self._log, logging.DEBUG, "guard_write_failed", pid=self.pid, error=repr(e))
        return False

    def _close_stdin(self) -> None:
        # The renewal pipe first: a guard woken by EOF on stdin must find no renewal still coming.
        if self._renew_fd is not None:
            os.close(self._renew_fd)
            self._renew_fd = None
        if self._stdin_fd is not None:
            os.close(self._stdin_fd)
            self._stdin_fd = None

    async def _watch(self, pipe: io.FileIO) -> None:
        # Reads the guard's reports until EOF, reaps it, waits for an orphaned group; then REAPED.
        try:
            try:
                await self._read_reports(pipe)
            except Exception as e:  # a bug of ours: the guard is killed, and the end runs as usual
                log_exception(self._log, "supervisor_error", guard_pid=self.proc.pid, pid=self.pid)
                self.abandon(f"supervisor error: {e!r}")
            self._close_stdin()
            if self.state is not RunState.EXITED:
                self._to(RunState.EXITED)
            self.guard_status = await self._reap_guard()
            if self.exited is None and self.error is None and self.pgid is not None:
                self._to(RunState.ORPHANED)
                log_event(
                    self._log,
                    logging.ERROR,
                    "guard_died",
                    pid=self.pgid,
                    guard_pid=self.proc.pid,
                    why=self.abandoned or self._lost_message(),
                    action="kill_the_script_group",
                )
                await self._kill_group(self.pgid)
            self.ended_at = time.monotonic()
            self._to(RunState.REAPED)
        except asyncio.CancelledError:
            # The loop is going away without aclose(): the guard reads EOF and stops the script (a
            # standby guard just exits).
            self._close_stdin()
            raise
        self.on_reaped(self)

    async def _read_reports(self, pipe: io.FileIO) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        try:
            while line := await reader.readline():
                self._on_report(line.decode(errors="replace").split())
        finally:
            transport.close()

    def _on_report(self, words: list[str]) -> None:
        verb = words[0] if words else ""
        try:
            if verb == "ready" and len(words) == 1 and self.state in (RunState.SPAWNED, RunState.CLOSING):
                self.ready_at = time.monotonic()
                if self.state is RunState.SPAWNED:  # else closed while it started up: it exits now
                    self._to(RunState.READY)
                return
            if verb == "hardened":
                self.hardened = " ".join(words[1:])
                if self.on_hardened is not None:
                    self.on_hardened(self)
                return
            if verb == "forked" and len(words) == 2 and self.state is RunState.STARTING:
                self.pgid = int(words[1])
                return
            if verb == "started" and len(words) == 2 and self.state is RunState.STARTING:
                self.pid = self.pgid = int(words[1])
                self._to(RunState.RUNNING)
                if self.requested:  # stop() came during the start: carried out from now on
                    self._to(RunState.STOPPING)
                return
            if verb == "exited" and len(words) == 6 and self.state in (RunState.RUNNING, RunState.STOPPING):
                fields = dict(word.split("=", 1) for word in words[3:])
                self.exited = _Exited(
                    int(words[1]),
                    float(words[2]),
                    _time(fields["deadline"]),
                    _time(fields["kill_due"]),
                    _time(fields["kill_sent"]),
                )
                return
            if verb == "error" and self.state is RunState.STARTING:
                self.error = " ".join(words[1:])
                return
        except (KeyError, ValueError):
            pass
        log_event(
            self._log,
            logging.WARNING,
            "guard_bad_report",
            guard_pid=self.proc.pid,
            state=self.state.value,
            words=" ".join(words)[:200],
        )

    async def _reap_guard(self) -> int:
        # The report pipe is at EOF: the guard has exited or is about to (it closes the pipe only
        # by exiting). Poll without blocking the loop; this takes well under a millisecond.
        began = time.monotonic()

        def complain(now: float) -> None:
            log_event(
                self._log,
                logging.ERROR,
                "guard_not_reaped",
                guard_pid=self.proc.pid,
                for_s=round(now - began),
                hint="its report pipe is closed but it has not exited",
            )

        await poll_until(lambda: self.proc.poll() is not None, complain, began + COMPLAIN_S)
        return self.proc.returncode

    async def _kill_group(self, pgid: int) -> None:
        """SIGKILL group ``pgid`` and wait until none of it is alive, however long that takes."""
        began = time.monotonic()

        def complain(now: float) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            log_event(
                self._log,
                logging.ERROR,
                "script_group_alive",
                pgid=pgid,
                for_s=round(now - began),
                pids=",".join(map(str, group_members(pgid))),
                hint="SIGKILLed after its guard died and still alive (uninterruptible sleep?); "
                "not reported stopped until it is gone",
            )

        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        await poll_until(lambda: not group_alive(pgid), complain, began + COMPLAIN_S)


def _time(word: str) -> float | None:
    return None if word == "-" else float(word)


def _describe(status: int) -> str:
    return f"killed by signal {-status}" if status < 0 else f"exit status {status}"
