"""Unit tests of the core's rules, one message at a time. References are to docs/protocol.md."""

from __future__ import annotations

import random

import pytest

from pyquorum.core.errors import LocalProtocolError
from pyquorum.core.lease import Timing
from pyquorum.core.messages import (
    Heartbeat,
    HeartbeatResponse,
    PreVoteRequest,
    PreVoteResponse,
    Resign,
    VoteRequest,
    VoteResponse,
)
from pyquorum.core.node import UNKNOWN_VOTE, EventKind, HardState, Node, Ready, Role, StartScript, StopScript
from tests.core.cluster_of_three import A, B, C, E, T, node


def drain(n: Node) -> Ready:
    rd = n.ready()
    n.advance(rd)
    return rd


def replies(rd: Ready, to: str) -> list[object]:
    return [m for dest, m in rd.messages if dest == to]


def test_restarted_node_grants_no_vote_during_embargo() -> None:
    """Reference: protocol.md §3.6."""
    n = node(now=100.0, hs=HardState(5, None))
    n.step(A, VoteRequest(6), 100.5)
    rd = drain(n)
    assert replies(rd, A) == [VoteResponse(5, False)]
    assert n.term == 5  # the request's higher term was not even adopted (§3.3)
    n.step(A, PreVoteRequest(6), 100.5)
    assert replies(drain(n), A) == [PreVoteResponse(6, False, 5)]


def test_vote_is_persisted_in_the_same_ready_as_the_grant() -> None:
    """Reference: protocol.md §3.4: the caller persists hard_state before sending the messages."""
    n = node()
    n.step(A, VoteRequest(1), E + 0.1)
    rd = drain(n)
    assert rd.hard_state == HardState(1, A, promise_s=E)
    assert replies(rd, A) == [VoteResponse(1, True)]


def test_one_vote_per_term() -> None:
    """Reference: protocol.md §3.4."""
    n = node()
    n.step(A, VoteRequest(1), E + 0.1)
    drain(n)
    n.step(C, VoteRequest(1), E + 0.2)
    assert replies(drain(n), C) == [VoteResponse(1, False)]
    n.step(A, VoteRequest(1), E + 0.3)  # a retransmission gets the same answer
    assert replies(drain(n), A) == [VoteResponse(1, True)]


def test_vote_survives_restart() -> None:
    """Reference: protocol.md §3.4, §3.6."""
    n = node()
    n.step(A, VoteRequest(1), E + 0.1)
    hs = drain(n).hard_state
    again = node(now=10.0, hs=hs)
    again.step(C, VoteRequest(1), 10.0 + E + 0.1)
    assert replies(drain(again), C) == [VoteResponse(1, False)]


def test_live_master_makes_voters_sticky() -> None:
    """Reference: protocol.md §3.3: a node that heard a live master within E grants nothing."""
    n = node()
    t = E + 0.1
    n.step(A, Heartbeat(1, True, 7), t)
    rd = drain(n)
    assert replies(rd, A) == [HeartbeatResponse(1, 7)]
    n.step(C, PreVoteRequest(2), t + E * 0.9)
    assert replies(drain(n), C) == [PreVoteResponse(2, False, 1)]
    n.step(C, VoteRequest(2), t + E * 0.9)
    assert replies(drain(n), C) == [VoteResponse(1, False)]
    assert n.term == 1
    n.step(C, PreVoteRequest(2), t + E * 1.01)
    assert replies(drain(n), C) == [PreVoteResponse(2, True, 1)]


def test_prevote_changes_no_state() -> None:
    """Reference: protocol.md §3.3."""
    n = node()
    assert drain(n).hard_state == HardState(0, None, promise_s=E)  # a new node records its promise (§3.6)
    n.step(A, PreVoteRequest(9), E + 0.1)
    rd = drain(n)
    assert rd.hard_state is None and n.term == 0 and n.voted_for is None


