"""Scenario tests that read like stories (after etcd-io/raft's raft_test.go).

Every step runs on the simulator, whose invariants (one master per term, no overlapping scripts,
leases backed by real acknowledgements...) are checked after every event; the asserts here add the
expected outcome of each story.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pyquorum.core.lease import Timing
from pyquorum.core.node import Role
from pyquorum.core.rules import KEEPALIVE_PROPOSERS
from tests.sim.measure import crash_failover, handover
from tests.sim.sim import Cluster, Violation
from tests.timing import DEFAULT, TUNED

A, B, C, D, E5 = (f"127.0.0.{i}:51621" for i in range(1, 6))


def settled(n: int = 3, timing: Timing | None = None, seed: int = 1) -> Cluster:
    c = Cluster(n, timing, seed=seed)
    c.run_for(3 * c.timing.election_timeout_s)
    return c


def test_lowest_address_is_elected_first() -> None:
    """Reference: protocol.md §3.3 (the lowest live address proposes first)."""
    for seed in range(5):
        c = settled(5, seed=seed)
        assert c.master() == A
        assert c.running_script() == A


def test_crashed_master_is_replaced_by_next_lowest() -> None:
    """Reference: protocol.md §3.3, §5.1."""
    c = settled()
    c.crash(A, with_script=True)
    c.run_for(DEFAULT.failover_bound_s())
    assert c.master() == B
    assert c.running_script() == B


def test_isolated_master_stops_script_before_new_master_starts() -> None:
    """Reference: protocol.md §4.2-4.3 (the kill deadline precedes any new master's start)."""
    c = settled()
    c.isolate(A)
    c.run_for(3.0)
    assert c.master() == B
    old, new = c.runs[0], c.runs[-1]
    assert old.node == 0 and old.end is not None
    assert new.node == 1 and new.start > old.end
    c.heal()
    c.run_for(2.0)
    assert c.master() == B  # no pre-emption when A comes back (protocol.md §3.3)
    assert c.nodes[0].core is not None and c.nodes[0].core.role is Role.SLAVE


def test_minority_never_has_a_master() -> None:
    """Reference: protocol.md §2 (majority), §4.3."""
    c = settled(5)
    c.partition([0, 1], [2, 3, 4])
    for _ in range(40):
        c.run_for(0.25)
        for idx in (0, 1):
            core = c.nodes[idx].core
            assert core is not None
            if c.now > 1.5 + 3.0:  # after A's lease has lapsed
                assert core.role is not Role.MASTER
    assert c.master() == C


def test_rejoining_node_does_not_depose_or_inflate_terms() -> None:
    """Reference: protocol.md §3.3 (pre-vote): a node cut off for long comes back harmlessly."""
    c = settled(3)
    master_core = c.nodes[0].core
    assert master_core is not None
    term = master_core.term
    c.isolate(C)
    c.run_for(20.0)
    c.heal()
    c.run_for(5.0)
    assert c.master() == A
    assert all(n.core is not None and n.core.term == term for n in c.nodes)


def rejoin_under(c: Cluster, node: str, master: str, *, down_s: float) -> None:
    """``node`` is down for ``down_s`` while the others elect ``master``, then starts again."""
    c.crash(node)
    c.run_for(down_s)
    assert c.master() == master
    c.restart(node)


def test_lower_address_joining_later_does_not_take_over() -> None:
    """Reference: protocol.md §3.3 (no pre-emption)."""
    c = Cluster(3, seed=3)
    rejoin_under(c, A, B, down_s=5.0)
    c.run_for(10.0)
    assert c.master() == B


def test_one_way_link_does_not_block_the_election() -> None:
    """A can send but receive nothing: it cannot win, so B's slot comes. Reference: protocol.md §3.3."""
    c = Cluster(3, seed=4)
    c.cut_links([(1, 0), (2, 0)], both=False)
    c.run_for(5.0)
    assert c.master() == B
    assert c.running_script() == B


def test_two_nodes_need_both() -> None:
    """Reference: protocol.md §2: a majority of 2 is 2."""
    c = settled(2)
    assert c.master() == A
    c.crash(B)
    c.run_for(5.0)
    assert c.master() is None
    assert c.running_script() is None
    c.restart(B)
    c.run_for(5.0)
    assert c.master() is not None


def test_single_node_elects_itself() -> None:
    c = settled(1)
    assert c.master() == A and c.running_script() == A


def test_paused_master_is_stopped_by_its_guard_before_a_new_master_starts() -> None:
    """SIGSTOP of the master's daemon: the guard kills by the deadline. Reference: protocol.md §4.4."""
    c = settled()
    c.pause(A, 5.0)
    c.run_for(3.0)
    assert c.running_script() == B
    assert c.runs[0].end is not None and c.runs[0].end < c.runs[-1].start
    c.run_for(4.0)  # A resumes, learns the new term, becomes a slave
    core = c.nodes[0].core
    assert core is not None and core.role is Role.SLAVE and core.master == B


def test_restarted_node_grants_no_vote_for_one_election_timeout() -> None:
    """Reference: protocol.md §3.6 (restart embargo)."""
    c = settled()
    c.crash(B)
    c.restart(B)
    core = c.nodes[1].core
    assert core is not None
    assert core._sticky(c.nodes[1].local(c.now)) == "restart embargo"
    c.run_for(DEFAULT.election_timeout_s * 1.05)
    assert core._sticky(c.nodes[1].local(c.now)) == "live master"  # it follows A again


def test_start_delay_makes_room_for_a_long_stop_timeout() -> None:
    """Reference: protocol.md §4.2: D adds to L_kill, so G can exceed E."""
    t = Timing(stop_timeout_s=2.0, start_delay_s=2.0)
    assert not t.validate()
    c = settled(3, t)
    c.run_for(t.start_delay_s + 1)
    assert c.running_script() == A
    c.isolate(A)
    c.run_for(8.0)
    assert c.running_script() == B
    assert c.runs[-1].start - c.runs[0].end >= 0  # type: ignore[operator]


def test_fencing_tokens_strictly_increase_across_masters() -> None:
    """Reference: protocol.md §3.8."""
    c = settled(5)
    for _ in range(3):
        victim = c.master()
        assert victim is not None
        c.crash(victim, with_script=True)
        c.run_for(3.0)
        c.restart(victim)
    tokens = [r.token for r in c.runs]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens) == 4


