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


@dataclass(eq=False)
class _Run:
    proc: subprocess.Popen[bytes]
    stdin_fd: int | None
    deadline: float
    started: asyncio.Future[int]
    # Set by start() as it returns (True) or raises (False): on_exit is for runs that start() began.
    settled: asyncio.Future[bool]
    done: asyncio.Future[None]
    pid: int | None = None
    requested: bool = False
    start_error: str | None = None
    dropped_renewals: int = 0
    exited: tuple[int, float] | None = None
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)


class ScriptSupervisor:
    """Runs ``argv`` under a kill deadline, one run at a time.

    Call ``start(deadline, env)`` when the core says to run the script, ``renew(deadline)`` each time
    the lease is renewed, ``stop(deadline)`` when the core says to stop, and ``aclose()`` at shutdown.
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

    async def start(self, deadline: float, env: dict[str, str]) -> None:
        """Start the script with kill deadline ``deadline`` (``time.monotonic()``) and exactly the
        environment ``env``. Returns once the script has been exec'd; ``pid`` is then set. Raises
        ``ScriptStartError`` if it cannot start, and RuntimeError if a run is still in progress.
        If ``start()`` is cancelled, the run is killed at once (in the background)."""
        if self._run is not None:
            raise RuntimeError("start() called while a run is in progress; wait for on_exit")
        if not math.isfinite(deadline):
            raise ValueError(f"the kill deadline must be a finite monotonic time, not {deadline!r}")
        loop = asyncio.get_running_loop()
        spawned_at = time.monotonic()
        proc, stdin_fd, report = self._spawn_guard(deadline, env)
        run = _Run(
            proc=proc,
            stdin_fd=stdin_fd,
            deadline=deadline,
            started=loop.create_future(),
            settled=loop.create_future(),
            done=loop.create_future(),
        )
        self._run = run
        run.watcher = loop.create_task(self._watch(run, report))
        try:
            # guard.py refuses when SIGTERM is already due; this bounds a guard that hangs instead,
            # by the deadline as renewed meanwhile (renew() moves run.deadline, and the guard reads
            # renewals before it decides).
            while True:
                wait_s = max(0.0, run.deadline - self._kill_margin_s - time.monotonic())
                try:
                    pid = await asyncio.wait_for(asyncio.shield(run.started), wait_s)
                    break
                except asyncio.TimeoutError:
                    if time.monotonic() >= run.deadline - self._kill_margin_s:
                        raise ScriptStartError("the script did not start before its kill deadline") from None
        except BaseException as e:
            # A run that start() did not begin leaves nothing behind: the script, if it was
            # exec'd, dies of PDEATHSIG with its guard, and the watcher kills its group.
            # Nobody waits for `started` any more: cancelled, it cannot end with an exception that
            # asyncio would report as never retrieved.
            run.started.cancel()
            run.settled.set_result(False)
            run.requested = True
            run.proc.kill()  # Popen checks that it has not reaped the guard yet
            if not isinstance(e, asyncio.CancelledError):
                # Let the watcher reap the guard, so that `running` is False when we raise.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(run.done), _FORCED_CLOSE_WAIT_S)
            raise
        run.settled.set_result(True)
        self._log.info(
            "event=script_started pid=%d guard_pid=%d deadline_in_s=%.3f spawn_ms=%.1f argv=%r",
            pid,
            proc.pid,
            deadline - time.monotonic(),
            (time.monotonic() - spawned_at) * 1000.0,
            self._argv,
        )

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
        and wait at most one second more."""
        run = self._run
        if run is None:
            return
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

    def _spawn_guard(
        self, deadline: float, env: dict[str, str]
    ) -> tuple[subprocess.Popen[bytes], int, io.FileIO]:
        # Synchronous, like asyncio's own subprocess support: fork and exec take a millisecond or two.
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
            "--deadline",
            repr(deadline),
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
        return proc, stdin_w, open(report_r, "rb", buffering=0)

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
        # Reads the guard's report until EOF, then reaps the guard; owns the end of the run.
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport: asyncio.BaseTransport | None = None
        try:
            transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
            while line := await reader.readline():
                self._on_report(run, line.decode(errors="replace").split())
            status = await self._reap_guard(run.proc)
            outcome = await self._outcome(run, status)
        except asyncio.CancelledError:
            # The loop is going away without aclose(): the guard reads EOF and stops the script.
            self._close_stdin(run)
            if self._run is run:
                self._run = None
            raise
        except Exception as e:  # a bug of ours: still end the run, and say so
            self._log.exception("event=supervisor_error pid=%s", run.pid)
            run.proc.kill()
            if not run.started.done():
                run.started.set_exception(ScriptStartError(f"supervisor error: {e!r}"))
            outcome = ScriptExit(None, time.monotonic(), f"supervisor error: {e!r}", run.requested)
        finally:
            if transport is not None:
                transport.close()
            self._close_stdin(run)
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

    def _on_report(self, run: _Run, words: list[str]) -> None:
        try:
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
            run.started.set_exception(ScriptStartError(error))
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
