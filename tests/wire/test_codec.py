"""The wire codec: exact format, authentication, every rejection reason; fuzzing at the end of
this file. Reference: security.md §3 (what is protected) and §4 (wire format)."""

from __future__ import annotations

import hashlib
import hmac
import random
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyquorum.core import messages
from pyquorum.core.errors import LocalProtocolError, RemoteProtocolError
from pyquorum.wire.codec import (
    DECODE_REASONS,
    MSG_TYPE,
    ClusterInfo,
    Codec,
    DatagramError,
    Envelope,
    Hello,
    WireMessage,
    cluster_fingerprint,
)
from pyquorum.wire.keyring import KeyRing
from pyquorum.wire.operate import (
    ROLE_NAMES,
    TRANSITION_KINDS,
    Silence,
    SilenceResponse,
    Timeline,
    TimelineResponse,
)

A, B, C = "10.0.0.1:51621", "10.0.0.2:51621", "[fd00::3]:51621"
MEMBERS = frozenset({A, B, C})
TIMING = "heartbeat=0.1s election=1.0s"
FP = cluster_fingerprint(MEMBERS, TIMING)
KEY1, KEY2, KEY3 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
RING = KeyRing(send_key_id=1, keys={1: KEY1})
MAX_TERM = 2**63 - 1
MAX_U64 = 2**64 - 1

ALL_MESSAGES: list[WireMessage] = [
    messages.Heartbeat(term=0, master=False, round=0),
    messages.Heartbeat(term=MAX_TERM, master=True, round=MAX_TERM),
    messages.Heartbeat(term=5, master=True, round=6, live=frozenset({C})),  # one member: a stable test id
    Hello(),
    messages.StepDown(term=4, to=C, preempt=True),
    messages.StepDown(term=4),
    messages.StepDownResponse(term=4, accepted=True, reason="accepted"),
    messages.StepDownResponse(term=4, accepted=False, reason="not-connected"),
    messages.HeartbeatResponse(term=7, round=123456789),
    messages.PreVoteRequest(term=8),
    messages.PreVoteResponse(term=8, granted=True, voter_term=7),
    messages.PreVoteResponse(term=8, granted=False, voter_term=MAX_TERM),
    messages.VoteRequest(term=9),
    messages.VoteResponse(term=9, granted=True),
    messages.VoteResponse(term=9, granted=False),
    messages.Resign(term=10, successor=""),
    messages.Resign(term=10, successor=C),
    ClusterInfo(members=(A, B, "10.0.0.9:51621"), timing=TIMING),
    ClusterInfo(members=("[::1]:1",), timing="é ρ=1%"),
    Timeline(request_id=MAX_U64),
    TimelineResponse(request_id=0, role="slave", term=3),
    TimelineResponse(
        request_id=7,
        role="master",
        term=MAX_TERM,
        entries=(("became_master", 4, 0), ("script_stopped", MAX_TERM, MAX_U64)) * 16,
    ),
    Silence(request_id=1, duration_ms=60_000),
    SilenceResponse(request_id=2, accepted=True),
    SilenceResponse(request_id=2, accepted=False),
]


def codec(
    local: str = B,
    keyring: KeyRing | None = None,
    fp: bytes = FP,
    members: frozenset[str] = MEMBERS,
) -> Codec:
    return Codec(local=local, cluster_fp=fp, members=members, keyring=keyring)


def encode(
    msg: WireMessage,
    keyring: KeyRing | None = None,
    *,
    sender: str = A,
    receiver: str = B,
    fp: bytes = FP,
    sender_epoch: int = 5,
    seq: int = 17,
    echo_epoch: int = 3,
) -> bytes:
    return codec(sender, keyring, fp).encode(
        msg, receiver=receiver, sender_epoch=sender_epoch, seq=seq, echo_epoch=echo_epoch
    )


def u64(value: int) -> bytes:
    return struct.pack(">Q", value)


def ident(text: str) -> bytes:
    raw = text.encode()
    return bytes([len(raw)]) + raw


def build(
    payload: bytes,
    *,
    msg_type: int = 1,
    magic: bytes = b"PQ",
    version: int = 2,
    key_id: int = 0,
    key: bytes | None = None,
    fp: bytes = FP,
    sender: bytes = ident(A),
    receiver: bytes = ident(B),
    sender_epoch: int = 5,
    seq: int = 17,
    echo_epoch: int = 3,
) -> bytes:
    """A datagram assembled by hand from the table in security.md §4, independently of Codec."""
    body = (
        magic
        + bytes([version, key_id])
        + fp
        + sender
        + receiver
        + u64(sender_epoch)
        + u64(seq)
        + u64(echo_epoch)
        + bytes([msg_type])
        + payload
    )
    if key is None:
        return body + struct.pack(">I", zlib.crc32(body))
    return body + hmac.new(key, body, hashlib.sha256).digest()


