"""When the core asks to be woken: a quiet follower is not woken for a heartbeat duty that sends
nothing, and what it sends, and when, is what a node ticked every heartbeat interval sends.

Reference: protocol.md §3.2 (a follower of a live master sends nothing but its acknowledgements).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from pyquorum.core.lease import Timing
from pyquorum.core.messages import Heartbeat, Message, Resign, VoteRequest
from pyquorum.core.node import HardState, Node, Role

A, B, C, D = "127.0.0.1:51621", "127.0.0.2:51621", "127.0.0.3:51621", "127.0.0.4:51621"
MEMBERS = [A, B, C, D]
T = Timing()
H, E = T.heartbeat_interval_s, T.election_timeout_s
TERM = 5

Input = tuple[float, str, Message]
Output = tuple[float, str, Message]


def master_rounds(start: float, end: float, *, live: frozenset[str] = frozenset(MEMBERS)) -> list[Input]:
    """A's heartbeats of term TERM every h from ``start`` until before ``end``."""
    count = int((end - start) / H)
    return [(start + k * H, A, Heartbeat(TERM, True, k + 1, live)) for k in range(count)]


def run(inputs: Sequence[Input], end: float, *, every_h: bool) -> tuple[list[Output], int]:
    """Drive B (follower of A) through ``inputs`` until ``end``: ticked at each ``next_wakeup()``
    and, with ``every_h``, also at every multiple of h (as the daemon did before it slept between
    its master's heartbeats). Returns what it sent, with the times, and how many ticks it took."""
    n = Node(B, MEMBERS, T, now=0.0, rng=random.Random(7), hard_state=HardState(TERM, None))
    sent: list[Output] = []
    ticks = 0

    def carry_out(now: float) -> None:
        rd = n.ready()
        sent.extend((now, dest, msg) for dest, msg in rd.messages)
        n.advance(rd)

    pending = sorted(inputs, key=lambda i: i[0])
    grid = 1
    now = 0.0
    while now < end:
        candidates = [n.next_wakeup()]
        if every_h:
            candidates.append(grid * H)
        if pending:
            candidates.append(pending[0][0])
        now = min(candidates)
        if now >= end:
            break
        if pending and pending[0][0] == now:
            _, sender, msg = pending.pop(0)
            n.step(sender, msg, now)
        else:
            if every_h and now == grid * H:
                grid += 1
            n.tick(now)
            ticks += 1
        carry_out(now)
    return sent, ticks


def same(a: list[Output], b: list[Output]) -> None:
    """The same messages to the same members at the same times (to the nanosecond: two duties due
    at one instant, computed by different sums of h, may come out in either order)."""

    def key(sent: Output) -> tuple[int, str, str]:
        return round(sent[0] * 1e9), sent[1], repr(sent[2])

    assert sorted(map(key, a)) == sorted(map(key, b))


SCENARIOS = {
    # a steady master: only acknowledgements go out
    "steady": (master_rounds(0.05, 6.0), 6.0),
    # the master falls silent at 3 s: plain heartbeats to everyone every h from E later, then a campaign
    "master_silent": (master_rounds(0.05, 3.0), 6.5),
    # the master resigns at 2.02 s: plain heartbeats from the next duty instant on, then a campaign
    "resign": ([*master_rounds(0.05, 2.0), (2.02, A, Resign(TERM, ""))], 5.0),
    # a candidate of a higher term in the middle of a steady master's rounds: refused while sticky
    "higher_term": ([*master_rounds(0.05, 4.0), (2.013, C, VoteRequest(TERM + 1))], 6.0),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_quiet_follower_sends_the_same_with_fewer_wakeups(name: str) -> None:
    inputs, end = SCENARIOS[name]
    every_h, ticks_every_h = run(inputs, end, every_h=True)
    on_demand, ticks_on_demand = run(inputs, end, every_h=False)
    same(every_h, on_demand)
    assert ticks_on_demand < ticks_every_h  # the duty ticks while quiet are gone


def test_steady_follower_is_woken_only_at_start_and_for_its_embargo() -> None:
    # 6 s of a steady master: 60 duty instants, all quiet after the first. The ticks: at start (no
    # master yet: a plain heartbeat to everyone) and at the end of the restart embargo (§3.6); the
    # election timer never comes due, each round moves it later.
    sent, ticks = run(master_rounds(0.05, 6.0), 6.0, every_h=False)
    assert ticks == 2
    assert [type(m).__name__ for t, _, m in sent if t > 0.0] == ["HeartbeatResponse"] * 59


def test_quiet_follower_wakes_only_for_its_election_timer() -> None:
    n = Node(B, MEMBERS, T, now=0.0, rng=random.Random(7), hard_state=HardState(TERM, None))
    n.tick(E)  # its restart embargo is over (protocol.md §3.6)
    n.advance(n.ready())
    n.step(A, Heartbeat(TERM, True, 1, frozenset(MEMBERS)), 2.0)
    n.advance(n.ready())
    assert n.role is Role.SLAVE and n.master == A
    # the first duty instant at which it would send is E after the round, not h after it
    assert n.next_wakeup() >= 2.0 + E - 1e-9


def test_recovering_follower_still_asks_every_h() -> None:
    """Reference: protocol.md §3.9: a recovering node asks the members whose terms it lacks."""
    n = Node(B, MEMBERS, T, now=0.0, rng=random.Random(7), hard_state=HardState(0, None, recovering=True))
    n.step(A, Heartbeat(TERM, True, 1, frozenset(MEMBERS)), 1.0)
    n.advance(n.ready())
    assert n.recovering and n.master == A
    assert n.next_wakeup() <= 1.0 + H + 1e-9
