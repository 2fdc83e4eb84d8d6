"""Bytes <-> messages: the wire format, its authentication, and its size limits.

What this module owns
---------------------
The exact bytes of a datagram (docs/security.md §4). It is pure: no sockets, no clocks, no
randomness. ``Codec.encode`` turns a message and its envelope fields into bytes;
``Codec.decode`` turns *any* bytes into ``(Envelope, message)`` or raises ``DatagramError``, a
``RemoteProtocolError`` whose ``reason`` says why in one machine-usable word. Nothing else ever
escapes ``decode``: the fuzz tests feed it arbitrary and mutated datagrams to hold it to that.

What it must not know
---------------------
Whether a datagram is fresh: that is ``pyquorum.wire.replay.ReplayGuard``'s job. Whether a datagram
from another cluster (``env.cluster_fp != codec.cluster_fp``) matters: it still decodes. What comes
after decoding, and in which order (the source check, the fingerprint, the replay guard), is
``pyquorum.wire.endpoint.Endpoint.receive``'s, which is the only caller of ``decode`` in the daemon.
Which sequence number and epochs go into ``encode`` is ``Endpoint.send``'s.

Wire format, version 2 (all integers big-endian)
-----------------------------------------------
::

    magic         2   b"PQ"
    version       u8  2 (1 had no ``live`` bitmap in the heartbeat; it is refused as "bad-version")
    key_id        u8  0 = unauthenticated, 1-255 = the HMAC key that signed it
    cluster_fp    8   cluster_fingerprint(members, timing)
    sender        u8 length + ASCII canonical node id (a member)
    receiver      u8 length + ASCII canonical node id (a member, and us)
    sender_epoch  u64 the sender's boot epoch, >= 1, strictly increasing across its restarts
    seq           u64 per (sender, sender_epoch), increasing
    echo_epoch    u64 the receiver's epoch as last seen by the sender, 0 = unknown
    msg_type      u8  see MSG_TYPE below
    payload       fixed and strict per type (terms and rounds u64 < 2**63, booleans 0 or 1); a
                  Heartbeat ends with ``live``: u8 length = ceil(members / 8), then that many
                  bytes, bit i (of byte i // 8, most significant first) for the i-th member in
                  protocol order; unused bits 0, and all 0 in a plain (non-master) heartbeat
    trailer       key_id != 0: 32-byte HMAC-SHA256(key, every byte before it)
                  key_id == 0: 4-byte CRC-32 of every byte before it

Decisions beyond the first sketch, and why:

* ``receiver`` is in the header and must be our own id. Without it a datagram that A sent to B
  could be replayed to C, whose epoch may equal B's (nothing makes two nodes' epochs differ): a
  ``VoteResponse(granted=True)`` that A gave B would then count as a vote for C, two masters in one
  term. So ``Codec`` knows its ``local`` id and ``encode`` takes the ``receiver``, not the sender.
* Unauthenticated datagrams carry a CRC-32. The UDP checksum is 16 bits and may be absent in IPv4;
  one flipped bit in ``VoteResponse.granted`` would be a vote nobody gave. CRC-32 detects every
  error confined to 32 consecutive bits. It is integrity against accidents only, not attackers.
* Decoding order (docs/security.md §3): size, then magic and version, then the key id and the
  trailer are checked (``wire.mac``: HMAC-SHA256 with each key's pads hashed once, compared in
  constant time) BEFORE any other byte is interpreted, then strict parsing. A forged datagram
  therefore costs one HMAC and reaches no parser.
* ``max_datagram`` defaults to 1200 bytes: IPv6 guarantees 1280-byte packets (RFC 8200 §5), minus
  40 (IPv6) and 8 (UDP) headers leaves 1232; QUIC (RFC 9000 §14) picked the same 1200. No datagram
  we send is fragmented. The runtime should receive into a larger buffer so that an oversized
  datagram is seen as "too-large" rather than silently truncated.

Limits: the MAC key is shared by the whole cluster, so any key holder can claim any member's id;
authentication means "a holder of the cluster key", not "that node" (docs/security.md §2).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, NamedTuple

from pyquorum.core import messages
from pyquorum.core.address import NodeAddress, sort_nodes
from pyquorum.core.errors import LocalProtocolError, RemoteProtocolError
from pyquorum.wire.keyring import KeyRing
from pyquorum.wire.mac import Mac, compare_digest, sha256
from pyquorum.wire.operate import (
    MAX_ENTRIES,
    MAX_SILENCE_MS,
    ROLE_NAMES,
    TRANSITION_KINDS,
    OperateMessage,
    Silence,
    SilenceResponse,
    Timeline,
    TimelineResponse,
)
from pyquorum.wire.reasons import DECODE_REASONS, Reason

__all__ = [
    "DECODE_REASONS",
    "DEFAULT_MAX_DATAGRAM",
    "MAGIC",
    "VERSION",
    "ClusterInfo",
    "Codec",
    "DatagramError",
    "Envelope",
    "Hello",
    "WireMessage",
    "cluster_fingerprint",
]

MAGIC: Final = b"PQ"
VERSION: Final = 2
DEFAULT_MAX_DATAGRAM: Final = 1200  # see the module docstring: RFC 8200 §5, RFC 9000 §14
MAC_SIZE: Final = 32
CRC_SIZE: Final = 4
FP_SIZE: Final = 8
MAX_TERM: Final = 2**63 - 1  # terms and rounds above this are "term inflation" (security.md §3)
MAX_U64: Final = 2**64 - 1
MAX_ID_LEN: Final = 255


class DatagramError(RemoteProtocolError):
    """A datagram ``Codec.decode`` refuses. Drop it, count ``reason``, log it rate-limited.

    ``reason`` is one word of ``DECODE_REASONS``; ``detail`` is a short sentence for a debug log.
    Neither contains raw attacker bytes: ids are shown with ``repr`` and only after they were found
    printable. ``sender`` is the member the datagram names as its sender when decoding got past that
    field (with a key, past the MAC too, so it is authenticated), else None.
    """

    def __init__(self, reason: Reason, detail: str, sender: str | None = None) -> None:
        if reason not in DECODE_REASONS:
            raise LocalProtocolError(f"{reason!r} is not a decode reason")  # our own bug
        super().__init__(f"{reason}: {detail}")
        self.reason: Reason = reason
        self.detail = detail
        self.sender = sender


class Envelope(NamedTuple):
    """Who sent a datagram, to whom, and the fields ``ReplayGuard.check`` needs.

    ``key_id`` is the key that verified it (0: unauthenticated cluster); a peer still signing with
    a retired key shows up here during a rotation (security.md §6). Immutable; a named tuple rather
    than a frozen dataclass because one is built per datagram and costs a fifth as much.
    """

    sender: str
    receiver: str
    cluster_fp: bytes
    key_id: int
    sender_epoch: int
    seq: int
    echo_epoch: int


@dataclass(frozen=True, slots=True)
class Hello:
    """Runtime-level message (never given to the core): "here is my epoch". ``Endpoint`` sends one
    in answer to a datagram it refused as "bad-echo" (the sender did not know our epoch yet), so
    that the handshake completes even when nothing else would go back: a follower of a live master
    sends nothing to a restarted peer (protocol.md §3.2). No payload: the envelope is the message."""


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    """Runtime-level message (never given to the core): "this is the cluster I believe in".

    A node sends it, rate-limited, to a peer whose datagrams carry a different ``cluster_fp``, so
    both sides can log both membership lists and timing texts (docs/security.md §5). Never answer a
    ``ClusterInfo`` with a ``ClusterInfo``: answer protocol messages only, or two nodes ping-pong.
    ``members`` are canonical node ids, no duplicates; about 20 IPv6 ids fit in 1200 bytes, and
    ``encode`` raises ``LocalProtocolError`` when the message does not fit.
    """

    members: tuple[str, ...]
    timing: str


def cluster_fingerprint(members: Iterable[str], timing_text: str) -> bytes:
    """The 8-byte identity of a cluster configuration: SHA-256 over the sorted, de-duplicated
    members and the timing text, each length-prefixed so that no two configurations collide by
    concatenation. Nodes that disagree on either never count each other's votes."""
    h = sha256(b"pyquorum cluster v1\0")
    ids = sorted(set(members))
    h.update(struct.pack(">I", len(ids)))
    for node in ids:
        raw = node.encode("utf-8")
        h.update(struct.pack(">I", len(raw)) + raw)
    raw = timing_text.encode("utf-8")
    h.update(struct.pack(">I", len(raw)) + raw)
    return h.digest()[:FP_SIZE]


