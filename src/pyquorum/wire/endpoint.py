"""One node's end of the wire: every datagram in through ``receive``, every datagram out through ``send``.

What this module owns
---------------------
The order of the checks on an incoming datagram, and the envelope of an outgoing one. ``receive``
turns any bytes from any source into exactly one of three answers, and never raises for what a peer
sent:

* ``Deliver(sender, message, key_id)``: fresh, authenticated (with a key), from our cluster: give
  ``message`` to ``Node.step(sender, message, now)``;
* ``Reject(reason, detail, sender)``: drop it; ``reason`` is one word of ``wire.reasons.REASONS``;
* ``Operate(sender, message)``: fresh and ours, but a runtime-level message (wire/operate.py: a
  timeline, a drill's silence): for the daemon, never the core;
* ``Foreign(sender, message, cluster_fp)``: a member speaking with another cluster's fingerprint
  (another member list or timing): never give it to the core; log both configurations and answer a
  protocol message with our ``ClusterInfo``, both rate-limited (docs/security.md §5).

Every ``Reject`` is counted in ``rejected`` under its reason, and every ``Foreign`` under
"cluster-mismatch", before ``receive`` returns, so no caller can forget to count.

``send(dest, message)`` owns what the sender side of the freshness proof needs: the sequence number
(one counter for all peers, from 1 in each life), this life's boot epoch, and the echo of the
receiver's epoch as last seen. It returns the bytes and the receiver's configured address, the only
address we ever send to (never a datagram's source: we must not reflect spoofed traffic).

The checks, in order (docs/security.md §3)
------------------------------------------
1. ``Codec.decode``: size, then magic and version, then the key id and the trailer (HMAC-SHA256 with
   a key, CRC-32 without) BEFORE any other byte is parsed, then strict parsing: the sender is a
   member, the receiver is us, every field in range, nothing after the payload;
2. without a key only: the source address is the claimed sender's configured address, else
   "wrong-source" (without a key the address is all that ties a datagram to a member);
3. the cluster fingerprint: another one is checked by the replay guard without the echo rule
   (its sender never completes our handshake) and becomes a ``Foreign``;
4. a ``ClusterInfo`` with our own fingerprint, which none of our nodes sends: "unexpected-info";
5. ``ReplayGuard.check``: "stale-epoch", "bad-echo", "too-old", "replayed";
6. ``Deliver`` (or ``Handshake`` for a Hello, ``Operate`` for a message of wire/operate.py).

The datagram path, hop by hop
-----------------------------
::

    kernel UDP socket
    -> Udp.datagram_received(data, addr)              runtime/udp.py (the loop's reader)
    -> Endpoint.receive(data, source)                 wire/endpoint.py, checks 1-6 above:
         Codec.decode                                 wire/codec.py
         ReplayGuard.check                            wire/replay.py
    <- Deliver | Reject | Foreign                     the one return to the daemon
    -> Deliver: Daemon.step -> Node.step(sender, message, now)   core/node.py
       then Daemon._process: Node.ready() -> persist (fsync) -> Endpoint.send + sendto -> script
       -> Node.advance
    -> Reject: Daemon._reject, a rate-limited log line (counted already) and, for a member
       refused for seconds, a WARNING; Foreign: Daemon._cluster_mismatch, a rate-limited report
       and a ClusterInfo answer through Endpoint.send

The simulation (tests/sim/sim.py) puts every message through ``send`` and ``receive`` too.

What it must not know
---------------------
Sockets, clocks and logs: it is pure, like the core, so the simulation can run it. It holds no
policy about how loud a refusal is or how often to answer another cluster: the runtime decides.
Keys come from the caller (``pyquorum.keyfile`` reads them); a reload hands the endpoint a new
``KeyRing`` (``set_keyring``), which keeps the replay state and the sequence number, so a reload
costs no handshake.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from pyquorum.core.address import NodeAddress
from pyquorum.core.errors import LocalProtocolError
from pyquorum.core.messages import Message
from pyquorum.wire.codec import (
    DEFAULT_MAX_DATAGRAM,
    MAX_U64,
    ClusterInfo,
    Codec,
    DatagramError,
    Hello,
    WireMessage,
)
from pyquorum.wire.keyring import KeyRing
from pyquorum.wire.operate import OPERATE_TYPES, OperateMessage
from pyquorum.wire.reasons import Reason, RejectCounts
from pyquorum.wire.replay import DEFAULT_WINDOW, ReplayGuard

__all__ = ["Datagram", "Deliver", "Endpoint", "Foreign", "Operate", "Received", "Reject"]

Address = tuple[str, int]

# The answers are named tuples: immutable, and one is built per datagram, which costs a frozen
# dataclass several times as much.


class Deliver(NamedTuple):
    """A fresh datagram of our cluster: step ``message`` as from ``sender``. ``key_id`` is the key
    that verified it (0 without a key); a peer still signing with a retired key shows here."""

    sender: str
    message: Message
    key_id: int


class Reject(NamedTuple):
    """A refused datagram, already counted. ``detail`` is a short printable sentence for a log;
    ``sender`` is the member the datagram names as its sender when decoding got that far (with a
    key it is then authenticated; without one it is only a claim), else None."""

    reason: Reason
    detail: str
    sender: str | None
    reply: Datagram | None = None  # send it: a Hello that completes the sender's epoch handshake


class Foreign(NamedTuple):
    """A member's datagram with another cluster's fingerprint, fresh (checked without the echo
    rule), counted as "cluster-mismatch". Never step it; ``message`` may be a ``ClusterInfo``."""

    sender: str
    message: WireMessage
    cluster_fp: bytes


class Handshake(NamedTuple):
    """A fresh ``Hello`` from ``sender``: the wire learnt its epoch; nothing for the core."""

    sender: str


class Operate(NamedTuple):
    """A fresh runtime-level message of wire/operate.py (a timeline or a drill's silence) from
    ``sender``: for the daemon (runtime/handover.py), never for the core."""

    sender: str
    message: OperateMessage


Received = Deliver | Reject | Foreign | Handshake | Operate


class Datagram(NamedTuple):
    """What to send: ``data`` to ``address``, the receiver's configured (ip, port)."""

    data: bytes
    address: Address


class Endpoint:
    """The wire of one node (``local``) of one cluster, for one process life (one boot ``epoch``).

    Build a new one at every start, with the epoch the runtime persisted before its first datagram
    (``wire.replay.next_boot_epoch``). ``keyring=None`` is an unauthenticated cluster (CRC-32, and
    the source address check).
    """

    __slots__ = ("_addresses", "_bad_echoes", "_by_address", "_codec", "_guard", "_seq", "rejected")

    def __init__(
        self,
        *,
        local: str,
        members: Iterable[str],
        cluster_fp: bytes,
        keyring: KeyRing | None,
        epoch: int,
        window: int = DEFAULT_WINDOW,
        max_datagram: int = DEFAULT_MAX_DATAGRAM,
    ) -> None:
        member_set = frozenset(members)
        if not 1 <= epoch <= MAX_U64:
            raise ValueError(f"epoch {epoch} is outside 1..2**64-1")
        self._codec = Codec(
            local=local, cluster_fp=cluster_fp, members=member_set, keyring=keyring, max_datagram=max_datagram
        )
        self._guard = ReplayGuard(epoch, window)
        self._seq = 0
        self._addresses: dict[str, Address] = {}
        for member in member_set:
            addr = NodeAddress.parse(member)
            self._addresses[member] = (str(addr.ip), addr.port)
        self._by_address = {addr: member for member, addr in self._addresses.items()}
        self.rejected = RejectCounts()
        # bad-echo refusals per (peer, its epoch): answered with a Hello at the 1st, 2nd, 4th, 8th...
        # (a lost Hello is answered again, a replayed datagram cannot make us send more than a few)
        self._bad_echoes: dict[tuple[str, int], int] = {}

    # -- what it is --------------------------------------------------------------------------

    @property
    def local(self) -> str:
        return self._codec.local

    @property
    def epoch(self) -> int:
        """This life's boot epoch: the ``sender_epoch`` of everything we send."""
        return self._guard.my_epoch

    @property
    def cluster_fp(self) -> bytes:
        return self._codec.cluster_fp

    @property
    def keyring(self) -> KeyRing | None:
        return self._codec.keyring

    def set_keyring(self, keyring: KeyRing | None) -> None:
        """Sign and verify with ``keyring`` from the next datagram on (a key file reload). The replay
        state and the sequence number are kept. Turning authentication on or off needs a restart:
        the source address check depends on it, so that raises ``LocalProtocolError``."""
        if (keyring is None) != (self._codec.keyring is None):
            raise LocalProtocolError("a reload cannot turn authentication on or off: restart instead")
        c = self._codec
        self._codec = Codec(
            local=c.local,
            cluster_fp=c.cluster_fp,
            members=c.members,
            keyring=keyring,
            max_datagram=c.max_datagram,
        )

    def address_of(self, member: str) -> Address:
        """The configured (ip, port) of ``member``."""
        return self._addresses[member]

    def member_at(self, source: Address) -> str | None:
        """The member configured at ``source``, if any (for naming a peer in a log, never for trust)."""
        return self._by_address.get(source)

    def peer_epoch(self, member: str) -> int:
        """The highest epoch of ``member`` seen so far; 0 before any datagram from it decoded."""
        return self._guard.peer_epoch(member)

    # -- inbound -----------------------------------------------------------------------------

    def receive(self, data: bytes, source: Address) -> Received:
        """Decide on one datagram from ``source`` (ip, port); see the module docstring for the
        order. Raises nothing for anything a peer can send; counts every ``Reject`` and ``Foreign``.
        """
        result = self._receive(data, source)
        if isinstance(result, Reject):
            self.rejected.add(result.reason)
        elif isinstance(result, Foreign):
            self.rejected.add("cluster-mismatch")
        return result

    def _receive(self, data: bytes, source: Address) -> Received:
        try:
            env, msg = self._codec.decode(data)  # check 1
        except DatagramError as exc:
            return Reject(exc.reason, exc.detail, exc.sender)
        if self._codec.keyring is None and self._addresses.get(env.sender) != source:  # check 2
            return Reject("wrong-source", f"claims to be {env.sender!r}", env.sender)
        if env.cluster_fp != self._codec.cluster_fp:  # check 3
            # docs/security.md §5: another cluster's node never completes our epoch handshake, so
            # only the echo rule is skipped; its stale or replayed datagrams are refused as usual
            why = self._guard.check(env, check_echo=False)
            if why is not None:
                return Reject(why, self._fresh_detail(env.sender, env.sender_epoch, env.seq), env.sender)
            return Foreign(env.sender, msg, env.cluster_fp)
        if isinstance(msg, ClusterInfo):  # check 4
            detail = f"ClusterInfo from {env.sender} with our own fingerprint"
            return Reject("unexpected-info", detail, env.sender)
        why = self._guard.check(env)  # check 5
        if why is not None:
            detail = self._fresh_detail(env.sender, env.sender_epoch, env.seq)
            if why == "bad-echo":
                detail += f" echo={env.echo_epoch} ours={self._guard.my_epoch}"
            elif why == "stale-epoch":
                detail += f" newest_seen={self._guard.peer_epoch(env.sender)}"
            reply = self._hello(env.sender, env.sender_epoch) if why == "bad-echo" else None
            return Reject(why, detail, env.sender, reply)
        if isinstance(msg, Hello):
            return Handshake(env.sender)
        if isinstance(msg, OPERATE_TYPES):
            return Operate(env.sender, msg)
        return Deliver(env.sender, msg, env.key_id)  # check 6

    def _hello(self, peer: str, epoch: int) -> Datagram | None:
        count = self._bad_echoes.get((peer, epoch), 0) + 1
        if len(self._bad_echoes) > 4 * len(self._addresses):
            self._bad_echoes.clear()  # bounded: old epochs of restarted peers are forgotten
        self._bad_echoes[(peer, epoch)] = count
        return self.send(peer, Hello()) if count & (count - 1) == 0 else None

    @staticmethod
    def _fresh_detail(sender: str, epoch: int, seq: int) -> str:
        return f"from {sender} epoch={epoch} seq={seq}"

    # -- outbound ----------------------------------------------------------------------------

    def send(self, dest: str, message: WireMessage) -> Datagram:
        """The datagram that carries ``message`` to the member ``dest``, with the next sequence
        number, this life's epoch and ``dest``'s epoch as last seen (0 before first contact).
        Raises ``LocalProtocolError`` for our own mistakes (``dest`` not a peer, a message that does
        not fit): nothing a peer sent can cause one."""
        self._seq += 1
        data = self._codec.encode(
            message,
            receiver=dest,
            sender_epoch=self._guard.my_epoch,
            seq=self._seq,
            echo_epoch=self._guard.peer_epoch(dest),
        )
        return Datagram(data, self._addresses[dest])