def test_planned_handover_is_immediate() -> None:
    """Reference: protocol.md §3.7: Resign after the script is reaped lets the next node go at once."""
    c = settled()
    c.shutdown(A)
    c.script_crash(A, restart_after=None)  # the script exits on SIGTERM at once
    stopped = c.now
    c.run_for(0.2)
    assert c.running_script() == B
    assert c.runs[-1].start - stopped < 0.1


def test_script_that_keeps_running_past_sigterm_delays_handover_not_safety() -> None:
    """The script ignores SIGTERM: the master waits for SIGKILL before it resigns."""
    c = settled()
    c.shutdown(A)
    c.run_for(DEFAULT.stop_timeout_s)
    assert c.running_script() == A
    c.run_for(0.2)
    assert c.running_script() == B


@pytest.mark.parametrize(("timing", "median_max", "p99_max"), [(DEFAULT, 2.0, 3.0), (TUNED, 0.5, 0.5)])
def test_crash_failover_time_in_simulation(timing: Timing, median_max: float, p99_max: float) -> None:
    """Reference: protocol.md §5.1. Simulated time, so this is deterministic, not a benchmark."""
    stats = crash_failover(timing, trials=60)
    assert stats.max_s <= timing.failover_bound_s()
    assert stats.median_s <= median_max and stats.p99_s <= p99_max


def test_handover_time_in_simulation() -> None:
    stats = handover(DEFAULT, trials=30)
    assert stats.median_s < 0.1


# ---- the safety holes of protocol.md §3.3, §3.6, §3.7, §3.9 and §4.2: each story fails with the rule
# broken (the variant) and passes with it, so each would have caught the hole it closes.


def _violation(fn: Callable[..., object], *args: object) -> str | None:
    try:
        fn(*args)
    except Violation as exc:
        return str(exc).splitlines()[0]
    return None


def _resign_a_follower_while_another_campaigns(broken: tuple[str, ...], seed: int) -> Cluster:
    c = Cluster(3, seed=seed, broken=broken)
    c.run_for(3.0)
    assert c.master() == A
    c.cut_links([(0, 2)])  # C hears A no more (nor A C); B hears both: A's lease counts on B
    for _ in range(40):
        c.run_for(0.05)
        core = c.nodes[2].core
        if core is not None and core.role is Role.PRECANDIDATE:
            c.resign(B)  # the daemon may call resign() on a node that is not master
            break
    c.run_for(3.0)
    return c


