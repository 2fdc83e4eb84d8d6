"""The endpoint: one call in, one call out, every refusal counted under one closed set of reasons.
Reference: docs/security.md §3 (the order of the checks) and §5 (epochs and the handshake)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyquorum.core.errors import LocalProtocolError
from pyquorum.core.messages import Heartbeat, VoteRequest, VoteResponse
from pyquorum.wire import (
    REASONS,
    ClusterInfo,
    Codec,
    Deliver,
    Endpoint,
    Foreign,
    Handshake,
    KeyRing,
    Operate,
    Reject,
    RejectCounts,
    cluster_fingerprint,
)
from pyquorum.wire.operate import Silence, Timeline
from pyquorum.wire.reasons import DECODE_REASONS, REPLAY_REASONS

A, B, C = "10.0.0.1:51621", "10.0.0.2:51621", "[fd00::3]:51621"
MEMBERS = (A, B, C)
FP = cluster_fingerprint(MEMBERS, "heartbeat=0.1s election=1.0s")
OTHER_FP = cluster_fingerprint(MEMBERS, "heartbeat=0.2s election=2.0s")
KEY1, KEY2 = b"\x01" * 32, b"\x02" * 32
RING = KeyRing(send_key_id=1, keys={1: KEY1})
ADDR = {A: ("10.0.0.1", 51621), B: ("10.0.0.2", 51621), C: ("fd00::3", 51621)}
HB = Heartbeat(term=3, master=True, round=7)


def endpoint(
    local: str, epoch: int, keyring: KeyRing | None = RING, fp: bytes = FP, window: int = 1024
) -> Endpoint:
    return Endpoint(local=local, members=MEMBERS, cluster_fp=fp, keyring=keyring, epoch=epoch, window=window)


def deliver(ep: Endpoint, data: bytes, source: tuple[str, int]) -> Deliver:
    got = ep.receive(data, source)
    assert isinstance(got, Deliver), got
    return got


def refused(ep: Endpoint, data: bytes, source: tuple[str, int]) -> Reject:
    got = ep.receive(data, source)
    assert isinstance(got, Reject), got
    return got


def handshake(a: Endpoint, b: Endpoint) -> None:
    """First contact both ways (security.md §5): a's first datagram teaches b its epoch."""
    assert refused(b, a.send(b.local, HB).data, ADDR[a.local]).reason == "bad-echo"
    deliver(a, b.send(a.local, HB).data, ADDR[b.local])
    deliver(b, a.send(b.local, HB).data, ADDR[a.local])


# -- the closed set -----------------------------------------------------------------------------


def test_reasons_are_one_closed_set_in_check_order():
    endpoint_reasons = {"wrong-source", "cluster-mismatch", "unexpected-info"}
    assert len(REASONS) == len(set(REASONS)) == 21
    assert set(REASONS) == DECODE_REASONS | endpoint_reasons | REPLAY_REASONS
    assert not DECODE_REASONS & REPLAY_REASONS and not endpoint_reasons & (DECODE_REASONS | REPLAY_REASONS)
    # decoding first, the endpoint's own checks next, freshness last (the order of receive)
    assert REASONS.index("trailing-bytes") < REASONS.index("wrong-source") < REASONS.index("stale-epoch")


def test_reject_counts_start_with_every_reason_at_zero_and_refuse_strangers():
    counts = RejectCounts()
    assert counts.as_dict() == dict.fromkeys(REASONS, 0)
    assert list(counts.as_dict()) == list(REASONS)
    assert counts.add("bad-mac") == 1 and counts.add("bad-mac") == 2
    assert counts["bad-mac"] == 2 and counts.total() == 2
    with pytest.raises(LocalProtocolError):
        counts.add("bad-datagram")  # type: ignore[arg-type]


def test_endpoint_counts_every_reason_from_zero():
    ep = endpoint(B, 5)
    assert ep.rejected.as_dict() == dict.fromkeys(REASONS, 0)


# -- inbound ------------------------------------------------------------------------------------


