"""Moving the role on a live loopback cluster: ``pyquorum step-down`` (with and without --to, --wait,
its refusals) and ``pyquorum drill`` (planned and --crash). Real daemons, real sockets, the real
command line; the harness's workload record checks at the end that no two scripts ever overlapped.

Reference: protocol.md §3.10 (step-down), §5.1 and §5.3 (the bounds a drill checks against);
docs/operations.md "Moving the role" and "Failover drill".
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from pyquorum.core.address import sort_nodes
from tests.harness.cluster import Cluster, Loopback, Node
from tests.runtime.test_operate import cli
from tests.timing import TEST_TIMING

slow = pytest.mark.slow
E = TEST_TIMING.election_timeout_s
WAIT_S = 20.0
GAP = re.compile(r"old script reaped -> new script started: (-?[\d.]+) ms ± ([\d.]+) ms")


def settled(c: Cluster) -> Node:
    """The master, once its script runs and every node has been up for longer than its embargo."""
    master = c.wait_for_master()
    c.wait_for_run(node=master)
    time.sleep(1.5 * E)
    return master


def master_of(c: Cluster, node: Node) -> str | None:
    doc: dict[str, Any] = c.query(node)
    master: str | None = doc["cluster"]["master"]
    return master


@slow
def test_step_down_hands_over_to_the_next_node_and_nothing_sticky_remains() -> None:
    """Reference: protocol.md §3.10: asked on a follower, the master hands over to the first of the
    proposal order; afterwards a crash fails over by the usual rule (the lowest live address)."""
    with Cluster(3, Loopback(), timing=TEST_TIMING) as c:
        master = settled(c)
        follower = next(n for n in c.nodes if n is not master)
        code, out, err = cli(c, follower, "step-down")
        assert code == 0, err
        assert f"{master.name} (term " in out and "accepted the step-down" in out
        expected = sort_nodes([n.name for n in c.nodes if n is not master])[0]
        new = c.wait_for_master(newer_than=0, exclude=[master])
        assert new.name == expected
        c.wait_for_run(node=new)
        time.sleep(2.5 * E)  # the old master's quiet period (2E) ends: nothing else stays behind
        t_crash = c.crash(new)
        run = c.wait_for_run(after=t_crash)
        assert run.node == sort_nodes([n.name for n in c.nodes if n is not new])[0]


@slow
def test_step_down_to_a_named_node_with_wait_prints_a_gap_the_workload_confirms() -> None:
    """Reference: protocol.md §3.10 (--to), §5.3: --wait prints the gap from the daemons' records; the
    workload's own record (its exit line before the reaping, its start line after the exec) can
    only show a longer one."""
    with Cluster(3, Loopback(), timing=TEST_TIMING) as c:
        master = settled(c)
        target = sort_nodes([n.name for n in c.nodes if n is not master])[-1]  # not the default one
        old_pid = c.status(master)["script_pid"]  # type: ignore[index]
        code, out, err = cli(c, master, "step-down", "--to", target, "--wait")
        assert code == 0, err
        assert f"-> {target} (term " in out
        found = GAP.search(out)
        assert found is not None, out
        gap_s, unc_s = float(found[1]) / 1000, float(found[2]) / 1000
        assert -unc_s <= gap_s <= TEST_TIMING.handover_bound_s(), out
        new_run = c.wait_for_run(node=c.node(target))
        old_run = next(r for r in c.runs() if r.pid == old_pid)
        assert old_run.exit_at is not None
        assert gap_s <= new_run.start - old_run.exit_at + unc_s + 0.002, (out, new_run, old_run)


@slow
def test_step_down_is_refused_with_the_reason_and_changes_nothing() -> None:
    """Reference: protocol.md §3.10: --to a node that is down is "not-live"; --to the master itself
    "is-master"; a member that is not one is refused before anything is sent. Nothing changes."""
    with Cluster(3, Loopback(), timing=TEST_TIMING) as c:
        master = settled(c)
        down, asker = (n for n in c.nodes if n is not master)
        c.shutdown(down)
        c.wait_exit(down)
        time.sleep(1.5 * E)  # no longer heard within E
        code, _, err = cli(c, asker, "step-down", "--to", down.name)
        assert code == 1 and "refused the step-down: not-live" in err, err
        code, _, err = cli(c, asker, "step-down", "--to", master.name)
        assert code == 1 and "is-master" in err, err
        code, _, err = cli(c, asker, "step-down", "--to", "127.0.0.1:9")
        assert code == 3 and "is not a member" in err, err
        time.sleep(E)
        assert master_of(c, asker) == master.name and c.running() is master


@slow
def test_step_down_without_a_majority_is_refused() -> None:
    """Reference: protocol.md §3.10: with two of three members down, nobody could take over: the
    member asked answers "no-majority" itself."""
    with Cluster(3, Loopback(), timing=TEST_TIMING) as c:
        settled(c)
        left, *gone = c.nodes
        for node in gone:
            c.shutdown(node)
        for node in gone:
            c.wait_exit(node)
        c.wait_for(lambda: not c.query(left)["cluster"]["has_quorum"] or None, WAIT_S, "no majority")
        time.sleep(2.5 * E)  # the master's last report of who is live (2E) is stale too
        code, _, err = cli(c, left, "step-down")
        assert code == 1 and "no-majority" in err, err


@slow
def test_drill_planned_two_rounds_within_the_bound() -> None:
    """Reference: protocol.md §5.3: two planned handovers, each measured against
    Timing.handover_bound_s; the JSON report says so."""
    with Cluster(3, Loopback(), timing=TEST_TIMING) as c:
        master = settled(c)
        asker = next(n for n in c.nodes if n is not master)
        code, out, err = cli(c, asker, "drill", "--rounds", "2", "--json")
        report = json.loads(out)
        assert code == 0 and report["ok"], (out, err)
        assert len(report["rounds"]) == 2 and report["error"] is None
        for r in report["rounds"]:
            assert r["kind"] == "planned" and r["within"] and r["new"] != r["old"]
            assert r["new_term"] > r["old_term"]
            assert -r["uncertainty_s"] <= r["gap_s"] <= r["bound_s"] == TEST_TIMING.handover_bound_s()
        assert report["rounds"][1]["old"] == report["rounds"][0]["new"]


@slow
def test_drill_crash_fails_over_without_killing_anything_and_rejoins() -> None:
    """Reference: protocol.md §4.3, §5.1: the silenced master's lease lapses and its script is
    stopped by the lease rules, another node takes over within Timing.failover_bound_s, and the old
    master, whose daemon never stopped, follows it again."""
    with Cluster(3, Loopback(), timing=TEST_TIMING) as c:
        master = settled(c)
        daemon_pid = master.pid
        code, out, err = cli(c, master, "drill", "--crash", "--json")  # run on the master itself
        report = json.loads(out)
        assert code == 0 and report["ok"], (out, err)
        (r,) = report["rounds"]
        assert r["kind"] == "crash" and r["old"] == master.name and r["new"] != master.name
        assert r["rejoined"] and r["within"]
        assert 0 < r["failover_s"] <= r["bound_s"] == TEST_TIMING.failover_bound_s()
        assert r["gap_s"] >= -r["uncertainty_s"]
        assert master.running and master.pid == daemon_pid  # nothing was killed
        doc = c.query(master)
        assert doc["cluster"]["master"] == r["new"] and doc["self"]["role"] == "slave"
        assert "event=silence_began" in c.log(master) and "event=silence_ended" in c.log(master)