def test_resign_on_a_follower_keeps_its_stickiness() -> None:
    """Reference: protocol.md §3.7: only a master resigns; a follower's stickiness is never dropped."""
    for seed in range(10):
        c = _resign_a_follower_while_another_campaigns((), seed)
        assert c.master() == A  # nothing changed: B refused to resign and C's pre-votes are refused
    caught = [
        _violation(_resign_a_follower_while_another_campaigns, ("resign_any_role",), seed)
        for seed in range(10)
    ]
    assert any(v is not None and "OVERLAP" in v for v in caught), caught


def _lower_timing_one_node_at_a_time(broken: tuple[str, ...], seed: int) -> Cluster:
    c = Cluster(3, seed=seed, broken=broken)
    c.run_for(3.0)
    assert c.master() == A
    for who in (B, C, A):  # followers first, the way operators roll out a change
        c.retime(who, TUNED)
        c.run_for(3.0)
    return c


def test_lowering_the_election_timeout_one_node_at_a_time_is_safe() -> None:
    """Reference: protocol.md §3.6: the embargo covers the previous run's E + D (its promise)."""
    for seed in range(4):
        c = _lower_timing_one_node_at_a_time((), seed)
        assert c.master() is not None and c.running_script() == c.master()
        assert all(nd.timing == TUNED and nd.disk.promise_s == TUNED.election_timeout_s for nd in c.nodes)
    caught = [
        _violation(_lower_timing_one_node_at_a_time, ("embargo_ignores_promise",), seed) for seed in range(4)
    ]
    assert all(v is not None and "OVERLAP" in v for v in caught), caught


def _lose_the_voters_state(broken: tuple[str, ...], seed: int) -> tuple[str | None, str | None]:
    c = Cluster(3, seed=seed, broken=broken)
    c.isolate(C)  # C never hears of term 1: only A and B know it (B voted for A in it)
    c.run_for(3.0)
    assert c.master() == A
    c.wipe(B)  # B's state dir is lost; it restarts at term 0
    c.heal()
    c.isolate(A)  # B and C are a majority; B cannot hear A
    c.run_for(5.0)
    while_cut_off = c.master()
    c.heal()
    c.run_for(5.0)
    return while_cut_off, c.master()


def test_a_node_that_lost_its_state_never_votes_twice_in_a_term() -> None:
    """Reference: protocol.md §3.9: it votes only once it knows every member's term, and only above."""
    for seed in range(4):
        while_cut_off, after = _lose_the_voters_state((), seed)
        assert while_cut_off is None  # B cannot hear A, so it does not vote (nor does it campaign)
        assert after is not None  # healed: B hears every member, learns term 1, and votes from term 2
    caught = [_violation(_lose_the_voters_state, ("amnesia_votes",), seed) for seed in range(4)]
    assert all(v is not None and "TWO MASTERS in term 1" in v for v in caught), caught


def _run_at_the_drift_bound(rate_error: float) -> str | None:
    """The worst case of protocol.md §4.2: the old master's clock runs slow by ``rate_error``, the
    others' fast, datagrams take a microsecond, and the master is cut off the instant its newest
    round is acknowledged; the script dies exactly at its kill deadline."""
    t = Timing()
    c = Cluster(3, t, seed=0, rates=[1 - rate_error, 1 + rate_error, 1 + rate_error])
    c.net.delay_min = c.net.delay_max = 1e-6
    c.run_for(3.0)
    master = c.nodes[0].core
    assert master is not None and master.role is Role.MASTER and c.running_script() == A
    acked = master.lease_start
    while master.lease_start == acked:
        c.run_for(t.heartbeat_interval_s / 20)
    c.isolate(A)
    violation = _violation(lambda: c.run_for(3.0))
    if violation is None:
        assert c.running_script() == B
    return violation


def test_the_lease_holds_at_the_drift_bound_and_is_caught_just_above_it() -> None:
    """Reference: protocol.md §4.2: L_kill is exact at rho = 1% (the network's microseconds are the
    only slack left; K is the real system's), and the simulation sees an overlap at 1.01%."""
    assert _run_at_the_drift_bound(0.01) is None
    beyond = _run_at_the_drift_bound(0.0101)
    assert beyond is not None and "OVERLAP" in beyond


