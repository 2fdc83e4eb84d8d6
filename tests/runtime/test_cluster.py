"""Real daemons on loopback: elections, crashes, freezes, handovers and the restart policy.

Reference: protocol.md §3.3 (elections), §3.7 (planned handover), §3.8 (the fencing token), §4.2-§4.4
(the kill deadline and the guard), §5.1 (the failover bound), §6 P4/P5 (no two scripts at once, tokens
increase). Each test runs a ``Cluster`` (tests/harness/cluster.py) on the ``Loopback()`` backend: the
workload records what ran when, and leaving the ``with`` block checks that no two runs overlapped, that
tokens increased, that the fencing register held and that no daemon logged a Traceback. Teardown kills
every process a cluster started, pass or fail.

Timing is ``TEST_TIMING`` (h = 0.05 s, E = 0.5 s, G = 0.2 s) unless the default is the point. Bounds from the
protocol cover the daemons' decisions; a script run begins SCRIPT_START_SLACK_S later at most, because
the guard and the workload are two Python interpreters to start (about 50 ms on an idle host, several
hundred ms on a loaded 2-core CI runner that runs other suites at the same time).
"""

from __future__ import annotations

import itertools
import time

import pytest

from tests.harness.cluster import Cluster, Loopback, Node
from tests.harness.runs import Run, check_runs, parse_runs
from tests.timing import DEFAULT, TEST_TIMING

slow = pytest.mark.slow

SCRIPT_START_SLACK_S = 0.5
# Scheduling slack for the guard's signals on a loaded host (it is one of many runnable processes).
SIGNAL_SLACK_S = 0.15
E, G, K, H = (
    TEST_TIMING.election_timeout_s,
    TEST_TIMING.stop_timeout_s,
    TEST_TIMING.kill_margin_s,
    TEST_TIMING.heartbeat_interval_s,
)


# ---- the checker itself (test the tester) -------------------------------------------------------

# Two runs on two nodes; pids far above any real one, so that no live process is mistaken for them.
RECORD = """\
127.0.0.1:9 9000001 10.000 1 start cluster=a,b,c
127.0.0.1:9 9000001 10.005 1 tick
127.0.0.1:9 9000001 10.200 1 term
127.0.0.1:9 9000001 10.201 1 exit code=0
127.0.0.2:9 9000002 10.300 2 start cluster=a,b,c
127.0.0.2:9 9000002 10.305 2 tick
"""
GONE = "9000001 10.202 pidfd\n9000002 10.400 pidfd\n"  # what the run monitor saw


def test_checker_accepts_runs_one_after_another() -> None:
    runs = parse_runs(RECORD, GONE)
    check_runs(runs)
    assert [(r.node, r.token, r.start, r.end) for r in runs] == [
        ("127.0.0.1:9", 1, 10.0, 10.202),
        ("127.0.0.2:9", 2, 10.3, 10.4),
    ]
    assert runs[0].cluster == "a,b,c" and runs[0].term_at == 10.2 and runs[0].exit_code == 0


def test_checker_ends_a_run_when_its_process_is_gone_not_at_its_last_line() -> None:
    """A SIGKILLed run's last line is a tick; it lasted until the monitor saw it gone: overlap."""
    record = RECORD.replace(
        "127.0.0.1:9 9000001 10.200 1 term\n127.0.0.1:9 9000001 10.201 1 exit code=0\n", ""
    )
    check_runs(parse_runs(record))  # without the monitor: the last tick, a lower bound
    assert parse_runs(record)[0].end_is_lower_bound
    with pytest.raises(AssertionError, match="overlap"):
        check_runs(parse_runs(record, "9000001 10.35 pidfd\n9000002 10.4 pidfd\n"))


def test_checker_rejects_a_token_that_does_not_increase() -> None:
    with pytest.raises(AssertionError, match="token did not increase"):
        check_runs(parse_runs(RECORD.replace(" 2 start", " 1 start").replace(" 2 tick", " 1 tick")))


def test_checker_allows_the_same_token_only_for_a_restart_on_the_same_node() -> None:
    restart = RECORD.replace("127.0.0.2:9 9000002", "127.0.0.1:9 9000002").replace(" 2 start", " 1 start")
    check_runs(parse_runs(restart.replace(" 2 tick", " 1 tick")))


def test_checker_rejects_a_run_without_a_start_line() -> None:
    with pytest.raises(AssertionError, match="no start line"):
        check_runs(parse_runs(RECORD.replace("10.300 2 start cluster=a,b,c", "10.300 2 tick")))