# Everything the wire carries: the core's messages, and the runtime's own (never given to the core).
WireMessage = messages.Message | ClusterInfo | Hello | OperateMessage

# msg_type numbers are part of the wire format: never renumber, only add.
MSG_TYPE: Final[dict[type[WireMessage], int]] = {
    messages.Heartbeat: 1,
    messages.HeartbeatResponse: 2,
    messages.PreVoteRequest: 3,
    messages.PreVoteResponse: 4,
    messages.VoteRequest: 5,
    messages.VoteResponse: 6,
    messages.Resign: 7,
    messages.StepDown: 8,
    messages.StepDownResponse: 9,
    ClusterInfo: 64,  # runtime-level messages live at 64 and above
    Hello: 65,
    Timeline: 66,  # wire/operate.py: step-down --wait and the drill
    TimelineResponse: 67,
    Silence: 68,
    SilenceResponse: 69,
}

_PREFIX = struct.Struct(">2sBB8s")  # magic, version, key_id, cluster_fp
_EPOCHS = struct.Struct(">QQQB")  # sender_epoch, seq, echo_epoch, msg_type
_U64 = struct.Struct(">Q")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_ENTRY = struct.Struct(">BQQ")  # a TimelineResponse entry: kind, term, age_us
_CRC = struct.Struct(">I")
_MIN_BODY = _PREFIX.size + 1 + 1 + _EPOCHS.size  # with empty ids: no valid datagram is shorter