def _failovers_with_lossy_inbound(broken: tuple[str, ...], seed: int) -> tuple[int, float]:
    c = Cluster(3, seed=seed, broken=broken)
    c.run_for(3.0)
    first, changes = c.now, len(c.master_changes)
    c.lossy_inbound(A, 0.7)  # A's sends arrive; 70% of what is sent to A is lost
    c.run_for(120.0)
    ran = sum(
        max(0.0, min(r.end if r.end is not None else c.now, c.now) - max(r.start, first)) for r in c.runs
    )
    return len(c.master_changes) - changes, ran / (c.now - first)


def test_a_lowest_node_that_keeps_losing_its_lease_stops_winning() -> None:
    """Reference: protocol.md §3.3 (demotion): after a lost-lease step-down a node proposes last, so
    the lowest address with lossy inbound traffic does not win every election and lose every lease."""
    for seed in range(3):
        failovers, available = _failovers_with_lossy_inbound((), seed)
        assert failovers <= 2 and available >= 0.98, (seed, failovers, available)
    # Without the demotion A wins again and again. How soon the cluster escapes the cycle (another node
    # wins while A does not look live to it: A is heard only in answer to the 30% of keep-alives that
    # reach it, protocol.md §3.2) is chance: 26, 3 and 24 failovers in these seeds. The sum is the
    # measure, against at most 2 per seed with the rule.
    before = [_failovers_with_lossy_inbound(("no_demotion",), seed) for seed in range(3)]
    assert sum(failovers for failovers, _ in before) >= 24, before


# ---- protocol.md §3.2: followers of a live master keep quiet; the master reports who is live


def _crash_failovers(broken: tuple[str, ...], n: int, seeds: int) -> tuple[float, int]:
    """(the slowest crash failover, the elections that failed on the way) over ``seeds`` clusters."""
    worst, failed = 0.0, 0
    for seed in range(seeds):
        c = Cluster(n, seed=seed, broken=broken)
        c.run_for(4.0)
        victim = c.master()
        assert victim is not None
        before = c.events["election_failed"]
        c.crash(victim, with_script=True)
        crashed = c.now
        while c.running_script() is None and c.now < crashed + 10.0:
            c.run_for(0.01)
        worst = max(worst, c.now - crashed)
        failed += c.events["election_failed"] - before
    return worst, failed


def test_followers_rank_each_other_by_the_masters_report() -> None:
    """Reference: protocol.md §3.2, §5.1: followers no longer hear each other; with the master's report
    of who is live the lowest live follower proposes alone and wins at the first attempt, without it
    every follower thinks it is the lowest and they split the vote."""
    worst, failed = _crash_failovers((), 7, 30)
    assert worst <= DEFAULT.failover_bound_s() and failed == 0
    worst_without, failed_without = _crash_failovers(("no_live_report",), 7, 30)
    assert failed_without > 0 and worst_without > worst


def _follower_that_lost_its_state_recovers(broken: tuple[str, ...]) -> bool:
    c = Cluster(3, seed=1, broken=broken)
    c.run_for(3.0)
    c.wipe(C)  # restarts at once, and follows A: it must still hear B's term (§3.9)
    c.run_for(3.0)
    core = c.nodes[2].core
    assert core is not None and core.master == A
    return not core.recovering


def test_a_quiet_follower_answers_a_node_that_needs_to_hear_it() -> None:
    """Reference: protocol.md §3.2, §3.9: a recovering node asks; quiet followers answer once per h."""
    assert _follower_that_lost_its_state_recovers(())
    assert not _follower_that_lost_its_state_recovers(("no_plain_answer",))


def test_a_followers_traffic_does_not_grow_with_the_cluster() -> None:
    """Reference: protocol.md §5.4: one acknowledgement per heartbeat interval, whatever N."""
    for n in (3, 15, 51):
        c = settled(n)
        before, start = list(c.sent_by), c.now
        c.run_for(10.0)
        master = c.index[c.master() or ""]
        rates = [(c.sent_by[i] - before[i]) / (c.now - start) for i in range(n)]
        h = DEFAULT.heartbeat_interval_s
        assert all(r <= 1.05 / h for i, r in enumerate(rates) if i != master), rates
        assert rates[master] <= 1.05 * (n - 1) / h