def reject(c: Codec, data: bytes) -> DatagramError:
    with pytest.raises(DatagramError) as info:
        c.decode(data)
    assert info.value.reason in DECODE_REASONS
    assert isinstance(info.value, RemoteProtocolError)
    return info.value


# -- round trips and the exact format ------------------------------------------------------------


@pytest.mark.parametrize("keyring", [None, RING], ids=["no-key", "key"])
@pytest.mark.parametrize("msg", ALL_MESSAGES, ids=repr)
def test_codec_round_trips_every_message(
    msg: messages.Message | ClusterInfo | Hello, keyring: KeyRing | None
):
    """Reference: security.md §4."""
    data = encode(msg, keyring, sender_epoch=MAX_U64, seq=MAX_U64, echo_epoch=MAX_U64)
    env, decoded = codec(B, keyring).decode(data)
    assert decoded == msg
    assert type(decoded) is type(msg)
    assert env == Envelope(
        sender=A,
        receiver=B,
        cluster_fp=FP,
        key_id=0 if keyring is None else 1,
        sender_epoch=MAX_U64,
        seq=MAX_U64,
        echo_epoch=MAX_U64,
    )


def test_codec_covers_every_core_message_type():
    assert set(messages.MESSAGE_TYPES) <= set(MSG_TYPE)
    assert {type(m) for m in ALL_MESSAGES} == set(MSG_TYPE)
    assert len(set(MSG_TYPE.values())) == len(MSG_TYPE)


def test_codec_wire_format_matches_the_table():
    """Every message type byte for byte against security.md §4, with and without a key."""
    payloads: list[tuple[WireMessage, int, bytes]] = [
        (messages.Heartbeat(term=3, master=True, round=4), 1, u64(3) + b"\x01" + u64(4) + b"\x01\x00"),
        # the live bitmap over the members in protocol order: 10.0.0.1, 10.0.0.2, [fd00::3]
        (
            messages.Heartbeat(term=3, master=True, round=4, live=frozenset({A, C})),
            1,
            u64(3) + b"\x01" + u64(4) + b"\x01\xa0",
        ),
        (messages.Heartbeat(term=3, master=False), 1, u64(3) + b"\x00" + u64(0) + b"\x01\x00"),
        (messages.HeartbeatResponse(term=3, round=4), 2, u64(3) + u64(4)),
        (messages.PreVoteRequest(term=3), 3, u64(3)),
        (messages.PreVoteResponse(term=3, granted=True, voter_term=2), 4, u64(3) + b"\x01" + u64(2)),
        (messages.VoteRequest(term=3), 5, u64(3)),
        (messages.VoteResponse(term=3, granted=False), 6, u64(3) + b"\x00"),
        (messages.Resign(term=3, successor=C), 7, u64(3) + ident(C)),
        (messages.Resign(term=3), 7, u64(3) + b"\x00"),
        (ClusterInfo(members=(A, C), timing="t"), 64, b"\x02" + ident(A) + ident(C) + b"\x00\x01t"),
        (Hello(), 65, b""),
        (messages.StepDown(term=3, to=C, preempt=True), 8, u64(3) + ident(C) + b"\x01"),
        (messages.StepDownResponse(term=3, accepted=False, reason="not-live"), 9, u64(3) + b"\x00\x06"),
        (Timeline(request_id=5), 66, u64(5)),
        (
            TimelineResponse(5, "candidate", 3, (("script_started", 3, 1500), ("silence_ended", 2, 1))),
            67,
            u64(5) + b"\x02" + u64(3) + b"\x02" + b"\x01" + u64(3) + u64(1500) + b"\x06" + u64(2) + u64(1),
        ),
        (Silence(request_id=5, duration_ms=2500), 68, u64(5) + struct.pack(">I", 2500)),
        (SilenceResponse(request_id=5, accepted=True), 69, u64(5) + b"\x01"),
    ]
    for msg, msg_type, payload in payloads:
        assert encode(msg) == build(payload, msg_type=msg_type)
        assert encode(msg, RING) == build(payload, msg_type=msg_type, key_id=1, key=KEY1)


def test_codec_format_is_frozen():
    """A golden datagram: if this changes, VERSION must change too. Reference: security.md §4."""
    assert FP.hex() == "6499ece97d1e9875"
    assert cluster_fingerprint([A], "x").hex() == "94d3b3c43db5c589"
    data = encode(messages.VoteResponse(term=2, granted=True), RING, sender_epoch=1, seq=2, echo_epoch=3)
    assert data.hex() == (
        "5051"  # magic
        "02"  # version
        "01"  # key_id
        "6499ece97d1e9875"  # cluster_fp
        "0e31302e302e302e313a3531363231"  # sender
        "0e31302e302e302e323a3531363231"  # receiver
        "0000000000000001"  # sender_epoch
        "0000000000000002"  # seq
        "0000000000000003"  # echo_epoch
        "06"  # msg_type VoteResponse
        "000000000000000201"  # term, granted
        "c7b61affe36199f937af0988f2c12026e26311942a8e5aa9ce521e22acd03ec4"  # HMAC-SHA256
    )


