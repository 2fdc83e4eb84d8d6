"""Notify hooks: the operator's program told of this node's role changes, one call at a time, in order.

What this module owns
---------------------
Two things. ``hook_event_for()`` is the rule for WHEN a hook event fires: a pure function of the last
event announced, the core's ``Status`` after a ``Ready`` and that ``Ready``'s events. ``NotifyHooks``
is HOW it is delivered: ``notify()`` only puts the event in a queue; a worker task of its own runs
the hook program once per event, never two at once, in the order of ``notify()``, under a timeout.

Hooks are advisory. The election, the lease and the script never wait for a hook: ``notify()``
returns at once and never raises, the hook runs in a process of its own, and the worker's share of
the event loop is a few non-blocking reads and polls. The supervised script (supervisor/) is what
runs under the lease; a hook only learns, late, what has already happened, and may fail to learn it
(a hook that hangs is killed, an event the queue cannot hold is dropped). Do not let a hook hold a
resource that only one node may hold: a hook that adds a virtual IP on ``master`` may run after the
next master's has added it on another host. Put that in the script, whose start and end follow the
lease.

When each event fires (``hook_event_for``)
------------------------------------------
After each ``Ready`` the core hands the daemon, with the ``Status`` after it and the previous
announcement, in this order; the first rule that applies gives the candidate:

1. ``stopping`` when the Ready holds ``resigning`` with ``reason=shutdown``: the daemon has begun a
   planned stop (SIGTERM). It fires when the stop begins, before the script is stopped, so that a
   hook can act while this node still runs (keepalived's stop notification came too late). Nothing
   fires after it in this daemon's life.
2. ``master`` while the role is MASTER: this node won an election (``became_master``). MASTER is this
   node. The lease and the script follow: ``master`` means elected, not "the script runs".
3. ``slave`` while the role is SLAVE and a master is known: this node follows MASTER
   (``following``; TERM is the master's term). A (pre-)candidate still names the master of the
   term before its own (``Status.master`` is not cleared when a candidate raises its term), so that
   name is never announced: a candidate is in an election, whose outcome is announced.
4. ``no-quorum`` when rule 3 does not apply and the Ready holds ``stepped_down`` with
   ``reason=lost_quorum`` (this master could not get its heartbeats acknowledged by a majority) or
   ``election_failed`` with ``phase=pre-vote`` (this node asked for an election and a majority did not
   grant it: they cannot be reached, or they still hear a master that this node does not). A failure
   in the vote phase fires nothing: a majority answered the pre-vote, so a master is near; that is
   contention, not the loss of the majority. MASTER is "-".
5. ``slave`` with MASTER "-" when none of the above applies and the last announcement was
   ``master``: this node stopped being master in any other way (deposed by a higher term, resigned)
   and does not follow a new master yet. It keeps the rule that ``master`` is the last event
   announced exactly while this node is master.

Otherwise nothing fires: a node without a master that has not yet failed to elect one (or a
candidate) is in an election, which ends in one of the above within a slot or two. The first event
of a daemon's life comes once the node knows where it stands (a master, a master to follow, or no
majority), not when it starts. An event is announced only if it differs from the last one, and
``no-quorum`` not again while it is the last (a node without a majority that learns a higher term is
no more without one). So no two events in a row are the same, which keepalived could not promise (its
notify scripts could run twice for one transition).

Timing, from the core's rules (protocol.md §3.3, §4.3): ``no-quorum`` comes when the node's first
pre-vote fails, about one election timeout E after its master was last heard plus its proposal slots
(E/4 each); a master that loses its majority steps down, and fires ``no-quorum``, L_kill - G - K after
its newest acknowledged round. A node that never campaigns (one recovering its lost state,
protocol.md §3.9) never fires ``no-quorum``: it keeps its last announcement until it follows a master.

How a hook is run (``NotifyHooks``)
-----------------------------------
``PATH EVENT TERM MASTER``: EVENT one of ``master``, ``slave``, ``no-quorum``, ``stopping``; TERM the
node's term when the event fired; MASTER the master's node id or ``-``. No shell. Environment: the
daemon's, plus ``PYQUORUM_EVENT``, ``PYQUORUM_TERM``, ``PYQUORUM_MASTER`` (as the arguments),
``PYQUORUM_NODE`` (this node's id), ``PYQUORUM_SEQ`` and ``PYQUORUM_TIMESTAMP``.

- ``PYQUORUM_SEQ`` starts at 1 and increases by one with each ``notify()`` in this daemon's life,
  delivered or not: a gap says that events were dropped. It is the order to trust (Pacemaker's
  ``CRM_alert_node_sequence`` does the same job). It starts again at 1 when the daemon restarts.
- ``PYQUORUM_TIMESTAMP`` is the wall clock when the event fired, ISO 8601 in UTC with microseconds
  (``2026-01-02T03:04:05.678901Z``), for people reading what the hook records. It is NOT for
  ordering: the wall clock can be set back, and events come microseconds apart. Order by SEQ.

Each run: its own session and process group (pgid = pid: a signal meant for the daemon does not
reach it, and the whole group can be killed), stdin from /dev/null, stdout and stderr read by the
worker and logged line by line as they come (``event=hook_output seq=N stream=stdout line="..."``):
at most ``MAX_OUTPUT_LINES`` lines per run, each cut at ``MAX_LINE_BYTES``, and what goes beyond is
read and thrown away, then counted in one ``hook_output_truncated`` line. Invalid UTF-8 is replaced;
a line can never forge a log field or a log line (logs.py quotes it).

The end of a run. When the hook's main process exits, whatever is left of its process group (a
child it put in the background, a double-forked "daemon") is SIGKILLed, so that nothing of one run
overlaps the next; a hook that wants a long-lived service started must ask the service manager
(``systemctl start``), which starts it outside the hook's group. After ``timeout_s``
(``--notify-timeout``, 30 s by default, Pacemaker's alert timeout) the whole group is SIGKILLed.
SIGKILL, with no SIGTERM and grace first, because the timeout is already the hook's whole budget: a
hook that needs to clean up can bound its own work within it (``timeout 20 curl ...``), a grace would
delay every later event, ``stopping`` included, for the sake of a hook that is already misbehaving,
and a hook that ignores SIGTERM would need the SIGKILL anyway. Either way the run ends only when its
main process is reaped and no process of its group is left alive; the next hook waits for that.
The main process is reaped only after its group has been killed, so the group id cannot have been
reused by then. Exit status 0 is ``delivered``; anything else is logged (WARNING) and counted in
``failed``, a timeout in ``timed_out``. There are no retries (Redis Sentinel retries on exit 1): a
retry would run an old event after newer ones; a hook that must succeed retries within its timeout.

The queue and its bound. Events not yet started wait in a FIFO of at most ``queue_max``. When a new
event finds it full, the OLDEST waiting event is dropped, logged (``event=hook_dropped
reason=queue_full``) and counted in ``dropped``: when hooks fall behind, the newest events are the
ones that describe the present. The bound the daemon should use is ``queue_bound(timeout_s,
election_timeout_s)``: two events per election timeout E for one whole notify timeout, and never
fewer than ``DEFAULT_QUEUE_MAX`` (64); 64 at the default timing (E = 1 s, 30 s). Why: every role
change takes the core at least part of an election timeout (an election, a lease running out), and
the worst flapping we found in the simulation (a master cut off and reconnected over and over, cut
for 0.2 E to 2 E and connected for 0.1 E to 1.5 E; random partitions, cuts and crashes made fewer)
made at most 1.13 events per E on one node: 34 in 30 s at E = 1 s, 164 in 30 s at E = 0.2 s
(tests/sim/test_hook_events.py measures the worst patterns again and checks the bound). So a hook
that hangs for its whole timeout while the link flaps as fast as it can loses nothing. A longer
queue would serve only a hook that is always slow, and run it ever further behind the present; each
waiting event costs a few hundred bytes.

``stopping`` and ``aclose()``. ``notify(stopping)`` drops the events still waiting before it (logged
and counted, ``reason=superseded``): at shutdown, the news that matters is that this node is
leaving, and the running hook, if any, is the only one ahead of it. Every later ``notify()`` is
dropped (``reason=after_stopping``); a second ``stopping`` is ignored. ``aclose(timeout_s)`` then
lets the worker go on for at most ``timeout_s``: ``stopping`` is delivered if it fits (each run gets
the smaller of its timeout and what is left of the budget); at the end of the budget a running hook
is SIGKILLed and reaped, and what still waits is dropped and counted (``reason=shutdown``).

What it must not know
---------------------
The daemon, the network, the core's internals: it sees ``Status`` and ``Event`` only. A hook's
result changes nothing in the election.

Honest limits
-------------
A process that leaves the hook's group (``setsid``) is not killed: when it still holds the hook's
output pipe after the group is gone, that is logged (``hook_escaped``), and the worker stops reading
it. systemd's ``KillMode=mixed`` (the shipped units) kills it when the service stops. If the daemon
itself is SIGKILLed, a running hook is not killed (no guard process watches it, unlike the script);
it runs to its end. A process of the group in uninterruptible sleep (D state) survives SIGKILL until
its system call returns: the worker waits for it, with an ERROR line each second, and no later hook
runs meanwhile (``aclose`` gives up on it after its budget). Call ``notify()`` from the event loop's
thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from pyquorum.core.node import Event, EventKind, Role, Status
from pyquorum.runtime.logs import Value, log_event, utc_text
from pyquorum.supervisor.guard import group_alive, group_members
from pyquorum.supervisor.run import COMPLAIN_S, POLL_MAX_S, poll_until

__all__ = [
    "DEFAULT_QUEUE_MAX",
    "EVENTS_PER_ELECTION_TIMEOUT",
    "MAX_LINE_BYTES",
    "MAX_OUTPUT_LINES",
    "Announcement",
    "HookEvent",
    "NotifyHooks",
    "hook_event_for",
    "queue_bound",
]

# The least queue_bound() gives (the module docstring says why it is what it is).
DEFAULT_QUEUE_MAX: Final = 64
# The fastest sustained rate of hook events, per election timeout, with a margin: the simulation's
# worst flapping made 1.13 (tests/sim/test_hook_events.py checks the bound).
EVENTS_PER_ELECTION_TIMEOUT: Final = 2.0
# Per run, both streams together: room for a Python traceback (10-40 lines) or a short shell hook's
# `set -x` trace; a runaway hook (`yes`) adds at most about 100 KB to the journal per event.
MAX_OUTPUT_LINES: Final = 100
MAX_LINE_BYTES: Final = 1000
# One read per readiness callback: bounded work per turn of the event loop, however fast a hook writes.
_READ_BYTES: Final = 65536
# When the group is gone, what is still in the pipes is read at once, up to this (beyond: a process
# that left the group is writing).
_DRAIN_MAX_BYTES: Final = 1 << 20
# Polling a group's death (and a hook's exit without a pidfd) is run.py's: from 0.2 ms, doubling, up
# to POLL_MAX_S; with a pidfd, a wake-up at least that often to see a shutdown's earlier kill. While
# a SIGKILLed group is still alive (D state), every COMPLAIN_S: say so, and SIGKILL it again.
# aclose(): how long past its budget to wait for a SIGKILLed hook to be reaped before giving up on it.
_FORCED_CLOSE_WAIT_S: Final = 1.0


class HookEvent(enum.Enum):
    """The EVENT argument of a hook (the module docstring says when each fires)."""

    MASTER = "master"
    SLAVE = "slave"
    NO_QUORUM = "no-quorum"
    STOPPING = "stopping"


@dataclass(frozen=True, slots=True)
class Announcement:
    """One event as the hook gets it: EVENT, TERM and MASTER (None is written ``-``)."""

    event: HookEvent
    term: int
    master: str | None


def hook_event_for(last: Announcement | None, status: Status, events: Sequence[Event]) -> Announcement | None:
    """The event to announce after one of the core's ``Ready``, or None.

    ``last`` is the last announcement of this daemon's life (None before the first), ``status`` the
    core's ``status()`` after the Ready, ``events`` its ``events``. Pure: the caller keeps ``last``
    (set it to the result when that is not None) and passes the result to ``NotifyHooks.notify``.
    The rules are the module docstring's, in its order.
    """
    if last is not None and last.event is HookEvent.STOPPING:
        return None
    candidate: Announcement | None = None
    # Node.shutdown() leaves with reason "shutdown"; a resign() on request gives its own reason.
    if any(ev.kind is EventKind.RESIGNING and ev.get("reason") == "shutdown" for ev in events):
        known = status.master if status.role in (Role.MASTER, Role.SLAVE) else None
        candidate = Announcement(HookEvent.STOPPING, status.term, known)
    elif status.role is Role.MASTER:
        candidate = Announcement(HookEvent.MASTER, status.term, status.node)
    elif status.role is Role.SLAVE and status.master is not None:
        candidate = Announcement(HookEvent.SLAVE, status.term, status.master)
    elif any(_lost_majority(ev) for ev in events):
        if last is not None and last.event is HookEvent.NO_QUORUM:
            return None
        candidate = Announcement(HookEvent.NO_QUORUM, status.term, None)
    elif last is not None and last.event is HookEvent.MASTER:
        candidate = Announcement(HookEvent.SLAVE, status.term, None)
    return None if candidate == last else candidate


def _lost_majority(ev: Event) -> bool:
    if ev.kind is EventKind.STEPPED_DOWN:
        return ev.get("reason") == "lost_quorum"
    return ev.kind is EventKind.ELECTION_FAILED and ev.get("phase") == "pre-vote"


def queue_bound(timeout_s: float, election_timeout_s: float) -> int:
    """The queue length that holds every event of one whole notify timeout at the fastest rate the
    core changes roles (``EVENTS_PER_ELECTION_TIMEOUT`` per E), and at least ``DEFAULT_QUEUE_MAX``."""
    if not (election_timeout_s > 0 and math.isfinite(timeout_s) and timeout_s > 0):
        return DEFAULT_QUEUE_MAX
    return max(DEFAULT_QUEUE_MAX, math.ceil(EVENTS_PER_ELECTION_TIMEOUT * timeout_s / election_timeout_s))


@dataclass(frozen=True, slots=True)
class _Pending:
    seq: int
    event: HookEvent
    term: int
    master: str | None
    timestamp: str  # wall clock, for the hook's PYQUORUM_TIMESTAMP only
    queued_at: float  # time.monotonic()

    @property
    def master_text(self) -> str:
        # MASTER as the hook gets it and the log shows it: "-" for none
        return self.master or "-"


def _checked(path: str, timeout_s: float, queue_max: int) -> tuple[str, float, int]:
    if not os.path.isabs(path):
        raise ValueError(f"the notify hook must be an absolute path, not {path!r}")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"the notify timeout must be a positive number of seconds, not {timeout_s!r}")
    if queue_max < 1:
        raise ValueError(f"the notify queue must hold at least one event, not {queue_max!r}")
    return path, timeout_s, queue_max


def _wall_clock_text() -> str:
    return utc_text(time.time_ns(), places=6)


class NotifyHooks:
    """Runs ``path EVENT TERM MASTER`` for each ``notify()``, one at a time, in order.

    Create it in the event loop's thread once the configuration is known. Call ``notify()`` for
    each event ``hook_event_for`` gives (it starts the worker task on first use), and at shutdown
    ``notify(HookEvent.STOPPING, ...)`` (a repeated one is ignored) then ``await aclose(budget)``.
    ``delivered``, ``failed``, ``timed_out`` and ``dropped`` count what became of each event.
    """

    def __init__(
        self,
        path: str,
        node: str,
        timeout_s: float,
        queue_max: int = DEFAULT_QUEUE_MAX,
        logger: logging.Logger | None = None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.path, self.timeout_s, self.queue_max = _checked(path, timeout_s, queue_max)
        self.node = node
        self._log = logger or logging.getLogger("pyquorum.hooks")
        self._environ = environ
        self._queue: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._seq = 0
        self._last: tuple[int, str, int, str | None] | None = None
        self._stopping = False  # notify(stopping) was called: nothing else is taken
        self._closing = False  # aclose() was called
        self._close_deadline = math.inf
        self._running: _Run | None = None
        self.delivered = 0
        self.failed = 0
        self.timed_out = 0
        self.dropped = 0

    def reconfigure(self, path: str, timeout_s: float, queue_max: int) -> None:
        """A reload: the next run is of ``path`` under ``timeout_s``; the one running now keeps its
        own. SEQ goes on, and the queue keeps its events (the oldest are dropped, logged, if it
        holds more than ``queue_max``). Raises ValueError, changing nothing, on a bad value."""
        self.path, self.timeout_s, self.queue_max = _checked(path, timeout_s, queue_max)
        while len(self._queue) > self.queue_max:
            self._drop(self._queue.popleft(), "queue_full")

    @property
    def last(self) -> tuple[int, str, int, str | None] | None:
        """SEQ, EVENT, TERM and MASTER of the last ``notify()`` (None before the first)."""
        return self._last

    @property
    def seq(self) -> int:
        """The SEQ of the last ``notify()`` (0 before the first)."""
        return self._seq

    @property
    def pending(self) -> int:
        """Events waiting, not counting the one whose hook runs."""
        return len(self._queue)

    @property
    def running_pid(self) -> int | None:
        """The pid (and process group) of the hook that runs now, or None."""
        return None if self._running is None else self._running.pid

    def counters(self) -> dict[str, int]:
        """What became of the events so far, for status and metrics."""
        return {
            "seq": self._seq,
            "pending": len(self._queue),
            "delivered": self.delivered,
            "failed": self.failed,
            "timed_out": self.timed_out,
            "dropped": self.dropped,
        }

    def notify(self, event: HookEvent, term: int, master: str | None) -> None:
        """Queue one event for the hook and return at once; never blocks, never raises.

        The event gets the next SEQ. It is dropped (logged, counted) if ``stopping`` or ``aclose()``
        came before; the oldest waiting event is dropped if the queue is full.
        """
        try:
            self._notify(HookEvent(event), term, master)
        except Exception:  # a bug of ours must not reach the election's code path
            self._log.exception("event=hook_internal_error where=notify")

    def _notify(self, event: HookEvent, term: int, master: str | None) -> None:
        if self._stopping and event is HookEvent.STOPPING:
            self._log.debug("event=hook_repeated_stopping_ignored")
            return
        self._seq += 1
        self._last = (self._seq, event.value, term, master)
        item = _Pending(self._seq, event, term, master, _wall_clock_text(), time.monotonic())
        if self._closing or self._stopping:
            self._drop(item, "closed" if self._closing else "after_stopping")
            return
        if event is HookEvent.STOPPING:
            self._stopping = True
            while self._queue:
                self._drop(self._queue.popleft(), "superseded")
        while len(self._queue) >= self.queue_max:
            self._drop(self._queue.popleft(), "queue_full")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._drop(item, "no_event_loop")
            return
        self._queue.append(item)
        self._report(
            logging.DEBUG,
            "hook_queued",
            item,
            master=item.master_text,
            pending=len(self._queue),
        )
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work(), name="pyquorum-notify-hooks")
        self._wake.set()

    def _report(self, level: int, event: str, item: _Pending, **fields: Value) -> None:
        # Every line about an event names it first, from its queueing to its hook's end.
        log_event(
            self._log, level, event, seq=item.seq, hook_event=item.event.value, term=item.term, **fields
        )

    def _drop(self, item: _Pending, reason: str) -> None:
        self.dropped += 1
        self._report(
            logging.WARNING,
            "hook_dropped",
            item,
            master=item.master_text,
            reason=reason,
            dropped=self.dropped,
        )

    async def aclose(self, timeout_s: float) -> None:
        """Shut down within ``timeout_s`` seconds: deliver what waits (after ``stopping``, only it)
        while the budget lasts, then SIGKILL and reap a running hook and drop what still waits.

        Returns when no hook process is left, or, if one will not die (D state), at most one second
        after the budget, with an ERROR line naming it. Later ``notify()`` calls are dropped.
        """
        self._closing = True
        budget_s = timeout_s if timeout_s >= 0 else 0.0  # NaN too; inf: as long as the hooks take
        self._close_deadline = min(self._close_deadline, time.monotonic() + budget_s)
        self._wake.set()
        worker = self._worker
        if worker is not None and not worker.done():
            wait_s = None if math.isinf(budget_s) else budget_s + _FORCED_CLOSE_WAIT_S
            try:
                await asyncio.wait_for(asyncio.shield(worker), wait_s)
            except asyncio.TimeoutError:
                run = self._running
                log_event(
                    self._log,
                    logging.ERROR,
                    "hook_abandoned",
                    seq=run.item.seq if run else None,
                    pid=run.pid if run else None,
                    pids=",".join(map(str, group_members(run.pid))) if run else "-",
                    reason="not reaped within the shutdown budget (uninterruptible sleep?)",
                )
                worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await worker
            except asyncio.CancelledError:
                worker.cancel()
                raise
        while self._queue:
            self._drop(self._queue.popleft(), "shutdown")
        log_event(self._log, logging.INFO, "hooks_closed", **self.counters())

    # ---- the worker ----------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
            item = self._queue.popleft()
            if self._closing and time.monotonic() >= self._close_deadline:
                self._drop(item, "shutdown")
                continue
            try:
                await self._deliver(item)
            except asyncio.CancelledError:
                raise
            except Exception:  # our own bug: log it, and go on with the next event
                self._log.exception("event=hook_internal_error where=worker seq=%d", item.seq)

    def _argv_env(self, item: _Pending) -> tuple[list[str], dict[str, str]]:
        master = item.master_text
        env = dict(os.environ if self._environ is None else self._environ)
        env.update(
            PYQUORUM_EVENT=item.event.value,
            PYQUORUM_TERM=str(item.term),
            PYQUORUM_MASTER=master,
            PYQUORUM_NODE=self.node,
            PYQUORUM_SEQ=str(item.seq),
            PYQUORUM_TIMESTAMP=item.timestamp,
        )
        return [self.path, item.event.value, str(item.term), master], env

    async def _deliver(self, item: _Pending) -> None:
        argv, env = self._argv_env(item)
        try:
            run = _Run.spawn(argv, env, item, self._log)
        except (OSError, ValueError) as exc:
            self.failed += 1
            self._report(logging.ERROR, "hook_start_failed", item, error=str(exc))
            return
        self._running = run
        try:
            self._report(
                logging.INFO,
                "hook_started",
                item,
                master=item.master_text,
                pid=run.pid,
                queued_ms=round((run.started_at - item.queued_at) * 1000.0, 3),
            )
            await run.finish(run.started_at + self.timeout_s, lambda: self._close_deadline)
        finally:
            self._running = None
            run.abandon()  # a no-op once finish() completed; on cancellation, the best we can do
        status = run.returncode
        duration_ms = round((run.ended_at - run.started_at) * 1000.0, 3)
        if run.killed_for is not None:
            result = run.killed_for
            if run.killed_for == "timeout":
                self.timed_out += 1
            else:
                self.failed += 1
        elif status == 0:
            result = "ok"
            self.delivered += 1
        else:
            result = "failed"
            self.failed += 1
        self._report(
            logging.INFO if result == "ok" else logging.WARNING,
            "hook_finished",
            item,
            result=result,
            status=status,
            duration_ms=duration_ms,
        )


class _Run:
    """One hook process from its spawn until it is reaped and its group is gone."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        fds: dict[str, int],
        item: _Pending,
        logger: logging.Logger,
    ) -> None:
        self.proc = proc
        self.pid = proc.pid  # also its process group id (start_new_session)
        self.item = item
        self.started_at = time.monotonic()
        self.ended_at = self.started_at
        self.returncode: int | None = None
        self.killed_for: str | None = None  # "timeout" or "shutdown" when we SIGKILLed it
        self._log = logger
        self._fds = dict(fds)  # stream name -> read end, while open
        self._partial = {name: bytearray() for name in fds}
        self._skipping = dict.fromkeys(fds, False)  # inside a line longer than MAX_LINE_BYTES
        self._lines_left = MAX_OUTPUT_LINES
        self._lines_dropped = 0
        self._bytes_dropped = 0
        self._done = False
        self._loop = asyncio.get_running_loop()
        for name, fd in fds.items():
            os.set_blocking(fd, False)
            self._loop.add_reader(fd, self._readable, name)
        # A pidfd becomes readable when the process exits (Linux 5.3): no polling while a hook runs.
        # Opened while the process cannot have been reaped (we have not waited for it), so it is ours.
        self._exit_seen = asyncio.Event()
        self._pidfd: int | None = None
        with contextlib.suppress(AttributeError, OSError):
            self._pidfd = os.pidfd_open(self.pid)
            self._loop.add_reader(self._pidfd, self._exit_seen.set)

    @classmethod
    def spawn(cls, argv: list[str], env: dict[str, str], item: _Pending, logger: logging.Logger) -> _Run:
        """Start the hook; raise OSError (no such file, not executable, bad format) or ValueError."""
        pipes = {"stdout": os.pipe(), "stderr": os.pipe()}  # close-on-exec: only the dup2 copies pass
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=pipes["stdout"][1],
                stderr=pipes["stderr"][1],
                env=env,
                start_new_session=True,
            )
        except BaseException:
            for r, w in pipes.values():
                os.close(r)
                os.close(w)
            raise
        for _, w in pipes.values():
            os.close(w)
        return cls(proc, {name: r for name, (r, _) in pipes.items()}, item, logger)

    def _report(self, level: int, event: str, **fields: Value) -> None:
        # Every line about a run names its event's SEQ first, as the worker's lines do.
        log_event(self._log, level, event, seq=self.item.seq, **fields)

    # ---- the end of a run ----------------------------------------------------------------------

    async def finish(self, timeout_at: float, shutdown_at: Callable[[], float]) -> None:
        """Wait for the main process to exit, SIGKILLing the group at ``timeout_at`` or at
        ``shutdown_at()`` (which a shutdown may bring earlier meanwhile); then SIGKILL what is left
        of the group, wait until none of it is alive, reap the main process and take the rest of
        its output."""
        killed = False
        complain_at = math.inf
        delay = 0.0002
        while not self._exited():
            now = time.monotonic()
            kill_at = min(timeout_at, shutdown_at())
            if not killed and now >= kill_at:
                self.killed_for = "timeout" if now >= timeout_at else "shutdown"
                self._report(
                    logging.WARNING,
                    "hook_killed",
                    reason=self.killed_for,
                    after_s=round(now - self.started_at, 3),
                    pids=",".join(map(str, group_members(self.pid))) or "-",
                )
                self._killpg()
                killed = True
                complain_at = now + COMPLAIN_S
            if now >= complain_at:
                complain_at = now + COMPLAIN_S
                self._complain(now)
            # Woken by the pidfd at the exit; otherwise polled. At least every POLL_MAX_S either
            # way, for a shutdown that brings the kill earlier.
            wait_s = POLL_MAX_S if self._pidfd is not None else delay
            delay = min(delay * 2, POLL_MAX_S)
            await self._exit_or(wait_s if killed else min(wait_s, kill_at - now))
        if not killed:
            # What the hook left behind in its group dies with it: nothing of one run may overlap
            # the next. The main process is a zombie until we reap it, so the group id is still ours.
            left = [pid for pid in group_members(self.pid) if pid != self.pid]
            if left:
                self._report(
                    logging.WARNING,
                    "hook_left_processes",
                    pids=",".join(map(str, left)),
                    action="sigkill",
                )
                self._killpg()
                killed = True
                complain_at = time.monotonic() + COMPLAIN_S
        if killed:
            await poll_until(lambda: not group_alive(self.pid), self._complain, complain_at)
        self.returncode = self._reap()
        self.ended_at = time.monotonic()
        self._close_pidfd()
        self._drain()
        self._done = True

    def _complain(self, now: float) -> None:
        self._killpg()
        self._report(
            logging.ERROR,
            "hook_group_alive",
            pgid=self.pid,
            for_s=round(now - self.started_at, 1),
            pids=",".join(map(str, group_members(self.pid))) or "-",
            reason="SIGKILLed and still alive (uninterruptible sleep?); the next hook waits",
        )

    async def _exit_or(self, timeout_s: float) -> None:
        # Until the pidfd says the main process exited, or timeout_s.
        if self._pidfd is None:
            await asyncio.sleep(max(0.0, timeout_s))
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._exit_seen.wait(), max(0.0, timeout_s))

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(Exception):  # a closed loop has no readers left to remove
                self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def abandon(self) -> None:
        """Give up on this run (the worker was cancelled): SIGKILL its group, stop reading. The
        main process is reaped by ``subprocess`` later if it is not yet. Does nothing after
        ``finish()`` completed."""
        if self._done:
            return
        self._done = True
        if self.proc.returncode is None:
            self._killpg()
        self._close_pidfd()
        self._close_all()

    def _exited(self) -> bool:
        # Has the main process exited? Without reaping it (WNOWAIT): reaped, its pid and so its
        # group id could be reused, and the group kill that follows could hit a stranger.
        if self.proc.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped by someone else (a careless SIGCHLD handler)
            return True
        return info is not None and info.si_pid == self.pid

    def _reap(self) -> int | None:
        try:
            return self.proc.wait(timeout=1.0)  # a zombie by now: at once
        except subprocess.TimeoutExpired:
            return None

    def _killpg(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    # ---- output --------------------------------------------------------------------------------

    def _readable(self, name: str) -> None:
        fd = self._fds.get(name)
        if fd is None:
            return
        try:
            data = os.read(fd, _READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._feed(name, data)
        else:
            self._close(name)

    def _drain(self) -> None:
        # The group is gone: what is left in a pipe is read now. A pipe still open for writing
        # after that is held by a process that left the group (setsid).
        for name in list(self._fds):
            fd = self._fds[name]
            taken = 0
            while taken < _DRAIN_MAX_BYTES:
                try:
                    data = os.read(fd, _READ_BYTES)
                except BlockingIOError:
                    break
                except OSError:
                    data = b""
                if not data:
                    self._close(name)
                    break
                taken += len(data)
                self._feed(name, data)
            if name in self._fds:
                self._report(
                    logging.WARNING,
                    "hook_escaped",
                    stream=name,
                    reason="a process that left the hook's process group (setsid) still holds its "
                    "output; it is not killed and no longer read",
                )
                self._close(name)
        if self._lines_dropped:
            self._report(
                logging.WARNING,
                "hook_output_truncated",
                lines_dropped=self._lines_dropped,
                bytes_dropped=self._bytes_dropped,
                max_lines=MAX_OUTPUT_LINES,
            )

    def _feed(self, name: str, data: bytes) -> None:
        buf = self._partial[name]
        while data:
            if self._skipping[name]:
                end = data.find(b"\n")
                if end < 0:
                    self._bytes_dropped += len(data)
                    return
                self._bytes_dropped += end
                self._skipping[name] = False
                data = data[end + 1 :]
                continue
            end = data.find(b"\n")
            if end < 0:
                buf += data
                if len(buf) > MAX_LINE_BYTES:
                    self._line(name, bytes(buf[:MAX_LINE_BYTES]), cut=True)
                    self._bytes_dropped += len(buf) - MAX_LINE_BYTES
                    buf.clear()
                    self._skipping[name] = True
                return
            buf += data[:end]
            data = data[end + 1 :]
            line = bytes(buf)
            buf.clear()
            if len(line) > MAX_LINE_BYTES:
                self._bytes_dropped += len(line) - MAX_LINE_BYTES
                self._line(name, line[:MAX_LINE_BYTES], cut=True)
            else:
                self._line(name, line, cut=False)

    def _line(self, name: str, line: bytes, *, cut: bool) -> None:
        if self._lines_left <= 0:
            self._lines_dropped += 1
            self._bytes_dropped += len(line)
            return
        self._lines_left -= 1
        text = line.decode("utf-8", "replace").rstrip("\r")
        fields: dict[str, Value] = {"stream": name, "line": text}
        if cut:
            fields["cut"] = True
        self._report(logging.INFO, "hook_output", **fields)

    def _close(self, name: str) -> None:
        fd = self._fds.pop(name, None)
        if fd is None:
            return
        buf = self._partial[name]
        if buf and not self._skipping[name]:
            self._line(name, bytes(buf), cut=False)  # a last line without its newline
        buf.clear()
        with contextlib.suppress(Exception):  # a closed loop has no readers left to remove
            self._loop.remove_reader(fd)
        os.close(fd)

    def _close_all(self) -> None:
        for name in list(self._fds):
            self._close(name)