def test_stale_master_is_told_the_newer_term() -> None:
    """Reference: protocol.md §3.5."""
    n = node(hs=HardState(4, None))
    n.step(A, Heartbeat(3, True, 1), 0.5)
    assert replies(drain(n), A) == [HeartbeatResponse(4, 1)]
    assert n.master is None


def elect(me: str = A) -> Node:
    n = node(me)
    t = E
    n.tick(t)
    drain(n)
    assert n.status().role is Role.PRECANDIDATE
    n.step(B, PreVoteResponse(1, True, 0), t)
    rd = drain(n)
    assert n.role is Role.CANDIDATE and rd.hard_state == HardState(1, A, promise_s=E)
    assert VoteRequest(1) in replies(rd, B)
    n.step(B, VoteResponse(1, True), t)
    drain(n)
    assert n.status().role is Role.MASTER
    return n


def test_lowest_address_campaigns_first_and_others_wait_their_slot() -> None:
    """Reference: protocol.md §3.3."""
    a, b = node(A), node(B)
    for n in (a, b):
        for peer in (A, B, C):
            if peer != n.me:
                n.step(peer, Heartbeat(0, False), 0.5)
    a.tick(E)
    b.tick(E)
    assert a.role is Role.PRECANDIDATE and b.role is Role.SLAVE
    assert b.attempt_at == pytest.approx(E + T.slot_s)


def test_master_starts_script_only_after_a_majority_acknowledges() -> None:
    """Reference: protocol.md §4.2."""
    n = elect()
    n.tick(E)
    rd = drain(n)
    hb = replies(rd, B)
    assert hb and isinstance(hb[0], Heartbeat) and hb[0].master
    assert rd.script == []
    n.step(B, HeartbeatResponse(1, hb[0].round), E + 0.01)
    rd = drain(n)
    assert rd.script == [StartScript(1, E + T.lease_kill_s)]  # lease runs from the SEND time


def test_master_renews_the_kill_deadline_and_steps_down_in_time() -> None:
    """Reference: protocol.md §4.2-4.3."""
    n = elect()
    n.tick(E)
    rnd = replies(drain(n), B)[0]
    assert isinstance(rnd, Heartbeat)
    n.step(C, HeartbeatResponse(1, rnd.round), E + 0.01)
    drain(n)
    t = E + T.heartbeat_interval_s
    n.tick(t)
    rnd2 = replies(drain(n), B)[0]
    assert isinstance(rnd2, Heartbeat)
    n.step(B, HeartbeatResponse(1, rnd2.round), t + 0.01)
    assert drain(n).kill_deadline == pytest.approx(t + T.lease_kill_s)
    # no more acks: step down exactly at t + stop_begin, leaving G + K before the deadline
    assert n.next_wakeup() <= t + T.stop_begin_s
    n.tick(t + T.stop_begin_s)
    rd = drain(n)
    assert n.role is Role.SLAVE
    (stop,) = rd.script
    assert isinstance(stop, StopScript)
    assert stop.kill_deadline - (t + T.stop_begin_s) == pytest.approx(T.stop_timeout_s + T.kill_margin_s)
    assert any(e.kind is EventKind.STEPPED_DOWN and e.get("reason") == "lost_quorum" for e in rd.events)


def test_shutdown_resigns_only_after_the_script_is_reaped() -> None:
    """Reference: protocol.md §3.7."""
    n = elect()
    n.tick(E)
    rnd = replies(drain(n), B)[0]
    assert isinstance(rnd, Heartbeat)
    n.step(B, HeartbeatResponse(1, rnd.round), E)
    drain(n)
    n.shutdown(E + 0.1)
    rd = drain(n)
    assert [type(a) for a in rd.script] == [StopScript]
    assert not any(isinstance(m, Resign) for _, m in rd.messages)
    assert not rd.finished
    n.script_stopped(E + 0.2)
    rd = drain(n)
    assert Resign(1, B) in replies(rd, B)
    assert rd.finished


