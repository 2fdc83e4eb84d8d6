"""Replay protection: is a decoded datagram fresh? (docs/security.md §5)

What this module owns
---------------------
One decision per datagram that ``Codec.decode`` accepted: hand it to the core, or drop it as
stale, replayed or addressed to an earlier life of ours; and the rule that picks a boot epoch. It is
pure: no clocks, no randomness (the wall clock the epoch rule needs is an argument). Its caller is
``pyquorum.wire.endpoint.Endpoint``. The freshness proof is two numbers every node already has, not
time:

* ``epoch``: a node's boot epoch, persisted (fsync) before its first datagram and strictly
  greater at every start (``next_boot_epoch``). Every datagram carries the sender's epoch, and
* ``echo_epoch``: the receiver's epoch as the sender last saw it, i.e. ``peer_epoch(receiver)``.

Rules, for every decoded datagram from ``sender``:

1. learn: ``max_epoch[sender] = max(max_epoch[sender], env.sender_epoch)``, even when the datagram
   is then rejected (so a restarted peer is recognised at its first datagram);
2. ``env.sender_epoch < max_epoch[sender]``: "stale-epoch" (sent by an earlier life of the sender);
3. ``env.echo_epoch != my_epoch``: "bad-echo" (sent to an earlier life of ours, or before the
   sender had heard from us at all);
4. ``seq`` must be newer than ``highest - window`` ("too-old") and not seen before ("replayed"),
   tracked by a sliding bitmap per sender, as IPsec (RFC 4303 §3.4.3) and DTLS (RFC 9147 §4.5.1).

What that buys: a captured datagram replays at most never (rule 4) within the epochs it was sent
in; after the sender restarts its old datagrams are stale (rule 2); after the receiver restarts
they echo its old epoch (rule 3). Reordering within ``window`` sequence numbers is harmless.

The first-contact handshake
---------------------------
Nobody knows anybody's epoch at start-up, so the first datagram in each direction is rejected
("bad-echo", echo 0), but it teaches the receiver the sender's epoch. The receiver's next datagram
echoes it and is accepted, and so is every datagram after that in both directions::

    A (epoch 7) -> B  Heartbeat  echo=0   B: learns A=7, rejects "bad-echo"
    B (epoch 3) -> A  Heartbeat  echo=7   A: learns B=3, accepts
    A (epoch 7) -> B  Heartbeat  echo=3   B: accepts

A node's first heartbeat duty of each life greets every peer (protocol.md §3.2), so a start or
restart costs one heartbeat round of refusals, well inside the election timeout, and every pair has
shaken hands before it needs to, even two followers of a live master, which have nothing else to say
to each other (a datagram that still meets an unknown epoch is answered with a Hello: see
docs/security.md §5). The same handshake repeats with the restarted node after any restart.

Another cluster's datagrams bypass the echo check
-------------------------------------------------
A node whose cluster fingerprint differs from ours is not in our protocol: the caller does not feed
it to the core, so its epoch handshake with us never completes. The caller therefore checks every
datagram with a foreign fingerprint (a ``ClusterInfo`` or a protocol message) with
``check_echo=False``. The only thing that weakens is that such a captured datagram can be replayed
into a later life of ours once; its effect is one rate-limited log line (and, for a protocol
message, one rate-limited ``ClusterInfo`` sent to the member's configured address). Rules 1, 2 and
4 still apply.

The boot epoch cannot go backwards
----------------------------------
``next_boot_epoch(persisted, wall_clock_us) = max(persisted + 1, wall_clock_us)``, which the runtime
persists (fsync) before the first datagram of a life. With its state a node's epoch grows by at least
one per start, whatever the clock says. Without it (an ephemeral disk, a state directory moved aside
or switched), the persisted value reads 0 and the wall clock in microseconds since 1970 is still
above every epoch the node had before: each was the wall clock of its own, earlier start (unless the
clock was behind then; two starts are more than a microsecond apart), or a small start counter
written before this rule. So the peers recognise the new life
at its first datagram (rule 1), and the handshake costs one heartbeat round as after any restart.
Were the epoch allowed to go back, the peers would refuse the node's datagrams as "stale-epoch", keep
echoing its old epoch, and it would refuse theirs as "bad-echo": both ways, until every peer restarted.

The wall clock serves here as a source of increasing identities only: it is never used to measure or
compare intervals, never in a timing decision (those use the monotonic clock, protocol.md §3.2), and
an epoch that is too high or too low only ever makes the guard refuse more, never accept more. If the
clock is set back AND the state is lost, the new epoch may be lower than one the peers saw: they
refuse the node both ways until the wall clock passes the old epoch or the peers restart, and the
daemon warns about a peer refused that long. Microseconds fit in u64 for 584,000 years.

Limits
------
Memory is one small record per sender; ``Codec.decode`` has already rejected senders that are not
members, so it is bounded by the membership. Without a cluster key anyone can forge epochs and
sequence numbers: the guard then only protects against accidents (duplicated or delayed datagrams,
restarts), not against an attacker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from pyquorum.wire.codec import MAX_U64, Envelope
from pyquorum.wire.reasons import Reason

__all__ = ["DEFAULT_WINDOW", "ReplayGuard", "next_boot_epoch"]

DEFAULT_WINDOW: Final = 1024
"""Sequence numbers tracked per sender. RFC 4303 requires >= 32 and recommends 64, for one flow;
our senders share one counter among all peers, so a receiver sees a gap of N-1 per datagram. 1024
bits (128 bytes per peer) tolerates any reordering a LAN or a retransmitting path produces."""


@dataclass(slots=True)
class _PeerState:
    epoch: int
    highest: int = -1  # the highest accepted seq in this epoch; -1: none yet
    seen: int = 0  # bit i set: seq ``highest - i`` was accepted


class ReplayGuard:
    """Per-process replay state. One per process life: ``my_epoch`` is this life's epoch."""

    __slots__ = ("_peers", "my_epoch", "window")

    def __init__(self, my_epoch: int, window: int = DEFAULT_WINDOW) -> None:
        if my_epoch < 1:
            raise ValueError(f"my_epoch must be >= 1 (0 means unknown on the wire), got {my_epoch}")
        if not 1 <= window <= 1 << 16:
            raise ValueError(f"window must be 1-65536, got {window}")
        self.my_epoch = my_epoch
        self.window = window
        self._peers: dict[str, _PeerState] = {}

    def check(self, env: Envelope, *, check_echo: bool = True) -> Reason | None:
        """Decide on one decoded datagram: ``None`` means fresh, hand it to the core; otherwise
        the reason to drop it ("stale-epoch", "bad-echo", "too-old", "replayed"), to be counted.

        Call it only after ``Codec.decode`` succeeded (its sender is a member; with a key, the MAC
        verified) and after comparing ``env.cluster_fp``, as ``Endpoint.receive`` does. Pass
        ``check_echo=False`` only for a datagram with another cluster's fingerprint (see the module
        docstring). A datagram is recorded as seen only when accepted.
        """
        peer = self._peers.get(env.sender)
        # rule 1: learn the sender's newest epoch from every datagram, accepted or not
        if peer is None or env.sender_epoch > peer.epoch:
            peer = _PeerState(epoch=env.sender_epoch)
            self._peers[env.sender] = peer
        if env.sender_epoch < peer.epoch:
            return "stale-epoch"  # rule 2
        if check_echo and env.echo_epoch != self.my_epoch:
            return "bad-echo"  # rule 3
        # rule 4: the sliding window
        seq = env.seq
        if seq > peer.highest:
            shift = seq - peer.highest
            peer.seen = ((peer.seen << shift) | 1) & ((1 << self.window) - 1) if shift < self.window else 1
            peer.highest = seq
            return None
        offset = peer.highest - seq
        if offset >= self.window:
            return "too-old"
        bit = 1 << offset
        if peer.seen & bit:
            return "replayed"
        peer.seen |= bit
        return None

    def peer_epoch(self, sender: str) -> int:
        """The epoch to put in ``echo_epoch`` of the next datagram to ``sender``; 0 before any
        datagram from it was decoded."""
        peer = self._peers.get(sender)
        return 0 if peer is None else peer.epoch


def next_boot_epoch(persisted: int, wall_clock_us: int) -> int:
    """The boot epoch of a new life: ``max(persisted + 1, wall_clock_us)`` (see the module docstring).

    ``persisted`` is the epoch of the previous life as read from disk (0 when the state is new or
    lost); ``wall_clock_us`` is the wall clock in microseconds since 1970, read once at start-up and
    used for nothing else. Raises ``ValueError`` if the result would not fit the wire's u64.
    """
    if persisted < 0:
        raise ValueError(f"persisted epoch {persisted} is negative")
    epoch = max(persisted + 1, wall_clock_us)
    if epoch > MAX_U64:
        raise ValueError(f"boot epoch {epoch} does not fit in 64 bits")
    return epoch