# ---- real clusters -------------------------------------------------------------------------------


def term_of(c: Cluster, node: Node) -> int:
    status = c.status(node)
    assert status is not None, f"{node} has no status"
    return int(status["term"])


def run_of(c: Cluster, node: Node) -> Run:
    """The run the node's daemon reports as its script (status.json script_pid)."""
    status = c.status(node)
    assert status is not None
    pid = status["script_pid"]
    return c.wait_for(lambda: next((r for r in c.runs() if r.pid == pid), None), 5.0, f"the run of pid {pid}")


def slaves_follow(c: Cluster, master: Node, nodes: list[Node]) -> bool:
    for node in nodes:
        st = c.status(node)
        if st is None or st["role"] != "slave" or st["master"] != master.name:
            return False
    return True


@slow
@pytest.mark.parametrize("size", [3, 5])
def test_cluster_elects_one_master_within_bound(size: int) -> None:
    """Reference: protocol.md §3.3, §3.6, §5.1: after the start-up embargo E, the lowest live address
    proposes; the master's script runs within E + failover_bound_s of the start."""
    with Cluster(size, Loopback(), keys=size == 5) as c:
        master = c.wait_for_master()
        run = run_of(c, master)
        assert c.ready_at is not None
        took = run.start - c.ready_at
        bound = E + TEST_TIMING.failover_bound_s() + SCRIPT_START_SLACK_S
        assert took <= bound, f"first script started {took:.3f}s after the daemons, bound {bound:.3f}s"
        others = [n for n in c.nodes if n is not master]
        c.wait_for(lambda: slaves_follow(c, master, others), 5.0, "every other node to follow the master")
        assert [r.node for r in c.runs()] == [master.name], "exactly one script runs"
        assert run.token == term_of(c, master)
        assert all(c.status(n)["authenticated"] is (size == 5) for n in c.nodes)  # type: ignore[index]


@slow
@pytest.mark.parametrize("size", [3, 5])
def test_crash_of_master_daemon_and_script_fails_over_and_the_node_rejoins(size: int) -> None:
    """Reference: protocol.md §5.1 (crash failover bound), §3.3 (no pre-emption by a rejoining node)."""
    with Cluster(size, Loopback()) as c:
        old = c.wait_for_master()
        old_run, old_term = run_of(c, old), term_of(c, old)
        t_kill = c.crash(old, host=True)
        new = c.wait_for_master(newer_than=old_term)
        new_run = c.wait_for_run(after=t_kill)
        assert new_run.node == new.name != old.name
        assert not c.runs()[0].alive, "the old script is gone"
        assert c.runs()[0].pid == old_run.pid
        took = new_run.start - t_kill
        bound = TEST_TIMING.failover_bound_s() + SCRIPT_START_SLACK_S
        assert took <= bound, f"failover took {took:.3f}s, bound {bound:.3f}s"
        assert new_run.token > old_run.token
        # the crashed node comes back as a slave of the new master, and does not take over
        c.restart(old)
        c.wait_for(lambda: slaves_follow(c, new, [old]), 5 * E, f"{old} to follow {new}")
        time.sleep(2 * E)
        assert c.master() is new and term_of(c, new) == new_run.token
        assert len(c.runs()) == 2


@slow
def test_kill9_of_daemon_alone_stops_its_script_within_stop_timeout() -> None:
    """Reference: protocol.md §4.4: the guard reads EOF, SIGTERMs the script at once and SIGKILLs it
    after G. The workload ignores SIGTERM here, so that it must be SIGKILLed."""
    with Cluster(3, Loopback(), workload={"term_delay_s": 30}) as c:
        old = c.wait_for_master()
        old_run = run_of(c, old)
        t_kill = c.crash(old)
        gone = c.gone_at(old_run.pid, timeout_s=5.0)
        assert gone - t_kill <= G + K + SIGNAL_SLACK_S, f"script outlived its daemon by {gone - t_kill:.3f}s"
        run = next(r for r in c.runs() if r.pid == old_run.pid)
        assert run.term_at is not None and run.exit_at is None, "SIGTERM first, then SIGKILL"
        assert gone - run.term_at >= G - 0.02, "the grace G between SIGTERM and SIGKILL was honoured"
        new = c.wait_for_master(newer_than=old_run.token)
        assert new is not old
        c.wait_for_run(after=t_kill)


