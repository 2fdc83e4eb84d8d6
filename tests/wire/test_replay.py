"""Replay protection: epochs, echoes and the sliding window. Reference: security.md §5."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyquorum.core.messages import Heartbeat, Message, VoteResponse
from pyquorum.wire.codec import ClusterInfo, Codec, Envelope, cluster_fingerprint
from pyquorum.wire.keyring import KeyRing
from pyquorum.wire.replay import DEFAULT_WINDOW, ReplayGuard, next_boot_epoch

A, B, C = "10.0.0.1:51621", "10.0.0.2:51621", "10.0.0.3:51621"
MEMBERS = frozenset({A, B, C})
FP = cluster_fingerprint(MEMBERS, "t")
RING = KeyRing(send_key_id=1, keys={1: b"k" * 32})
ME = 7  # the guard's own epoch in the unit tests


def env(seq: int, *, sender: str = A, epoch: int = 3, echo: int = ME) -> Envelope:
    return Envelope(
        sender=sender,
        receiver=B,
        cluster_fp=FP,
        key_id=1,
        sender_epoch=epoch,
        seq=seq,
        echo_epoch=echo,
    )


def accepted(guard: ReplayGuard, *envs: Envelope) -> list[str | None]:
    return [guard.check(e) for e in envs]


# -- the sliding window -----------------------------------------------------------------------


def test_replay_accepts_increasing_sequence_numbers():
    guard = ReplayGuard(ME)
    assert accepted(guard, env(1), env(2), env(5), env(1000)) == [None] * 4


def test_replay_rejects_exact_replay():
    """Reference: security.md §5 rule 4."""
    guard = ReplayGuard(ME)
    assert guard.check(env(10)) is None
    assert guard.check(env(10)) == "replayed"
    assert guard.check(env(11)) is None
    assert guard.check(env(10)) == "replayed"
    assert guard.check(env(11)) == "replayed"


def test_replay_accepts_reordering_within_the_window_once():
    """Reference: security.md §5 rule 4."""
    guard = ReplayGuard(ME, window=64)
    assert guard.check(env(100)) is None
    assert accepted(guard, env(99), env(37), env(50), env(98)) == [None] * 4
    assert accepted(guard, env(99), env(37), env(50), env(98), env(100)) == ["replayed"] * 5
    assert guard.check(env(36)) == "too-old"  # 100 - 64
    assert guard.check(env(0)) == "too-old"


def test_replay_window_slides():
    guard = ReplayGuard(ME, window=8)
    assert accepted(guard, env(1), env(3)) == [None, None]
    assert guard.check(env(10)) is None  # 3 is now 7 behind: still inside
    assert guard.check(env(3)) == "replayed"
    assert guard.check(env(4)) is None  # never seen, 6 behind: inside
    assert guard.check(env(2)) == "too-old"  # never seen, 8 behind: outside
    assert guard.check(env(11)) is None
    assert guard.check(env(3)) == "too-old"
    assert guard.check(env(10_000)) is None  # a jump beyond the window forgets everything
    assert accepted(guard, env(9_999), env(9_993)) == [None, None]
    assert accepted(guard, env(9_992), env(10_000), env(9_999)) == ["too-old", "replayed", "replayed"]


def test_replay_sequence_numbers_cover_the_whole_u64_range():
    guard = ReplayGuard(ME)
    assert accepted(guard, env(0), env(2**64 - 2), env(2**64 - 1)) == [None] * 3
    assert guard.check(env(2**64 - 1)) == "replayed"


def test_replay_senders_are_independent():
    guard = ReplayGuard(ME)
    assert accepted(guard, env(5, sender=A), env(5, sender=C)) == [None, None]
    assert accepted(guard, env(5, sender=A), env(5, sender=C)) == ["replayed", "replayed"]


def test_replay_rejected_datagram_does_not_consume_its_sequence_number():
    guard = ReplayGuard(ME)
    assert guard.check(env(5, echo=ME - 1)) == "bad-echo"
    assert guard.check(env(5)) is None


# -- epochs ---------------------------------------------------------------------------------


def test_replay_restarted_sender_makes_its_old_datagrams_stale():
    """The old life's datagrams cannot impersonate the new one, even with unseen sequence
    numbers. Reference: security.md §5 rule 2."""
    guard = ReplayGuard(ME)
    old = [env(seq, epoch=3) for seq in range(1, 6)]
    assert accepted(guard, *old[:2]) == [None, None]
    assert guard.check(env(1, epoch=4)) is None  # restarted: counts from 1 again
    assert guard.peer_epoch(A) == 4
    assert accepted(guard, *old) == ["stale-epoch"] * 5
    assert accepted(guard, env(2, epoch=4), env(1, epoch=4)) == [None, "replayed"]


def test_replay_learns_epoch_from_rejected_datagrams():
    """Rule 1: even a datagram rejected for its echo teaches the sender's new epoch."""
    guard = ReplayGuard(ME)
    assert guard.check(env(1, epoch=3)) is None
    assert guard.check(env(1, epoch=9, echo=0)) == "bad-echo"
    assert guard.peer_epoch(A) == 9
    assert guard.check(env(2, epoch=3)) == "stale-epoch"
    assert guard.check(env(2, epoch=9)) is None


