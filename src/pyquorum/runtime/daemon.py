"""The asyncio shell around the election core: one UDP socket, a ticker, the script supervisor.

What this module owns
---------------------
Sockets, the monotonic clock, the state directory, signals, the script's supervisor and the logs. Every
protocol decision is the core's (``pyquorum.core.node``); this module carries out its ``Ready`` in the
order the core's docstring prescribes: persist (fsync), send, act on the script, log, ``advance()``.

Whose fault is it
-----------------
A datagram that does not decode, is stale, replayed, from another cluster or from a stranger is a
peer's fault: ``pyquorum.wire.Endpoint.receive`` refuses and counts it per reason (``status.json``
shows the counters), and this module logs it at a rate limit, never a crash; a peer refused for
longer than ``REFUSED_WARN_AFTER_S`` is a WARNING. A broken invariant of the core is ours: it stops
the script and the daemon. The datagram path, hop by hop, is listed in ``pyquorum.wire.endpoint``.

Time
----
``time.monotonic()`` is CLOCK_MONOTONIC on Linux: it never jumps and keeps running while the process
is stopped, which is what the lease arithmetic needs (protocol.md §3.2). The guard process that holds
the script's kill deadline reads the same clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import signal
import socket
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from typing import Any

from pyquorum import __version__
from pyquorum.config import Config
from pyquorum.core.errors import ConfigError
from pyquorum.core.messages import Message
from pyquorum.core.node import EventKind, HardState, Node, Ready, Role, StartScript
from pyquorum.keyfile import load_keyring
from pyquorum.runtime.restart import Action, Decision, RestartPolicy
from pyquorum.runtime.storage import PersistedState, StateStore, member_change_problem, write_status
from pyquorum.supervisor import ScriptExit, ScriptStartError, ScriptSupervisor
from pyquorum.wire import (
    ClusterInfo,
    Deliver,
    Endpoint,
    Foreign,
    Handshake,
    Hello,
    KeyRing,
    Reject,
    cluster_fingerprint,
)

log = logging.getLogger("pyquorum")

# (asyncio receives into a 256 KiB buffer: an oversized datagram arrives whole and is counted as
# "too-large" by the codec, never truncated into something that might parse.)
# At most one log line per reason per this many seconds for rejected datagrams (an attacker must not
# be able to fill the disk); the counters in status.json are exact.
REJECT_LOG_INTERVAL_S = 10.0
# How long a planned shutdown may take beyond the script's own stop grace before we give up waiting.
SHUTDOWN_SLACK_S = 2.0
# status.json is rewritten at once when the role, term, master or script changes, and otherwise at
# most this often: its counters (received, sent, rejected) and lease stay current while traffic
# flows, and a flood of datagrams does not become a flood of file writes (a rewrite costs ~0.2 ms).
STATUS_REFRESH_S = 0.5
# A peer whose datagrams have all been refused for this long (none accepted meanwhile, no silence
# longer than this in between) is logged as a WARNING naming it and the reason. A (re)start's
# handshake refuses one datagram each way ("bad-echo", one heartbeat interval apart at most), and a
# restarted peer's last datagrams in flight are "stale-epoch" for milliseconds: both stay at debug.
REFUSED_WARN_AFTER_S = 3.0


class _RateLimiter:
    """At most one event per key per interval; counts what it suppressed."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def allow(self, key: str, now: float) -> int | None:
        """None if suppressed; else how many were suppressed since the last allowed one."""
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] += 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)


class _RefusedPeers:
    """For how long each peer's datagrams have been refused without one accepted (monotonic s).

    A refusal after a silence longer than ``after_s`` starts a new episode, so one first-contact
    refusal after a long silence is not mistaken for a long refusal.
    """

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self._episodes: dict[str, tuple[float, float]] = {}  # peer -> (first, last) refusal
        self.warned: set[str] = set()

    def refused(self, peer: str, now: float) -> float:
        """Record one refusal of ``peer``'s datagram; return how long its refusals have lasted."""
        first, last = self._episodes.get(peer, (now, now))
        if now - last > self.after_s:
            first = now
        self._episodes[peer] = (first, now)
        return now - first

    def accepted(self, peer: str, now: float) -> float | None:
        """Record an accepted datagram; if ``peer`` had been warned about, return for how long it
        was refused (the caller logs the recovery), else None."""
        episode = self._episodes.pop(peer, None)
        if peer in self.warned:
            self.warned.discard(peer)
            return now - episode[0] if episode is not None else 0.0
        return None