TERMS = st.integers(0, MAX_TERM)
MESSAGES: st.SearchStrategy[WireMessage] = st.one_of(
    st.builds(messages.Heartbeat, TERMS, st.just(True), TERMS, st.frozensets(st.sampled_from([A, B, C]))),
    st.builds(messages.Heartbeat, TERMS, st.just(False), TERMS),
    st.builds(messages.HeartbeatResponse, TERMS, TERMS),
    st.builds(messages.PreVoteRequest, TERMS),
    st.builds(messages.PreVoteResponse, TERMS, st.booleans(), TERMS),
    st.builds(messages.VoteRequest, TERMS),
    st.builds(messages.VoteResponse, TERMS, st.booleans()),
    st.builds(messages.Resign, TERMS, st.sampled_from(["", A, B, C])),
    st.builds(messages.StepDown, TERMS, st.sampled_from(["", A, B, C]), st.booleans()),
    st.builds(
        messages.StepDownResponse, TERMS, st.just(False), st.sampled_from(messages.STEP_DOWN_REASONS[1:])
    ),
    st.builds(Timeline, st.integers(0, MAX_U64)),
    st.builds(
        TimelineResponse,
        st.integers(0, MAX_U64),
        st.sampled_from(ROLE_NAMES),
        TERMS,
        st.lists(
            st.tuples(st.sampled_from(TRANSITION_KINDS), TERMS, st.integers(0, MAX_U64)), max_size=32
        ).map(tuple),
    ),
    st.builds(Silence, st.integers(0, MAX_U64), st.integers(1, 60_000)),
    st.builds(SilenceResponse, st.integers(0, MAX_U64), st.booleans()),
    st.builds(
        ClusterInfo,
        st.lists(
            st.sampled_from([A, B, C, "10.0.0.9:1", "[::1]:51621", "255.255.255.255:65535"]),
            min_size=1,
            max_size=6,
            unique=True,
        ).map(tuple),
        st.text(st.characters(categories=["L", "N", "P", "S"], include_characters=" ")),
    ),
)


@settings(max_examples=2000, deadline=None, derandomize=True, database=None)
@given(
    msg=MESSAGES,
    keyed=st.booleans(),
    sender_epoch=st.integers(1, MAX_U64),
    seq=st.integers(0, MAX_U64),
    echo=st.integers(0, MAX_U64),
)
def test_codec_round_trips_random_messages(msg, keyed, sender_epoch, seq, echo):
    """Reference: security.md §4."""
    ring = RING if keyed else None
    data = encode(msg, ring, sender_epoch=sender_epoch, seq=seq, echo_epoch=echo)
    assert len(data) <= 1200
    env, decoded = codec(B, ring).decode(data)
    assert decoded == msg
    assert (env.sender_epoch, env.seq, env.echo_epoch) == (sender_epoch, seq, echo)


# -- authentication and keys ------------------------------------------------------------------


def test_codec_rotation_accepts_both_keys_and_signs_with_the_first():
    """Rotation step 2 on one node only: it signs with key 2, the others still with key 1, and
    everyone accepts both. Reference: security.md §6."""
    old_first = KeyRing(send_key_id=1, keys={1: KEY1, 2: KEY2})
    new_first = KeyRing(send_key_id=2, keys={2: KEY2, 1: KEY1})
    from_old = encode(messages.VoteRequest(term=4), old_first)
    from_new = encode(messages.VoteRequest(term=4), new_first)
    assert from_old[3] == 1
    assert from_new[3] == 2
    assert from_new[:-32] == from_old[:3] + b"\x02" + from_old[4:-32]
    for receiver_ring in (old_first, new_first):
        assert codec(B, receiver_ring).decode(from_old)[0].key_id == 1
        assert codec(B, receiver_ring).decode(from_new)[0].key_id == 2
    # step 3 done on the receiver (key 1 removed) before the sender moved key 2 first: refused
    only_new = KeyRing(send_key_id=2, keys={2: KEY2})
    assert reject(codec(B, only_new), from_old).reason == "unknown-key"
    assert codec(B, only_new).decode(from_new)[1] == messages.VoteRequest(term=4)


def test_codec_rejects_wrong_key_with_same_id():
    """Reference: security.md §3 (forgery)."""
    forged = encode(messages.VoteResponse(term=4, granted=True), KeyRing(send_key_id=1, keys={1: KEY3}))
    assert reject(codec(B, RING), forged).reason == "bad-mac"


def test_codec_rejects_unknown_key_id():
    data = encode(messages.VoteRequest(term=4), KeyRing(send_key_id=9, keys={9: KEY1}))
    err = reject(codec(B, RING), data)
    assert err.reason == "unknown-key"
    assert "key id 9" in err.detail


def test_codec_with_key_rejects_unauthenticated():
    """Reference: security.md §3 (forgery): key_id 0 is refused once a key is configured."""
    assert reject(codec(B, RING), encode(messages.VoteRequest(term=4))).reason == "unauthenticated"


