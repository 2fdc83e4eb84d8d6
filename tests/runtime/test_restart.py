"""The restart policy, without processes. Reference: protocol.md §3.7 (only a master resigns) and
README "The script" (on-failure / always / never, backoff, 5 failures in 60 s)."""

from __future__ import annotations

import pytest

from pyquorum.runtime.restart import Action, RestartPolicy


def policy(kind: str = "on-failure") -> RestartPolicy:
    return RestartPolicy(kind, backoff_s=1.0, backoff_max_s=30.0, max_failures=5, window_s=60.0)


def fail(p: RestartPolicy, now: float, term: int = 3, ran_for_s: float = 0.1, rc: int | None = 1):
    return p.ended(now, run_term=term, term=term, is_master=True, returncode=rc, ran_for_s=ran_for_s)


def test_failures_back_off_then_resign() -> None:
    p = policy()
    delays = [fail(p, t).delay_s for t in (0.0, 1.0, 3.0, 7.0)]
    assert delays == [1.0, 2.0, 4.0, 8.0]
    last = fail(p, 15.0)
    assert last.action is Action.RESIGN and last.failures == 5
    assert fail(p, 16.0).failures == 1  # after resigning, a new count


def test_backoff_is_capped() -> None:
    p = RestartPolicy("on-failure", backoff_s=1.0, backoff_max_s=3.0, max_failures=99, window_s=1e9)
    assert [fail(p, float(t)).delay_s for t in range(5)] == [1.0, 2.0, 3.0, 3.0, 3.0]


def test_clean_exit_is_left_alone_on_failure_but_restarted_always() -> None:
    assert fail(policy(), 0.0, rc=0).action is Action.LEAVE
    d = fail(policy("always"), 0.0, rc=0)
    assert d.action is Action.RESTART and d.failures == 1
    assert fail(policy("never"), 0.0, rc=1).action is Action.LEAVE


def test_a_long_run_ends_the_streak_and_old_failures_leave_the_window() -> None:
    p = policy()
    for t in (0.0, 1.0, 3.0):
        fail(p, t)
    assert fail(p, 200.0, ran_for_s=190.0).delay_s == 1.0  # streak reset
    assert fail(p, 201.0).failures == 2  # the failures at 0-3 s are out of the 60 s window


def test_only_this_terms_runs_count_and_only_a_master_resigns() -> None:
    """Reference: protocol.md §3.7: a start that failed after the core stepped down, while the node
    follows a new master, must not make it resign (nor count against the next term)."""
    p = policy()
    for t in (0.0, 1.0, 3.0, 7.0):
        assert fail(p, t, term=3).action is Action.RESTART
    late = p.start_failed(8.0, run_term=3, term=4, is_master=False)
    assert late.action is Action.IGNORE
    stale = p.ended(9.0, run_term=3, term=5, is_master=True, returncode=1, ran_for_s=0.1)
    assert stale.action is Action.IGNORE
    assert fail(p, 10.0, term=5).failures == 1  # term 5's own count starts at one


@pytest.mark.parametrize("kind", ["on-failure", "always"])
def test_failed_starts_count_as_failures(kind: str) -> None:
    p = policy(kind)
    decisions = [p.start_failed(float(t), run_term=2, term=2, is_master=True) for t in range(5)]
    assert [d.action for d in decisions] == [Action.RESTART] * 4 + [Action.RESIGN]


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="restart policy"):
        RestartPolicy("sometimes", backoff_s=1, backoff_max_s=1, max_failures=1, window_s=1)