def test_replay_restarted_receiver_rejects_everything_sent_before():
    """After our restart, datagrams echo our old epoch: all rejected, including a withheld one
    never delivered before. Reference: security.md §5 rule 3."""
    before = ReplayGuard(ME)
    captured = [env(seq, echo=ME) for seq in range(1, 10)]
    assert accepted(before, *captured[:5]) == [None] * 5
    after = ReplayGuard(ME + 1)
    assert accepted(after, *captured) == ["bad-echo"] * 9
    assert after.peer_epoch(A) == 3  # learnt from them all the same
    assert after.check(env(10, echo=ME + 1)) is None


def test_replay_first_contact_is_rejected_until_echoed():
    """Echo 0 means the sender has not heard from us yet. Reference: security.md §5."""
    guard = ReplayGuard(ME)
    assert guard.peer_epoch(A) == 0
    assert guard.check(env(1, echo=0)) == "bad-echo"
    assert guard.peer_epoch(A) == 3


def test_replay_cluster_info_bypasses_only_the_echo_check():
    """Reference: security.md §5 (ClusterInfo)."""
    guard = ReplayGuard(ME)
    assert guard.check(env(1, echo=0), check_echo=False) is None
    assert guard.check(env(1, echo=0), check_echo=False) == "replayed"
    assert guard.check(env(1, epoch=4, echo=0), check_echo=False) is None
    assert guard.check(env(2, epoch=3, echo=0), check_echo=False) == "stale-epoch"


