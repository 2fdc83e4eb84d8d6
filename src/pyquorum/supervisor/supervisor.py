"""Running the operator's script on the master, under a kill deadline, one run at a time.

What this owns. The core hands the runtime a kill deadline: a ``time.monotonic()`` value by which the
script's whole process group must be dead and reaped, moved later each time the lease is renewed
(protocol.md §4.2). ``ScriptSupervisor`` starts the script and keeps that promise even if the daemon
cannot: every run goes through a guard process (guard.py) that holds the deadline, receives renewals
over a pipe and SIGTERMs, SIGKILLs and reaps the script on its own, on the same host-wide monotonic
clock (protocol.md §4.4). So:

- daemon frozen (SIGSTOP, swap): the guard kills on time; renewals simply stop arriving;
- daemon killed: the guard reads EOF and stops the script at once (SIGTERM, SIGKILL after the grace);
- guard killed: the script dies by PR_SET_PDEATHSIG, the supervisor SIGKILLs its process group and
  reports nothing until the group is gone (run.py, ORPHANED);
- script exits: the guard SIGKILLs and reaps what is left of it, then reports.

The rules (protocol.md §4.3, §4.4; G = ``stop_timeout_s``, K = ``kill_margin_s``, D the kill deadline):
absent renewal, SIGTERM at D - G - K and SIGKILL at D - K; a requested stop sends SIGTERM now and SIGKILL
at min(now + G, D - K). A deadline only moves later by renewal, and a stop never moves it later.

One run at a time, and the supervisor alone knows where it is: ``start()`` registers the run at once
(it returns the task to await), so a ``stop()`` that comes before the script has started is never
lost, whoever calls it and however soon: it is remembered and carried out the moment the script has
started (the start is not cut short: a script started with SIGTERM pending stops as it would a
moment later), and if the start fails instead there is nothing to stop. ``on_exit`` then reports the
run as ``requested``. A start that fails raises only once nothing of it is left (``running`` is False
by then, so a next ``start()`` never finds a run in progress); a run that ended is reported only once
its process group is gone, however long a process in uninterruptible sleep takes (run.py).

What the script gets: argv exactly as given (no shell); the environment given to ``start()``; stdin
from /dev/null; the daemon's own stdout and stderr (its output goes wherever the daemon's goes: the
journal under systemd); its own session and process group (pgid = pid), so a Ctrl-C at the daemon's
terminal does not reach it; the daemon's scheduling policy and nice value, and no memory locks, even
though its guard runs hardened (guard.py, "Punctuality"). The guard runs with the same environment
(``python -I`` ignores the PYTHON* variables) in a session of its own; a standby guard (standby.py)
with the daemon's.

Measured. The guard's ``exited`` report says how late its planned SIGKILL went out and when the group
was reaped: each kill is logged as ``event=script_killed late_ms=... slack_ms=...`` (slack against
the kill deadline), at WARNING if the group was reaped after the deadline.

Limits. A descendant that leaves the process group (setsid, double fork) is still found by the guard
(a child subreaper) but not by the supervisor: if the guard itself is SIGKILLed, such a process
survives. Use systemd's KillMode=control-group as the backstop (docs/design-notes.md, "Supervising a
child"); cgroups are not used here. A stopped guard (someone SIGSTOPs it: it is in a session of its
own, so a stop meant for the daemon's group does not reach it) or a paused host enforces nothing:
fencing tokens cover that (protocol.md §4.5). A set-user-ID script that the daemon's user may not
signal cannot be stopped. Processes are signalled by pid only while they cannot have been reaped,
except the group kill after a guard's death (the group's members have a new parent by then; a reused
group id needs every member gone first, and then there is nothing left to wait for).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import Callable
from typing import Final

from pyquorum.runtime.logs import RESERVED_FIELDS, Value, log_event, log_exception
from pyquorum.supervisor.run import (
    COMPLAIN_S,
    GuardLost,
    GuardRun,
    RunState,
    ScriptExit,
    ScriptStartError,
)
from pyquorum.supervisor.standby import StandbyPool

__all__ = ["ScriptSupervisor"]

# aclose(): after its timeout, how long to wait once more for a SIGKILLed guard's run to end.
_FORCED_CLOSE_WAIT_S: Final = 1.0
# A new standby guard comes this long after a run ends (standby.py says why); a restart after a
# failure waits longer than this anyway (config.DEFAULT_RESTART_BACKOFF_S).
_STANDBY_AFTER_RUN_S: Final = 0.5


class ScriptSupervisor:
    """Runs ``argv`` under a kill deadline, one run at a time.

    Call ``prepare()`` once it is created (the first ``start()`` is then fast too), ``start(deadline,
    env)`` when the core says to run the script, ``renew(deadline)`` each time the lease is renewed,
    ``stop(deadline)`` when the core says to stop, and ``aclose()`` at shutdown.
    ``on_exit`` is then called exactly once for each start that completed normally, from the
    event loop, after the script's process group is gone and its guard has exited; ``running`` is
    already False by then, so ``on_exit`` may begin the next ``start()``."""

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
        self._run: GuardRun | None = None
        self._idle: asyncio.Event | None = None  # set while no run is in progress (for aclose)
        self._hardened: str | None = None  # what the last guard obtained, to log changes only
        self._pool = StandbyPool(
            lambda on_reaped: self._spawn(None, None, on_reaped),
            busy=lambda: self._run is not None,
            logger=logger,
        )

    @property
    def running(self) -> bool:
        """True from ``start()`` until the run's guard is reaped and its script gone (just before
        ``on_exit``, or before the start raises)."""
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
        return self._pool.standby_pid

    async def prepare(self) -> None:
        """Start a standby guard now, unless one exists or a run is in progress (one follows the
        run), so that the next ``start()`` is fast. Returns at once: the guard gets ready in the
        background. Call it once the supervisor is created, and again after ``aclose()`` if the
        supervisor is to be used again."""
        self._pool.keep()

    def start(self, deadline: float, env: dict[str, str]) -> asyncio.Task[None]:
        """Begin a run of the script with kill deadline ``deadline`` (``time.monotonic()``) and
        exactly the environment ``env``, and return the task to await: it returns once the script
        has been exec'd (``pid`` is then set), or raises ``ScriptStartError`` if it cannot start,
        once nothing of the attempt is left. The run exists from this call on: ``running`` is True,
        and ``renew()`` and ``stop()`` apply to it at once. Raises RuntimeError at once if a run is
        still in progress (wait for ``on_exit``). Cancelling the task kills the run (in the
        background); ``on_exit`` is then not called."""
        if self._run is not None:
            raise RuntimeError("start() called while a run is in progress; wait for on_exit")
        if not math.isfinite(deadline):
            raise ValueError(f"the kill deadline must be a finite monotonic time, not {deadline!r}")
        loop = asyncio.get_running_loop()
        asked_at = time.monotonic()
        run = self._pool.take(deadline, env)
        from_standby = run is not None
        if run is None:
            try:
                run = self._spawn(deadline, env, self._on_reaped)
            except ScriptStartError as e:  # nothing was started: the task raises it
                self._pool.refill_after(_STANDBY_AFTER_RUN_S)
                return loop.create_task(_raise(e))
        run.on_reaped = self._on_reaped
        self._begin(run)
        task = loop.create_task(self._starting(run, env, asked_at, from_standby))
        run.start_task = task
        return task

    def renew(self, deadline: float) -> None:
        """Move the kill deadline later. Earlier or equal values, and calls when not running or
        after ``stop()``, are ignored. Never blocks."""
        if not math.isfinite(deadline):
            raise ValueError(f"the kill deadline must be a finite monotonic time, not {deadline!r}")
        if self._run is not None:
            self._run.renew(deadline)

    def stop(self, deadline: float) -> None:
        """Stop the script: SIGTERM now, SIGKILL at min(now + G, ``deadline`` - K); during the start,
        as soon as it has started. Never blocks; a repeated call only matters if it brings the
        deadline earlier. ``on_exit`` follows (or the start fails, and nothing was running)."""
        if not math.isfinite(deadline):  # a caller's bug, but a stop must still happen
            log_event(
                self._log, logging.ERROR, "bad_stop_deadline", deadline=repr(deadline), action="keep_current"
            )
            deadline = math.inf
        if self._run is not None:
            self._run.stop(deadline)

    async def aclose(self, timeout: float = 5.0) -> None:
        """Stop the running script, if any, and wait until it is reaped and ``on_exit`` has been
        called. If that takes longer than ``timeout`` seconds, SIGKILL the guard (and so the script)
        and wait at most one second more. Also ends the standby guard; none is started again until
        ``prepare()``."""
        self._pool.close()
        run = self._run
        if run is not None:
            await self._close_run(run, timeout)
        await self._pool.wait_closed()

    async def _close_run(self, run: GuardRun, timeout: float) -> None:
        self.stop(run.deadline)
        idle = self._idle
        assert idle is not None
        try:
            await asyncio.wait_for(idle.wait(), timeout)
            return
        except asyncio.TimeoutError:
            log_event(self._log, logging.ERROR, "script_stop_timeout", pid=run.pid, timeout_s=timeout)
        current = self._run  # a lost standby guard may have been replaced meanwhile
        if current is not None:
            current.kill()
        try:
            await asyncio.wait_for(idle.wait(), _FORCED_CLOSE_WAIT_S)
        except asyncio.TimeoutError:
            log_event(self._log, logging.ERROR, "script_abandoned", pid=run.pid, guard_pid=run.proc.pid)

    # ---- a run ------------------------------------------------------------------------------------

    def _spawn(
        self, deadline: float | None, env: dict[str, str] | None, on_reaped: Callable[[GuardRun], None]
    ) -> GuardRun:
        return GuardRun.spawn(
            self._argv,
            stop_timeout_s=self._stop_timeout_s,
            kill_margin_s=self._kill_margin_s,
            deadline=deadline,
            env=env,
            logger=self._log,
            on_reaped=on_reaped,
        )

    def _begin(self, run: GuardRun) -> None:
        self._run = run
        if self._idle is None:
            self._idle = asyncio.Event()
        self._idle.clear()

    async def _starting(
        self, run: GuardRun, env: dict[str, str], asked_at: float, from_standby: bool
    ) -> None:
        # The start task: until the script has started, or nothing of the attempt is left.
        run.on_hardened = self._note_hardening  # the guard locks itself once the script runs
        try:
            while True:
                try:
                    await self._until_started(run)
                    break
                except GuardLost:
                    if not from_standby or run.requested:
                        raise
                # The standby guard died just as it was given the start, and is reaped: a fresh
                # guard starts the run at once, by the deadline as renewed meanwhile; ``_run`` was
                # never None in between, so no stop or renewal fell into a gap.
                log_event(
                    self._log,
                    logging.WARNING,
                    "standby_guard_lost",
                    guard_pid=run.proc.pid,
                    action="start_a_fresh_guard",
                )
                run = self._spawn(run.deadline, env, self._on_reaped)
                run.on_hardened = self._note_hardening
                run.start_task = asyncio.current_task()
                self._run = run
                from_standby = False
        except ScriptStartError:
            self._end(run)  # REAPED, never started: nothing left, and no on_exit
            raise
        except asyncio.CancelledError:
            if run.state is RunState.REAPED:  # a lost standby guard, not yet replaced
                self._end(run)
            else:
                run.abandon("start() was cancelled")  # REAPED later: _on_reaped ends it
            raise
        log_event(
            self._log,
            logging.INFO,
            "script_started",
            pid=run.pid,
            guard_pid=run.proc.pid,
            deadline_in_s=round(run.deadline - time.monotonic(), 3),
            spawn_ms=round((time.monotonic() - asked_at) * 1000.0, 1),
            standby=from_standby,
            stop_requested=run.requested,
            argv=" ".join(self._argv),
        )

    async def _until_started(self, run: GuardRun) -> None:
        """Return once ``run``'s script has started (it may have ended since); raise why it did not
        once ``run`` is REAPED."""
        while not run.started:
            if run.state is RunState.REAPED:
                raise run.start_failure()
            if run.state is not RunState.STARTING:  # its guard has ended: wait for all of it
                await run.changed()
                continue
            if run.abandoned is not None:
                # We SIGKILLed the guard and it has not died yet: it is stuck (a frozen cgroup, D
                # state). Nothing is reported until it has, however long that takes.
                try:
                    await asyncio.wait_for(run.changed(), COMPLAIN_S)  # still not dead: say so
                except asyncio.TimeoutError:
                    log_event(
                        self._log,
                        logging.ERROR,
                        "guard_not_dying",
                        guard_pid=run.proc.pid,
                        for_s=round(time.monotonic() - run.abandoned_at),
                        why=run.abandoned,
                        hint="SIGKILLed when the start was abandoned, and still alive",
                    )
                continue
            # guard.py refuses when SIGTERM is already due; this bounds a guard that hangs instead,
            # by the deadline as renewed meanwhile (the guard reads renewals before it decides).
            wait_s = run.deadline - self._kill_margin_s - time.monotonic()
            if wait_s <= 0:
                run.abandon("the script did not start before its kill deadline")
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(run.changed(), wait_s)

    def _on_reaped(self, run: GuardRun) -> None:
        # The run's guard is reaped and its script gone. Who reports it: a start still waiting for
        # it (it raises, or starts a fresh guard), or, once the start has completed, on_exit.
        task = run.start_task
        if task is not None and not task.done():
            if not run.started:
                return  # the start task sees REAPED and ends the run itself
            task.add_done_callback(lambda _: self._end(run))
            return
        self._end(run)

    def _end(self, run: GuardRun) -> None:
        if self._run is not run:
            return
        self._run = None
        if self._idle is not None:
            self._idle.set()
        self._pool.refill_after(_STANDBY_AFTER_RUN_S)
        task = run.start_task
        if not run.started or task is None or task.cancelled() or task.exception() is not None:
            return  # the start raised or was cancelled: no on_exit
        outcome = run.outcome()
        self._log_end(run, outcome)
        try:
            self._on_exit(outcome)
        except Exception:
            log_exception(self._log, "on_exit_failed", pid=run.pid)

    def _log_end(self, run: GuardRun, outcome: ScriptExit) -> None:
        slack_ms = None if outcome.deadline is None else (outcome.deadline - outcome.reaped_at) * 1000.0
        if outcome.kill_late_s is not None and slack_ms is not None:
            late: dict[str, Value] = {"hint": "reaped AFTER the kill deadline"} if slack_ms < 0 else {}
            log_event(
                self._log,
                logging.WARNING if slack_ms < 0 else logging.INFO,
                "script_killed",
                pid=run.pid,
                late_ms=round(outcome.kill_late_s * 1000.0, 3),
                slack_ms=round(slack_ms, 3),
                requested=outcome.requested,
                **late,
            )
        log_event(
            self._log,
            logging.INFO,
            "script_reaped",
            pid=run.pid,
            returncode=outcome.returncode,
            requested=outcome.requested,
            slack_ms=None if slack_ms is None else round(slack_ms, 3),
            error=outcome.error,
        )

    def _note_hardening(self, run: GuardRun) -> None:
        # What the guard obtained (guard.py, "Punctuality"), reported just after the script's start:
        # at INFO the first time and when it changes, else at DEBUG.
        what = run.hardened or "unknown"
        level = logging.DEBUG if what == self._hardened else logging.INFO
        self._hardened = what
        log_event(self._log, level, "guard_hardened", guard_pid=run.proc.pid, **_hardening_fields(what))


def _hardening_fields(what: str) -> dict[str, Value]:
    # the guard's "hardened" report, "mlock=yes sched=rr:1 ...", as fields; anything else as one
    pairs = [word.split("=", 1) for word in what.split()]
    if pairs and all(len(p) == 2 and _FIELD.fullmatch(p[0]) and p[0] not in RESERVED_FIELDS for p in pairs):
        return {name: value for name, value in pairs}
    return {"hardened": what}


_FIELD = re.compile(r"[a-z][a-z0-9_]*")


async def _raise(error: ScriptStartError) -> None:
    raise error