@slow
def test_sigstop_of_master_stops_its_script_by_the_deadline_and_sigcont_rejoins_as_slave() -> None:
    """Reference: protocol.md §4.2-§4.4: a frozen daemon renews nothing; its guard has the script
    reaped by the kill deadline t_ack + L_kill, where t_ack (the last acknowledged round) precedes the
    SIGSTOP; a new master takes over only after that. After SIGCONT the old master steps down and
    follows the new one (§3.3: its stale term cannot disrupt)."""
    with Cluster(3, Loopback(), workload={"term_delay_s": 30}) as c:
        old = c.wait_for_master()
        old_run = run_of(c, old)
        time.sleep(0.2)  # a few renewals
        t_stop = c.pause(old)
        gone = c.gone_at(old_run.pid, timeout_s=5.0)
        lease_kill = TEST_TIMING.lease_kill_s
        assert gone <= t_stop + lease_kill, (
            f"script gone {gone - t_stop:.3f}s after SIGSTOP, after its kill deadline "
            f"(at most {lease_kill:.3f}s)"
        )
        run = next(r for r in c.runs() if r.pid == old_run.pid)
        assert run.term_at is not None, "the guard sent SIGTERM before SIGKILL"
        new = c.wait_for_master(newer_than=old_run.token, exclude=[old])
        new_run = c.wait_for_run(after=t_stop)
        assert new_run.node == new.name and new_run.start > gone
        c.resume(old)
        c.wait_for(lambda: slaves_follow(c, new, [old]), 10 * E, f"{old} to rejoin as a slave of {new}")
        time.sleep(2 * E)
        assert c.master() is new and term_of(c, new) == new_run.token, "the thawed node did not disrupt"
        assert [r.pid for r in c.runs()] == [old_run.pid, new_run.pid]


@slow
def test_sigterm_of_master_hands_over_in_well_under_an_election_timeout() -> None:
    """Reference: protocol.md §3.7, §5.3: the master stops its script, resigns and exits 0; its
    successor starts at once, without waiting for E. Default timing: E = 1 s is the point."""
    with Cluster(3, Loopback(), timing=DEFAULT) as c:
        old = c.wait_for_master()
        old_run = run_of(c, old)
        t_term = c.shutdown(old)
        assert c.wait_exit(old, timeout_s=DEFAULT.stop_timeout_s + 5.0) == 0
        new_run = c.wait_for_run(after=t_term)
        old_run = next(r for r in c.runs() if r.pid == old_run.pid)
        assert old_run.exit_at is not None and old_run.exit_code == 0, "the script exited on SIGTERM"
        handover = new_run.start - old_run.exit_at
        limit = DEFAULT.election_timeout_s / 2
        assert handover <= limit, f"handover took {handover:.3f}s, more than E/2 = {limit:.3f}s"
        assert new_run.token > old_run.token


@slow
@pytest.mark.parametrize("size", [3, 5])
def test_minority_never_runs_the_script(size: int) -> None:
    """Reference: protocol.md §3.3, §6 P6: without a majority no node becomes master. Masters are
    stopped one by one (first a planned stop, then crashes) until a minority is left."""
    quorum = size // 2 + 1
    with Cluster(size, Loopback()) as c:
        term = 0
        stopped = 0
        while sum(n.running for n in c.nodes) >= quorum:
            master = c.wait_for_master(newer_than=term)
            term = term_of(c, master)
            if stopped == 0:
                c.shutdown(master)
                assert c.wait_exit(master, timeout_s=5.0) == 0
            else:
                c.crash(master, host=True)
            stopped += 1
        t_minority = time.monotonic()
        survivors = [n for n in c.nodes if n.running]
        assert len(survivors) == size - quorum
        give_up = t_minority + 3 * TEST_TIMING.failover_bound_s() + SCRIPT_START_SLACK_S
        while time.monotonic() < give_up:
            for node in survivors:
                st = c.status(node)
                assert st is not None and st["role"] != "master", f"{node} became master without a majority"
            time.sleep(0.01)
        late = [r for r in c.runs() if r.start > t_minority]
        assert not late, f"a minority ran the script: {late}"
        assert all(not r.alive for r in c.runs())