def test_a_masterless_clusters_keepalive_does_not_grow_with_the_cluster() -> None:
    """Reference: protocol.md §3.2, §5.4: without a master (here a minority, which stays so) a node keeps
    alive only the proposers before it up to the second live one; the first two answer the others."""
    h = DEFAULT.heartbeat_interval_s
    for n in (5, 15, 51):
        c = settled(n)
        live = n - c.quorum
        for i in range(live, n):
            c.crash(i)
        c.run_for(3 * DEFAULT.election_timeout_s)  # the dead are no longer live, not even reported
        before, start = list(c.plain_sent_by), c.now
        c.run_for(10.0)
        assert c.master() is None
        rates = [(c.plain_sent_by[i] - before[i]) / (c.now - start) for i in range(live)]
        assert all(r <= 1.05 * KEEPALIVE_PROPOSERS / h for r in rates[KEEPALIVE_PROPOSERS:]), (n, rates)
        assert all(r <= 1.05 * (live - 1) / h for r in rates[:KEEPALIVE_PROPOSERS]), (n, rates)
        assert min(rates) > 0, (n, rates)  # nobody went quiet: every live node is heard


def _first_masters_behind_two_dead(broken: tuple[str, ...]) -> tuple[int, int]:
    """(clusters of 5 whose first master was not C, the elections that failed) over 100 seeds, with A
    and B down from the start: C proposes first only if it knows it is the lowest live node, D and E
    only wait for it if they know that C is alive. (Every node greets every peer at its start, so
    they knew each other then; by the time they are due, E later, that is about to expire.)"""
    others, failed = 0, 0
    for seed in range(100):
        c = Cluster(5, seed=seed, broken=broken)
        c.crash(A)
        c.crash(B)
        while c.master() is None and c.now < 20.0:
            c.run_for(0.05)
        others += c.master() != C
        failed += c.events["election_failed"]
    return others, failed


def test_the_keepalive_goes_past_dead_proposers() -> None:
    """Reference: protocol.md §3.2: the dead proposers before a node do not count towards the two live
    ones it keeps alive; if they did, behind two dead ones nobody would hear anybody, and every live
    node would think it proposes first."""
    assert _first_masters_behind_two_dead(()) == (0, 0)
    others, failed = _first_masters_behind_two_dead(("keepalive_stops_at_the_dead",))
    assert others >= 10 and failed > 0, (others, failed)  # 24 and 16 in these seeds


def _handovers_after_a_follower_restarted(broken: tuple[str, ...]) -> list[float]:
    """A's script reaped -> B's script started, in 10 clusters where B restarted (a new epoch) while A
    was master: B and C, both followers, have nothing to say to each other until the handover."""
    out = []
    for seed in range(10):
        c = Cluster(3, seed=seed, broken=broken)
        c.run_for(3.0)
        c.crash(B)
        c.run_for(0.3)
        c.restart(B)
        c.run_for(3.0)
        assert c.master() == A
        c.shutdown(A)
        c.script_crash(A, restart_after=None)  # the script exits on SIGTERM at once
        stopped = c.now
        while c.running_script() != B and c.now < stopped + 2.0:
            c.run_for(0.001)
        out.append(c.runs[-1].start - stopped)
    return out


def test_a_restarted_node_greets_every_peer() -> None:
    """Reference: protocol.md §3.2 (the first duty of a life goes to every peer), docs/security.md §5:
    without the greeting B's first pre-vote to C after the handover echoes 0, is refused ("bad-echo")
    and is sent again a retry interval later (8 ms median against 32 ms in these seeds)."""
    greeted = _handovers_after_a_follower_restarted(())
    retry = DEFAULT.retry_interval_s
    assert max(greeted) < retry, greeted
    assert min(_handovers_after_a_follower_restarted(("no_first_greeting",))) > retry


# ---- protocol.md §3.10 (step-down, priorities, pre-emption) and §3.11 (witnesses)


def test_step_down_hands_over_to_the_named_node_at_once() -> None:
    """Reference: protocol.md §3.10: asked on any member; the master stops its script, then resigns
    naming the successor, which takes over at once; nothing sticky remains."""
    c = settled(5)
    assert c.master() == A
    c.step_down(D, to=C)  # asked on a follower, about a third node
    asked = c.now
    c.run_for(DEFAULT.stop_timeout_s + DEFAULT.kill_margin_s + 0.2)
    assert c.master() == C and c.running_script() == C
    assert c.runs[-1].start - asked < DEFAULT.stop_timeout_s + DEFAULT.kill_margin_s + 0.1
    assert c.events["step_down_answered"] == 1
    c.run_for(3 * DEFAULT.election_timeout_s)  # A's quiet period after resigning (2E) is over
    c.crash(C, with_script=True)  # one-shot: the next failover follows the ordinary order again
    c.run_for(DEFAULT.failover_bound_s())
    assert c.master() == A


