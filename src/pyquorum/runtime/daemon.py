"""The asyncio shell around the election core: its life from start-up to exit, and the core's outputs.

What this module owns
---------------------
The daemon's stages and what each may take (``Daemon.main``), the clock, the state directory, signals,
and carrying out the core's ``Ready`` in the order the core's docstring prescribes: persist (fsync),
send, act on the script, log, ``advance()``. Every protocol decision is the core's
(``pyquorum.core.node``). The other jobs are elsewhere, one module each:

* ``runtime.udp``: the socket, every datagram through ``wire.Endpoint`` (its docstring lists the path
  hop by hop), the refusal logs and the other-cluster reports;
* ``runtime.status``: the counters, the rate limiter and the one ``Snapshot`` every reader reads;
* ``runtime.restart``: the pure restart policy for a script that ends by itself;
* ``runtime.reload``: reading the configuration again, and what a reload refuses;
* ``runtime.control``: the control socket (the commands are ``COMMANDS`` below, one function each);
* ``runtime.handover``: step-down answers, this node's transition record and a drill's silence;
* ``runtime.hooks``: the notify hook (``--notify``): when each event fires, and its runs, in order;
* ``runtime.http`` and ``runtime.metrics``: the opt-in HTTP listener and its Prometheus collector;
* ``runtime.sdnotify``: what systemd is told, at each stage;
* ``pyquorum.supervisor``: the script's runs under the kill deadline (and its guard process).

The stages (``main``)
---------------------
1. start-up: lock and load the state, bind the socket, build the core, prepare the supervisor; log
   ``event=started``;
2. running, until a stop signal, or the core has finished, or a fatal error of ours; a reload
   (SIGHUP or the control socket) runs as a task meanwhile, one at a time;
3. the planned stop (first SIGTERM or SIGINT): the core stops the script, resigns and finishes; it
   may take ``G + K + SHUTDOWN_SLACK_S``, after which the daemon gives up waiting; a second signal
   ends the wait at once (uvicorn's rule; the guard still stops the script);
4. exit: the ticker's timer (cancelled), the supervisor (at most ``G + 1`` s, then its guard is
   killed), the notify hook (at most ``HOOK_DRAIN_S`` more, none after a second signal; its
   ``stopping`` was queued when the stop began, so it ran beside the script's stop), the socket, the
   state lock.

Signal handlers only record the signal and wake ``main``, which does the work (uvicorn's and CPython
asyncio.runners' rule): nothing runs inside a handler that could meet the loop half-way through a
``Ready``.

Whose fault is it
-----------------
A bad datagram is a peer's fault and never more than a counted, rate-limited log line (runtime/udp.py).
A broken invariant of the core is ours: it stops the script and the daemon (``event=internal_error``,
then ``event=fatal``, exit code 1).

Time
----
``time.monotonic()`` is CLOCK_MONOTONIC on Linux: it never jumps and keeps running while the process
is stopped, which is what the lease arithmetic needs (protocol.md §3.2). The guard process that holds
the script's kill deadline reads the same clock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pyquorum import __version__
from pyquorum.config import Config
from pyquorum.core.errors import ConfigError
from pyquorum.core.messages import Message
from pyquorum.core.node import Event, EventKind, HardState, Node, Ready, Role, StartScript
from pyquorum.keyfile import load_keyring
from pyquorum.runtime.control import CONTROL_SOCKET_NAME, CommandFailed, ControlServer
from pyquorum.runtime.handover import Handover
from pyquorum.runtime.hooks import Announcement, HookEvent, NotifyHooks, hook_event_for, queue_bound
from pyquorum.runtime.logs import RESERVED_FIELDS, Value, configure_logging, log_event, log_exception
from pyquorum.runtime.reload import needs_restart, read_config, restart_settings
from pyquorum.runtime.restart import Action, Decision, RestartPolicy
from pyquorum.runtime.sdnotify import Notifier, status_text
from pyquorum.runtime.status import (
    DATAGRAM_TYPES,
    Counters,
    HookStatus,
    ScriptStatus,
    Snapshot,
    fresh_master,
    peer_statuses,
)
from pyquorum.runtime.storage import PersistedState, StateStore, member_change_problem, write_status
from pyquorum.runtime.udp import Udp
from pyquorum.supervisor import ScriptExit, ScriptStartError, ScriptSupervisor
from pyquorum.wire import Endpoint, KeyRing, cluster_fingerprint

if TYPE_CHECKING:
    from pyquorum.runtime.http import HttpServer

log = logging.getLogger("pyquorum.daemon")
script_log = logging.getLogger("pyquorum.script")

# How long a planned shutdown may take beyond the script's own stop grace before we give up waiting.
SHUTDOWN_SLACK_S = 2.0
# At exit, once the script has stopped and the resignation has gone out: how much longer the notify
# hook may run (its `stopping`, queued when the stop began) before its process group is SIGKILLed.
# It never delays the script's stop or the handover, only the daemon's exit, by at most this much.
HOOK_DRAIN_S = 2.0


@dataclass
class _ScriptRun:
    token: int
    asked_at: float
    task: asyncio.Task[None]
    started_at: float | None = None


class Daemon:
    """One pyquorum node. ``await Daemon(config).main()`` runs it until a signal stops it."""

    def __init__(self, config: Config, argv: Sequence[str] | None = None) -> None:
        self.config = config
        # the command line the daemon was started with: a reload reads it (and its --config) again
        self.argv = None if argv is None else list(argv)
        self.me = config.node_id
        self.members = tuple(config.members)
        self.timing = config.timing
        self.store = StateStore(config.state_dir)
        self.counters = Counters(m for m in self.members if m != self.me)
        self.restart_policy = _restart_policy(config)
        self.started_at = time.monotonic()
        self.epoch = 0
        self.node: Node
        self.udp: Udp | None = None
        self.supervisor: ScriptSupervisor | None = None
        self._run: _ScriptRun | None = None
        # the ticker: one timer for the core's next wakeup (_schedule_tick), armed once running
        self._ticking = False
        self._tick_timer: asyncio.TimerHandle | None = None
        self._tick_due = 0.0
        self._main_wake = asyncio.Event()  # main()'s: a signal, the core finished, a fatal error
        self._stop_signals: list[signal.Signals] = []
        self._reload_requested = False
        self._finished = False
        self._fatal: BaseException | None = None
        self._stopped = False  # status.json says "stopped" from here on
        self._state_key: tuple[object, ...] | None = None
        # the ticker: when it last woke and how late that came (see on_time); it wakes at least
        # this often (the systemd watchdog's interval, if shorter, once main() knows it)
        self.last_tick_at = self.started_at
        self.last_lag_s = 0.0
        self.tick_every_s = config.timing.election_timeout_s
        # the script, for status
        self._starts = 0
        self._restarts = 0
        self._last_token: int | None = None
        self._last_exit: dict[str, Any] | None = None
        self.notifier = Notifier(None)  # the real one is made first thing in main()
        self.control: ControlServer | None = None
        self.http: HttpServer | None = None
        self._reload_lock = asyncio.Lock()
        self._reloads: set[asyncio.Task[Any]] = set()
        self._notify_status = False  # STATUS= on changes: after READY=1, until STOPPING=1
        # the notify hook: made when --notify is first set, then kept (its SEQ runs for the daemon's
        # life); a reload that removes --notify pauses it (_hooks_on False)
        self.hooks: NotifyHooks | None = None
        self._hooks_on = False
        self._announced: Announcement | None = None  # the last event given to the hook
        # step-down, the timeline and a drill's silence (runtime/handover.py)
        self.handover = Handover(
            self.me,
            self.timing,
            send=lambda dest, msg: self.udp.send(dest, msg) if self.udp is not None else None,
            role_now=lambda: (self.node.role.value, self.node.term),
            silence_switch=self._set_silence,
        )

    # ------------------------------------------------------------------ start-up

    def _open_state(self) -> PersistedState:
        self.store.acquire()
        state = self.store.load()
        if state.members is not None and state.members != self.members:
            # protocol.md §1, §8: two member lists can elect two masters; never change it silently
            self.store.release()
            raise ConfigError([member_change_problem(self.store.state_file, state.members, self.members)])
        if state.members is None:
            self.store.save(replace(state, members=self.members))
        self.epoch = self.store.bump_epoch()
        return state

    def _load_keys(self) -> KeyRing | None:
        return load_keyring(self.config.key_file) if self.config.key_file else None

    def _make_endpoint(self, keyring: KeyRing | None) -> Endpoint:
        fp = cluster_fingerprint(self.members, self.config.cluster_text)
        return Endpoint(local=self.me, members=self.members, cluster_fp=fp, keyring=keyring, epoch=self.epoch)

    async def main(self) -> int:
        """Run the stages of the module docstring; the exit code: 0 after a clean stop, 1 fatal."""
        # Before anything can start a process (the supervisor's standby guard): it removes
        # $NOTIFY_SOCKET from the environment the guard and the script inherit (runtime/sdnotify.py).
        self.notifier = Notifier.from_environ()
        if self.notifier.watchdog_interval_s is not None:
            self.tick_every_s = min(self.tick_every_s, self.notifier.watchdog_interval_s)
        state = self._open_state()
        try:
            await self._start(state)
            self._ticking = True
            self._schedule_tick()
            try:
                await self._run_until_stopped()
            finally:
                self._finished = True
                self._stop_ticking()
        finally:
            await self._cleanup()
        if self._fatal is not None:
            log_event(
                log,
                logging.CRITICAL,
                "fatal",
                error=repr(self._fatal),
                hint="stopped the script and the daemon",
            )
            return 1
        return 0

    async def _start(self, state: PersistedState) -> None:
        keyring = self._load_keys()
        endpoint = self._make_endpoint(keyring)
        self.udp = Udp(
            endpoint,
            self.step,
            self.counters,
            members=self.members,
            timing_text=self.config.timing_text,
            on_operate=self.handover.on_message,
        )
        ip = self.config.me.ip
        await self.udp.bind(
            str(ip), self.config.me.port, socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        )
        self.node = Node(
            self.me,
            self.members,
            self.timing,
            now=time.monotonic(),
            rng=random.Random(int.from_bytes(os.urandom(8), "big")),
            hard_state=HardState(state.term, state.voted_for, state.promise_s, state.recovering),
            priorities=dict(self.config.priorities),
            witnesses=frozenset(self.config.witnesses),
            preempt_after_s=self.config.preempt_after_s,
        )
        self._configure_hooks(self.config)
        if self.config.script and not self.config.is_witness:  # a witness never runs it (§3.11)
            self.supervisor = ScriptSupervisor(
                [self.config.script],
                stop_timeout_s=self.timing.stop_timeout_s,
                kill_margin_s=self.timing.kill_margin_s,
                on_exit=self._on_script_exit,
                logger=script_log,
            )
            await self.supervisor.prepare()  # a standby guard: the first start is fast too
        self.control = ControlServer(self.store.state_dir / CONTROL_SOCKET_NAME, self._commands())
        await self.control.start()
        if self.config.http is not None:
            self.http = await self._open_http(self.config.http)
        self._install_signals()
        log_event(
            log,
            logging.INFO,
            "started",
            version=__version__,
            members=",".join(self.members),
            term=state.term,
            boot_epoch=self.epoch,
            authenticated=keyring is not None,
            script=self.config.script,
            timing=self.timing.describe(),
        )
        if state.recovering:
            log_event(
                log,
                logging.WARNING,
                "recovering",
                term=state.term,
                state_dir=str(self.store.state_dir),
                hint="no state file (a new node, or its state was lost): it may have voted before, so "
                "it grants no vote and does not campaign until it has heard the current term of every "
                "member (docs/protocol.md §3.9); it follows a master meanwhile. For a brand-new "
                "cluster with members not yet running, see 'pyquorum init'",
            )
        self._note_state()
        # socket bound, state loaded, control socket up: systemd may start what is ordered after us
        self.notifier.ready(self._status_line())
        self._notify_status = True
        if keyring is None:
            log_event(
                log,
                logging.WARNING,
                "unauthenticated",
                hint=f"cluster traffic is UNAUTHENTICATED: anyone who can send UDP to {self.me} can "
                "disrupt elections; create a key "
                "with 'pyquorum keygen' and use --key-file",
            )

    async def _run_until_stopped(self) -> None:
        # Stages 2 and 3 of the module docstring: everything the signal handlers asked for is done here.
        give_up_at: float | None = None
        while True:
            timeout = None if give_up_at is None else max(0.0, give_up_at - time.monotonic())
            try:
                await asyncio.wait_for(self._main_wake.wait(), timeout)
            except asyncio.TimeoutError:
                log_event(
                    log,
                    logging.ERROR,
                    "shutdown_overdue",
                    waited_s=round(time.monotonic() - (give_up_at or 0.0) + self._shutdown_limit_s(), 3),
                    hint="the script did not stop in time; exiting anyway",
                )
                return
            self._main_wake.clear()
            if self._fatal is not None or self._finished:
                return
            if len(self._stop_signals) > 1:
                # uvicorn's rule: a second signal forces the exit; the guard still stops the script
                log_event(
                    log,
                    logging.WARNING,
                    "forced_exit",
                    signal=self._stop_signals[-1].name,
                    hint="not waiting for a handover",
                )
                return
            if self._reload_requested:
                self._reload_requested = False
                if give_up_at is None:  # a reload during the planned stop changes nothing
                    task = asyncio.create_task(self.reload("SIGHUP"))
                    self._reloads.add(task)
                    task.add_done_callback(self._reloads.discard)
            if self._stop_signals and give_up_at is None:
                give_up_at = time.monotonic() + self._shutdown_limit_s()
                self._begin_shutdown(self._stop_signals[0])

    def _shutdown_limit_s(self) -> float:
        return self.timing.stop_timeout_s + self.timing.kill_margin_s + SHUTDOWN_SLACK_S

    def _begin_shutdown(self, sig: signal.Signals) -> None:
        self.notifier.stopping(f"stopping ({sig.name}) " + self._status_line())
        self._notify_status = False  # "stopping" stays the status line to the end
        log_event(
            log,
            logging.INFO,
            "shutdown_requested",
            signal=sig.name,
            term=self.node.term,
            role=self.node.role.value,
        )
        self.node.shutdown(time.monotonic())
        self._process()

    async def _cleanup(self) -> None:
        if self._notify_status:  # not stopping yet: a fatal error, or the core finished by itself
            self.notifier.stopping()
            self._notify_status = False
        for task in list(self._reloads):
            task.cancel()
        self.handover.close()
        if self.http is not None:
            await self.http.close()
        if self.control is not None:
            await self.control.close()
        if self.supervisor is not None:
            await self.supervisor.aclose(timeout=self.timing.stop_timeout_s + 1.0)
        if self._run is not None:
            self._run.task.cancel()
        if self.hooks is not None:
            if self._hooks_on and hasattr(self, "node"):
                # a stop the core did not announce (a fatal error, a forced exit): the hook still
                # hears it; a second `stopping` is ignored by the runner
                master = self._announced.master if self._announced is not None else None
                self.hooks.notify(HookEvent.STOPPING, self.node.term, master)
            await self.hooks.aclose(0.0 if len(self._stop_signals) > 1 else HOOK_DRAIN_S)
        if self.udp is not None:
            self.udp.close()
        self._stopped = True
        if hasattr(self, "node"):
            self._note_state()
        self.store.release()
        self.notifier.close()

    # ------------------------------------------------------------------ signals

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        self._stop_signals.append(sig)
        self._main_wake.set()

    def _on_hup(self) -> None:
        self._reload_requested = True
        self._main_wake.set()

    # ------------------------------------------------------------------ reload

    async def reload(self, source: str) -> dict[str, Any]:
        """Read the configuration again (the original command line and its --config file) and
        apply what can change live; refuse, changing nothing, if anything else changed. Returns
        what happened (the control socket's answer to ``pyquorum reload``). One at a time."""
        async with self._reload_lock:
            self.notifier.reloading()
            log_event(log, logging.INFO, "reload_started", source=source)
            try:
                # in a thread: resolving host names may wait on DNS, and the loop must not stop
                # (a master that cannot send its heartbeats loses its lease)
                config, keyring, problems = await asyncio.to_thread(read_config, self.argv, self.config)
                result = await self._apply_config(config, keyring, problems, source)
            except Exception as exc:  # our bug: refused, nothing changed, the daemon goes on
                log_exception(log, "reload_error", source=source)
                result = {"applied": False, "changes": [], "problems": [f"internal error: {exc!r}"]}
            self.notifier.reloaded(
                ("reloaded " if result["applied"] else "reload refused ") + self._status_line()
            )
            self._note_state()
            return result

    async def _apply_config(
        self, new: Config | None, keyring: KeyRing | None, problems: list[str], source: str
    ) -> dict[str, Any]:
        old = self.config
        if new is not None and not problems:
            problems = needs_restart(old, new)
        if new is None or problems:
            log_event(
                log,
                logging.ERROR,
                "reload_failed",
                source=source,
                problems="; ".join(problems),
                hint="nothing changed; the daemon runs on with its configuration",
            )
            return {"applied": False, "changes": [], "problems": problems}
        changes: list[str] = []
        # First what can fail: the new HTTP listener (the old one is closed only once it listens).
        new_http = self.http
        if new.http != old.http:
            try:
                new_http = await self._open_http(new.http) if new.http is not None else None
            except ConfigError as exc:
                return await self._apply_config(new, keyring, exc.problems, source)
            changes.append(f"http {old.http or 'off'} -> {new.http or 'off'}")
        # From here on nothing fails.
        if self.udp is not None and new.key_file is not None:
            before = self.udp.endpoint.keyring
            self.udp.endpoint.set_keyring(keyring)  # keeps the replay state: no handshake, no election
            log_event(  # ids only, never key bytes
                log,
                logging.WARNING,
                "keys_reloaded",
                send_key_id=keyring.send_key_id if keyring else None,
                key_ids=",".join(map(str, sorted(keyring.keys))) if keyring else "",
            )
            if repr(before) != repr(keyring) or old.key_file != new.key_file:
                changes.append(f"keys {before!r} -> {keyring!r}")
        if restart_settings(old) != restart_settings(new):
            self.restart_policy = _restart_policy(new)  # its failure count starts again
            changes.append(f"restart {old.restart} -> {new.restart} (failure count reset)")
        if (old.log_level, old.log_format) != (new.log_level, new.log_format):
            configure_logging(new.log_level, self.me, new.log_format)
            old_level, new_level = logging.getLevelName(old.log_level), logging.getLevelName(new.log_level)
            changes.append(
                f"logs {old_level.lower()}/{old.log_format} -> {new_level.lower()}/{new.log_format}"
            )
        hook_change = self._configure_hooks(new)  # validated with the rest: it does not fail
        if hook_change is not None:
            changes.append(hook_change)
        if new_http is not self.http:
            if self.http is not None:
                await self.http.close()
            self.http = new_http
        self.config = new
        log_event(
            log,
            logging.WARNING,
            "reloaded",
            source=source,
            changes="; ".join(changes) or "none",
            term=self.node.term,
            role=self.node.role.value,
        )
        return {"applied": True, "changes": changes, "problems": []}

    async def _open_http(self, address: Any) -> HttpServer:
        from pyquorum.runtime.http import HttpServer  # imports prometheus_client: only when asked

        server = HttpServer(address, self.snapshot)
        await server.start()
        return server

    # ------------------------------------------------------------------ the control socket

    async def step_down(self, to: str, timeout_s: float) -> dict[str, Any]:
        """Ask the master to hand over (protocol.md §3.10), to ``to`` if not empty: on the master
        the core decides at once; elsewhere the request goes to the master and this waits for its
        answer. Returns the answer for ``pyquorum step-down``."""
        node = self.node
        was_master, term = node.role is Role.MASTER, node.term
        master = self.me if was_master else node.master
        reason = node.request_step_down(time.monotonic(), to)
        self._process()
        if reason is None:
            assert master is not None  # the core sent the request to the master it follows
            master, accepted, reason = await self.handover.step_down_answer(master, timeout_s)
        else:
            accepted = reason == "accepted"
            master = master if was_master else None
        log_event(
            log,
            logging.INFO,
            "step_down_request",
            term=term,
            to=to or None,
            master=master,
            accepted=accepted,
            reason=reason,
        )
        return {
            "accepted": accepted,
            "reason": reason,
            "master": master,
            "term": term,
            "to": to or None,
            "answered_at": time.monotonic(),
        }

    def _set_silence(self, until: float) -> None:
        # a drill's silence (runtime/handover.py) is carried out by the UDP layer
        if self.udp is not None:
            self.udp.silent_until = until

    def _commands(self) -> dict[str, Callable[[Mapping[str, Any]], Awaitable[Any]]]:
        return {name: _bind(self, command) for name, command in COMMANDS.items()}

    def _status_line(self) -> str:
        node = self.node
        return status_text(node.role.value, node.term, fresh_master(node, time.monotonic()))

    # ------------------------------------------------------------------ the core's inputs

    def _schedule_tick(self) -> None:
        """Arm the ticker's timer for ``Node.next_wakeup()``, or ``tick_every_s`` after its last
        wake-up if that comes first; leave it alone if it is armed for that moment or earlier.

        Called after every input (``_process``), so that the core is ticked when it asked to be and
        not otherwise: a follower of a live master has nothing to send (protocol.md §3.2) and sleeps
        between its master's heartbeats. No wake-up, task or timer per datagram: a timer armed for an
        earlier moment (a follower's election timer, which each heartbeat moves later) fires for
        nothing and is armed again, one wake-up per E, where re-arming it for every datagram would
        cost two loop calls each. A moment already past fires at the next turn of the loop, after
        the I/O that is ready: the loop never starves.
        """
        if not self._ticking:
            return
        at = min(self.node.next_wakeup(), self.last_tick_at + self.tick_every_s)
        timer = self._tick_timer
        if timer is not None:
            if self._tick_due <= at:
                return
            timer.cancel()
        # loop.time() is time.monotonic(), the clock of every `now` given to the core
        self._tick_due = at
        self._tick_timer = asyncio.get_running_loop().call_at(at, self._tick)

    def _stop_ticking(self) -> None:
        self._ticking = False
        if self._tick_timer is not None:
            self._tick_timer.cancel()
            self._tick_timer = None

    def _tick(self) -> None:
        self._tick_timer = None
        if not self._ticking:
            return
        now = time.monotonic()
        self.last_lag_s = max(0.0, now - self._tick_due)  # how late the wake-up came
        self.last_tick_at = now
        if self.last_lag_s <= self.timing.heartbeat_interval_s:
            # systemd's watchdog, only while on time: a wedged or late loop gets restarted
            self.notifier.watchdog(now)
        self.node.tick(now)
        self._process()

    def on_time(self, now: float) -> bool:
        """The loop is on time: the ticker's last wake-up came at most one heartbeat interval after
        it was due, and it woke within ``tick_every_s`` (E, or the systemd watchdog's interval if
        shorter) plus one heartbeat interval: it wakes at least every ``tick_every_s``."""
        h = self.timing.heartbeat_interval_s
        return self.last_lag_s <= h and now - self.last_tick_at <= self.tick_every_s + h

    def step(self, sender: str, msg: Message, now: float) -> None:
        """A message the wire delivered (runtime/udp.py): step the core, carry out its Ready."""
        self.node.step(sender, msg, now)
        self._process()

    # ------------------------------------------------------------------ the core's outputs

    def _process(self) -> None:
        """Carry out the core's Ready: persist, send, script, log, advance (core/node.py)."""
        if self._fatal is not None:
            return
        try:
            rd = self.node.ready()
            if not rd.empty() or rd.finished:
                self._carry_out(rd)
            self.node.advance(rd)
        except Exception as exc:  # our own bug or an unwritable disk: fail safe
            log_exception(log, "internal_error")
            self._fail(exc)
            return
        if rd.finished:
            self._finished = True
            self._main_wake.set()
            self._stop_ticking()
            return
        self._schedule_tick()

    def _fail(self, exc: BaseException) -> None:
        self._fatal = exc
        self._finished = True
        self._main_wake.set()
        self._stop_ticking()

    def _carry_out(self, rd: Ready) -> None:
        if rd.hard_state is not None:
            # protocol.md §3.4: durable BEFORE any message of this Ready leaves
            hs = rd.hard_state
            self.store.save(
                PersistedState(hs.term, hs.voted_for, self.epoch, hs.promise_s, hs.recovering, self.members)
            )
        if self.udp is not None:
            for dest, msg in rd.messages:
                self.udp.send(dest, msg)
        for action in rd.script:
            if isinstance(action, StartScript):
                self._start_script(action)
            else:
                self._stop_script(action.kill_deadline, action.reason)
        if rd.kill_deadline is not None and self.supervisor is not None:
            self.supervisor.renew(rd.kill_deadline)
        if rd.events:
            now = time.monotonic()
            for ev in rd.events:
                self.counters.on_event(ev, now)
                self.handover.on_event(ev, now)
                log_core_event(log, ev)
            self._announce(rd.events)
            self._note_state()

    # ------------------------------------------------------------------ notify hooks

    def _configure_hooks(self, config: Config) -> str | None:
        """Start, change or pause the notify hook as ``config`` says (at start-up and on a reload);
        what changed, in words, or None."""
        before = f"{self.hooks.path} ({self.hooks.timeout_s:g} s)" if self.hooks and self._hooks_on else "off"
        if config.notify is None:
            self._hooks_on = False  # what waits still runs; nothing new is given to it
        else:
            bound = queue_bound(config.notify_timeout_s, self.timing.election_timeout_s)
            if self.hooks is None:
                self.hooks = NotifyHooks(config.notify, self.me, config.notify_timeout_s, bound)
            else:
                self.hooks.reconfigure(config.notify, config.notify_timeout_s, bound)
            if not self._hooks_on:
                self._hooks_on = True
                self._announced = None  # a hook turned on hears where this node stands now
                if hasattr(self, "node"):
                    self._announce(())
        after = f"{self.hooks.path} ({self.hooks.timeout_s:g} s)" if self.hooks and self._hooks_on else "off"
        return None if after == before else f"notify {before} -> {after}"

    def _announce(self, events: Sequence[Event]) -> None:
        # the hook's event for this Ready, if one fires (runtime/hooks.py: the rule); never raises
        if self.hooks is None or not self._hooks_on:
            return
        try:
            announcement = hook_event_for(self._announced, self.node.status(), events)
        except Exception:  # a bug of ours in an advisory path: logged, and the core goes on
            log_exception(log, "hook_internal_error", where="hook_event_for")
            return
        if announcement is not None:
            self._announced = announcement
            self.hooks.notify(announcement.event, announcement.term, announcement.master)

    # ------------------------------------------------------------------ the script

    def _script_env(self, token: int) -> dict[str, str]:
        env = dict(os.environ)
        env["PYQUORUM_TERM"] = str(token)
        env["PYQUORUM_NODE"] = self.me
        env["PYQUORUM_CLUSTER"] = ",".join(self.members)
        return env

    def _start_script(self, action: StartScript) -> None:
        if self.supervisor is None:
            # no script configured: the core's bookkeeping still needs a "stopped" eventually,
            # which comes when it asks us to stop; the timeline counts the role as the script's run
            self.handover.log.record("script_started", action.token, time.monotonic())
            return
        now = time.monotonic()
        # The run exists from this call on: a stop the core asks for before the script has started
        # is the supervisor's to remember and carry out. It raises RuntimeError only if a run is in
        # progress, which the core never asks for (it starts only after script_stopped, which
        # comes only once the supervisor's run is over): _process treats that as our own bug.
        starting = self.supervisor.start(action.kill_deadline, self._script_env(action.token))
        task = asyncio.get_running_loop().create_task(self._until_started(action, starting))
        self._run = _ScriptRun(action.token, now, task)
        self._starts += 1
        if self._last_token == action.token:
            self._restarts += 1  # the same term's script again: the restart policy's doing
        self._last_token = action.token

    async def _until_started(self, action: StartScript, starting: Awaitable[None]) -> None:
        try:
            await starting
        except ScriptStartError as exc:
            log_event(log, logging.ERROR, "script_start_failed", term=action.token, error=str(exc))
            self._run = None
            now = time.monotonic()
            self._record_exit("start_failed", now, error=str(exc))
            decision = self.restart_policy.start_failed(
                now, run_term=action.token, term=self.node.term, is_master=self.node.role is Role.MASTER
            )
            self._apply(decision, now, action.token, f"could not start: {exc}")
            return
        except Exception as exc:  # our own bug: fail safe, as _process does
            log_exception(log, "internal_error")
            self._fail(exc)
            return
        if self._run is not None and self._run.token == action.token:
            self._run.started_at = time.monotonic()
            self.handover.log.record("script_started", action.token, self._run.started_at)
        self._note_state()

    def _stop_script(self, deadline: float, reason: str) -> None:
        if self.supervisor is None:
            # Nothing runs: report the (virtual) script reaped, but after this Ready is carried out,
            # since what the core says in reply belongs to the next Ready.
            asyncio.get_running_loop().call_soon(self._virtual_script_stopped)
            return
        self.supervisor.stop(deadline)  # also during the start: the supervisor remembers it

    def _virtual_script_stopped(self) -> None:
        self.handover.log.record("script_stopped", self.node.term, time.monotonic())
        self.node.script_stopped(time.monotonic())
        self._process()

    def _on_script_exit(self, exit_: ScriptExit) -> None:
        now = time.monotonic()
        run, self._run = self._run, None
        # from the start request, as the restart policy's window counts it
        ran_for = now - run.asked_at if run is not None else 0.0
        self._record_exit(_exit_reason(exit_), now, exit_.returncode, exit_.error)
        if run is not None and run.started_at is not None:
            self.handover.log.record("script_stopped", run.token, exit_.reaped_at)
        if exit_.requested or run is None or self.node.role is not Role.MASTER or self.node.leaving:
            log_event(
                log,
                logging.INFO,
                "script_stopped",
                term=run.token if run else None,
                returncode=exit_.returncode,
                ran_for_s=round(ran_for, 3),
            )
            self.node.script_stopped(now)
            self._process()
            self._note_state()
            return
        decision = self.restart_policy.ended(
            now,
            run_term=run.token,
            term=self.node.term,
            is_master=True,
            returncode=exit_.returncode,
            ran_for_s=ran_for,
        )
        what = f"returncode={exit_.returncode}" + (f" error={exit_.error}" if exit_.error else "")
        self._apply(decision, now, run.token, f"exited {what} after {ran_for:.3f}s")

    def _record_exit(
        self, reason: str, now: float, returncode: int | None = None, error: str | None = None
    ) -> None:
        self.counters.on_script_exit(reason)
        sig = None
        if returncode is not None and returncode < 0:
            try:
                sig = signal.Signals(-returncode).name
            except ValueError:
                sig = str(-returncode)
        self._last_exit = {
            "code": returncode if returncode is not None and returncode >= 0 else None,
            "signal": sig,
            "reason": reason,
            "error": error,
            "at": now,
        }

    def _apply(self, decision: Decision, now: float, run_term: int, what: str) -> None:
        """Carry out the restart policy's answer for a run of ``run_term`` that ended by itself."""
        cfg, term = self.config, self.node.term

        def report(level: int, event: str, **fields: Value) -> None:
            # an answer for a run of this term: how the run ended and the action, then the answer's own fields
            log_event(log, level, event, term=term, how=what, action=decision.action.value, **fields)

        if decision.action is Action.IGNORE:
            # protocol.md §3.7: a run of an earlier term says nothing about the role we hold now
            log_event(
                log, logging.INFO, "script_ended", term=term, run_term=run_term, how=what, why=decision.why
            )
            self.node.script_stopped(now)
        elif decision.action is Action.LEAVE:
            report(
                logging.WARNING,
                "script_exited",
                why=decision.why,
                hint="not restarted; this node stays master",
            )
            self.node.script_stopped(now, restart_after=None)
        elif decision.action is Action.RESIGN:
            report(
                logging.ERROR,
                "script_failing",
                failures=decision.failures,
                why=decision.why,
                hint="resigning so another node can try",
            )
            self.node.script_stopped(now, restart_after=None)
            self.node.resign(now, "script keeps failing")  # a no-op unless master (protocol.md §3.7)
        else:
            report(
                logging.WARNING,
                "script_exited",
                restart_in_s=decision.delay_s,
                failures=decision.failures,
                max_failures=cfg.max_failures,
                window_s=cfg.failure_window_s,
            )
            self.node.script_stopped(now, restart_after=decision.delay_s)
        self._process()
        self._note_state()

    # ------------------------------------------------------------------ status

    def snapshot(self) -> Snapshot:
        """The node now: what status.json, the control socket, /status and /metrics all read."""
        now = time.monotonic()
        node = self.node
        peers = peer_statuses(node, self.counters, now)
        keyring = self.udp.endpoint.keyring if self.udp is not None else None
        lease_ends = node.lease_ends_at()
        sup = self.supervisor
        pid = sup.pid if sup is not None else None
        deadline = sup.deadline if sup is not None and pid is not None else None
        run = self._run
        last_exit = None
        if self._last_exit is not None:
            last_exit = {k: v for k, v in self._last_exit.items() if k != "at"}
            last_exit["ago_s"] = round(now - self._last_exit["at"], 3)
        rejected = self.udp.endpoint.rejected.as_dict() if self.udp is not None else {}
        return Snapshot(
            version=__version__,
            pid=os.getpid(),
            node=self.me,
            uptime_s=now - self.started_at,
            members=self.members,
            quorum=node.quorum,
            role="stopped" if self._stopped else node.role.value,
            term=node.term,
            master=fresh_master(node, now),
            has_quorum=sum(1 for p in peers if p.reachable) >= node.quorum,
            recovering=node.recovering,
            authenticated=keyring is not None,
            send_key_id=keyring.send_key_id if keyring is not None else None,
            key_ids=tuple(sorted(keyring.keys)) if keyring is not None else (),
            lease_remaining_s=None if lease_ends is None else max(0.0, lease_ends - now),
            kill_deadline_remaining_s=None if deadline is None else deadline - now,
            loop_lag_s=self.last_lag_s,
            loop_on_time=self.on_time(now),
            peers=peers,
            script=ScriptStatus(
                path=self.config.script,
                running=pid is not None,
                pid=pid,
                uptime_s=None
                if pid is None or run is None or run.started_at is None
                else now - run.started_at,
                starts=self._starts,
                restarts=self._restarts,
                last_exit=last_exit,
            ),
            datagrams_sent={DATAGRAM_TYPES[t]: n for t, n in self.counters.sent.items()},
            datagrams_received={DATAGRAM_TYPES[t]: n for t, n in self.counters.received.items()},
            datagrams_rejected=rejected,
            role_changes=dict(self.counters.role_changes),
            elections=dict(self.counters.elections),
            script_exits=dict(self.counters.script_exits),
            election_histogram=tuple(self.counters.election_histogram()),
            election_sum_s=self.counters.election_sum_s,
            hooks=self._hook_status(),
            taken_at=now,
        )

    def _hook_status(self) -> HookStatus | None:
        hooks = self.hooks
        if hooks is None or not self._hooks_on:
            return None
        last = hooks.last
        return HookStatus(
            path=hooks.path,
            timeout_s=hooks.timeout_s,
            seq=hooks.seq,
            last_event=None if last is None else last[1],
            last_term=None if last is None else last[2],
            last_master=None if last is None else last[3],
            pending=hooks.pending,
            running_pid=hooks.running_pid,
            delivered=hooks.delivered,
            failed=hooks.failed,
            timed_out=hooks.timed_out,
            dropped=hooks.dropped,
        )

    def _note_state(self) -> None:
        """After anything that may change the role, term, master, script or signing key: if one
        did, rewrite status.json from a snapshot. Nothing else rewrites it: it costs nothing while
        the cluster is steady (the counters and live facts are the control socket's)."""
        node = self.node
        keyring = self.udp.endpoint.keyring if self.udp is not None else None
        key = (
            self._stopped,
            node.role,
            node.term,
            node.master,
            self.supervisor.pid if self.supervisor is not None else None,
            keyring.send_key_id if keyring is not None else None,
        )
        if key == self._state_key:
            return
        self._state_key = key
        snap = self.snapshot()
        if self._notify_status and not self._reload_lock.locked():
            self.notifier.status(status_text(snap.role, snap.term, snap.master))
        try:
            write_status(self.store.status_file, status_file_doc(snap))
        except OSError as exc:
            log_event(log, logging.DEBUG, "status_write_failed", error=str(exc))


Command = Callable[[Daemon, Mapping[str, Any]], Awaitable[Any]]
COMMANDS: dict[str, Command] = {}
"""The control socket's commands (runtime/control.py): name -> ``async def(daemon, args)``, whose
return value is the answer's ``result``; raise ``control.CommandFailed`` for an error answer."""


def command(name: str) -> Callable[[Command], Command]:
    """Register a control socket command: one function each."""

    def register(fn: Command) -> Command:
        COMMANDS[name] = fn
        return fn

    return register


@command("status")
async def _status_command(daemon: Daemon, args: Mapping[str, Any]) -> Any:
    """The ``api_version`` 1 status document (docs/operations.md)."""
    return daemon.snapshot().to_json()


@command("reload")
async def _reload_command(daemon: Daemon, args: Mapping[str, Any]) -> Any:
    """Re-read the configuration; answered once applied or refused."""
    return await daemon.reload("control socket")


@command("commands")
async def _commands_command(daemon: Daemon, args: Mapping[str, Any]) -> Any:
    """The names of the commands, with their one-line descriptions."""
    return {name: (fn.__doc__ or "").strip().split("\n")[0] for name, fn in sorted(COMMANDS.items())}


@command("step-down")
async def _step_down_command(daemon: Daemon, args: Mapping[str, Any]) -> Any:
    """Ask the master to hand over, to args.to if given; answered with its decision (§3.10)."""
    to = args.get("to") or ""
    if not isinstance(to, str) or (to and to not in daemon.members):
        raise CommandFailed(f"'to' must be a member ({', '.join(daemon.members)}), not {to!r}")
    return await daemon.step_down(to, _seconds_arg(args, "timeout_s", 2.0))


@command("timeline")
async def _timeline_command(daemon: Daemon, args: Mapping[str, Any]) -> Any:
    """A member's role, term and recent transitions, on this host's monotonic clock."""
    return await daemon.handover.timeline(_member_arg(daemon, args))


@command("silence")
async def _silence_command(daemon: Daemon, args: Mapping[str, Any]) -> Any:
    """Make a member drop every datagram for args.duration_s, as if it had died (a drill)."""
    return await daemon.handover.silence(_member_arg(daemon, args), _seconds_arg(args, "duration_s", 0.0))


def _member_arg(daemon: Daemon, args: Mapping[str, Any]) -> str:
    node = args.get("node") or daemon.me
    if not isinstance(node, str) or node not in daemon.members:
        raise CommandFailed(f"'node' must be a member ({', '.join(daemon.members)}), not {node!r}")
    return node


def _seconds_arg(args: Mapping[str, Any], name: str, default: float) -> float:
    value = args.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 3600:
        raise CommandFailed(f"{name!r} must be a number of seconds from 0 to 3600, not {value!r}")
    return float(value)


def _bind(daemon: Daemon, fn: Command) -> Callable[[Mapping[str, Any]], Awaitable[Any]]:
    async def handler(args: Mapping[str, Any]) -> Any:
        return await fn(daemon, args)

    return handler


def status_file_doc(snap: Snapshot) -> dict[str, Any]:
    """The status.json contract (``runtime.storage.STATUS_KEYS``), from a snapshot."""
    return {
        "node": snap.node,
        "role": snap.role,
        "term": snap.term,
        "master": snap.master,
        "script_pid": snap.script.pid,
        "authenticated": snap.authenticated,
        "send_key_id": snap.send_key_id,
        "members": list(snap.members),
        "updated_monotonic": snap.taken_at,
        "pid": snap.pid,
    }


def _exit_reason(exit_: ScriptExit) -> str:
    if exit_.requested:
        return "requested"
    if exit_.returncode is None:
        return "lost"
    if exit_.returncode < 0:
        return "signal"
    return "success" if exit_.returncode == 0 else "failure"


def _restart_policy(config: Config) -> RestartPolicy:
    return RestartPolicy(
        config.restart,
        backoff_s=config.restart_backoff_s,
        backoff_max_s=config.restart_backoff_max_s,
        max_failures=config.max_failures,
        window_s=config.failure_window_s,
    )


# The core's events an operator should see at the default level (WARNING): losing mastership against
# our will, elections that fail, a peer that claims our role, the end of a recovery (protocol.md §3.9).
_EVENT_LEVELS = {
    EventKind.STEPPED_DOWN: logging.WARNING,
    EventKind.ELECTION_FAILED: logging.WARNING,
    EventKind.IGNORED_MASTER: logging.WARNING,
    EventKind.RECOVERED: logging.WARNING,
}


def log_core_event(logger: logging.Logger, ev: Event) -> None:
    """One line for a core event: ``event=<kind> term=<t> <its fields>``, the fields as fields
    (JSON gets them typed). Seconds are rounded to the millisecond, as the core's own text does."""
    level = _EVENT_LEVELS.get(ev.kind, logging.INFO)
    if not logger.isEnabledFor(level):
        return
    fields: dict[str, Value] = {"term": ev.term}
    for name, value in ev.fields:
        # a field name the log format reserves gets a trailing underscore: never a crash over a name
        key = f"{name}_" if name in RESERVED_FIELDS else name
        if isinstance(value, float):
            fields[key] = round(value, 3)
        elif value is None or isinstance(value, (str, int, bool)):
            fields[key] = value
        else:
            fields[key] = str(value)
    log_event(logger, level, ev.kind.value, **fields)


def run(config: Config, argv: Sequence[str] | None = None) -> int:
    """Run one node until it is stopped. Returns the process exit code (0 clean, 1 fatal, 2 config).
    ``argv``: the command line it came from, which a reload reads again."""
    for peer in config.peers:
        if peer.ip.version != config.me.ip.version:
            raise ConfigError(
                [
                    f"peer {peer} is IPv{peer.ip.version} but -b {config.me.ip} is "
                    f"IPv{config.me.ip.version}: all members must use the same IP version"
                ]
            )
    return asyncio.run(Daemon(config, argv).main())
