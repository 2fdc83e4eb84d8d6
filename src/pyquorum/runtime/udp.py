"""The node's UDP socket: every datagram in, through the wire, to the core; every message out.

What this module owns
---------------------
The node's UDP socket on the event loop and what surrounds ``pyquorum.wire.Endpoint``: binding it (with
an error an operator can act on), handing each datagram to ``Endpoint.receive`` and what follows from
the answer, and sending the core's messages through ``Endpoint.send``. The core sees only ``Deliver``ed
messages, through the ``step`` callback the daemon gives (``Daemon.step``: ``Node.step`` then the
``Ready``).

Whose fault is it
-----------------
A datagram that does not decode, is stale, replayed, from another cluster or from a stranger is a
peer's fault: the endpoint refuses and counts it per reason (``Endpoint.rejected``, shown by ``pyquorum
status`` and ``/metrics``), and this module logs it at a rate limit (``REJECT_LOG_INTERVAL_S``), never a
crash. A member refused for longer than ``REFUSED_WARN_AFTER_S`` is a WARNING naming it and the likely
cause. A member speaking with another cluster's fingerprint is reported with both configurations and
answered with our ``ClusterInfo``, both rate-limited (docs/security.md §5).

The datagram path, hop by hop
-----------------------------
::

    kernel UDP socket
    -> Udp._readable(): recvfrom_into, each waiting  this module (the loop's reader callback)
    -> Udp.datagram_received(data, addr)
    -> Endpoint.receive(data, source)               wire/endpoint.py: codec, then replay guard
    <- Deliver | Reject | Foreign | Handshake | Operate   the one answer
    -> Deliver: Counters.on_deliver, then the daemon's step(sender, message, now):
         Node.step                                  core/node.py
         Daemon._process: Node.ready() -> persist (fsync) -> Udp.send (Endpoint.send + sendto)
         -> script actions -> log events -> Node.advance
    -> Reject: the Hello reply if any, a rate-limited log line (counted already), a lasting refusal
       of a member: a WARNING; Foreign: a rate-limited report and a ClusterInfo through Udp.send;
       Handshake: nothing for the core (the wire learnt the peer's epoch); Operate (a timeline or
       a drill's silence, wire/operate.py): the daemon's ``on_operate`` (runtime/handover.py)

While a drill's silence lasts (``silent_until``) every datagram in and out is dropped before anything
else, and counted in ``silenced_received`` / ``silenced_sent``: the node acts as if it had died.

Every datagram received is counted once: accepted by type (``Counters.received``) or refused by reason
(``Endpoint.rejected``); every datagram sent once, by type (``Counters.sent``).

Why not asyncio's datagram transport
------------------------------------
It was two thirds of the daemon's CPU per datagram (bench/hotpath.py, py-spy): for each datagram it
allocates a 256 KiB bytes object to receive into and shrinks it, and each send goes through a layer
of checks and buffering. Here the socket is the loop's reader (``add_reader``): when it is readable,
every datagram waiting is read (at most ``RECEIVE_BATCH`` per turn of the loop, so that a flood cannot
starve the timers) into one buffer larger than any UDP datagram, so an oversized one still arrives
whole and is refused as "too-large" by the codec, never truncated into something that might parse. A
send goes straight to ``sendto``; one the kernel refuses (no route while a link is down, a full send
buffer) is dropped and logged at debug level, which the protocol treats as a lost datagram (asyncio
reported the same errors to ``error_received``, logged at debug level too, and queued a send that
would block: a datagram that late is worth no more than a lost one).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections.abc import Callable
from typing import Any, Final

from pyquorum.core.errors import ConfigError
from pyquorum.core.messages import Message
from pyquorum.runtime.logs import log_event
from pyquorum.runtime.status import Counters, RateLimiter
from pyquorum.wire import ClusterInfo, Deliver, Endpoint, Foreign, Handshake, Hello, Operate, Reject
from pyquorum.wire.codec import WireMessage
from pyquorum.wire.operate import OperateMessage

__all__ = ["REFUSED_WARN_AFTER_S", "REJECT_LOG_INTERVAL_S", "Udp"]

log = logging.getLogger("pyquorum.udp")

# At most one log line per reason per this many seconds for rejected datagrams (an attacker must not
# be able to fill the disk); the counters are exact.
REJECT_LOG_INTERVAL_S = 10.0
# A peer whose datagrams have all been refused for this long (none accepted meanwhile, no silence
# longer than this in between) is logged as a WARNING naming it and the reason. A (re)start's
# handshake refuses one datagram each way ("bad-echo", one heartbeat interval apart at most), and a
# restarted peer's last datagrams in flight are "stale-epoch" for milliseconds: both stay at debug.
REFUSED_WARN_AFTER_S = 3.0
# The kernel's receive buffer is raised to this, so that a burst (a flood, or a pause of the loop)
# drops less.
RECEIVE_BUFFER_BYTES = 1 << 20
# Datagrams are received into a buffer this large: more than any UDP datagram's payload (65,507 bytes
# over IPv4), so that an oversized one arrives whole (module docstring).
DATAGRAM_BUFFER_BYTES: Final = 1 << 16
# At most this many datagrams are read per turn of the event loop: a flood waits its turn behind the
# timers and the other sockets instead of starving them.
RECEIVE_BATCH: Final = 64

Step = Callable[[str, Message, float], None]
OnOperate = Callable[[str, OperateMessage, float], None]


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
        if not self._episodes:  # the common case: nothing was refused
            return None
        episode = self._episodes.pop(peer, None)
        if peer in self.warned:
            self.warned.discard(peer)
            return now - episode[0] if episode is not None else 0.0
        return None


class Udp:
    """The socket of one node. ``await Udp.bind(...)`` opens it; ``send`` sends the core's messages;
    every delivered message goes to ``step``; ``close()`` at shutdown."""

    def __init__(
        self,
        endpoint: Endpoint,
        step: Step,
        counters: Counters,
        *,
        members: tuple[str, ...],
        timing_text: str,
        on_operate: OnOperate | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.counters = counters
        self._step = step
        self._members = members
        self._timing_text = timing_text
        self._me = endpoint.local
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buffer = memoryview(bytearray(DATAGRAM_BUFFER_BYTES))
        self._reject_log = RateLimiter(REJECT_LOG_INTERVAL_S)
        self._info_sent = RateLimiter(REJECT_LOG_INTERVAL_S)
        self._refused = _RefusedPeers(REFUSED_WARN_AFTER_S)
        self._on_operate = on_operate
        # A drill's silence (runtime/handover.py): until this monotonic time every datagram in and
        # out is dropped, as if the node had died; 0.0 when not silent (one float test per datagram).
        self.silent_until = 0.0
        self.silenced_sent = 0
        self.silenced_received = 0

    async def bind(self, ip: str, port: int, family: int) -> None:
        """Bind ``ip``:``port``; a failure is a ``ConfigError`` saying what to do. From here on every
        datagram that arrives is received on the running loop."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            # the address as given (a literal IP: nothing to resolve), so no executor round
            sock.bind((ip, port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    [f"UDP port {self._me} is already in use (another pyquorum node?): stop it or use -p"]
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ConfigError([f"-b {ip} is not an address of this host"]) from None
            raise ConfigError([f"cannot bind UDP {self._me}: {exc.strerror or exc}"]) from None
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
        self._sock, self._loop = sock, loop
        loop.add_reader(sock.fileno(), self._readable)

    def close(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    # -- out ------------------------------------------------------------------------------------

    def send(self, dest: str, msg: WireMessage) -> None:
        """Send ``msg`` to ``dest``'s configured address (never a datagram's source); dropped while
        silent (a drill)."""
        if self._sock is None:
            return
        if self.silent_until and time.monotonic() < self.silent_until:
            self.silenced_sent += 1
            return
        datagram = self.endpoint.send(dest, msg)
        self.counters.on_send(msg, time.monotonic())
        self._sendto(datagram.data, datagram.address)

    def _sendto(self, data: bytes, address: tuple[str, int]) -> None:
        assert self._sock is not None
        try:
            self._sock.sendto(data, address)
        except OSError as exc:  # a lost datagram (module docstring)
            log_event(log, logging.DEBUG, "send_failed", address=address[0], error=str(exc))

    # -- in -------------------------------------------------------------------------------------

    def _readable(self) -> None:
        # every datagram waiting, up to RECEIVE_BATCH, each copied out of the one buffer
        sock, buffer = self._sock, self._buffer
        for _ in range(RECEIVE_BATCH):
            if sock is not self._sock or sock is None:  # closed by what the last one caused
                return
            try:
                size, addr = sock.recvfrom_into(buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.error_received(exc)
                return
            self.datagram_received(buffer[:size].tobytes(), addr)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """One datagram from ``addr`` (IPv6 adds flow info and scope: the endpoint knows (ip, port))."""
        if self.silent_until and time.monotonic() < self.silent_until:
            self.silenced_received += 1  # a drill's silence: as if we had died
            return
        source = (str(addr[0]), int(addr[1]))
        result = self.endpoint.receive(data, source)
        now = time.monotonic()
        if isinstance(result, Deliver):
            self._on_accepted(result.sender, now)
            self.counters.on_deliver(result.sender, result.message, result.key_id, now)
            self._step(result.sender, result.message, now)
        elif isinstance(result, Foreign):
            self._cluster_mismatch(result.sender, result.message, now)
        elif isinstance(result, Handshake):
            self.counters.on_hello()
            self._on_accepted(result.sender, now)  # its epoch is known now (protocol.md §3.2)
        elif isinstance(result, Operate):
            self.counters.received[type(result.message)] += 1
            self._on_accepted(result.sender, now)
            if self._on_operate is not None:
                self._on_operate(result.sender, result.message, now)
        else:
            if result.reply is not None and self._sock is not None:
                self.counters.on_send(Hello(), now)
                self._sendto(result.reply.data, result.reply.address)
            self._reject(result, source, now)

    def error_received(self, exc: Exception) -> None:
        # an error queued on the socket (ICMP port unreachable from a peer that is down): normal,
        # and not worth more than debug
        log_event(log, logging.DEBUG, "socket_error", error=str(exc))

    def _reject(self, rej: Reject, source: tuple[str, int], now: float) -> None:
        # counted by the endpoint already; here only the logs
        suppressed = self._reject_log.allow(rej.reason, now)
        if suppressed is not None:
            log_event(
                log,
                logging.DEBUG if rej.reason in _ROUTINE_REJECTS else logging.WARNING,
                "datagram_rejected",
                reason=rej.reason,
                source=source[0],
                detail=rej.detail[:200],
                count=self.endpoint.rejected[rej.reason],
                suppressed_since_last=suppressed,
            )
        # the member it names, or else the member configured at its source (to name it, not to trust it)
        peer = rej.sender or self.endpoint.member_at(source)
        if peer is not None and peer != self._me:
            refused_for = self._refused.refused(peer, now)
            lasting = refused_for >= REFUSED_WARN_AFTER_S
            if lasting and self._reject_log.allow(f"refused:{peer}", now) is not None:
                self._refused.warned.add(peer)
                log_event(
                    log,
                    logging.WARNING,
                    "peer_refused",
                    peer=peer,
                    reason=rej.reason,
                    refused_for_s=round(refused_for, 1),
                    detail=rej.detail[:200],
                    hint="no datagram from this peer was accepted meanwhile"
                    + _REFUSED_HINTS.get(rej.reason, ""),
                )

    def _on_accepted(self, peer: str, now: float) -> None:
        refused_for = self._refused.accepted(peer, now)
        if refused_for is not None:
            # at the level of the warning it ends, so that whoever saw one sees the other
            log_event(log, logging.WARNING, "peer_accepted", peer=peer, after_refused_s=round(refused_for, 1))

    def _cluster_mismatch(self, sender: str, msg: WireMessage, now: float) -> None:
        # counted ("cluster-mismatch") by the endpoint already; here the report and the answer. A
        # ClusterInfo brings the peer's lists; any other message only its other fingerprint, so it
        # is answered with ours (rate-limited), and its lists follow when it gets them.
        if isinstance(msg, ClusterInfo):
            key, hint = f"info:{sender}", "every node must be given the same servers and timing options"
            theirs = {"their_members": ",".join(msg.members), "their_timing": msg.timing}
        else:
            key, theirs = f"mismatch:{sender}", {}
            hint = "it sent a different cluster fingerprint; its own lists follow when it gets ours"
        if self._reject_log.allow(key, now) is not None:
            log_event(
                log,
                logging.ERROR,
                "cluster_mismatch",
                peer=sender,
                **theirs,
                our_members=",".join(self._members),
                our_timing=self._timing_text,
                hint=hint,
            )
        if not isinstance(msg, ClusterInfo) and self._info_sent.allow(sender, now) is not None:
            self.send(sender, ClusterInfo(self._members, self._timing_text))


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
