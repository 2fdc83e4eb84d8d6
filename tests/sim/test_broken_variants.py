"""Test the tester: each deliberately broken protocol variant must be caught (protocol.md §6.3).

A simulation that cannot tell a broken protocol from a correct one proves nothing. Each variant below
breaks one rule of docs/protocol.md; the randomized schedules must expose it within 1,000 schedules.
"""

from __future__ import annotations

import pytest

from tests.sim.nemesis import find_violation
from tests.sim.sim import SIM_VARIANTS
from tests.sim.variants import VARIANTS

# variant -> the invariants that may catch it (any one suffices)
EXPECTED: dict[str, tuple[str, ...]] = {
    "double_vote": ("DOUBLE VOTE",),
    "no_prevote_stickiness": ("OVERLAP",),
    "no_restart_embargo": ("OVERLAP",),
    "no_drift_margin": ("LEASE",),
    "late_stepdown": ("still master", "too late"),
    "lease_from_ack_time": ("LEASE",),
    "resign_before_stop": ("OVERLAP",),
    "no_quorum_check": ("still master", "expired lease"),
    "no_persist": ("term decreased",),
    "wall_clock": ("OVERLAP", "LEASE", "too late", "still master", "expired lease"),
    "resign_any_role": ("OVERLAP",),
    "embargo_ignores_promise": ("OVERLAP",),
    "amnesia_votes": ("TWO MASTERS", "DOUBLE VOTE", "fencing token"),
    "witness_campaigns": ("WITNESS",),
}

# Rules of liveness, not safety: no invariant can catch them, a measurement does (see the test named).
CAUGHT_BY_A_SCENARIO = {
    "no_demotion": "test_scenarios.py::test_a_lowest_node_that_keeps_losing_its_lease_stops_winning",
    "no_live_report": "test_scenarios.py::test_followers_rank_each_other_by_the_masters_report",
    "keepalive_stops_at_the_dead": "test_scenarios.py::test_the_keepalive_goes_past_dead_proposers",
    "no_first_greeting": "test_scenarios.py::test_a_restarted_node_greets_every_peer",
    "no_plain_answer": "test_scenarios.py::test_a_quiet_follower_answers_a_node_that_needs_to_hear_it",
    "preempt_while_flapping": "test_scenarios.py::test_no_handover_to_a_preferred_node_whose_link_flaps",
}


def test_every_variant_has_an_expectation() -> None:
    assert set(EXPECTED) | set(CAUGHT_BY_A_SCENARIO) == VARIANTS.keys() | SIM_VARIANTS
    assert not set(EXPECTED) & set(CAUGHT_BY_A_SCENARIO)
    assert len(EXPECTED) >= 13


@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_broken_variant_is_caught(variant: str) -> None:
    """Reference: protocol.md §6.3."""
    found = find_violation({variant}, max_schedules=1000)
    assert found is not None, f"variant {variant} survived 1,000 schedules"
    schedules, what = found
    assert any(marker in what for marker in EXPECTED[variant]), what
    print(f"{variant}: caught after {schedules} schedule(s): {what}")


def test_correct_protocol_survives_the_same_schedules() -> None:
    """The same search with nothing broken finds nothing (so the catches above are real)."""
    assert find_violation(set(), max_schedules=60) is None