def test_codec_without_key_rejects_signed_datagrams_clearly():
    err = reject(codec(B, None), encode(messages.VoteRequest(term=4), RING))
    assert err.reason == "unexpected-mac"
    assert "peer uses a key, we don't" in str(err)


def test_codec_rejects_forged_mac():
    data = build(u64(4), msg_type=5, key_id=1, key=KEY1)
    assert codec(B, RING).decode(data)[1] == messages.VoteRequest(term=4)
    assert reject(codec(B, RING), data[:-32] + bytes(32)).reason == "bad-mac"
    assert reject(codec(B, RING), data[:-1] + bytes([data[-1] ^ 1])).reason == "bad-mac"


def test_codec_verifies_mac_before_parsing():
    """A forged datagram reaches no parser: garbage behind a valid prefix is "bad-mac", not a
    parse error. Reference: security.md §3 (verify before parse)."""
    garbage = b"PQ\x02\x01" + FP + b"\xff" * 60
    assert reject(codec(B, RING), garbage).reason == "bad-mac"
    # the same garbage with a correct MAC reaches the parser: sender length 255 overruns it
    signed = garbage + hmac.new(KEY1, garbage, hashlib.sha256).digest()
    assert reject(codec(B, RING), signed).reason == "truncated"


def _flips(data: bytes):
    for pos in range(len(data)):
        for mask in (0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xFF):
            yield data[:pos] + bytes([data[pos] ^ mask]) + data[pos + 1 :]


@pytest.mark.parametrize("msg", ALL_MESSAGES, ids=repr)
def test_codec_with_key_rejects_every_altered_byte(msg: messages.Message | ClusterInfo | Hello):
    """Every single bit, and every whole byte, flipped anywhere: rejected. Reference:
    security.md §3 (alteration)."""
    data = encode(msg, RING)
    receiver = codec(B, RING)
    reasons = {reject(receiver, altered).reason for altered in _flips(data)}
    assert reasons <= {"bad-magic", "bad-version", "unauthenticated", "unknown-key", "bad-mac"}


@pytest.mark.parametrize("msg", ALL_MESSAGES, ids=repr)
def test_codec_without_key_detects_every_corrupted_byte(msg: messages.Message | ClusterInfo | Hello):
    """CRC-32 catches any error within one byte (accidents only, not attackers). Reference:
    security.md §4 (trailer)."""
    data = encode(msg)
    receiver = codec(B, None)
    reasons = {reject(receiver, altered).reason for altered in _flips(data)}
    assert reasons <= {"bad-magic", "bad-version", "unexpected-mac", "bad-checksum"}


@pytest.mark.parametrize("keyring", [None, RING], ids=["no-key", "key"])
def test_codec_rejects_every_truncation_and_extension(keyring: KeyRing | None):
    """Reference: security.md §3 (alteration)."""
    receiver = codec(B, keyring)
    for msg in ALL_MESSAGES:
        data = encode(msg, keyring)
        for cut in range(len(data)):
            reject(receiver, data[:cut])
        for extra in (b"\x00", b"\xff" * 7, data):
            reject(receiver, data + extra)


# -- cluster identity -------------------------------------------------------------------------


def test_codec_decodes_other_cluster_and_reports_its_fingerprint():
    """A different fingerprint still decodes; the caller only counts ClusterInfo from it.
    Reference: security.md §5 (ClusterInfo)."""
    other_fp = cluster_fingerprint(MEMBERS, "heartbeat=0.2s election=2.0s")
    info = ClusterInfo(members=tuple(sorted(MEMBERS)), timing="heartbeat=0.2s election=2.0s")
    for ring in (None, RING):
        env, msg = codec(B, ring).decode(encode(info, ring, fp=other_fp))
        assert env.cluster_fp == other_fp != FP
        assert msg == info


def test_codec_other_cluster_with_other_key_is_rejected():
    """With a key, a foreign datagram decodes only when its MAC verifies with our keys.
    Reference: security.md §3 (cross-cluster)."""
    other = encode(messages.VoteRequest(term=1), KeyRing(send_key_id=1, keys={1: KEY3}), fp=b"\x00" * 8)
    assert reject(codec(B, RING), other).reason == "bad-mac"


def test_cluster_fingerprint_properties():
    assert len(FP) == 8
    assert cluster_fingerprint([C, A, B, A], TIMING) == FP
    assert cluster_fingerprint([A, B], TIMING) != FP
    assert cluster_fingerprint(MEMBERS, TIMING + " ") != FP
    # length prefixes: no ambiguity between where one field ends and the next begins
    assert cluster_fingerprint(["ab"], "c") != cluster_fingerprint(["a"], "bc")
    assert cluster_fingerprint(["a", "b"], "") != cluster_fingerprint(["ab"], "")


# -- every rejection reason -------------------------------------------------------------------