def _is_canonical_id(text: str) -> bool:
    if not text.isascii() or not text.isprintable() or not 0 < len(text) <= MAX_ID_LEN:
        return False
    try:
        return str(NodeAddress.parse(text)) == text
    except ValueError:
        return False


class _Reader:
    # A cursor over the body; every overrun is "truncated", every strict check "bad-field".

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int) -> None:
        self.data = data
        self.pos = pos

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise DatagramError("truncated", f"datagram ends inside {what}")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    # u8, u64, term and flag check the bounds themselves rather than through take(): they run for
    # every field of every datagram, and the calls saved are a fifth of decode's time

    def u8(self, what: str) -> int:
        pos = self.pos
        if pos >= len(self.data):
            raise DatagramError("truncated", f"datagram ends inside {what}")
        self.pos = pos + 1
        return self.data[pos]

    def u16(self, what: str) -> int:
        value: int = _U16.unpack(self.take(2, what))[0]
        return value

    def u64(self, what: str) -> int:
        pos = self.pos
        if pos + 8 > len(self.data):
            raise DatagramError("truncated", f"datagram ends inside {what}")
        self.pos = pos + 8
        value: int = _U64.unpack_from(self.data, pos)[0]
        return value

    def term(self, what: str) -> int:
        # security.md §3: a term or round >= 2**63 is term inflation, never legitimate
        value = self.u64(what)
        if value > MAX_TERM:
            raise DatagramError("bad-field", f"{what} {value} is not below 2**63")
        return value

    def flag(self, what: str) -> bool:
        value = self.u8(what)
        if value > 1:
            raise DatagramError("bad-field", f"{what} is {value}, not 0 or 1")
        return value == 1

    def text(self, what: str, length: int, *, ascii_only: bool) -> str:
        raw = self.take(length, what)
        try:
            value = raw.decode("ascii" if ascii_only else "utf-8")
        except UnicodeDecodeError:
            raise DatagramError("bad-field", f"{what} is not valid text") from None
        if not value.isprintable():
            raise DatagramError("bad-field", f"{what} contains unprintable characters")
        return value

    def node_id(self, what: str) -> str:
        length = self.u8(what)
        if length == 0:
            raise DatagramError("bad-field", f"{what} is empty")
        return self.text(what, length, ascii_only=True)

    def known_id(self, what: str, known: Mapping[bytes, str]) -> str:
        # node_id() for the ids we expect, by one dict lookup of the raw bytes; anything else takes
        # the strict path, so the outcome (and every error) is exactly node_id()'s
        data, pos = self.data, self.pos
        if pos < len(data):
            end = pos + 1 + data[pos]
            found = known.get(data[pos + 1 : end]) if end <= len(data) else None
            if found is not None:
                self.pos = end
                return found
        return self.node_id(what)