@dataclass
class _ScriptRun:
    token: int
    started_at: float
    task: asyncio.Task[None]


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.daemon.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a peer that is down: normal, and not worth more than debug
        log.debug("event=socket_error error=%s", exc)


class Daemon:
    """One pyquorum node. ``await Daemon(config).main()`` runs it until a signal stops it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.me = config.node_id
        self.members = tuple(config.members)
        self.timing = config.timing
        self.store = StateStore(config.state_dir)
        # the key id of each peer's last accepted datagram: shows who still signs with an old key
        # during a rotation (docs/security.md §6); one entry per member at most
        self.peer_key_ids: dict[str, int] = {}
        self.received = 0
        self.sent = 0
        self._reject_log = _RateLimiter(REJECT_LOG_INTERVAL_S)
        self._info_sent = _RateLimiter(REJECT_LOG_INTERVAL_S)
        self._refused = _RefusedPeers(REFUSED_WARN_AFTER_S)
        self._wake = asyncio.Event()
        self._finished = asyncio.Event()
        self._run: _ScriptRun | None = None
        self.restart_policy = RestartPolicy(
            config.restart,
            backoff_s=config.restart_backoff_s,
            backoff_max_s=config.restart_backoff_max_s,
            max_failures=config.max_failures,
            window_s=config.failure_window_s,
        )
        self._signals = 0
        self._last_status: tuple[object, ...] | None = None
        self._status_written = float("-inf")
        self.epoch = 0
        self.endpoint: Endpoint | None = None
        self.node: Node
        self.transport: asyncio.DatagramTransport | None = None
        self.supervisor: ScriptSupervisor | None = None
        self._fatal: BaseException | None = None

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

    async def _open_socket(self) -> None:
        loop = asyncio.get_running_loop()
        ip = self.config.me.ip
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(self), local_addr=(str(ip), self.config.me.port), family=family
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    [f"UDP port {self.me} is already in use (another pyquorum node?): stop it or use -p"]
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ConfigError([f"-b {ip} is not an address of this host"]) from None
            raise ConfigError([f"cannot bind UDP {self.me}: {exc.strerror or exc}"]) from None
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)

    async def main(self) -> int:
        """Run until SIGTERM/SIGINT (exit 0 after a clean handover) or a fatal error."""
        state = self._open_state()
        try:
            keyring = self._load_keys()
            self.endpoint = self._make_endpoint(keyring)
            await self._open_socket()
            now = time.monotonic()
            self.node = Node(
                self.me,
                self.members,
                self.timing,
                now=now,
                rng=random.Random(int.from_bytes(os.urandom(8), "big")),
                hard_state=HardState(state.term, state.voted_for, state.promise_s, state.recovering),
                priorities=dict(self.config.priorities),
                witnesses=frozenset(self.config.witnesses),
                preempt_after_s=self.config.preempt_after_s,
            )
            if self.config.script and not self.config.is_witness:  # a witness never runs it (§3.11)
                self.supervisor = ScriptSupervisor(
                    [self.config.script],
                    stop_timeout_s=self.timing.stop_timeout_s,
                    kill_margin_s=self.timing.kill_margin_s,
                    on_exit=self._on_script_exit,
                    logger=logging.getLogger("pyquorum.script"),
                )
                await self.supervisor.prepare()  # a standby guard: the first start is fast too
            self._install_signals()
            log.info(
                "event=started version=%s node=%s members=%s term=%d boot_epoch=%d authenticated=%s "
                "script=%s %s",
                __version__,
                self.me,
                ",".join(self.members),
                state.term,
                self.epoch,
                "yes" if keyring else "NO",
                self.config.script or "-",
                self.timing.describe(),
            )
            if state.recovering:
                log.warning(
                    "event=recovering term=%d: no state file in %s (a new node, or its state was lost): "
                    "it may have voted before, so it grants no vote and does not campaign until it has "
                    "heard the current term of every member (docs/protocol.md §3.9); it follows a master "
                    "meanwhile. For a brand-new cluster with members not yet running, see 'pyquorum init'",
                    state.term,
                    self.store.state_dir,
                )
            if keyring is None:
                log.warning(
                    "cluster traffic is UNAUTHENTICATED: anyone who can send UDP to %s can disrupt "
                    "elections; create a key with 'pyquorum keygen' and use --key-file",
                    self.me,
                )
            self._write_status(force=True)
            ticker = asyncio.create_task(self._ticker())
            try:
                await self._finished.wait()
            finally:
                self._finished.set()
                self._wake.set()
                try:
                    await asyncio.wait_for(ticker, self.timing.heartbeat_interval_s + 1.0)
                except (asyncio.TimeoutError, asyncio.CancelledError):
                    ticker.cancel()
        finally:
            await self._cleanup()
        if self._fatal is not None:
            log.critical("event=fatal error=%r: stopped the script and the daemon", self._fatal)
            return 1
        return 0

    async def _cleanup(self) -> None:
        if self.supervisor is not None:
            await self.supervisor.aclose(timeout=self.timing.stop_timeout_s + 1.0)
        if self._run is not None:
            self._run.task.cancel()
        if self.transport is not None:
            self.transport.close()
        with contextlib.suppress(Exception):
            self._write_status(force=True, role="stopped")
        self.store.release()

    # ------------------------------------------------------------------ signals

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals > 1:
            # uvicorn's rule: a second signal forces the exit; the guard still stops the script
            log.warning("event=forced_exit signal=%s: not waiting for a handover", sig.name)
            self._finished.set()
            return
        log.info(
            "event=shutdown_requested signal=%s term=%d role=%s",
            sig.name,
            self.node.term,
            self.node.role.value,
        )
        self.node.shutdown(time.monotonic())
        self._process()
        loop = asyncio.get_running_loop()
        limit = self.timing.stop_timeout_s + self.timing.kill_margin_s + SHUTDOWN_SLACK_S
        loop.call_later(limit, self._shutdown_overdue)

    def _shutdown_overdue(self) -> None:
        if not self._finished.is_set():
            log.error("event=shutdown_overdue: the script did not stop in time; exiting anyway")
            self._finished.set()

    def _on_reload(self) -> None:
        """SIGHUP: re-read the key file (docs/security.md: key rotation)."""
        try:
            keyring = self._load_keys()
        except ConfigError as exc:
            log.error("event=reload_failed keeping the old keys: %s", "; ".join(exc.problems))
            return
        assert self.endpoint is not None  # SIGHUP is handled only once the endpoint exists
        self.endpoint.set_keyring(keyring)  # keeps the replay state: no handshake, no election
        log.warning("event=keys_reloaded keys=%r", keyring)  # ids only, never key bytes
        self._write_status(force=True)

    # ------------------------------------------------------------------ the core's inputs

    async def _ticker(self) -> None:
        h = self.timing.heartbeat_interval_s
        loop = asyncio.get_running_loop()
        # Ends by checking the flag, not by cancellation: on Python < 3.12 a wait_for() that
        # completes as it is cancelled swallows the cancellation (CPython gh-86296).
        while not self._finished.is_set():
            delay = self.node.next_wakeup() - time.monotonic()
            self._wake.clear()
            # always yield, even when a tick is overdue: the loop must never starve. A timer that
            # sets the event, not wait_for(): no task to create and cancel on every tick, which
            # was a sixth of an idle daemon's CPU time.
            timer = loop.call_later(max(0.0, min(delay, h)), self._wake.set)
            try:
                await self._wake.wait()
            finally:
                timer.cancel()
            if self._finished.is_set():
                return
            self.node.tick(time.monotonic())
            self._process()

    def on_datagram(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """One datagram from the socket: the endpoint decides, the core steps what it delivers."""
        self.received += 1
        assert self.endpoint is not None  # the socket opens after the endpoint exists
        source = (str(addr[0]), int(addr[1]))
        result = self.endpoint.receive(data, source)
        if isinstance(result, Deliver):
            self._on_accepted(result.sender)
            self.peer_key_ids[result.sender] = result.key_id
            self.node.step(result.sender, result.message, time.monotonic())
            self._process()
        elif isinstance(result, Foreign):
            self._cluster_mismatch(result.sender, result.message)
            self._write_status()
        elif isinstance(result, Handshake):
            self._on_accepted(result.sender)  # its epoch is known now (protocol.md §3.2)
        else:
            if result.reply is not None and self.transport is not None:
                self.sent += 1
                self.transport.sendto(result.reply.data, result.reply.address)
            self._reject(result, source)

    def _reject(self, rej: Reject, source: tuple[str, int]) -> None:
        # counted by the endpoint already; here only the logs
        assert self.endpoint is not None
        now = time.monotonic()
        suppressed = self._reject_log.allow(rej.reason, now)
        if suppressed is not None:
            log.log(
                logging.DEBUG if rej.reason in _ROUTINE_REJECTS else logging.WARNING,
                "event=datagram_rejected reason=%s source=%s detail=%s count=%d suppressed_since_last=%d",
                rej.reason,
                source[0],
                rej.detail[:200],
                self.endpoint.rejected[rej.reason],
                suppressed,
            )
        # the member it names, or else the member configured at its source (to name it, not to trust it)
        peer = rej.sender or self.endpoint.member_at(source)
        if peer is not None and peer != self.me:
            refused_for = self._refused.refused(peer, now)
            lasting = refused_for >= REFUSED_WARN_AFTER_S
            if lasting and self._reject_log.allow(f"refused:{peer}", now) is not None:
                self._refused.warned.add(peer)
                log.warning(
                    "event=peer_refused peer=%s reason=%s refused_for_s=%.1f detail=%s: no datagram from "
                    "this peer was accepted meanwhile%s",
                    peer,
                    rej.reason,
                    refused_for,
                    rej.detail[:200],
                    _REFUSED_HINTS.get(rej.reason, ""),
                )
        self._write_status()

    def _on_accepted(self, peer: str) -> None:
        refused_for = self._refused.accepted(peer, time.monotonic())
        if refused_for is not None:
            # at the level of the warning it ends, so that whoever saw one sees the other
            log.warning("event=peer_accepted peer=%s after_refused_s=%.1f", peer, refused_for)

    def _cluster_mismatch(self, sender: str, msg: Message | ClusterInfo | Hello) -> None:
        # counted ("cluster-mismatch") by the endpoint already; here the reports and the answer
        now = time.monotonic()
        if isinstance(msg, ClusterInfo):
            if self._reject_log.allow(f"info:{sender}", now) is not None:
                log.error(
                    "event=cluster_mismatch peer=%s theirs: members=%s timing=[%s] ours: members=%s "
                    "timing=[%s]: every node must be given the same servers and timing options",
                    sender,
                    ",".join(msg.members),
                    msg.timing,
                    ",".join(self.members),
                    self._timing_text(),
                )
            return
        if self._reject_log.allow(f"mismatch:{sender}", now) is not None:
            log.error(
                "event=cluster_mismatch peer=%s sent a different cluster fingerprint; ours: members=%s "
                "timing=[%s] (its own list follows when it gets ours)",
                sender,
                ",".join(self.members),
                self._timing_text(),
            )
        if self._info_sent.allow(sender, now) is not None:
            self._send(sender, ClusterInfo(self.members, self._timing_text()))

    def _timing_text(self) -> str:
        lines = self.config.cluster_text.splitlines()
        return " ".join(line for line in lines if "=" in line and not line.startswith("members="))

    # ------------------------------------------------------------------ the core's outputs

    def _process(self) -> None:
        """Carry out the core's Ready: persist, send, script, log, advance (core/node.py)."""
        if self._fatal is not None:
            return
        try:
            rd = self.node.ready()
            if rd.empty() and not rd.finished:
                self.node.advance(rd)
                return
            self._carry_out(rd)
            self.node.advance(rd)
        except Exception as exc:  # our own bug or an unwritable disk: fail safe
            log.exception("event=internal_error")
            self._fatal = exc
            self._finished.set()
            return
        if rd.finished:
            self._finished.set()
        self._wake.set()

    def _carry_out(self, rd: Ready) -> None:
        if rd.hard_state is not None:
            # protocol.md §3.4: durable BEFORE any message of this Ready leaves
            hs = rd.hard_state
            self.store.save(
                PersistedState(hs.term, hs.voted_for, self.epoch, hs.promise_s, hs.recovering, self.members)
            )
        for dest, msg in rd.messages:
            self._send(dest, msg)
        for action in rd.script:
            if isinstance(action, StartScript):
                self._start_script(action)
            else:
                self._stop_script(action.kill_deadline, action.reason)
        if rd.kill_deadline is not None and self.supervisor is not None:
            self.supervisor.renew(rd.kill_deadline)
        for ev in rd.events:
            log.log(_EVENT_LEVELS.get(ev.kind, logging.INFO), "%s", ev)
        self._write_status()

    def _send(self, dest: str, msg: Message | ClusterInfo) -> None:
        if self.transport is None or self.endpoint is None:
            return
        datagram = self.endpoint.send(dest, msg)  # to dest's configured address, never a source
        self.sent += 1
        self.transport.sendto(datagram.data, datagram.address)

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
            # which comes when it asks us to stop
            return
        now = time.monotonic()
        # The run exists from this call on: a stop the core asks for before the script has started
        # is the supervisor's to remember and carry out. It raises RuntimeError only if a run is in
        # progress, which the core never asks for (it starts only after script_stopped, which
        # comes only once the supervisor's run is over): _process treats that as our own bug.
        starting = self.supervisor.start(action.kill_deadline, self._script_env(action.token))
        task = asyncio.get_running_loop().create_task(self._start(action, starting))
        self._run = _ScriptRun(action.token, now, task)

    async def _start(self, action: StartScript, starting: Awaitable[None]) -> None:
        try:
            await starting
        except ScriptStartError as exc:
            log.error("event=script_start_failed term=%d error=%s", action.token, exc)
            self._run = None
            now = time.monotonic()
            decision = self.restart_policy.start_failed(
                now, run_term=action.token, term=self.node.term, is_master=self.node.role is Role.MASTER
            )
            self._apply(decision, now, action.token, f"could not start: {exc}")
            return
        except Exception as exc:  # our own bug: fail safe, as _process does
            log.exception("event=internal_error")
            self._fatal = exc
            self._finished.set()
            return
        self._write_status(force=True)

    def _stop_script(self, deadline: float, reason: str) -> None:
        if self.supervisor is None:
            # Nothing runs: report the (virtual) script reaped, but after this Ready is carried out,
            # since what the core says in reply belongs to the next Ready.
            asyncio.get_running_loop().call_soon(self._virtual_script_stopped)
            return
        self.supervisor.stop(deadline)  # also during the start: the supervisor remembers it

    def _virtual_script_stopped(self) -> None:
        self.node.script_stopped(time.monotonic())
        self._process()

    def _on_script_exit(self, exit_: ScriptExit) -> None:
        now = time.monotonic()
        run, self._run = self._run, None
        ran_for = now - run.started_at if run is not None else 0.0
        if exit_.requested or run is None or self.node.role is not Role.MASTER or self.node.leaving:
            log.info(
                "event=script_stopped term=%s returncode=%s ran_for=%.3fs",
                run.token if run else "?",
                exit_.returncode,
                ran_for,
            )
            self.node.script_stopped(now)
            self._process()
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

    def _apply(self, decision: Decision, now: float, run_term: int, what: str) -> None:
        """Carry out the restart policy's answer for a run of ``run_term`` that ended by itself."""
        cfg, term = self.config, self.node.term
        if decision.action is Action.IGNORE:
            # protocol.md §3.7: a run of an earlier term says nothing about the role we hold now
            log.info("event=script_ended term=%d run_term=%d %s: %s", term, run_term, what, decision.why)
            self.node.script_stopped(now)
        elif decision.action is Action.LEAVE:
            log.warning(
                "event=script_exited term=%d %s: not restarted (%s); this node stays master",
                term,
                what,
                decision.why,
            )
            self.node.script_stopped(now, restart_after=None)
        elif decision.action is Action.RESIGN:
            log.error(
                "event=script_failing term=%d %s: %s, resigning so another node can try",
                term,
                what,
                decision.why,
            )
            self.node.script_stopped(now, restart_after=None)
            self.node.resign(now, "script keeps failing")  # a no-op unless master (protocol.md §3.7)
        else:
            log.warning(
                "event=script_exited term=%d %s: restarting in %.1fs (failure %d of %d allowed in %.0fs)",
                term,
                what,
                decision.delay_s,
                decision.failures,
                cfg.max_failures,
                cfg.failure_window_s,
            )
            self.node.script_stopped(now, restart_after=decision.delay_s)
        self._process()

    # ------------------------------------------------------------------ status

    def _write_status(self, *, force: bool = False, role: str | None = None) -> None:
        st = self.node.status() if hasattr(self, "node") else None
        pid = self.supervisor.pid if self.supervisor is not None else None
        key = (
            role,
            st.role if st else None,
            st.term if st else None,
            st.master if st else None,
            pid,
        )
        now = time.monotonic()
        if not force and key == self._last_status and now - self._status_written < STATUS_REFRESH_S:
            return
        self._last_status = key
        self._status_written = now
        lease = None if st is None or st.lease_deadline is None else round(st.lease_deadline - now, 3)
        keyring = self.endpoint.keyring if self.endpoint is not None else None
        status: dict[str, Any] = {
            "node": self.me,
            "role": role or (st.role.value if st else "starting"),
            "term": st.term if st else 0,
            "master": st.master if st else None,
            "script_pid": pid,
            "lease_remaining_s": lease,
            "authenticated": keyring is not None,
            "send_key_id": keyring.send_key_id if keyring is not None else None,
            "peer_key_ids": dict(sorted(self.peer_key_ids.items())),
            "updated_monotonic": now,
            "pid": os.getpid(),
            "members": list(self.members),
            "received": self.received,
            "sent": self.sent,
            "rejected": self.endpoint.rejected.as_dict() if self.endpoint is not None else {},
        }
        try:
            write_status(self.store.status_file, status)
        except OSError as exc:
            log.debug("event=status_write_failed error=%s", exc)


