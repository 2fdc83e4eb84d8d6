"""Unit tests of the masterless keep-alive and its answers, one node at a time (protocol.md §3.2)."""

from __future__ import annotations

import random

from pyquorum.core.lease import Timing
from pyquorum.core.messages import Heartbeat
from pyquorum.core.node import Node
from pyquorum.core.rules import KEEPALIVE_PROPOSERS

T = Timing()
E, H = T.election_timeout_s, T.heartbeat_interval_s
N1, N2, N3, N4, N5, N6 = (f"127.0.0.{i}:51621" for i in range(1, 7))
MEMBERS = [N1, N2, N3, N4, N5, N6]


def fresh(me: str, **kwargs: object) -> Node:
    return Node(me, MEMBERS, T, now=0.0, rng=random.Random(0), **kwargs)  # type: ignore[arg-type]


def node(me: str, **kwargs: object) -> Node:
    """A node whose first duty (the greeting of every peer, at 0) is done; its next is due at H."""
    n = fresh(me, **kwargs)
    n.tick(0.0)
    assert plain_to(n) == [p for p in MEMBERS if p != me]
    return n


def plain_to(n: Node) -> list[str]:
    """The peers a plain heartbeat went to in the current Ready; then the Ready is done."""
    rd = n.ready()
    n.advance(rd)
    return [dest for dest, msg in rd.messages if isinstance(msg, Heartbeat) and not msg.master]


def test_a_node_without_a_master_keeps_alive_the_first_two_live_proposers_before_it() -> None:
    """Reference: protocol.md §3.2: up to the second live one, the dead on the way included; nobody
    after it, and the first proposer keeps nobody alive (everyone keeps it alive)."""
    assert KEEPALIVE_PROPOSERS == 2
    n = node(N5)
    n.tick(H)
    assert plain_to(n) == [N1, N2, N3, N4]  # nobody heard yet: all before it may be dead
    for peer in (N2, N3, N4):
        n.step(peer, Heartbeat(0, False), H + 0.01)
    plain_to(n)
    n.tick(2 * H)
    assert plain_to(n) == [N1, N2, N3]  # N1 is not heard, so it does not count; N2, N3 do
    first = node(N1)
    first.tick(H)
    assert plain_to(first) == []


def test_a_node_that_hears_the_first_two_proposers_sends_to_them_only() -> None:
    """Reference: protocol.md §3.2, §5.4: at most two keep-alives per h, whatever the cluster's size."""
    n = node(N6)
    n.step(N1, Heartbeat(0, False), 0.01)
    n.step(N2, Heartbeat(0, False), 0.01)
    plain_to(n)
    n.tick(H)
    assert plain_to(n) == [N1, N2]
    n.tick(H + E)  # neither heard within E: both may be dead, the walk goes on to the end
    assert plain_to(n) == [N1, N2, N3, N4, N5]


def test_a_node_answers_a_keepalive_from_a_peer_it_does_not_keep_alive() -> None:
    """Reference: protocol.md §3.2: once per h per peer; a peer it keeps alive hears its keep-alives."""
    n = node(N2)
    n.step(N1, Heartbeat(0, False), H / 2)
    assert plain_to(n) == []  # N1 is N2's own target: its keep-alive goes out with the duty
    n.step(N5, Heartbeat(0, False), H / 2)
    assert plain_to(n) == []  # greeted at 0: not twice within h
    n.step(N5, Heartbeat(0, False), H)
    assert plain_to(n) == [N5]
    n.step(N5, Heartbeat(0, False), 1.5 * H)
    assert plain_to(n) == []


def test_witnesses_are_not_kept_alive_and_a_witness_keeps_alive_the_proposers() -> None:
    """Reference: protocol.md §3.2, §3.11: a witness never proposes, so nobody ranks behind it; it
    ranks after every proposer, and the priority orders the proposers (§3.10)."""
    n = node(N4, witnesses=frozenset({N1}), priorities={N3: 5})
    n.tick(H)
    assert plain_to(n) == [N3, N2]
    w = node(N1, witnesses=frozenset({N1}), priorities={N3: 5})
    w.tick(H)
    assert plain_to(w) == [N3, N2, N4, N5, N6]


def test_the_first_duty_of_a_life_greets_every_peer_even_a_follower() -> None:
    """Reference: protocol.md §3.2: the first contact (docs/security.md §5) is over with every peer
    before any request needs it; a node that follows a master before its first duty is not quiet yet."""
    n = fresh(N3)
    n.step(N1, Heartbeat(1, True, 1), 0.0)  # a master's round, before the first tick
    rd = n.ready()
    n.advance(rd)
    n.tick(0.001)
    assert plain_to(n) == [N1, N2, N4, N5, N6]
    n.step(N1, Heartbeat(1, True, 2), H)
    plain_to(n)
    n.tick(H + 0.001)
    assert plain_to(n) == []  # then a quiet follower