class Codec:
    """Encodes and decodes the datagrams of one node (``local``) of one cluster.

    Build one per process life, and a new one when the key file is reloaded (``Endpoint`` does
    both). ``keyring=None`` means an unauthenticated cluster: datagrams carry key_id 0 and a CRC-32,
    and a signed datagram is refused ("unexpected-mac"). With a keyring, every datagram is signed
    with its sending key and only datagrams signed with one of its keys are accepted.
    """

    __slots__ = (
        "_bitmap_len",
        "_headers",
        "_live_cache",
        "_local_id",
        "_macs",
        "_max_datagram",
        "_member_ids",
        "_order",
        "_send_mac",
        "cluster_fp",
        "keyring",
        "local",
        "members",
    )

    def __init__(
        self,
        *,
        local: str,
        cluster_fp: bytes,
        members: frozenset[str],
        keyring: KeyRing | None,
        max_datagram: int = DEFAULT_MAX_DATAGRAM,
    ) -> None:
        if len(cluster_fp) != FP_SIZE:
            raise ValueError(f"cluster_fp must be {FP_SIZE} bytes, got {len(cluster_fp)}")
        for node in members:
            if not _is_canonical_id(node):
                raise ValueError(f"member {node!r} is not a canonical node id")
        if local not in members:
            raise ValueError(f"local node {local!r} is not a member")
        if not 256 <= max_datagram <= 65507:  # 65507: the largest IPv4 UDP payload
            raise ValueError(f"max_datagram {max_datagram} is outside 256-65507")
        self.local = local
        self.cluster_fp = bytes(cluster_fp)
        self.members = frozenset(members)
        self.keyring = keyring
        self._max_datagram = max_datagram
        self._order = sort_nodes(self.members)  # protocol order: the live bitmap's bit order
        self._bitmap_len = (len(self._order) + 7) // 8
        self._live_cache: tuple[frozenset[str], bytes] = (frozenset(), bytes(self._bitmap_len))
        # Everything up to the epochs is fixed per receiver: packed once, not per datagram (a third
        # of encode's time). A Codec is not changed after this: build a new one for new keys.
        key_id = 0 if keyring is None else keyring.send_key_id
        self._macs = {} if keyring is None else {kid: Mac(key) for kid, key in keyring.keys.items()}
        self._send_mac = None if keyring is None else self._macs[key_id]
        prefix = _PREFIX.pack(MAGIC, VERSION, key_id, self.cluster_fp) + _id_field(local)
        self._headers = {peer: prefix + _id_field(peer) for peer in self.members if peer != local}
        self._member_ids = {node.encode("ascii"): node for node in self.members}
        self._local_id = {local.encode("ascii"): local}

    @property
    def max_datagram(self) -> int:
        return self._max_datagram

    # -- encoding ----------------------------------------------------------------------------

    def encode(
        self,
        msg: WireMessage,
        *,
        receiver: str,
        sender_epoch: int,
        seq: int,
        echo_epoch: int,
    ) -> bytes:
        """The datagram that carries ``msg`` from ``self.local`` to ``receiver``.

        ``Endpoint.send`` is the caller that fills the envelope: ``echo_epoch`` is
        ``ReplayGuard.peer_epoch(receiver)``; ``seq`` grows with every datagram this process sends
        (one counter for all peers is fine). Send the bytes to the configured
        address of ``receiver``, never to the source address of a datagram being answered (that
        would make us a reflector for spoofed packets). Raises ``LocalProtocolError`` when a field
        is out of range or the result would exceed ``max_datagram``: that is our own bug.
        """
        header = self._headers.get(receiver)
        if header is None:
            raise LocalProtocolError(f"cannot send to {receiver!r}: not a peer member")
        if not 1 <= sender_epoch <= MAX_U64:
            raise LocalProtocolError(f"sender_epoch {sender_epoch} is outside 1..2**64-1")
        for name, value in (("seq", seq), ("echo_epoch", echo_epoch)):
            if not 0 <= value <= MAX_U64:
                raise LocalProtocolError(f"{name} {value} is outside 0..2**64-1")
        msg_type = MSG_TYPE.get(type(msg))
        if msg_type is None:
            raise LocalProtocolError(f"cannot encode {type(msg).__name__}")
        body = header + _EPOCHS.pack(sender_epoch, seq, echo_epoch, msg_type) + self._encode_payload(msg)
        if self._send_mac is None:
            datagram = body + _CRC.pack(zlib.crc32(body))
        else:
            datagram = body + self._send_mac.digest(body)
        if len(datagram) > self._max_datagram:
            raise LocalProtocolError(
                f"{type(msg).__name__} is {len(datagram)} bytes, above max_datagram {self._max_datagram}"
            )
        return datagram

    def _encode_payload(self, msg: WireMessage) -> bytes:
        if isinstance(msg, messages.Heartbeat):
            return _term(msg.term) + _flag(msg.master) + _term(msg.round) + self._live_bits(msg.live)
        if isinstance(msg, messages.HeartbeatResponse):
            return _term(msg.term) + _term(msg.round)
        if isinstance(msg, (messages.PreVoteRequest, messages.VoteRequest)):
            return _term(msg.term)
        if isinstance(msg, messages.PreVoteResponse):
            return _term(msg.term) + _flag(msg.granted) + _term(msg.voter_term)
        if isinstance(msg, messages.VoteResponse):
            return _term(msg.term) + _flag(msg.granted)
        if isinstance(msg, Hello):
            return b""
        if isinstance(msg, messages.StepDown):
            if msg.to and msg.to not in self.members:
                raise LocalProtocolError(f"step-down target {msg.to!r} is not a member")
            raw = msg.to.encode("ascii")
            return _term(msg.term) + bytes((len(raw),)) + raw + _flag(msg.preempt)
        if isinstance(msg, messages.StepDownResponse):
            if msg.reason not in messages.STEP_DOWN_REASONS:
                raise LocalProtocolError(f"unknown step-down reason {msg.reason!r}")
            return (
                _term(msg.term) + _flag(msg.accepted) + bytes((messages.STEP_DOWN_REASONS.index(msg.reason),))
            )
        if isinstance(msg, messages.Resign):
            if msg.successor and msg.successor not in self.members:
                raise LocalProtocolError(f"successor {msg.successor!r} is not a member")
            raw = msg.successor.encode("ascii")
            return _term(msg.term) + bytes((len(raw),)) + raw
        if isinstance(msg, (Timeline, TimelineResponse, Silence, SilenceResponse)):
            return _encode_operate(msg)
        # ClusterInfo
        if not 1 <= len(msg.members) <= 255 or len(set(msg.members)) != len(msg.members):
            raise LocalProtocolError("ClusterInfo needs 1-255 distinct members")
        out = [bytes((len(msg.members),))]
        for node in msg.members:
            if not _is_canonical_id(node):
                raise LocalProtocolError(f"ClusterInfo member {node!r} is not a canonical id")
            out.append(bytes((len(node),)) + node.encode("ascii"))
        timing = msg.timing.encode("utf-8")
        if not msg.timing.isprintable() or len(timing) > 0xFFFF:
            raise LocalProtocolError("ClusterInfo timing must be printable and < 64 KiB")
        out.append(_U16.pack(len(timing)) + timing)
        return b"".join(out)

    # -- decoding ----------------------------------------------------------------------------

    def decode(self, data: bytes) -> tuple[Envelope, WireMessage]:
        """Verify and parse one datagram. Raises ``DatagramError`` (a ``RemoteProtocolError``)
        and nothing else, whatever ``data`` holds.

        A decoded datagram is not yet fresh nor from our cluster: ``Endpoint.receive`` checks its
        source, its fingerprint and its freshness next (docs/security.md §3), and only then is the
        message given to ``Node.step``.
        """
        # security.md §3: size first, then magic and version, then the trailer, then parsing
        size = len(data)
        if size > self._max_datagram:
            raise DatagramError("too-large", f"{size} bytes, limit {self._max_datagram}")
        if size < _PREFIX.size:
            raise DatagramError("truncated", f"{size} bytes is shorter than any header")
        magic, version, key_id, cluster_fp = _PREFIX.unpack_from(data)
        if magic != MAGIC:
            raise DatagramError("bad-magic", "not a pyquorum datagram")
        if version != VERSION:
            raise DatagramError("bad-version", f"version {version}, we speak {VERSION}")
        body = self._verify_trailer(data, key_id)

        r = _Reader(body, _PREFIX.size)
        sender = r.known_id("sender", self._member_ids)
        if sender not in self.members:
            raise DatagramError("unknown-sender", f"sender {sender!r} is not a member")
        try:
            receiver = r.known_id("receiver", self._local_id)
            if receiver != self.local:
                raise DatagramError("wrong-receiver", f"addressed to {receiver!r}, not to us")
            if sender == receiver:
                raise DatagramError("bad-field", "a node does not send to itself")
            sender_epoch, seq, echo_epoch, msg_type = _EPOCHS.unpack(r.take(_EPOCHS.size, "header"))
            if sender_epoch == 0:
                raise DatagramError("bad-field", "sender_epoch is 0")
            msg = self._decode_payload(r, msg_type)
            if r.pos != len(body):
                raise DatagramError("trailing-bytes", f"{len(body) - r.pos} bytes after the payload")
        except DatagramError as exc:
            exc.sender = sender  # a member: the caller may name it (with a key, authenticated)
            raise
        env = Envelope(sender, receiver, cluster_fp, key_id, sender_epoch, seq, echo_epoch)
        return env, msg

    def _verify_trailer(self, data: bytes, key_id: int) -> bytes:
        # Returns the authenticated body (the datagram without its trailer).
        if self.keyring is None:
            if key_id != 0:
                raise DatagramError("unexpected-mac", "peer uses a key, we don't (no --key-file)")
            if len(data) < _MIN_BODY + CRC_SIZE:
                raise DatagramError("truncated", f"{len(data)} bytes is too short")
            body, trailer = data[:-CRC_SIZE], data[-CRC_SIZE:]
            if _CRC.unpack(trailer)[0] != zlib.crc32(body):
                raise DatagramError("bad-checksum", "CRC-32 mismatch: corrupted in transit")
            return body
        if key_id == 0:
            raise DatagramError("unauthenticated", "peer sends without a key, we require one")
        verifier = self._macs.get(key_id)
        if verifier is None:
            raise DatagramError("unknown-key", f"signed with key id {key_id}, not in our key file")
        if len(data) < _MIN_BODY + MAC_SIZE:
            raise DatagramError("truncated", f"{len(data)} bytes is too short")
        body, mac = data[:-MAC_SIZE], data[-MAC_SIZE:]
        if not compare_digest(mac, verifier.digest(body)):
            raise DatagramError("bad-mac", f"HMAC with key id {key_id} does not verify")
        return body

    def _live_bits(self, live: frozenset[str]) -> bytes:
        # The master sends one set to every peer each round: encode it once.
        cached, bits = self._live_cache
        if live is cached or live == cached:
            return bytes((self._bitmap_len,)) + bits
        value = 0
        for i, node in enumerate(self._order):
            if node in live:
                value |= 1 << (self._bitmap_len * 8 - 1 - i)
        if len(live) != bin(value).count("1"):
            raise LocalProtocolError(f"live members {sorted(live - self.members)} are not members")
        bits = value.to_bytes(self._bitmap_len, "big")
        self._live_cache = (live, bits)
        return bytes((self._bitmap_len,)) + bits

    def _read_live(self, r: _Reader) -> frozenset[str]:
        if r.u8("live length") != self._bitmap_len:
            raise DatagramError("bad-field", f"live bitmap is not {self._bitmap_len} bytes")
        value = int.from_bytes(r.take(self._bitmap_len, "live bitmap"), "big")
        if not value:
            return frozenset()
        n, width = len(self._order), self._bitmap_len * 8
        if value & ((1 << (width - n)) - 1):
            raise DatagramError("bad-field", "live bitmap has bits beyond the members")
        return frozenset(node for i, node in enumerate(self._order) if value >> (width - 1 - i) & 1)

    def _decode_payload(self, r: _Reader, msg_type: int) -> WireMessage:
        if msg_type == 1:
            term, master, round_ = r.term("term"), r.flag("master"), r.term("round")
            live = self._read_live(r)
            if live and not master:
                raise DatagramError("bad-field", "a plain heartbeat reports live members")
            return messages.Heartbeat(term=term, master=master, round=round_, live=live)
        if msg_type == 2:
            return messages.HeartbeatResponse(term=r.term("term"), round=r.term("round"))
        if msg_type == 3:
            return messages.PreVoteRequest(term=r.term("term"))
        if msg_type == 4:
            return messages.PreVoteResponse(
                term=r.term("term"), granted=r.flag("granted"), voter_term=r.term("voter_term")
            )
        if msg_type == 5:
            return messages.VoteRequest(term=r.term("term"))
        if msg_type == 6:
            return messages.VoteResponse(term=r.term("term"), granted=r.flag("granted"))
        if msg_type == 7:
            term = r.term("term")
            successor = r.text("successor", r.u8("successor"), ascii_only=True)
            if successor and successor not in self.members:
                raise DatagramError("bad-field", f"successor {successor!r} is not a member")
            return messages.Resign(term=term, successor=successor)
        if msg_type == 8:
            term = r.term("term")
            to = r.text("to", r.u8("to"), ascii_only=True)
            if to and to not in self.members:
                raise DatagramError("bad-field", f"step-down target {to!r} is not a member")
            return messages.StepDown(term=term, to=to, preempt=r.flag("preempt"))
        if msg_type == 9:
            term, accepted, code = r.term("term"), r.flag("accepted"), r.u8("reason")
            if (
                code >= len(messages.STEP_DOWN_REASONS)
                or (messages.STEP_DOWN_REASONS[code] == "accepted") != accepted
            ):
                raise DatagramError("bad-field", f"step-down reason {code} does not fit accepted={accepted}")
            return messages.StepDownResponse(
                term=term, accepted=accepted, reason=messages.STEP_DOWN_REASONS[code]
            )
        if msg_type == 64:
            return self._decode_cluster_info(r)
        if msg_type == 65:
            return Hello()
        if 66 <= msg_type <= 69:
            return _decode_operate(r, msg_type)
        raise DatagramError("bad-type", f"unknown message type {msg_type}")

    @staticmethod
    def _decode_cluster_info(r: _Reader) -> ClusterInfo:
        count = r.u8("member count")
        if count == 0:
            raise DatagramError("bad-field", "ClusterInfo lists no members")
        members: list[str] = []
        for _ in range(count):
            node = r.node_id("ClusterInfo member")
            if not _is_canonical_id(node):
                raise DatagramError("bad-field", f"ClusterInfo member {node!r} is not canonical")
            if node in members:
                raise DatagramError("bad-field", f"ClusterInfo member {node!r} is repeated")
            members.append(node)
        timing = r.text("timing", r.u16("timing length"), ascii_only=False)
        return ClusterInfo(members=tuple(members), timing=timing)