@pytest.mark.parametrize("keyring", [RING, None], ids=["key", "no-key"])
def test_endpoint_first_contact_then_everything_delivers(keyring: KeyRing | None):
    a, b = endpoint(A, 7, keyring), endpoint(B, 3, keyring)
    handshake(a, b)
    got = deliver(b, a.send(B, VoteRequest(term=4)).data, ADDR[A])
    assert got == Deliver(A, VoteRequest(term=4), 1 if keyring else 0)
    assert b.rejected["bad-echo"] == 1 and b.rejected.total() == 1
    assert a.rejected.total() == 0


@pytest.mark.parametrize("keyring", [RING, None], ids=["key", "no-key"])
def test_endpoint_duplicate_is_replayed_not_delivered_twice(keyring: KeyRing | None):
    a, b = endpoint(A, 7, keyring), endpoint(B, 3, keyring)
    handshake(a, b)
    data = a.send(B, VoteResponse(term=4, granted=True)).data
    deliver(b, data, ADDR[A])
    assert refused(b, data, ADDR[A]).reason == "replayed"
    assert b.rejected["replayed"] == 1


def test_endpoint_restart_of_either_side():
    a, b = endpoint(A, 7), endpoint(B, 3)
    handshake(a, b)
    in_flight = a.send(B, HB).data  # from a's first life, delivered late
    a2 = endpoint(A, 8)  # a restarts with a higher epoch
    first = refused(b, a2.send(B, HB).data, ADDR[A])
    assert first.reason == "bad-echo" and first.sender == A  # echo 0, but b learns a's new epoch
    stale = refused(b, in_flight, ADDR[A])
    assert stale.reason == "stale-epoch" and "newest_seen=8" in stale.detail
    deliver(a2, b.send(A, HB).data, ADDR[B])  # b now echoes 8
    deliver(b, a2.send(B, HB).data, ADDR[A])
    # b restarts: what a2 sent to b's earlier life is refused by b's new life
    to_old_b = a2.send(B, HB).data
    b2 = endpoint(B, 4)
    rej = refused(b2, to_old_b, ADDR[A])
    assert rej.reason == "bad-echo" and "echo=3 ours=4" in rej.detail


def test_endpoint_without_key_ties_a_member_to_its_address():
    a, b = endpoint(A, 7, None), endpoint(B, 3, None)
    handshake(a, b)
    data = a.send(B, HB).data
    rej = refused(b, data, ("10.0.0.9", 51621))
    assert (rej.reason, rej.sender) == ("wrong-source", A)
    assert refused(b, data, (ADDR[A][0], 1)).reason == "wrong-source"  # the port counts too
    deliver(b, data, ADDR[A])  # not consumed by the refusals: the source check comes first


def test_endpoint_with_key_does_not_care_about_the_source():
    a, b = endpoint(A, 7), endpoint(B, 3)
    handshake(a, b)
    deliver(b, a.send(B, HB).data, ("192.0.2.1", 9))


def test_endpoint_checks_the_mac_before_the_fingerprint():
    forger = Codec(local=A, cluster_fp=OTHER_FP, members=frozenset(MEMBERS), keyring=KeyRing(1, {1: KEY2}))
    data = forger.encode(HB, receiver=B, sender_epoch=7, seq=1, echo_epoch=3)
    rej = refused(endpoint(B, 3), data, ADDR[A])
    assert (rej.reason, rej.sender) == ("bad-mac", None)


def test_endpoint_other_cluster_is_foreign_counted_and_still_replay_checked():
    a_other, b = endpoint(A, 7, fp=OTHER_FP), endpoint(B, 3)
    data = a_other.send(B, VoteRequest(term=9)).data  # echo 0: no handshake needed
    got = b.receive(data, ADDR[A])
    assert got == Foreign(A, VoteRequest(term=9), OTHER_FP)
    assert b.rejected["cluster-mismatch"] == 1
    assert refused(b, data, ADDR[A]).reason == "replayed"
    info = a_other.send(B, ClusterInfo(members=MEMBERS, timing="x")).data
    assert isinstance(b.receive(info, ADDR[A]), Foreign)
    assert b.rejected["cluster-mismatch"] == 2 and b.rejected["replayed"] == 1
    a_restarted_other = endpoint(A, 6, fp=OTHER_FP)  # an earlier epoch than b saw: stale
    assert refused(b, a_restarted_other.send(B, HB).data, ADDR[A]).reason == "stale-epoch"


