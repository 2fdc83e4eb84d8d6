"""Timing rules and the kill-deadline arithmetic. Reference: protocol.md §4."""

from __future__ import annotations

import pytest

from pyquorum.core.lease import DEFAULT_KILL_MARGIN_S, MIN_KILL_MARGIN_S, Timing


def test_default_and_tuned_profiles_are_valid() -> None:
    assert Timing().validate() == []
    assert Timing(heartbeat_interval_s=0.02, election_timeout_s=0.2, stop_timeout_s=0.1).validate() == []


def test_lease_kill_accounts_for_drift_in_both_directions() -> None:
    """protocol.md §4.2: L_kill = (1 - rho)(E + D)/(1 + rho)."""
    t = Timing(election_timeout_s=1.0, start_delay_s=0.5, drift_bound=0.01)
    assert t.lease_kill_s == pytest.approx(0.99 * 1.5 / 1.01)
    # the old master's clock may run slow by rho, a voter's fast by rho: still disjoint
    old_master_real = t.lease_kill_s / (1 - t.drift_bound)
    new_master_earliest_real = (t.election_timeout_s + t.start_delay_s) / (1 + t.drift_bound)
    assert old_master_real <= new_master_earliest_real + 1e-12


def test_stop_begins_with_the_whole_grace_left() -> None:
    t = Timing()
    assert t.kill_deadline(10.0) - t.stop_at(10.0) == pytest.approx(t.stop_timeout_s + t.kill_margin_s)


def test_validate_names_the_failed_inequality_and_what_works() -> None:
    (problem,) = Timing(stop_timeout_s=5.0).validate()
    assert "L_kill" in problem and "--stop-timeout" in problem and "--start-delay" in problem
    fixed_g = float(problem.split("Use --stop-timeout ")[1].split()[0])
    assert Timing(stop_timeout_s=fixed_g).validate() == []
    fixed_e = float(problem.split("--election-timeout ")[1].split()[0])
    assert Timing(stop_timeout_s=5.0, election_timeout_s=fixed_e).validate() == []
    fixed_d = float(problem.split("--start-delay ")[1].split()[0])
    assert Timing(stop_timeout_s=5.0, start_delay_s=fixed_d).validate() == []


def test_validate_rejects_heartbeat_too_slow_for_the_timeout() -> None:
    problems = Timing(heartbeat_interval_s=0.5, election_timeout_s=1.0, stop_timeout_s=0.0).validate()
    assert any("5 x --heartbeat-interval" in p for p in problems)


@pytest.mark.parametrize("field", ["heartbeat_interval_s", "election_timeout_s"])
def test_validate_rejects_non_positive(field: str) -> None:
    problems = Timing(**{field: 0.0}).validate()
    assert problems and "positive" in problems[0]


@pytest.mark.parametrize("kill_margin_s", [0.0, MIN_KILL_MARGIN_S / 2, -0.1, float("nan")])
def test_validate_rejects_a_kill_margin_too_small_and_names_one_that_works(kill_margin_s: float) -> None:
    """protocol.md §4.1, §4.4: K is the time the group has to die between SIGKILL and the deadline."""
    (problem,) = Timing(kill_margin_s=kill_margin_s).validate()
    assert problem.startswith("--kill-margin (")
    fixed = float(problem.split("use --kill-margin ")[1].split()[0])
    assert fixed == DEFAULT_KILL_MARGIN_S
    assert Timing(kill_margin_s=fixed).validate() == []


def test_validate_names_a_smaller_kill_margin_when_one_would_do() -> None:
    (problem,) = Timing(kill_margin_s=0.2).validate()
    assert "--kill-margin (0.2s)" in problem
    fixed_k = float(problem.split("or --kill-margin ")[1].split()[0])
    assert MIN_KILL_MARGIN_S <= fixed_k < 0.2
    assert Timing(kill_margin_s=fixed_k).validate() == []
    # When even the smallest allowed K would not do, none is named.
    (problem,) = Timing(stop_timeout_s=5.0).validate()
    assert "or --kill-margin" not in problem


def test_liveness_bound_covers_two_timeouts_the_slots_and_a_failover() -> None:
    """Reference: protocol.md §5.2: (2E + (N + 2)S + 4h)(1 + rho) + D + E."""
    t = Timing()
    assert t.liveness_bound_s(3) == pytest.approx((2 * 1.0 + 5 * 0.25 + 4 * 0.1) * 1.01 + 1.0)
    assert t.liveness_bound_s(5) - t.liveness_bound_s(3) == pytest.approx(2 * t.slot_s * 1.01)
    assert t.liveness_bound_s(1) > t.failover_bound_s()
    assert Timing(start_delay_s=0.3).liveness_bound_s(3) == pytest.approx(t.liveness_bound_s(3) + 0.3)
