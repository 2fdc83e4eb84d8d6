"""A guard started ahead of time, so that starting the script costs a fork and an exec.

What this owns. Starting a guard is starting a Python interpreter: 20 ms on a quiet host, 50-150 ms
under load, all of it on the way from "the core says start" to the script running (a handover, a
failover). So while no script runs, ``StandbyPool`` keeps one guard started in standby mode
(``guard.py --standby``): it has reported ``ready`` (and what hardening it obtained) and sleeps in
poll() until ``take()`` hands it the deadline and the environment in one line. A ``take()`` that
finds no ready standby guard returns None, and the supervisor starts a fresh guard as it would
without this pool, so the standby guard only ever saves time.

When. ``keep()`` (from ``ScriptSupervisor.prepare()``, which the daemon calls at start-up) starts one
at once; ``refill_after(s)`` another once a run has ended; one that dies by itself is replaced at
most once per ``_RESPAWN_S`` after the previous spawn, twice as long after each one in a row that
died before it was ready (a broken Python or guard.py must not make the daemon fork a dying
interpreter every second), up to ``_RESPAWN_MAX_S``. None is started while a run is in progress
(``busy``). ``close()`` ends it, and none comes until ``keep()``.

It runs with the daemon's environment (the script gets exactly the one given to the start) and
exits at EOF on its stdin, so a daemon that dies leaves none behind. It does not know the run: once
taken, the guard belongs to ``ScriptSupervisor``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Final

from pyquorum.runtime.logs import log_event
from pyquorum.supervisor.run import GuardRun, RunState, ScriptStartError

__all__ = ["StandbyPool"]

_RESPAWN_S: Final = 1.0
_RESPAWN_MAX_S: Final = 60.0
# wait_closed(): how long a closed standby guard may take to exit before it is SIGKILLed, and again.
_CLOSE_WAIT_S: Final = 1.0


class StandbyPool:
    """At most one standby guard, spawned by ``spawn()``; see the module's docstring."""

    def __init__(
        self,
        spawn: Callable[[Callable[[GuardRun], None]], GuardRun],
        *,
        busy: Callable[[], bool],
        logger: logging.Logger,
    ) -> None:
        # spawn(on_reaped) starts a standby guard (raises ScriptStartError if it cannot).
        self._spawn_guard = spawn
        self._busy = busy
        self._log = logger
        self._standby: GuardRun | None = None
        self._closed: set[GuardRun] = set()  # standby guards we closed, until they are reaped
        self._keep = False
        self._timer: asyncio.TimerHandle | None = None
        self._spawned_at = -math.inf
        self._failures = 0  # standby guards in a row that died before they were ready

    @property
    def standby_pid(self) -> int | None:
        """The standby guard's pid once it is ready; None otherwise."""
        standby = self._standby
        return standby.proc.pid if standby is not None and standby.state is RunState.READY else None

    def keep(self) -> None:
        """Keep a standby guard from now on; start one now unless one exists or a run is on."""
        self._keep = True
        if not self._busy() and self._standby is None:
            self._cancel_timer()
            self._spawn()

    def take(self, deadline: float, env: dict[str, str]) -> GuardRun | None:
        """The ready standby guard, given its start line (now STARTING, and the caller's), or None if
        there is none, or it was not ready yet (it is closed: it would only compete for the CPU with
        the fresh guard the caller starts instead). None is spawned until ``refill_after()``."""
        self._cancel_timer()
        standby, self._standby = self._standby, None
        if standby is None:
            return None
        try:
            given = standby.give_start(deadline, env)
        except BaseException:  # an environment that is not all strings: the caller's bug
            self._close(standby)
            raise
        if not given:
            self._close(standby)
            return None
        return standby

    def refill_after(self, delay_s: float) -> None:
        """A run has ended: a new standby guard in ``delay_s``. Not at once: a run ends at a handover
        or a step-down, when the daemon is often about to exit (the guard would be wasted) and the
        host may be starting the next master's script (a test cluster on one host)."""
        self._schedule(delay_s)

    def close(self) -> None:
        """End the standby guard; none is started again until ``keep()``. ``wait_closed()`` waits
        until it has exited."""
        self._keep = False
        self._cancel_timer()
        if self._standby is not None:
            self._close(self._standby)

    async def wait_closed(self) -> None:
        """Wait until every standby guard we closed is reaped (SIGKILL after ``_CLOSE_WAIT_S``)."""
        for guard in list(self._closed):
            try:
                await asyncio.wait_for(guard.reached(RunState.REAPED), _CLOSE_WAIT_S)
            except asyncio.TimeoutError:
                guard.kill()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(guard.reached(RunState.REAPED), _CLOSE_WAIT_S)

    # ---- inside ---------------------------------------------------------------------------------

    def _spawn(self) -> None:
        self._spawned_at = time.monotonic()
        try:
            standby = self._spawn_guard(self._on_reaped)
        except ScriptStartError as e:
            log_event(self._log, logging.DEBUG, "standby_guard_failed", error=str(e))
            self._failures += 1
            self._schedule(self._respawn_in())
            return
        self._standby = standby
        log_event(self._log, logging.DEBUG, "standby_guard_spawned", guard_pid=standby.proc.pid)

    def _close(self, standby: GuardRun) -> None:
        if self._standby is standby:
            self._standby = None
        self._closed.add(standby)
        standby.close()

    def _on_reaped(self, standby: GuardRun) -> None:
        # A standby guard that was never taken is reaped: closed by us, or it died by itself.
        if self._standby is standby:
            self._standby = None
        if standby in self._closed:
            self._closed.discard(standby)
            return
        if standby.ready_at is None:
            self._failures += 1
        else:
            self._failures = 0
        log_event(
            self._log,
            logging.DEBUG,
            "standby_guard_died",
            guard_pid=standby.proc.pid,
            status=standby.guard_status,
            ready=standby.ready_at is not None,
        )
        self._schedule(self._respawn_in())

    def _respawn_in(self) -> float:
        interval = min(_RESPAWN_MAX_S, _RESPAWN_S * 2.0**self._failures)
        return max(0.0, self._spawned_at + interval - time.monotonic())

    def _schedule(self, delay_s: float) -> None:
        if self._keep and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(delay_s, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._keep and not self._busy() and self._standby is None:
            self._spawn()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