def _encode_operate(msg: OperateMessage) -> bytes:
    # wire/operate.py has the layout
    if not 0 <= msg.request_id <= MAX_U64:
        raise LocalProtocolError(f"request_id {msg.request_id} is outside 0..2**64-1")
    head = _U64.pack(msg.request_id)
    if isinstance(msg, Timeline):
        return head
    if isinstance(msg, Silence):
        if not 1 <= msg.duration_ms <= MAX_SILENCE_MS:
            raise LocalProtocolError(f"silence of {msg.duration_ms} ms is outside 1..{MAX_SILENCE_MS}")
        return head + _U32.pack(msg.duration_ms)
    if isinstance(msg, SilenceResponse):
        return head + _flag(msg.accepted)
    if msg.role not in ROLE_NAMES or len(msg.entries) > MAX_ENTRIES:
        raise LocalProtocolError(f"bad TimelineResponse: role {msg.role!r}, {len(msg.entries)} entries")
    out = [head, bytes((ROLE_NAMES.index(msg.role),)), _term(msg.term), bytes((len(msg.entries),))]
    for kind, term, age_us in msg.entries:
        if kind not in TRANSITION_KINDS or not 0 <= age_us <= MAX_U64:
            raise LocalProtocolError(f"bad timeline entry {kind!r} age {age_us}")
        out.append(_ENTRY.pack(TRANSITION_KINDS.index(kind), _checked_term(term), age_us))
    return b"".join(out)