def test_endpoint_refuses_cluster_info_with_our_own_fingerprint():
    a, b = endpoint(A, 7), endpoint(B, 3)
    handshake(a, b)
    rej = refused(b, a.send(B, ClusterInfo(members=MEMBERS, timing="x")).data, ADDR[A])
    assert (rej.reason, rej.sender) == ("unexpected-info", A)
    assert b.rejected["unexpected-info"] == 1


def test_endpoint_names_the_sender_once_decoding_got_past_it():
    a_to_c = endpoint(A, 7)
    rej = refused(endpoint(B, 3), a_to_c.send(C, HB).data, ADDR[A])
    assert (rej.reason, rej.sender) == ("wrong-receiver", A)
    assert refused(endpoint(B, 3), b"PQ\x02\x01" + bytes(200), ADDR[A]).sender is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    datagrams=st.lists(st.binary(max_size=300), max_size=20),
    keyed=st.booleans(),
    source=st.sampled_from([ADDR[A], ADDR[C], ("127.0.0.1", 1)]),
)
def test_fuzz_endpoint_answers_everything_and_counts_every_refusal(
    datagrams: list[bytes], keyed: bool, source: tuple[str, int]
):
    b = endpoint(B, 3, RING if keyed else None)
    a = endpoint(A, 7, RING if keyed else None)
    genuine = [a.send(B, HB).data, a.send(B, HB).data]
    refusals = 0
    for data in [*datagrams, *genuine, *(g[:-1] + bytes([g[-1] ^ 1]) for g in genuine)]:
        got = b.receive(data, source)
        assert isinstance(got, Deliver | Reject | Foreign)
        if isinstance(got, Reject):
            refusals += 1
            assert got.reason in REASONS
            assert got.detail.isprintable() and len(got.detail) < 300
        elif isinstance(got, Foreign):
            refusals += 1
    assert b.rejected.total() == refusals


# -- outbound -----------------------------------------------------------------------------------


def test_endpoint_send_owns_sequence_epoch_and_echo():
    a, b = endpoint(A, 7), endpoint(B, 3)
    reader = Codec(local=C, cluster_fp=FP, members=frozenset(MEMBERS), keyring=RING)
    first = a.send(C, HB)
    assert first.address == ("fd00::3", 51621)
    env, msg = reader.decode(first.data)
    assert (env.sender, env.sender_epoch, env.seq, env.echo_epoch, msg) == (A, 7, 1, 0, HB)
    b.receive(a.send(B, HB).data, ADDR[A])  # b learns a's epoch
    a.receive(b.send(A, HB).data, ADDR[B])  # a learns b's epoch (3)
    env, _ = Codec(local=B, cluster_fp=FP, members=frozenset(MEMBERS), keyring=RING).decode(
        a.send(B, HB).data
    )
    assert (env.seq, env.echo_epoch) == (3, 3)  # one counter for all peers
    env, _ = reader.decode(a.send(C, HB).data)
    assert (env.seq, env.echo_epoch) == (4, 0)
    assert (a.epoch, a.peer_epoch(B), a.peer_epoch(C)) == (7, 3, 0)


@pytest.mark.parametrize("dest", [A, "10.0.0.9:51621"])
def test_endpoint_send_refuses_our_own_mistakes(dest: str):
    with pytest.raises(LocalProtocolError):
        endpoint(A, 7).send(dest, HB)


@pytest.mark.parametrize("epoch", [0, -1, 2**64])
def test_endpoint_validates_its_epoch(epoch: int):
    with pytest.raises(ValueError, match="epoch"):
        endpoint(A, epoch)


def test_endpoint_member_addresses():
    ep = endpoint(A, 1)
    assert ep.address_of(C) == ("fd00::3", 51621)
    assert ep.member_at(("10.0.0.2", 51621)) == B
    assert ep.member_at(("10.0.0.2", 51622)) is None


# -- reload -------------------------------------------------------------------------------------