def test_replay_memory_is_one_record_per_sender():
    """Reference: security.md §3 (memory bounds)."""
    guard = ReplayGuard(ME)
    for seq in range(0, 200_000, 7):
        guard.check(env(seq, sender=(A, C)[seq % 2], epoch=3 + seq // 50_000))
    assert len(guard._peers) == 2
    assert all(p.seen < 1 << DEFAULT_WINDOW for p in guard._peers.values())


@pytest.mark.parametrize(("epoch", "window"), [(0, 1024), (-1, 1024), (1, 0), (1, 1 << 17)])
def test_replay_guard_validates(epoch: int, window: int):
    with pytest.raises(ValueError, match="must be"):
        ReplayGuard(epoch, window)


# -- against a reference model ----------------------------------------------------------------


@settings(max_examples=1000, deadline=None, derandomize=True, database=None)
@given(
    window=st.integers(1, 70),
    stream=st.lists(
        st.tuples(
            st.sampled_from([A, C]),
            st.integers(1, 4),  # epoch
            st.integers(0, 200),  # seq
            st.sampled_from([ME, ME, ME, 0, ME + 1]),  # echo
            st.booleans(),  # check_echo
        ),
        max_size=120,
    ),
)
def test_replay_guard_matches_a_simple_model(window, stream):
    """The bitmap window against sets: same verdict for every datagram, and no (sender, epoch,
    seq) ever accepted twice. Reference: security.md §5 rules 1-4."""
    guard = ReplayGuard(ME, window)
    max_epoch: dict[str, int] = {}
    seen: dict[tuple[str, int], set[int]] = {}
    for sender, epoch, seq, echo, check_echo in stream:
        max_epoch[sender] = max(max_epoch.get(sender, 0), epoch)
        accepted_set = seen.setdefault((sender, epoch), set())
        highest = max(accepted_set, default=-1)
        if epoch < max_epoch[sender]:
            expected = "stale-epoch"
        elif check_echo and echo != ME:
            expected = "bad-echo"
        elif seq in accepted_set:
            expected = "too-old" if highest - seq >= window else "replayed"
        elif seq <= highest - window:
            expected = "too-old"
        else:
            expected = None
            accepted_set.add(seq)
        got = guard.check(env(seq, sender=sender, epoch=epoch, echo=echo), check_echo=check_echo)
        assert got == expected
        assert guard.peer_epoch(sender) == max_epoch[sender]


# -- the handshake, end to end with the codec ---------------------------------------------------


class Peer:
    """One node's codec, guard and send counter, as the runtime will hold them."""

    def __init__(self, me: str, epoch: int) -> None:
        self.me = me
        self.codec = Codec(local=me, cluster_fp=FP, members=MEMBERS, keyring=RING)
        self.guard = ReplayGuard(epoch)
        self.epoch = epoch
        self.seq = 0

    def send(self, to: str, msg: Message | ClusterInfo) -> bytes:
        self.seq += 1
        return self.codec.encode(
            msg,
            receiver=to,
            sender_epoch=self.epoch,
            seq=self.seq,
            echo_epoch=self.guard.peer_epoch(to),
        )

    def receive(self, data: bytes) -> str | None:
        env, msg = self.codec.decode(data)
        return self.guard.check(env, check_echo=not isinstance(msg, ClusterInfo))


def test_replay_handshake_takes_one_heartbeat_round():
    """Reference: security.md §5 (first contact)."""
    a, b = Peer(A, epoch=7), Peer(B, epoch=3)
    hb = Heartbeat(term=1, master=False)
    assert b.receive(a.send(B, hb)) == "bad-echo"  # B learns A=7
    assert a.receive(b.send(A, hb)) is None  # echoes 7; A learns B=3
    assert b.receive(a.send(B, hb)) is None  # echoes 3
    for _ in range(5):
        assert a.receive(b.send(A, hb)) is None
        assert b.receive(a.send(B, hb)) is None


def test_replay_captured_datagrams_are_useless_after_either_side_restarts():
    """A captured vote grant is refused when replayed: at once, after the sender restarts, and
    after the receiver restarts. Reference: security.md §3 (replay) and §5."""
    a, b = Peer(A, epoch=7), Peer(B, epoch=3)
    b.receive(a.send(B, Heartbeat(term=1, master=False)))
    a.receive(b.send(A, Heartbeat(term=1, master=False)))
    grant = b.send(A, VoteResponse(term=2, granted=True))
    withheld = b.send(A, VoteResponse(term=3, granted=True))  # an on-path attacker keeps it
    assert a.receive(grant) is None
    assert a.receive(grant) == "replayed"

    b2 = Peer(B, epoch=4)  # B restarts
    assert a.receive(b2.send(A, Heartbeat(term=3, master=False))) == "bad-echo"  # A learns B=4
    assert a.receive(withheld) == "stale-epoch"

    a2 = Peer(A, epoch=8)  # A restarts
    assert a2.receive(withheld) == "bad-echo"
    assert a2.receive(grant) == "bad-echo"


def test_replay_cluster_info_from_a_stranger_is_accepted_at_first_contact():
    """Reference: security.md §5 (ClusterInfo)."""
    a, b = Peer(A, epoch=7), Peer(B, epoch=3)
    info = ClusterInfo(members=(A, B), timing="other")
    assert b.receive(a.send(B, info)) is None
    assert b.receive(a.send(B, Heartbeat(term=1, master=False))) == "bad-echo"


# -- the boot epoch rule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("persisted", "wall_clock_us", "epoch"),
    [
        (0, 1_767_225_600_000_000, 1_767_225_600_000_000),  # new or lost state: the wall clock
        (41, 1_767_225_600_000_000, 1_767_225_600_000_000),  # an old start counter: the wall clock
        (1_767_225_600_000_000, 1_767_225_600_000_000, 1_767_225_600_000_001),  # same microsecond
        (1_767_225_600_000_000, 1_000, 1_767_225_600_000_001),  # the clock set back: still + 1
        (0, 0, 1),  # a clock at 1970: still a valid epoch (>= 1)
    ],
)
def test_replay_next_boot_epoch(persisted: int, wall_clock_us: int, epoch: int):
    """Reference: security.md §5 (the epoch cannot go backwards)."""
    assert next_boot_epoch(persisted, wall_clock_us) == epoch


@pytest.mark.parametrize(("persisted", "match"), [(2**64 - 1, "64 bits"), (-1, "negative")])
def test_replay_next_boot_epoch_refuses_impossible_values(persisted: int, match: str):
    with pytest.raises(ValueError, match=match):
        next_boot_epoch(persisted, 1)


@settings(max_examples=200, deadline=None)
@given(
    starts=st.lists(
        st.tuples(st.integers(min_value=1, max_value=10**6), st.booleans()), min_size=1, max_size=30
    )
)
def test_replay_epochs_increase_across_restarts_and_state_losses(starts: list[tuple[int, bool]]):
    """With a wall clock that never goes back, every start has a higher epoch than every earlier
    one, whether or not the state was lost before it; peers therefore never find it stale. (Two
    starts of one node are at least a microsecond apart: a process start takes milliseconds.)"""
    clock_us, disk, seen = 1_700_000_000_000_000, 0, 0
    for advance_us, lost in starts:
        clock_us += advance_us
        if lost:
            disk = 0
        epoch = next_boot_epoch(disk, clock_us)
        assert epoch > seen
        seen = disk = epoch