HB = u64(3) + b"\x01" + u64(4) + b"\x01\x00"  # a valid Heartbeat payload (no member reported live)


def test_codec_rejects_too_large_before_anything_else():
    """Reference: security.md §3 (order of checks)."""
    c = codec(B, RING)
    assert reject(c, b"\xff" * 1201).reason == "too-large"
    assert reject(codec(B, None), b"\xff" * 1201).reason == "too-large"
    # a valid datagram grown past the limit is refused by size alone
    big = build(u64(3), msg_type=3, key_id=1, key=KEY1)
    assert reject(c, big + b"\x00" * (1201 - len(big))).reason == "too-large"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "truncated"),
        (b"PQ", "truncated"),
        (b"PQ\x02\x00" + b"\x00" * 7, "truncated"),
        (b"XQ\x01\x00" + FP, "bad-magic"),
        (b"\x00" * 200, "bad-magic"),
        (b"PQ\x03\x00" + FP, "bad-version"),
        (b"PQ\x01\x00" + FP, "bad-version"),  # a pyquorum whose heartbeats carry no live bitmap
        (b"PQ\x00\x00" + FP, "bad-version"),
        (b"PQ\x02\x00" + FP + b"\x00" * 10, "truncated"),
    ],
)
def test_codec_rejects_header_problems(data: bytes, reason: str):
    assert reject(codec(B, None), data).reason == reason


def test_codec_rejects_short_signed_datagram_as_truncated():
    assert reject(codec(B, RING), b"PQ\x02\x01" + FP + b"\x00" * 30).reason == "truncated"


def test_codec_rejects_bad_checksum():
    data = build(HB)
    assert reject(codec(B), data[:-4] + b"\x00\x00\x00\x00").reason == "bad-checksum"


@pytest.mark.parametrize("keyed", [False, True])
def test_codec_rejects_unknown_sender(keyed: bool):
    """Reference: security.md §3 (memory bounds, impersonation of non-members)."""
    key = KEY1 if keyed else None
    ring = RING if keyed else None
    data = build(HB, sender=ident("10.0.0.99:51621"), key_id=int(keyed), key=key)
    err = reject(codec(B, ring), data)
    assert err.reason == "unknown-sender"
    assert "'10.0.0.99:51621'" in err.detail


def test_codec_rejects_datagram_for_another_receiver():
    """A datagram A sent to C cannot be replayed to B. Reference: security.md §3 (replay)."""
    data = encode(messages.VoteResponse(term=5, granted=True), RING, receiver=C)
    assert codec(C, RING).decode(data)[1] == messages.VoteResponse(term=5, granted=True)
    assert reject(codec(B, RING), data).reason == "wrong-receiver"


@pytest.mark.parametrize(
    ("overrides", "payload", "msg_type"),
    [
        ({"sender": b"\x00"}, HB, 1),  # empty sender
        ({"sender": ident("10.0.0.1:51621\n")}, HB, 1),  # unprintable
        ({"sender": b"\x02\xc3\xa9"}, HB, 1),  # not ASCII
        ({"sender": ident(B)}, HB, 1),  # from ourselves
        ({"receiver": b"\x00"}, HB, 1),
        ({"sender_epoch": 0}, HB, 1),
        ({}, u64(2**63) + b"\x01" + u64(4), 1),  # term inflation
        ({}, u64(MAX_U64) + u64(0), 2),
        ({}, u64(3) + b"\x01" + u64(2**63), 1),  # round inflation
        ({}, u64(3) + b"\x02" + u64(4), 1),  # boolean 2
        ({}, u64(3) + b"\xff", 6),
        ({}, u64(3) + b"\x01" + u64(2**63), 4),  # voter_term inflation
        ({}, u64(3) + ident("10.0.0.99:51621"), 7),  # successor not a member
        ({}, u64(3) + b"\x03\x00\x01\x02", 7),  # successor unprintable
        ({}, b"\x00" + b"\x00\x00", 64),  # ClusterInfo without members
        ({}, b"\x01" + ident("10.0.0.01:1") + b"\x00\x00", 64),  # not canonical
        ({}, b"\x01" + ident("host:1") + b"\x00\x00", 64),
        ({}, b"\x01" + ident("1.2.3.4") + b"\x00\x00", 64),  # port missing
        ({}, b"\x02" + ident(A) + ident(A) + b"\x00\x00", 64),  # repeated
        ({}, b"\x01" + ident(A) + b"\x00\x01\n", 64),  # timing unprintable
        ({}, b"\x01" + ident(A) + b"\x00\x01\xff", 64),  # timing not UTF-8
        ({}, u64(1) + b"\x04" + u64(3) + b"\x00", 67),  # role unknown
        ({}, u64(1) + b"\x00" + u64(2**63) + b"\x00", 67),  # term inflation
        ({}, u64(1) + b"\x00" + u64(3) + b"\x21", 67),  # 33 entries: above MAX_ENTRIES
        ({}, u64(1) + b"\x00" + u64(3) + b"\x01" + b"\x07" + u64(3) + u64(0), 67),  # kind unknown
        ({}, u64(1) + b"\x00" + u64(3) + b"\x01" + b"\x00" + u64(2**63) + u64(0), 67),
        ({}, u64(1) + struct.pack(">I", 0), 68),  # a silence of 0 ms
        ({}, u64(1) + struct.pack(">I", 60_001), 68),  # above MAX_SILENCE_MS
        ({}, u64(1) + b"\x02", 69),  # boolean 2
    ],
)
def test_codec_rejects_bad_fields(overrides: dict[str, object], payload: bytes, msg_type: int):
    """Strict parsing. Reference: security.md §3 (term inflation, parser crashes)."""
    for ring, key, key_id in ((None, None, 0), (RING, KEY1, 1)):
        data = build(payload, msg_type=msg_type, key=key, key_id=key_id, **overrides)  # type: ignore[arg-type]
        assert reject(codec(B, ring), data).reason == "bad-field"