def test_resign_lifts_stickiness_and_the_successor_campaigns_at_once() -> None:
    """Reference: protocol.md §3.7."""
    n = node(B)
    n.step(A, Heartbeat(1, True, 1), E + 0.1)
    n.step(C, Heartbeat(1, False), E + 0.1)
    drain(n)
    n.step(A, Resign(1, B), E + 0.2)
    n.step(A, Heartbeat(1, True, 2), E + 0.2)  # overtaken by the Resign: void
    drain(n)
    n.tick(E + 0.2)
    assert n.role is Role.PRECANDIDATE
    assert PreVoteRequest(2) in replies(drain(n), C)


def test_higher_term_deposes_master() -> None:
    """Reference: protocol.md §3.1."""
    n = elect()
    n.step(C, HeartbeatResponse(5, 1), E + 0.1)
    drain(n)
    assert n.role is Role.SLAVE and n.term == 5


def test_core_rejects_misuse() -> None:
    with pytest.raises(LocalProtocolError):
        Node("127.0.0.9:1", [A, B], T, now=0, rng=random.Random(0))
    n = node()
    with pytest.raises(LocalProtocolError):
        n.advance(Ready())


def test_messages_from_strangers_and_self_are_ignored() -> None:
    n = node()
    drain(n)  # the new node's promise (§3.6)
    n.step("127.0.0.9:51621", VoteRequest(3), E + 1)
    n.step(B, VoteRequest(3), E + 1)
    assert drain(n).empty() and n.term == 0


# ---- protocol.md §3.7: only a master resigns


def test_resign_on_a_slave_changes_nothing() -> None:
    """Reference: protocol.md §3.7: a follower's stickiness is what its master's lease counts on."""
    n = node()
    n.step(A, Heartbeat(1, True, 1), E + 0.1)
    drain(n)
    assert not n.resign(E + 0.2, "script keeps failing")
    rd = drain(n)
    assert rd.empty() and n.master == A and n._sticky(E + 0.3) == "live master"
    n.step(C, PreVoteRequest(2), E + 0.3)
    assert replies(drain(n), C) == [PreVoteResponse(2, False, 1)]


def elect_with_script(me: str = A) -> Node:
    n = elect(me)
    n.tick(E)  # the first heartbeat round
    drain(n)
    n.step(B, HeartbeatResponse(1, n.round), E)  # acknowledged: the lease starts, and the script
    assert any(isinstance(a, StartScript) for a in drain(n).script)
    return n


def test_master_deposed_while_resigning_keeps_its_new_masters_stickiness() -> None:
    """Reference: protocol.md §3.7: it finishes leaving as the follower of the new master."""
    n = elect_with_script(A)
    assert n.resign(E + 0.1, "script keeps failing")
    assert any(isinstance(a, StopScript) for a in drain(n).script)
    n.step(B, Heartbeat(2, True, 1), E + 0.2)  # B won term 2 while our script was stopping
    drain(n)
    assert n.role is Role.SLAVE and n.master == B
    n.script_stopped(E + 0.3)
    rd = drain(n)
    assert not any(isinstance(m, Resign) for _, m in rd.messages)  # term 1 is not ours to resign now
    assert n._sticky(E + 0.4) == "live master"
    n.step(C, PreVoteRequest(3), E + 0.4)
    assert replies(drain(n), C) == [PreVoteResponse(3, False, 2)]


# ---- protocol.md §3.6: the embargo covers the previous run's promise


def test_restart_embargo_covers_the_previous_runs_promise() -> None:
    """Reference: protocol.md §3.6: after lowering E from 1 s to 0.2 s, a restarted node still waits
    out the 1 s it may have promised a master of the old timing."""
    tuned = Timing(heartbeat_interval_s=0.02, election_timeout_s=0.2, stop_timeout_s=0.1)
    n = Node(B, [A, B, C], tuned, now=100.0, rng=random.Random(0), hard_state=HardState(3, None, 1.0))
    assert n.embargo_s == pytest.approx(1.0)
    assert drain(n).hard_state is None  # the larger promise stays on disk until it is waited out
    n.step(A, VoteRequest(4), 100.5)
    assert replies(drain(n), A) == [VoteResponse(3, False)]
    n.tick(101.01)
    assert drain(n).hard_state == HardState(3, None, promise_s=0.2)  # now this run's own E + D
    n.step(A, VoteRequest(4), 101.02)
    assert replies(drain(n), A) == [VoteResponse(4, True)]