def _decode_operate(r: _Reader, msg_type: int) -> OperateMessage:
    request_id = r.u64("request_id")
    if msg_type == 66:
        return Timeline(request_id)
    if msg_type == 68:
        duration_ms: int = _U32.unpack(r.take(4, "duration_ms"))[0]
        if not 1 <= duration_ms <= MAX_SILENCE_MS:
            raise DatagramError("bad-field", f"silence of {duration_ms} ms is outside 1..{MAX_SILENCE_MS}")
        return Silence(request_id, duration_ms)
    if msg_type == 69:
        return SilenceResponse(request_id, r.flag("accepted"))
    role = r.u8("role")
    if role >= len(ROLE_NAMES):
        raise DatagramError("bad-field", f"role {role} is unknown")
    term, count = r.term("term"), r.u8("entry count")
    if count > MAX_ENTRIES:
        raise DatagramError("bad-field", f"{count} timeline entries, at most {MAX_ENTRIES}")
    entries = []
    for _ in range(count):
        kind, entry_term, age_us = _ENTRY.unpack(r.take(_ENTRY.size, "timeline entry"))
        if kind >= len(TRANSITION_KINDS) or entry_term > MAX_TERM:
            raise DatagramError("bad-field", f"timeline entry kind {kind} term {entry_term}")
        entries.append((TRANSITION_KINDS[kind], entry_term, age_us))
    return TimelineResponse(request_id, ROLE_NAMES[role], term, tuple(entries))


def _checked_term(value: int) -> int:
    if not 0 <= value <= MAX_TERM:
        raise LocalProtocolError(f"term {value} is outside 0..2**63-1")
    return value


def _id_field(node: str) -> bytes:
    raw = node.encode("ascii")
    return bytes((len(raw),)) + raw


def _term(value: int) -> bytes:
    if not 0 <= value <= MAX_TERM:
        raise LocalProtocolError(f"term or round {value} is outside 0..2**63-1")
    return _U64.pack(value)


def _flag(value: bool) -> bytes:
    return b"\x01" if value else b"\x00"