@pytest.mark.parametrize("msg_type", [0, 10, 63, 70, 255])
def test_codec_rejects_unknown_message_type(msg_type: int):
    assert reject(codec(B), build(u64(1), msg_type=msg_type)).reason == "bad-type"


@pytest.mark.parametrize(
    ("payload", "msg_type"),
    [(u64(3), 1), (u64(3) + b"\x01", 1), (b"", 3), (u64(3), 6), (u64(3) + b"\x05AB", 7)],
)
def test_codec_rejects_truncated_payload(payload: bytes, msg_type: int):
    err = reject(codec(B, RING), build(payload, msg_type=msg_type, key_id=1, key=KEY1))
    assert err.reason == "truncated"


@pytest.mark.parametrize(("payload", "msg_type"), [(HB + b"\x00", 1), (u64(3) + b"\x00", 5)])
def test_codec_rejects_trailing_bytes(payload: bytes, msg_type: int):
    err = reject(codec(B, RING), build(payload, msg_type=msg_type, key_id=1, key=KEY1))
    assert err.reason == "trailing-bytes"


@pytest.mark.parametrize(
    "live",
    [
        b"\x02\x00\x00",  # the wrong length for three members
        b"\x01\x10",  # a bit beyond the third member
    ],
)
def test_codec_rejects_a_bad_live_bitmap(live: bytes):
    """Reference: security.md §4 (strict parsing), protocol.md §3.2 (the master's report)."""
    data = build(u64(3) + b"\x01" + u64(4) + live, key_id=1, key=KEY1)
    assert reject(codec(B, RING), data).reason == "bad-field"


def test_codec_rejects_a_plain_heartbeat_that_reports_members():
    data = build(u64(3) + b"\x00" + u64(0) + b"\x01\x80", key_id=1, key=KEY1)
    assert reject(codec(B, RING), data).reason == "bad-field"


def test_codec_error_details_are_short_and_printable():
    """Rejects are logged (rate-limited): no raw attacker bytes in the text."""
    data = build(HB, sender=ident("10.0.0.99:51621"))
    detail = reject(codec(B), data).detail
    assert detail.isprintable()
    assert len(detail) < 200


# -- our own mistakes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("msg", "kwargs", "match"),
    [
        (messages.VoteRequest(term=2**63), {}, "outside 0..2\\*\\*63-1"),
        (messages.VoteRequest(term=-1), {}, "outside"),
        (messages.Heartbeat(term=1, master=True, round=2**63), {}, "outside"),
        (messages.VoteRequest(term=1), {"receiver": A}, "not a peer member"),
        (messages.VoteRequest(term=1), {"receiver": "10.0.0.99:51621"}, "not a peer member"),
        (messages.VoteRequest(term=1), {"sender_epoch": 0}, "sender_epoch"),
        (messages.VoteRequest(term=1), {"seq": -1}, "seq"),
        (messages.VoteRequest(term=1), {"echo_epoch": 2**64}, "echo_epoch"),
        (messages.Resign(term=1, successor="10.0.0.99:51621"), {}, "successor"),
        (ClusterInfo(members=(), timing=""), {}, "1-255 distinct"),
        (ClusterInfo(members=(A, A), timing=""), {}, "1-255 distinct"),
        (ClusterInfo(members=("a:b",), timing=""), {}, "canonical"),
        (ClusterInfo(members=(A,), timing="\n"), {}, "printable"),
        (
            ClusterInfo(members=tuple(f"[fd00::{i:x}]:51621" for i in range(1, 99)), timing=""),
            {},
            "above max_datagram 1200",
        ),
    ],
)
def test_codec_encode_refuses_our_own_mistakes(msg, kwargs, match):
    c = codec(A, RING)
    args = {"receiver": B, "sender_epoch": 1, "seq": 1, "echo_epoch": 0, **kwargs}
    with pytest.raises(LocalProtocolError, match=match):
        c.encode(msg, **args)