def test_restart_embargo_is_this_runs_own_when_the_timing_was_raised() -> None:
    n = Node(
        B,
        [A, B, C],
        Timing(election_timeout_s=2.0),
        now=0.0,
        rng=random.Random(0),
        hard_state=HardState(3, None, 1.0),
    )
    assert n.embargo_s == 2.0 and drain(n).hard_state == HardState(3, None, promise_s=2.0)


# ---- protocol.md §3.9: a node that lost its state


def recovering(me: str = B, now: float = 0.0) -> Node:
    return Node(me, [A, B, C], T, now=now, rng=random.Random(0), hard_state=HardState(recovering=True))


def test_recovering_node_grants_nothing_until_it_heard_every_member() -> None:
    """Reference: protocol.md §3.9."""
    n = recovering()
    t = 10 * E
    n.step(C, VoteRequest(1), t)
    assert replies(drain(n), C) == [VoteResponse(0, False)]
    n.step(C, PreVoteRequest(1), t)
    assert replies(drain(n), C) == [PreVoteResponse(1, False, 0)]
    assert n.next_wakeup() <= t + T.heartbeat_interval_s and n._election_due_at() == float("inf")
    n.step(A, Heartbeat(0, False), t + 0.1)  # now every member has been heard: A at term 0, C at 1
    rd = drain(n)
    assert not n.recovering and rd.hard_state == HardState(1, UNKNOWN_VOTE, promise_s=E)
    n.step(C, VoteRequest(1), t + 0.2)  # it may have voted in term 1 before its state was lost
    assert replies(drain(n), C) == [VoteResponse(1, False)]
    n.step(C, VoteRequest(2), t + 0.3)
    assert replies(drain(n), C) == [VoteResponse(2, True)]


def test_recovered_node_votes_for_nobody_in_the_highest_term_it_heard() -> None:
    """Reference: protocol.md §3.9: it may have voted in that term before it lost its state."""
    n = recovering()
    t = 10 * E
    n.step(C, PreVoteRequest(6), t)  # C is at term 5
    n.step(A, Heartbeat(5, False), t)
    drain(n)
    assert n.term == 5 and n.voted_for == UNKNOWN_VOTE
    n.step(C, VoteRequest(5), t + 0.1)
    assert replies(drain(n), C) == [VoteResponse(5, False)]
    n.step(C, VoteRequest(6), t + 0.2)
    assert replies(drain(n), C) == [VoteResponse(6, True)]


def test_recovering_is_persisted_until_done() -> None:
    """A crash while recovering must not make the next run believe its state is intact."""
    n = recovering()
    n.step(A, Heartbeat(3, True, 1), 10 * E)
    rd = drain(n)
    assert rd.hard_state == HardState(3, None, promise_s=E, recovering=True)
    assert replies(rd, A) == [HeartbeatResponse(3, 1)]  # it still follows and acknowledges a master


# ---- protocol.md §3.3: demotion after a lost lease


def test_master_that_lost_its_lease_proposes_last() -> None:
    """Reference: protocol.md §3.3."""
    n = elect_with_script(A)
    stop = T.stop_at(n.lease_start or 0.0)
    n.tick(stop + 0.001)
    drain(n)
    assert n.role is Role.SLAVE
    due = n._election_due_at()
    for peer in (B, C):
        n.step(peer, Heartbeat(1, False), due)
    n.tick(due)
    drain(n)
    # three live members: ranks 0..2 are slots 0..2, and A, the lowest, would go at once; demoted, it
    # waits three slots, after both others
    assert n.role is Role.SLAVE and n.attempt_at == pytest.approx(due + 3 * T.slot_s)
