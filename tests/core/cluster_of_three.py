"""The cluster of three that the core's unit tests drive a Node in by hand (tests/core/test_node.py,
tests/runtime/test_status.py): its members, the daemon's default timing, and a seeded Node of it."""

from __future__ import annotations

import random

from pyquorum.core.node import HardState, Node
from tests.timing import DEFAULT

A, B, C = "127.0.0.1:51621", "127.0.0.2:51621", "127.0.0.3:51621"
T = DEFAULT
E = T.election_timeout_s


def node(me: str = B, now: float = 0.0, hs: HardState | None = None) -> Node:
    """The member ``me`` of A, B, C as a core Node with the default timing and a seeded rng."""
    return Node(me, [A, B, C], T, now=now, rng=random.Random(0), hard_state=hs)