@slow
def test_script_sees_its_environment_and_tokens_increase_over_handovers() -> None:
    """Reference: protocol.md §3.8: PYQUORUM_TERM is the master's term and grows with every new
    master; PYQUORUM_NODE and PYQUORUM_CLUSTER name the node and all members."""
    with Cluster(3, Loopback(), keys=True) as c:
        members = ",".join(sorted(n.name for n in c.nodes))
        term = 0
        seen: list[tuple[str, int, int]] = []
        for _ in range(3):
            master = c.wait_for_master(newer_than=term)
            term = term_of(c, master)
            run = run_of(c, master)
            seen.append((master.name, term, run.pid))
            assert run.node == master.name and run.token == term and run.cluster == members
            assert c.status(master)["members"] == sorted(n.name for n in c.nodes)  # type: ignore[index]
            c.shutdown(master)
            assert c.wait_exit(master, timeout_s=5.0) == 0
            c.restart(master)
        runs = c.runs()
        tokens = [r.token for r in runs]
        assert tokens == sorted(set(tokens)), f"tokens do not strictly increase: {tokens}"
        assert [(r.node, r.token, r.pid) for r in runs[:3]] == seen


@slow
def test_restart_on_failure_backs_off_then_resigns_and_another_node_takes_over() -> None:
    """Reference: README "restart policy", config.py: --restart on-failure restarts a failing script
    after 1, 2, 4, 8 s (same token: same master, same term); the 5th failure within 60 s makes the
    master resign, and another node runs the script with a higher token."""
    with Cluster(3, Loopback()) as c:
        bad = c.wait_for_master()
        term = term_of(c, bad)
        c.set_workload(bad, exit_after_s=0.05, exit_code=1)
        new = c.wait_for_master(40.0, newer_than=term, exclude=[bad])
        runs = c.runs()
        failed = [r for r in runs if r.node == bad.name]
        assert len(failed) == 5, [str(r) for r in runs]
        assert all(r.token == term and r.exit_code == 1 for r in failed)
        for i, (a, b) in enumerate(itertools.pairwise(failed)):
            backoff = 2.0**i
            assert a.exit_at is not None
            gap = b.start - a.exit_at
            assert backoff <= gap <= backoff + SCRIPT_START_SLACK_S, f"restart {i + 1} after {gap:.3f}s"
        good = c.wait_for_run(after=failed[-1].start, node=new)
        assert good.token > term
        st = c.status(bad)
        assert st is not None and st["role"] == "slave"


@slow
@pytest.mark.parametrize(
    ("policy", "exit_code", "restarted"),
    [("on-failure", 0, False), ("never", 1, False), ("always", 0, True)],
)
def test_restart_policy(policy: str, exit_code: int, restarted: bool) -> None:
    """Reference: README "restart policy": on-failure does not restart a script that exited 0, never
    restarts nothing, always restarts after a clean exit too (after 1 s); the node stays master."""
    with Cluster(3, Loopback(), restart=policy) as c:
        master = c.wait_for_master()
        term = term_of(c, master)
        first = run_of(c, master)
        c.set_workload(master, exit_after_s=0.1, exit_code=exit_code)
        ended = c.wait_for(
            lambda: next((r for r in c.runs() if r.pid == first.pid and r.exit_at is not None), None),
            5.0,
            "the script to exit by itself",
        )
        c.set_workload(master, exit_after_s=None)
        assert ended.exit_code == exit_code
        if restarted:
            again = c.wait_for_run(5.0, after=ended.start, node=master)
            assert again.token == term
            assert 1.0 <= again.start - ended.exit_at <= 1.0 + SCRIPT_START_SLACK_S  # type: ignore[operator]
        else:
            time.sleep(2.5)  # longer than the first backoff
            assert len(c.runs()) == 1, "not restarted"
        st = c.status(master)
        assert st is not None and st["role"] == "master" and st["term"] == term, "the node stays master"
        assert slaves_follow(c, master, [n for n in c.nodes if n is not master])


@slow
def test_sigterm_stops_every_daemon_with_exit_0_and_leaves_no_process() -> None:
    """Reference: protocol.md §3.7, README "Planned stop": on SIGTERM the daemon stops the script
    (bounded), resigns and exits 0."""
    with Cluster(3, Loopback(), workload={"term_delay_s": 0.05}) as c:
        master = c.wait_for_master()
        run = run_of(c, master)
        for node in c.nodes:
            c.shutdown(node)
        codes = [c.wait_exit(node, timeout_s=G + K + 5.0) for node in c.nodes]
        assert codes == [0, 0, 0]
        assert not any(c.processes(node) for node in c.nodes), "a guard or script outlived its daemon"
        run = next(r for r in c.runs() if r.pid == run.pid)
        assert run.term_at is not None and run.exit_code == 0, "the script was stopped with SIGTERM"
        for node in c.nodes:
            assert "event=forced_exit" not in c.log(node)