# The core's events an operator should see at the default level (WARNING): losing mastership against
# our will, elections that fail, a peer that claims our role, the end of a recovery (protocol.md §3.9).
_EVENT_LEVELS = {
    EventKind.STEPPED_DOWN: logging.WARNING,
    EventKind.ELECTION_FAILED: logging.WARNING,
    EventKind.IGNORED_MASTER: logging.WARNING,
    EventKind.RECOVERED: logging.WARNING,
}


# Rejections that happen in a healthy cluster (first contact before the epoch handshake, a peer's
# restart, duplicated datagrams): counted, logged at debug level only, unless they last
# (REFUSED_WARN_AFTER_S).
_ROUTINE_REJECTS = frozenset({"bad-echo", "stale-epoch", "replayed", "too-old"})

# What a lasting refusal most likely means, appended to the peer_refused warning (docs/security.md §5).
_REFUSED_HINTS = {
    "stale-epoch": (
        "; it sends from an older boot epoch than one we saw from it (its state dir was lost while its "
        "wall clock was behind, or it runs an old pyquorum): restarting this node forgets the newer one"
    ),
    "bad-echo": (
        "; it echoes an epoch of ours other than this life's: it has not accepted a datagram of ours "
        "since we started (a one-way network problem, or it refuses us: see its log)"
    ),
}


def run(config: Config) -> int:
    """Run one node until it is stopped. Returns the process exit code (0 clean, 1 fatal, 2 config)."""
    for peer in config.peers:
        if peer.ip.version != config.me.ip.version:
            raise ConfigError(
                [
                    f"peer {peer} is IPv{peer.ip.version} but -b {config.me.ip} is "
                    f"IPv{config.me.ip.version}: all members must use the same IP version"
                ]
            )
    return asyncio.run(Daemon(config).main())
