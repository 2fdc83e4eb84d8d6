"""Running the operator's script on the master, under a kill deadline (protocol.md §4.3, §6).

What this owns. The core hands the runtime a kill deadline: a ``time.monotonic()`` value by which the
script's whole process group must be dead and reaped, moved later each time the lease is renewed.
``ScriptSupervisor`` starts the script and keeps that promise even if the daemon cannot: every run
goes through a guard process (``guard.py``, in this directory) that holds the deadline, receives
renewals over a pipe and SIGTERMs, SIGKILLs and reaps the script on its own, on the same host-wide
monotonic clock (research/safety.md §6, Goals R3 and R5). So:

- daemon frozen (SIGSTOP, swap): the guard kills on time; renewals simply stop arriving;
- daemon killed: the guard reads EOF and stops the script at once (SIGTERM, SIGKILL after the grace);
- guard killed: the script dies by PR_SET_PDEATHSIG, and the supervisor SIGKILLs its process group;
- script exits: the guard SIGKILLs and reaps what is left of it, then reports.

The rules (protocol.md §4.3; G = ``stop_timeout_s``, K = ``kill_margin_s``, D the kill deadline):
absent renewal, SIGTERM at D - G - K and SIGKILL at D - K; a requested stop sends SIGTERM now and SIGKILL
at min(now + G, D - K). A deadline only moves later by renewal, and a stop never moves it later.

What the script gets: argv exactly as given (no shell); the environment given to ``start()``; stdin
from /dev/null; the daemon's own stdout and stderr (its output goes wherever the daemon's goes: the
journal under systemd); its own session and process group (pgid = pid), so a Ctrl-C at the daemon's
terminal does not reach it. The guard runs with the same environment (``python -I`` ignores the
PYTHON* variables) in a session of its own.

A standby guard. Starting a guard is starting a Python interpreter: 20 ms on a quiet host, 50-80 ms
under load, all of it on the way from "the core says start" to the script running (a handover, a
failover). So while no script runs, the supervisor keeps one guard started ahead of time in standby
mode (``guard.py --standby``): it has reported ``ready`` and sleeps in poll() until ``start()`` hands it
the deadline and the environment in one line; what is left is its fork and exec of the script. A
``start()`` that finds no ready standby guard starts a fresh guard as before, so the standby guard
only ever saves time. It is started by ``prepare()`` (the daemon calls it at start-up), again
``_STANDBY_AFTER_RUN_S`` after each run, and again when it dies (at most once a second, less often if
it keeps dying before it is ready); ``aclose()`` ends it. It runs with the daemon's environment (the
script gets exactly the one given to ``start()``) and exits at EOF on its stdin, so a daemon that dies
leaves none behind.

Writes to the guard never block the event loop: its stdin is non-blocking, a renewal that does not
fit is dropped (the guard keeps the earlier, safer deadline), and a stop that does not fit closes the
pipe, which the guard reads as "stop now". A dead guard (EPIPE) is noticed by the watcher task.

Limits. A descendant that leaves the process group (setsid, double fork) is still found by the guard
(a child subreaper) but not by the supervisor: if the guard itself is SIGKILLed, such a process
survives. Use systemd's KillMode=control-group as the backstop (safety.md §6); cgroups are not used
here. A stopped guard (someone SIGSTOPs it: it is in a session of its own, so a stop meant for the
daemon's group does not reach it) or a paused host enforces nothing: fencing tokens cover that.
A set-user-ID script that the daemon's user may not signal cannot be stopped. Processes are
signalled by pid only while they cannot have been reaped, except the group kill after a guard's
death (the group's members have a new parent by then; a reused group id within those milliseconds
is improbable). After a guard's death ``ScriptExit.reaped_at`` is when no member was left alive;
zombies are their new parent's to reap.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from pyquorum.core.errors import PyquorumError
from pyquorum.supervisor.guard import group_alive

__all__ = ["GUARD_PATH", "ScriptExit", "ScriptStartError", "ScriptSupervisor"]

GUARD_PATH: Final = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guard.py")
# -I: ignore PYTHON* variables and the user's site directory (the script's environment is not ours
# to interpret); -S: no site-packages, the guard needs only the standard library and starts faster.
_GUARD_FLAGS: Final = ("-I", "-S")
# After a guard dies, how long its script's group may take to die of SIGKILL before we say so.
_GROUP_KILL_WAIT_S: Final = 1.0
# aclose(): after its timeout, how long to wait once more for a SIGKILLed guard to be reaped.
_FORCED_CLOSE_WAIT_S: Final = 1.0
# A new standby guard comes this long after a run ends, not at once: a run ends at a handover or a
# step-down, when the daemon is often about to exit (the guard would be wasted) and the host may be
# starting the next master's script (a test cluster on one host); a restart after a failure waits
# longer than this anyway (config.DEFAULT_RESTART_BACKOFF_S).
_STANDBY_AFTER_RUN_S: Final = 0.5
# A standby guard that dies is replaced at most once per this interval after the previous one was
# started, twice as long after each one in a row that died before it was ready (a broken Python or
# guard.py must not make the daemon fork a dying interpreter every second), up to the maximum.
_STANDBY_RESPAWN_S: Final = 1.0
_STANDBY_RESPAWN_MAX_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class ScriptExit:
    """How one run ended; passed to ``on_exit`` once the script's process group is gone.

    ``returncode`` is as in ``subprocess`` (-N: killed by signal N), or None when it is unknown
    because the guard died (then ``error`` says so). ``reaped_at`` is the ``time.monotonic()`` at
    which the group was dead and reaped. ``requested`` is True if ``stop()`` or ``aclose()`` was
    called for this run, False if the script exited by itself or the kill deadline passed."""

    returncode: int | None
    reaped_at: float
    error: str | None
    requested: bool


class ScriptStartError(PyquorumError):
    """The script could not be started (no such program, not executable, deadline too close, the
    guard could not run). Nothing is left running; ``on_exit`` is not called for this attempt."""


class _GuardLost(ScriptStartError):
    # The guard exited before it reported the script started or failed: it was killed (or crashed).
    pass


@dataclass(eq=False)
class _Run:
    """One guard process, from its spawn until it is reaped; a run of the script once it is given a
    deadline (at once, or, for a standby guard, by its start line)."""

    proc: subprocess.Popen[bytes]
    stdin_fd: int | None
    deadline: float
    started: asyncio.Future[int]
    # Set by start() as it returns (True) or raises (False): on_exit is for runs that start() began.
    settled: asyncio.Future[bool]
    done: asyncio.Future[None]
    pid: int | None = None
    # For a run: stop() or aclose() was called. For a standby guard never started: we closed it.
    requested: bool = False
    start_error: str | None = None
    dropped_renewals: int = 0
    exited: tuple[int, float] | None = None
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)
    standby: bool = False  # a standby guard not (yet) given its start line
    ready: bool = False  # it reported "ready"
    eof: bool = False  # its report pipe is at EOF: it has exited, or is exiting
    spawned_at: float = 0.0


class ScriptSupervisor:
    """Runs ``argv`` under a kill deadline, one run at a time.

    Call ``prepare()`` once it is created (the first ``start()`` is then fast too), ``start(deadline,
    env)`` when the core says to run the script, ``renew(deadline)`` each time the lease is renewed,
    ``stop(deadline)`` when the core says to stop, and ``aclose()`` at shutdown.
    ``on_exit`` is then called exactly once for each ``start()`` that returned normally, from the
    event loop, after the script's process group is gone and its guard has exited; ``running`` is
    already False by then, so ``on_exit`` may schedule the next ``start()``."""

    def __init__(
        self,
        argv: list[str],
        *,
        stop_timeout_s: float,
        kill_margin_s: float,
        on_exit: Callable[[ScriptExit], None],
        logger: logging.Logger,
    ) -> None:
        if not argv:
            raise ValueError("the script's argv is empty")
        if stop_timeout_s < 0 or kill_margin_s < 0:
            raise ValueError("stop_timeout_s and kill_margin_s must not be negative")
        self._argv = list(argv)
        self._stop_timeout_s = stop_timeout_s
        self._kill_margin_s = kill_margin_s
        self._on_exit = on_exit
        self._log = logger
        self._run: _Run | None = None
        self._standby: _Run | None = None
        self._retired: set[_Run] = set()  # standby guards we closed, until they are reaped
        self._keep_standby = True  # False from aclose() until prepare()
        self._standby_timer: asyncio.TimerHandle | None = None
        self._standby_spawned_at = -math.inf
        self._standby_failures = 0  # standby guards in a row that died before they were ready

    @property
    def running(self) -> bool:
        """True from ``start()`` until the run's guard is reaped (just before ``on_exit``)."""
        return self._run is not None

    @property
    def pid(self) -> int | None:
        """The script's pid, which is also its process group id; None until it has started."""
        return None if self._run is None else self._run.pid

    @property
    def guard_pid(self) -> int | None:
        """The guard's pid (for diagnostics and tests); None when not running."""
        return None if self._run is None else self._run.proc.pid

    @property
    def deadline(self) -> float | None:
        """The kill deadline the guard was last given; None when not running."""
        return None if self._run is None else self._run.deadline

    @property
    def standby_pid(self) -> int | None:
        """The standby guard's pid once it is ready to start the script (for diagnostics and tests);
        None otherwise."""
        standby = self._standby
        return standby.proc.pid if standby is not None and standby.ready else None

    async def prepare(self) -> None:
        """Start a standby guard now, unless one exists or a run is in progress (one follows the
        run), so that the next ``start()`` is fast. Returns at once: the guard gets ready in the
        background. Call it once the supervisor is created, and again after ``aclose()`` if the
        supervisor is to be used again."""
        self._keep_standby = True
        if self._run is None and self._standby is None:
            self._cancel_standby_timer()
            self._spawn_standby()

    async def start(self, deadline: float, env: dict[str, str]) -> None:
        """Start the script with kill deadline ``deadline`` (``time.monotonic()``) and exactly the
        environment ``env``. Returns once the script has been exec'd; ``pid`` is then set. Raises
        ``ScriptStartError`` if it cannot start, and RuntimeError if a run is still in progress.
        If ``start()`` is cancelled, the run is killed at once (in the background)."""
        if self._run is not None:
            raise RuntimeError("start() called while a run is in progress; wait for on_exit")
        if not math.isfinite(deadline):
            raise ValueError(f"the kill deadline must be a finite monotonic time, not {deadline!r}")
        asked_at = time.monotonic()
        run = self._start_standby(deadline, env)
        pid = None if run is None else await self._await_started(run, retry_if_lost=True)
        from_standby = pid is not None
        if run is not None and pid is None:
            # The standby guard died just as it was given the start, and has been reaped: a fresh
            # guard starts the run at once (no stop or renewal can slip in between), by the
            # deadline as renewed meanwhile.
            deadline = run.deadline
        if pid is None or run is None:
            self._cancel_standby_timer()
            run = self._spawn_guard(deadline, env)
            pid = await self._await_started(run, retry_if_lost=False)
        run.settled.set_result(True)
        self._log.info(
            "event=script_started pid=%d guard_pid=%d deadline_in_s=%.3f spawn_ms=%.1f standby=%s argv=%r",
            pid,
            run.proc.pid,
            run.deadline - time.monotonic(),
            (time.monotonic() - asked_at) * 1000.0,
            "yes" if from_standby else "no",
            self._argv,
        )

    async def _await_started(self, run: _Run, *, retry_if_lost: bool) -> int | None:
        """Make ``run`` the current run and wait until its script has started; its pid. If it
        cannot start, nothing of it is left when this raises, or, with ``retry_if_lost``, returns
        None because its guard died without a word and was reaped, with no stop asked (the caller
        may start a fresh guard, before it next awaits anything)."""
        self._run = run
        try:
            # guard.py refuses when SIGTERM is already due; this bounds a guard that hangs instead,
            # by the deadline as renewed meanwhile (renew() moves run.deadline, and the guard reads
            # renewals before it decides).
            while True:
                wait_s = max(0.0, run.deadline - self._kill_margin_s - time.monotonic())
                try:
                    return await asyncio.wait_for(asyncio.shield(run.started), wait_s)
                except asyncio.TimeoutError:
                    if time.monotonic() >= run.deadline - self._kill_margin_s:
                        raise ScriptStartError("the script did not start before its kill deadline") from None
        except BaseException as e:
            lost = retry_if_lost and isinstance(e, _GuardLost) and not run.requested
            # A run that start() did not begin leaves nothing behind: the script, if it was
            # exec'd, dies of PDEATHSIG with its guard, and the watcher kills its group.
            # Nobody waits for `started` any more: cancelled, it cannot end with an exception that
            # asyncio would report as never retrieved.
            run.started.cancel()
            run.settled.set_result(False)
            run.requested = True
            run.proc.kill()  # Popen checks that it has not reaped the guard yet
            if lost:  # _GuardLost comes once the guard is reaped; the script never reported started
                self._run = None
                self._log.warning(
                    "event=standby_guard_lost guard_pid=%d action=start_a_fresh_guard", run.proc.pid
                )
                return None
            if not isinstance(e, asyncio.CancelledError):
                # Let the watcher reap the guard, so that `running` is False when we raise.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(run.done), _FORCED_CLOSE_WAIT_S)
            raise

    def renew(self, deadline: float) -> None:
        """Move the kill deadline later. Earlier or equal values, and calls when not running or
        after ``stop()``, are ignored. Never blocks."""
        if not math.isfinite(deadline):
            raise ValueError(f"the kill deadline must be a finite monotonic time, not {deadline!r}")
        run = self._run
        if run is None or run.requested or not deadline > run.deadline:
            return
        if self._send(run, f"renew {deadline!r}\n", urgent=False):
            run.deadline = deadline

    def stop(self, deadline: float) -> None:
        """Stop the script: SIGTERM now, SIGKILL at min(now + G, ``deadline`` - K). Never blocks;
        a repeated call only matters if it brings the deadline earlier. ``on_exit`` follows."""
        if not math.isfinite(deadline):  # a caller's bug, but a stop must still happen
            self._log.error("event=bad_stop_deadline deadline=%r action=keep_current", deadline)
            deadline = math.inf
        run = self._run
        if run is None or (run.requested and not deadline < run.deadline):
            return
        if not run.requested:
            self._log.info("event=script_stop_requested pid=%s", run.pid)
        run.requested = True
        run.deadline = min(run.deadline, deadline)
        self._send(run, f"stop {run.deadline!r}\n", urgent=True)

    async def aclose(self, timeout: float = 5.0) -> None:
        """Stop the running script, if any, and wait until it is reaped and ``on_exit`` has been
        called. If that takes longer than ``timeout`` seconds, SIGKILL the guard (and so the script)
        and wait at most one second more. Also ends the standby guard; none is started again until
        ``prepare()``."""
        self._keep_standby = False
        self._cancel_standby_timer()
        if self._standby is not None:
            self._retire_standby(self._standby)
        run = self._run
        if run is not None:
            await self._close_run(run, timeout)
        for standby in list(self._retired):
            # Closed, it exits at once (EOF and SIGTERM); if it has not within the wait, SIGKILL.
            try:
                await asyncio.wait_for(asyncio.shield(standby.done), _FORCED_CLOSE_WAIT_S)
            except asyncio.TimeoutError:
                standby.proc.kill()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(standby.done), _FORCED_CLOSE_WAIT_S)

    async def _close_run(self, run: _Run, timeout: float) -> None:
        self.stop(run.deadline)
        try:
            await asyncio.wait_for(asyncio.shield(run.done), timeout)
            return
        except asyncio.TimeoutError:
            self._log.error("event=script_stop_timeout pid=%s timeout_s=%s", run.pid, timeout)
        run.proc.kill()
        try:
            await asyncio.wait_for(asyncio.shield(run.done), _FORCED_CLOSE_WAIT_S)
        except asyncio.TimeoutError:
            self._log.error("event=script_abandoned pid=%s guard_pid=%d", run.pid, run.proc.pid)

    # ---- the guard --------------------------------------------------------------------------------

    def _spawn_guard(self, deadline: float | None, env: dict[str, str] | None) -> _Run:
        """A guard and its watcher: for one run, with ``deadline`` and ``env``, or a standby guard
        (``deadline`` None), with our environment. Raises ScriptStartError if it cannot start."""
        # Synchronous, like asyncio's own subprocess support: fork and exec take a millisecond or two.
        loop = asyncio.get_running_loop()
        mode = ["--standby"] if deadline is None else ["--deadline", repr(deadline)]
        report_r, report_w = os.pipe()
        stdin_r, stdin_w = os.pipe()
        args = [
            sys.executable,
            *_GUARD_FLAGS,
            GUARD_PATH,
            "--report-fd",
            str(report_w),
            "--stop-timeout",
            repr(self._stop_timeout_s),
            "--kill-margin",
            repr(self._kill_margin_s),
            *mode,
            "--",
            *self._argv,
        ]
        try:
            if not sys.executable:
                raise FileNotFoundError("sys.executable is empty: cannot find a Python for the guard")
            proc = subprocess.Popen(
                args, stdin=stdin_r, pass_fds=(report_w,), env=env, start_new_session=True
            )
        except (OSError, ValueError) as e:
            os.close(report_r)
            os.close(stdin_w)
            raise ScriptStartError(f"cannot start the guard: {e}") from e
        finally:
            os.close(report_w)
            os.close(stdin_r)
        os.set_blocking(stdin_w, False)
        run = _Run(
            proc=proc,
            stdin_fd=stdin_w,
            deadline=-math.inf if deadline is None else deadline,
            started=loop.create_future(),
            settled=loop.create_future(),
            done=loop.create_future(),
            standby=deadline is None,
            spawned_at=time.monotonic(),
        )
        report = open(report_r, "rb", buffering=0)  # noqa: SIM115 - the watcher's transport closes it
        run.watcher = loop.create_task(self._watch(run, report))
        return run

    # ---- the standby guard ------------------------------------------------------------------------

    def _spawn_standby(self) -> None:
        # The standby guard runs with our environment; its deadline comes with its start line.
        self._standby_spawned_at = time.monotonic()
        try:
            standby = self._spawn_guard(None, None)
        except ScriptStartError as e:
            self._log.debug("event=standby_guard_failed error=%s", e)
            self._standby_failures += 1
            self._schedule_standby(self._standby_respawn_in())
            return
        self._standby = standby
        self._log.debug("event=standby_guard_spawned guard_pid=%d", standby.proc.pid)

    def _standby_respawn_in(self) -> float:
        interval = min(_STANDBY_RESPAWN_MAX_S, _STANDBY_RESPAWN_S * 2.0**self._standby_failures)
        return max(0.0, self._standby_spawned_at + interval - time.monotonic())

    def _schedule_standby(self, delay_s: float) -> None:
        if self._keep_standby and self._standby_timer is None:
            loop = asyncio.get_running_loop()
            self._standby_timer = loop.call_later(delay_s, self._on_standby_timer)

    def _on_standby_timer(self) -> None:
        self._standby_timer = None
        if self._keep_standby and self._run is None and self._standby is None:
            self._spawn_standby()

    def _cancel_standby_timer(self) -> None:
        if self._standby_timer is not None:
            self._standby_timer.cancel()
            self._standby_timer = None

    def _start_standby(self, deadline: float, env: dict[str, str]) -> _Run | None:
        """Hand the standby guard its start line; the run it now is, or None if there is no ready
        standby guard (one that is not ready yet is closed: a fresh guard serves this run)."""
        if self._standby is None:
            return None
        order = json.dumps({"env": env}, separators=(",", ":"))  # first: it may raise (not a str)
        line = f"start {deadline!r} {order}\n".encode()
        standby, self._standby = self._standby, None
        if not standby.ready or standby.eof or standby.proc.poll() is not None or standby.stdin_fd is None:
            self._retire_standby(standby)
            return None
        try:
            # Its stdin pipe is empty: the whole line fits unless the environment is larger than
            # the pipe (64 KiB, but a page or two once the user's pipe quota is spent).
            written = os.write(standby.stdin_fd, line)
        except OSError as e:  # EAGAIN: nothing fitted; EPIPE: it has just died
            self._log.debug("event=standby_guard_write_failed guard_pid=%d error=%r", standby.proc.pid, e)
            written = 0
        if written < len(line):
            # A partial start line is no command: at EOF, the standby guard exits starting nothing.
            self._retire_standby(standby)
            return None
        standby.standby = False
        standby.deadline = deadline
        return standby

    def _retire_standby(self, standby: _Run) -> None:
        """Close a standby guard that was given no start line: EOF, and SIGTERM (which also ends it
        while it is still starting up). It exits without starting anything; the watcher reaps it."""
        if self._standby is standby:
            self._standby = None
        standby.requested = True
        self._retired.add(standby)
        self._close_stdin(standby)
        with contextlib.suppress(ProcessLookupError):
            standby.proc.terminate()  # Popen does nothing once it has reaped the guard

    def _standby_exited(self, standby: _Run, how: str) -> None:
        self._retired.discard(standby)
        if self._standby is standby:
            self._standby = None
        if standby.requested:
            return
        # It died by itself (or was killed): replace it, rate-limited.
        if not standby.ready:
            self._standby_failures += 1
        self._log.debug(
            "event=standby_guard_died guard_pid=%d how=%r ready=%s",
            standby.proc.pid,
            how,
            standby.ready,
        )
        self._schedule_standby(self._standby_respawn_in())

    def _send(self, run: _Run, line: str, *, urgent: bool) -> bool:
        if run.stdin_fd is None:
            return False
        try:
            # < PIPE_BUF bytes to a non-blocking pipe: written whole, or not at all.
            os.write(run.stdin_fd, line.encode())
            return True
        except BlockingIOError:
            if urgent:
                self._log.warning("event=guard_not_reading action=close_pipe pid=%s", run.pid)
                self._close_stdin(run)  # the guard reads EOF as "stop now"
            else:
                run.dropped_renewals += 1
                if run.dropped_renewals == 1:  # once per run: this repeats at every renewal
                    self._log.warning("event=guard_not_reading action=drop_renewal pid=%s", run.pid)
        except OSError as e:  # EPIPE: the guard is gone, and the watcher will report it
            self._log.debug("event=guard_write_failed pid=%s error=%r", run.pid, e)
        return False

    @staticmethod
    def _close_stdin(run: _Run) -> None:
        if run.stdin_fd is not None:
            os.close(run.stdin_fd)
            run.stdin_fd = None

    async def _watch(self, run: _Run, pipe: io.FileIO) -> None:
        # Reads the guard's report until EOF, then reaps the guard; owns the end of the run, or of
        # the standby guard if it never got its start line.
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport: asyncio.BaseTransport | None = None
        try:
            transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
            while line := await reader.readline():
                self._on_report(run, line.decode(errors="replace").split())
            run.eof = True  # from now on, start() does not hand it a start line
            status = await self._reap_guard(run.proc)
            if run.standby:
                self._standby_exited(run, _describe(status))
                return
            outcome = await self._outcome(run, status)
        except asyncio.CancelledError:
            # The loop is going away without aclose(): the guard reads EOF and stops the script (a
            # standby guard just exits).
            self._close_stdin(run)
            if self._run is run:
                self._run = None
            if self._standby is run:
                self._standby = None
            raise
        except Exception as e:  # a bug of ours: still end the run, and say so
            self._log.exception("event=supervisor_error pid=%s", run.pid)
            run.proc.kill()
            if run.standby:
                self._standby_exited(run, f"supervisor error: {e!r}")
                return
            if not run.started.done():
                run.started.set_exception(ScriptStartError(f"supervisor error: {e!r}"))
            outcome = ScriptExit(None, time.monotonic(), f"supervisor error: {e!r}", run.requested)
        finally:
            if transport is not None:
                transport.close()
            self._close_stdin(run)
            if run.standby:
                run.done.set_result(None)
        try:
            # start() settles this as it returns or raises; until then the run is still its own.
            begun = await run.settled
        finally:
            if self._run is run:
                self._run = None
        try:
            if begun:
                self._log.info(
                    "event=script_exited pid=%s returncode=%s requested=%s error=%r",
                    run.pid,
                    outcome.returncode,
                    outcome.requested,
                    outcome.error,
                )
                self._on_exit(outcome)
        except Exception:
            self._log.exception("event=on_exit_failed pid=%s", run.pid)
        finally:
            run.done.set_result(None)
            self._schedule_standby(_STANDBY_AFTER_RUN_S)

    def _on_report(self, run: _Run, words: list[str]) -> None:
        try:
            if words == ["ready"] and run.standby:
                run.ready = True
                self._standby_failures = 0
                self._log.debug(
                    "event=standby_guard_ready guard_pid=%d ready_ms=%.1f",
                    run.proc.pid,
                    (time.monotonic() - run.spawned_at) * 1000.0,
                )
                return
            if words[0] == "started" and len(words) == 2:
                run.pid = int(words[1])
                if not run.started.done():
                    run.started.set_result(run.pid)
                return
            if words[0] == "exited" and len(words) == 3:
                run.exited = (int(words[1]), float(words[2]))
                return
            if words[0] == "error":
                run.start_error = " ".join(words[1:])
                if not run.started.done():
                    run.started.set_exception(ScriptStartError(run.start_error))
                return
        except (IndexError, ValueError):
            pass
        self._log.warning("event=guard_bad_report words=%r", words)

    async def _reap_guard(self, proc: subprocess.Popen[bytes]) -> int:
        # The report pipe is at EOF: the guard has exited or is about to (it closes the pipe only
        # by exiting). Poll without blocking the loop; this takes well under a millisecond.
        delay = 0.0002
        while (status := proc.poll()) is None:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        return status

    async def _outcome(self, run: _Run, guard_status: int) -> ScriptExit:
        if run.exited is not None:
            returncode, reaped_at = run.exited
            return ScriptExit(returncode, reaped_at, None, run.requested)
        if run.start_error is not None:  # start() raises it; on_exit is not called
            return ScriptExit(None, time.monotonic(), run.start_error, run.requested)
        error = f"the guard exited unexpectedly ({_describe(guard_status)})"
        if not run.started.done():
            run.started.set_exception(_GuardLost(error))
        if run.pid is not None:
            # protocol.md §6: the script died of PDEATHSIG with its guard; kill the rest of its group.
            error += "; killed the script's process group"
            if not await self._kill_group(run.pid):
                error += f", which is still alive after {_GROUP_KILL_WAIT_S}s"
        self._log.error("event=guard_died pid=%s guard_pid=%d %s", run.pid, run.proc.pid, error)
        return ScriptExit(None, time.monotonic(), error, run.requested)

    async def _kill_group(self, pgid: int) -> bool:
        """SIGKILL group ``pgid`` and wait until none of it is alive; False if it outlives the wait."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        give_up_at = time.monotonic() + _GROUP_KILL_WAIT_S
        delay = 0.0002
        while group_alive(pgid):
            if time.monotonic() > give_up_at:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.02)
        return True


def _describe(status: int) -> str:
    return f"killed by signal {-status}" if status < 0 else f"exit status {status}"