def test_codec_encode_refuses_foreign_objects():
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        codec(A).encode("hello", receiver=B, sender_epoch=1, seq=1, echo_epoch=0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cluster_fp": b"short"}, "8 bytes"),
        ({"members": frozenset({A, "10.0.0.02:1"})}, "canonical"),
        ({"local": "10.0.0.99:51621"}, "not a member"),
        ({"max_datagram": 100}, "outside"),
        ({"max_datagram": 70000}, "outside"),
    ],
)
def test_codec_constructor_validates(kwargs, match):
    args = {"local": A, "cluster_fp": FP, "members": MEMBERS, "keyring": None, **kwargs}
    with pytest.raises(ValueError, match=match):
        Codec(**args)


def test_codec_max_datagram_is_configurable():
    c = Codec(local=B, cluster_fp=FP, members=MEMBERS, keyring=None, max_datagram=256)
    assert c.max_datagram == 256
    info = ClusterInfo(members=(A,), timing="x" * 200)
    assert reject(c, encode(info)).reason == "too-large"


# -- fuzzing ----------------------------------------------------------------------------------
#
# Every input either decodes to a message whose re-encoding is byte for byte the input (so the
# encoding is canonical: no two datagrams mean the same thing) or raises DatagramError with a
# known reason. Any other exception fails the test. Two kinds of test, split into several
# functions so that pytest-xdist spreads them over cores, all derandomized (every run is the same
# run, and a failure reproduces):
#
# * structured: Hypothesis draws each input, and shrinks a failure to a minimal one;
# * batches: Hypothesis draws a seed and FUZZ_BATCH inputs are derived from it, because Hypothesis
#   costs ~0.5-1.5 ms per example while one decode costs ~10 us. A failure prints the input.
#
# Inputs per regular run: 6 x 2,500 structured + 4 x 500 x 100 batched = 215,000.
# Reference: security.md §3 (parser crashes).

FUZZ_STRUCTURED = 2_500
FUZZ_SEEDS = 500
FUZZ_BATCH = 100


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


RECEIVER = {False: codec(B, None), True: codec(B, RING)}
SENDERS = {
    (keyed, sender, fp): codec(sender, RING if keyed else None, fp)
    for keyed in (False, True)
    for sender in MEMBERS
    for fp in (FP, b"\x00" * 8)
}
CORPUS: list[bytes] = [
    encode(msg, ring, sender=sender, receiver=B, fp=fp, sender_epoch=epoch, seq=seq)
    for msg in ALL_MESSAGES
    for ring in (None, RING)
    for sender, fp, epoch, seq in ((A, FP, 1, 0), (C, b"\x00" * 8, MAX_U64, 2**32 + 1))
]
CORPUS_SET = frozenset(CORPUS)
TRAILER = {False: 4, True: 32}


def check_decode(data: bytes, keyed: bool) -> bool:
    """True when ``data`` decoded; then it must be the canonical encoding of what it decoded to."""
    try:
        env, msg = RECEIVER[keyed].decode(data)
    except DatagramError as err:
        reason = err.reason
    else:
        sender = SENDERS.get((keyed, env.sender, env.cluster_fp)) or codec(
            env.sender, RING if keyed else None, env.cluster_fp
        )
        again = sender.encode(
            msg,
            receiver=env.receiver,
            sender_epoch=env.sender_epoch,
            seq=env.seq,
            echo_epoch=env.echo_epoch,
        )
        assert again == data
        return True
    assert reason in DECODE_REASONS
    return False


def seal(body: bytes, keyed: bool) -> bytes:
    if keyed:
        return body + hmac.new(KEY1, body, hashlib.sha256).digest()
    return body + struct.pack(">I", zlib.crc32(body))


@fuzz_settings(FUZZ_STRUCTURED)
@given(data=st.binary(max_size=1300))
def test_fuzz_codec_arbitrary_bytes_with_key(data: bytes):
    assert not check_decode(data, keyed=True)


@fuzz_settings(FUZZ_STRUCTURED)
@given(data=st.binary(max_size=1300))
def test_fuzz_codec_arbitrary_bytes_without_key(data: bytes):
    assert not check_decode(data, keyed=False)


def node_id_field() -> st.SearchStrategy[bytes]:
    valid = st.sampled_from([ident(A), ident(B), ident(C), ident("10.0.0.99:51621"), b"\x00"])
    return st.one_of(valid, st.binary(max_size=20))


def payload_field() -> st.SearchStrategy[bytes]:
    # building blocks of real payloads, concatenated in random order, or raw bytes
    pieces = st.sampled_from(
        [
            u64(0),
            u64(MAX_TERM),
            u64(2**63),
            u64(MAX_U64),
            b"\x00",
            b"\x01",
            b"\x02",
            ident(A),
            ident(C),
            ident("[::1]:1"),
            ident("1.2.3.4"),
            b"\x00\x03abc",
            b"\x00\x01\n",
            b"\xff",
        ]
    )
    return st.one_of(st.lists(pieces, max_size=6).map(b"".join), st.binary(max_size=40))