def test_endpoint_reload_swaps_keys_and_keeps_the_handshake():
    a, b = endpoint(A, 7), endpoint(B, 3)
    handshake(a, b)
    both = KeyRing(send_key_id=1, keys={1: KEY1, 2: KEY2})
    b.set_keyring(both)  # rotation step 1 on b: accept key 2, still sign with 1
    a.set_keyring(KeyRing(send_key_id=2, keys={1: KEY1, 2: KEY2}))  # a already signs with 2
    assert deliver(b, a.send(B, HB).data, ADDR[A]).key_id == 2  # no new handshake
    assert deliver(a, b.send(A, HB).data, ADDR[B]).key_id == 1
    b.set_keyring(KeyRing(send_key_id=2, keys={2: KEY2}))  # retire key 1 on b
    a.set_keyring(RING)
    assert refused(b, a.send(B, HB).data, ADDR[A]).reason == "unknown-key"
    assert b.keyring is not None and b.keyring.send_key_id == 2


@pytest.mark.parametrize(("before", "after"), [(RING, None), (None, RING)])
def test_endpoint_reload_cannot_turn_authentication_on_or_off(before: KeyRing | None, after: KeyRing | None):
    ep = endpoint(A, 7, before)
    with pytest.raises(LocalProtocolError, match="restart"):
        ep.set_keyring(after)
    assert ep.keyring is before


# -- the Hello: a first contact that nothing else would answer ----------------------------------


def test_a_refused_first_contact_is_answered_with_a_hello_that_completes_the_handshake():
    """Reference: protocol.md §3.2 (a quiet follower sends nothing to a restarted peer), security.md §5.
    Only one side ever sends: the Hello is all that goes back, and it is enough."""
    a, b = endpoint(A, 7), endpoint(B, 3)
    first = refused(b, a.send(B, HB).data, ADDR[A])
    assert first.reason == "bad-echo" and first.reply is not None
    assert first.reply.address == ADDR[A]
    assert isinstance(a.receive(first.reply.data, ADDR[B]), Handshake)  # a learns b's epoch
    assert a.peer_epoch(B) == 3 and a.rejected["bad-echo"] == 0
    deliver(b, a.send(B, HB).data, ADDR[A])  # a's next datagram echoes b's epoch: accepted


def test_hellos_back_off_by_count():
    """A lost Hello is answered again; a replayed stream of old datagrams gets only a few answers."""
    a, b = endpoint(A, 7), endpoint(B, 3)
    replies = [refused(b, a.send(B, HB).data, ADDR[A]).reply is not None for _ in range(20)]
    assert [i + 1 for i, r in enumerate(replies) if r] == [1, 2, 4, 8, 16]


def test_a_stale_hello_is_refused_like_any_datagram():
    a, b = endpoint(A, 7), endpoint(B, 3)
    reply = refused(b, a.send(B, HB).data, ADDR[A]).reply
    assert reply is not None
    assert isinstance(a.receive(reply.data, ADDR[B]), Handshake)
    assert refused(a, reply.data, ADDR[B]).reason == "replayed"
    restarted = endpoint(A, 8)  # a's next life: the old Hello was addressed to its previous epoch
    assert refused(restarted, reply.data, ADDR[B]).reason == "bad-echo"


# -- runtime-level messages (wire/operate.py) ----------------------------------------------------


def test_operate_messages_go_to_the_runtime_and_a_replay_or_forgery_changes_nothing():
    """A timeline or silence request is answered as ``Operate``, never ``Deliver`` (the core never
    sees it); a replayed copy is refused as "replayed", a forged one as "bad-mac", both counted.
    Reference: docs/security.md §3, §4 (types 66-69)."""
    a, b = endpoint(A, 1), endpoint(B, 1)
    handshake(a, b)
    datagram = a.send(B, Silence(request_id=9, duration_ms=1500)).data
    got = b.receive(datagram, ADDR[A])
    assert got == Operate(A, Silence(request_id=9, duration_ms=1500))
    assert refused(b, datagram, ADDR[A]).reason == "replayed"
    forged = bytearray(a.send(B, Timeline(request_id=3)).data)
    forged[-40] ^= 1  # the payload, under the MAC
    assert refused(b, bytes(forged), ADDR[A]).reason == "bad-mac"
    assert b.rejected["replayed"] == 1 and b.rejected["bad-mac"] == 1
