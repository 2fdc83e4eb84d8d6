"""The protocol's rules as one value, so that the simulation can break one at a time (protocol.md §6.3).

What this module owns
---------------------
The few decisions of docs/protocol.md that a "test the tester" variant breaks: whether a vote may be
given, how long stickiness and the restart embargo last, the lease arithmetic, when a master stops,
who may resign, whether a lost state is recovered, how long a demotion lasts. ``Node`` computes with
the fields of its ``Rules`` and never asks which variant it runs: production code has no test
branches. ``RULES`` is the protocol; tests build broken values with ``dataclasses.replace(RULES,
...)`` (``tests/sim/variants.py``), and the randomized schedules must catch each.

Each field is a value or a pure function of values the core already has (the timing, the promise, the
role); none reads a clock or does I/O. The defaults are the rules of protocol.md, cited field by field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pyquorum.core.lease import Timing

# protocol.md §3.3: a master that stepped down because it lost its lease proposes last for this many
# election timeouts: a node that can send but hardly receive would otherwise win every election (it
# proposes first) and lose every lease. Ten E: long past the election that follows, short enough that a
# node whose network was repaired soon ranks by its address again.
DEMOTION_E = 10.0

# protocol.md §3.2: a node with no live master keeps alive the proposers before it in the proposal
# order, up to and including this many live ones (the dead before them included): enough to know who
# proposes first and who after it, without a keep-alive that grows with the cluster.
KEEPALIVE_PROPOSERS = 2


def _one_vote_per_term(voted_for: str | None, candidate: str) -> bool:
    # protocol.md §3.4: first come, first served; a retransmission gets the same answer
    return voted_for is None or voted_for == candidate


def _embargo_s(timing: Timing, promise_s: float) -> float:
    # protocol.md §3.6: this run's E, and what the previous run promised (its E + D) less our D
    return max(timing.election_timeout_s, promise_s - timing.start_delay_s)


def _lease_kill_s(timing: Timing) -> float:
    return timing.lease_kill_s  # protocol.md §4.2: (1 - rho)(E + D)/(1 + rho)


def _stop_begin_s(timing: Timing) -> float:
    return timing.stop_begin_s  # protocol.md §4.3: L_kill - G - K


def _lease_start(sent_at: float, acked_at: float) -> float:
    return sent_at  # protocol.md §4.2: the SEND time of the acknowledged round, never the ack's arrival


def _only_a_master(is_master: bool) -> bool:
    return is_master  # protocol.md §3.7: only a master resigns (and forgets its own stickiness)


@dataclass(frozen=True, slots=True)
class Rules:
    """The rules a ``Node`` computes with. Use ``RULES``; only tests build other values."""

    may_vote: Callable[[str | None, str], bool] = _one_vote_per_term
    """(voted_for, candidate) -> may this node vote for candidate in its current term (§3.4)."""
    stickiness_e: float = 1.0
    """How long, in E, a node that heard a live master refuses (pre-)votes (§3.3)."""
    embargo_s: Callable[[Timing, float], float] = _embargo_s
    """(timing, persisted promise) -> the restart embargo: no vote, no candidacy (§3.6)."""
    lease_kill_s: Callable[[Timing], float] = _lease_kill_s
    """L_kill: from the lease start to the moment the script must be reaped (§4.2)."""
    stop_begin_s: Callable[[Timing], float] = _stop_begin_s
    """Lease age at which a master with no newer acknowledged round steps down (§4.3)."""
    lease_start: Callable[[float, float], float] = _lease_start
    """(round sent at, acknowledged at) -> where the lease counts from (§4.2)."""
    may_resign: Callable[[bool], bool] = _only_a_master
    """(is master) -> may resign() act, and may leaving forget the stickiness (§3.7)."""
    resign_after_reap: bool = True
    """Whether the Resign waits until the script is reaped (§3.7)."""
    recovers_lost_state: bool = True
    """Whether a node without its state waits to hear every member before it votes (§3.9)."""
    demotion_e: float = DEMOTION_E
    """How long, in E, a master that lost its lease proposes last (§3.3)."""
    report_e: float = 2.0
    """How long, in E, the master's report of who is live counts for the proposal order (§3.2)."""
    answer_plain: bool = True
    """Whether a node answers a plain heartbeat from a peer it does not keep alive (once per h) (§3.2)."""
    greet_every_peer: bool = True
    """Whether a node's first heartbeat duty of a life goes to every peer (the first contact) (§3.2)."""
    keepalive_past_the_dead: bool = True
    """Whether a node with no live master keeps alive the first live proposers before it, past the
    dead ones (True), or just the first ones, dead or alive (§3.2)."""
    witness_abstains: bool = True
    """Whether a witness never campaigns (and so is never master) (§3.11)."""
    preempt_needs_connection: bool = True
    """Whether the master grants a pre-emption only to a node connected for --preempt-after (§3.10)."""


RULES = Rules()
"""The protocol of docs/protocol.md."""