@pytest.mark.parametrize(
    ("to", "reason"),
    [("127.0.0.1:51621", "is-master"), ("127.0.0.3:51621", "not-live")],
)
def test_step_down_is_refused_with_the_reason(to: str, reason: str) -> None:
    """Reference: protocol.md §3.10: a successor that is not live, or the master itself, is refused."""
    c = settled(3)
    c.crash(C)
    c.run_for(2 * DEFAULT.election_timeout_s)
    core = c.nodes[0].core
    assert core is not None
    assert core.request_step_down(c.nodes[0].local(c.now), to) == reason
    c.run_for(1.0)
    assert c.master() == A  # nothing changed


def test_step_down_without_a_live_master_is_answered_at_once() -> None:
    """Reference: protocol.md §3.10: a member with no live master to ask answers itself: "no-majority"
    while it hears fewer than a majority, "not-master" while it hears one but knows no master."""
    c = settled(3)
    c.crash(A)
    c.crash(B)
    c.run_for(3 * DEFAULT.election_timeout_s)  # the master's report (2E) is stale too
    core = c.nodes[2].core
    assert core is not None
    assert core.request_step_down(c.nodes[2].local(c.now)) == "no-majority"
    assert core.ready().messages == []  # nothing was sent: there is nobody to ask
    c.restart(B)
    c.run_for(0.05)  # B is heard again, before anyone could be elected
    assert c.master() is None
    assert core.request_step_down(c.nodes[2].local(c.now)) == "not-master"


def test_higher_priority_proposes_first() -> None:
    """Reference: protocol.md §3.10: among the live members a higher priority proposes first."""
    for seed in range(4):
        c = Cluster(5, seed=seed, priorities={3: 2, 1: 1})
        c.run_for(3.0)
        assert c.master() == D
        c.crash(D, with_script=True)
        c.run_for(DEFAULT.failover_bound_s())
        assert c.master() == B


def test_no_preemption_by_default() -> None:
    """Reference: protocol.md §3.10: a healthy master keeps the role when a preferred node joins."""
    c = Cluster(3, seed=2, priorities={2: 5})
    rejoin_under(c, C, A, down_s=3.0)
    c.run_for(30.0)
    assert c.master() == A


def _preempted(broken: tuple[str, ...], flapping: bool) -> list[float]:
    after = 3.0
    c = Cluster(3, seed=5, priorities={2: 5}, preempt_after_s=after, broken=broken)
    rejoin_under(c, C, A, down_s=3.0)
    for _ in range(40):  # 40 s: what C sends A is lost 0.5 s in every 2.5 s while flapping (C hears
        if flapping:  # A throughout, so only the master can tell: its side of the rule is tested)
            c.cut_links([(2, 0)], both=False)
            c.run_for(0.5)
            c.heal()
            c.run_for(0.5)
            c.run_for(1.5)
        else:
            c.run_for(2.5)
    return c.preemptions


def test_a_preferred_node_takes_over_once_by_a_clean_handover() -> None:
    """Reference: protocol.md §3.10: --preempt-after of connection, then one handover to it, by the
    master's step-down (never by deposing), and no more on a stable network."""
    handovers = _preempted((), flapping=False)
    assert len(handovers) == 1


def test_no_handover_to_a_preferred_node_whose_link_flaps() -> None:
    """Reference: protocol.md §3.10: the connection must have lasted --preempt-after on both sides."""
    assert _preempted((), flapping=True) == []
    assert len(_preempted(("preempt_while_flapping",), flapping=True)) >= 1


def test_two_servers_and_a_witness_fail_over() -> None:
    """Reference: protocol.md §3.11: the witness votes and acknowledges, never campaigns nor runs."""
    for seed in range(4):
        c = Cluster(3, seed=seed, witnesses={0})  # A, the lowest address, is the witness
        c.run_for(3.0)
        assert c.master() == B and c.running_script() == B
        c.crash(B, with_script=True)
        c.run_for(DEFAULT.failover_bound_s())
        assert c.master() == C and c.running_script() == C
        c.crash(C, with_script=True)  # only the witness is left: no master, safely
        c.run_for(5.0)
        assert c.master() is None and c.running_script() is None