@st.composite
def sealed_garbage(draw: st.DrawFn, keyed: bool) -> bytes:
    """A header with each field valid or not, a payload of real building blocks, and a correct
    trailer: inputs that get past the MAC or checksum and exercise the parser itself."""
    body = (
        b"PQ\x02"
        + bytes([1 if keyed else 0])
        + draw(st.sampled_from([FP, b"\x00" * 8]))
        + draw(node_id_field())
        + draw(node_id_field())
        + draw(st.sampled_from([u64(0), u64(1), u64(MAX_U64)]))
        + draw(st.binary(min_size=16, max_size=16))
        + draw(st.sampled_from([b"\x00", b"\x01", b"\x04", b"\x07", b"\x08", b"\x40", b"\xff"]))
        + draw(payload_field())
    )
    return seal(body, keyed)


@fuzz_settings(FUZZ_STRUCTURED)
@given(data=sealed_garbage(keyed=True))
def test_fuzz_codec_signed_garbage(data: bytes):
    """What a key holder could send: still never a crash."""
    check_decode(data, keyed=True)


@fuzz_settings(FUZZ_STRUCTURED)
@given(data=sealed_garbage(keyed=False))
def test_fuzz_codec_checksummed_garbage(data: bytes):
    check_decode(data, keyed=False)


KINDS = ("flip", "set", "truncate", "extend", "insert", "delete", "splice")
Mutation = tuple[str, int, bytes]
MUTATIONS = st.lists(
    st.tuples(st.sampled_from(KINDS), st.integers(0, 2000), st.binary(min_size=1, max_size=8)),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, ops: list[Mutation]) -> bytes:
    """Bit flips, overwrites, truncation, extension, insertion, deletion and splicing with
    another valid datagram."""
    for kind, where, value in ops:
        pos = where % (len(data) + 1)
        if kind == "flip" and data:
            pos %= len(data)
            data = data[:pos] + bytes([data[pos] ^ (value[0] or 1)]) + data[pos + 1 :]
        elif kind == "set" and data:
            pos %= len(data)
            data = data[:pos] + value[:1] + data[pos + 1 :]
        elif kind == "truncate":
            data = data[:pos]
        elif kind == "extend":
            data = data + value
        elif kind == "insert":
            data = data[:pos] + value + data[pos:]
        elif kind == "delete":
            data = data[:pos] + data[pos + len(value) :]
        elif kind == "splice":
            other = CORPUS[value[0] % len(CORPUS)]
            data = data[:pos] + other[where % (len(other) + 1) :]
    return data


def check_mutation(original: bytes, ops: list[Mutation], *, keyed: bool, reseal: bool) -> None:
    if reseal:
        # what a key holder could send: any body, correctly signed or checksummed
        body = original[: -TRAILER[original[3] != 0]]
        body = body[:3] + bytes([int(keyed)]) + body[4:]  # the key id this receiver expects
        check_decode(seal(mutate(body, ops), keyed), keyed)
    elif check_decode(data := mutate(original, ops), keyed):
        # without resealing, no mutation yields anything but a valid datagram we already had
        # (splicing can rebuild one): with a key by the MAC, without one by CRC-32
        assert data in CORPUS_SET


def mutation_test(keyed: bool, reseal: bool):
    @fuzz_settings(FUZZ_STRUCTURED)
    @given(original=st.sampled_from(CORPUS), ops=MUTATIONS)
    def test(original: bytes, ops: list[Mutation]) -> None:
        check_mutation(original, ops, keyed=keyed, reseal=reseal)

    return test


def mutation_batch_test(keyed: bool, reseal: bool):
    @fuzz_settings(FUZZ_SEEDS)
    @given(seed=st.integers(0, 2**64 - 1))
    def test(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(FUZZ_BATCH):
            original = rng.choice(CORPUS)
            ops = [
                (rng.choice(KINDS), rng.randrange(2001), rng.randbytes(rng.randint(1, 8)))
                for _ in range(rng.randint(1, 4))
            ]
            try:
                check_mutation(original, ops, keyed=keyed, reseal=reseal)
            except Exception as exc:
                raise AssertionError(f"original={original.hex()} ops={ops!r}") from exc

    return test


test_fuzz_codec_mutated_datagrams_with_key = mutation_test(keyed=True, reseal=False)
test_fuzz_codec_mutated_and_resigned_datagrams = mutation_test(keyed=True, reseal=True)
test_fuzz_codec_mutated_batches_with_key = mutation_batch_test(keyed=True, reseal=False)
test_fuzz_codec_mutated_batches_without_key = mutation_batch_test(keyed=False, reseal=False)
test_fuzz_codec_mutated_and_resigned_batches = mutation_batch_test(keyed=True, reseal=True)
test_fuzz_codec_mutated_and_rechecksummed_batches = mutation_batch_test(keyed=False, reseal=True)
