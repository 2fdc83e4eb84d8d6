"""Notify hooks driven by real daemons on loopback: the order across failovers, ``stopping`` last, a
hook that hangs or fails, a stop while a hook runs, and a reload that adds and removes ``--notify``.
Reference: docs/operations.md §13, runtime/hooks.py (the rules), runtime/daemon.py (``HOOK_DRAIN_S``).

The hook records its calls (tests/harness/hookrecord.py). The hooks inherit the cluster's tag, so the
harness kills whatever is left of them, pass or fail.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import pytest

from pyquorum.runtime.daemon import HOOK_DRAIN_S, SHUTDOWN_SLACK_S
from tests.harness.cluster import Cluster, Loopback, Node
from tests.harness.hookrecord import Call, calls, check_order, install, last_call
from tests.harness.procfs import alive
from tests.runtime.test_operate import cli, metrics_of
from tests.timing import TEST_TIMING

pytestmark = pytest.mark.slow

E, G, K = TEST_TIMING.election_timeout_s, TEST_TIMING.stop_timeout_s, TEST_TIMING.kill_margin_s
WAIT_S = 20.0
SCRIPT_START_SLACK_S = 0.5  # as tests/runtime/test_cluster.py: a loaded host starts a script late


def wait_last(c: Cluster, records: Path, node: Node, event: str, master: Node) -> None:
    """Until the node's last hook call is ``event`` naming ``master``."""
    want = (event, master.name)
    c.wait_for(lambda: last_call(records, node) == want or None, WAIT_S, f"{node}'s hook: {want}")


def wait_log(c: Cluster, node: Node, text: str) -> None:
    c.wait_for(lambda: text in c.log(node) or None, WAIT_S, f"{text!r} in {node}'s log")


def test_hooks_follow_failovers_in_order_and_stopping_comes_last(tmp_path: Path) -> None:
    hook, records = install(tmp_path)
    env = {"HOOK_DIR": str(records), "HOOK_MODE": "slow"}
    with Cluster(3, Loopback(), extra_args=["--notify", str(hook)], env=env) as c:
        first = c.wait_for_master()
        c.pause(first)  # its peers elect another; resumed, it hears the higher term and follows
        second = c.wait_for_master(exclude=[first])
        c.resume(first)
        c.pause(second)
        third = c.wait_for_master(exclude=[second])
        c.resume(second)
        for n in c.nodes:
            wait_last(c, records, n, "master" if n is third else "slave", third)
        term = c.query(third)["cluster"]["term"]
        assert calls(records, third)[-1].term == term
        for n in c.nodes:  # every hook is slow (0.3 s): the stop finds one running or about to
            c.shutdown(n)
        assert all(c.wait_exit(n) == 0 for n in c.nodes)
    for n in c.nodes:
        check_order(records, n)
    for n in (first, second, third):  # each master heard it, in the term it won
        assert "master" in [x.event for x in calls(records, n)], n


def test_a_hung_hook_delays_no_failover_and_is_killed_at_its_timeout(tmp_path: Path) -> None:
    hook, records = install(tmp_path)
    env = {"HOOK_DIR": str(records), "HOOK_MODE": "hang"}  # every `slave` hook hangs
    timeout_s = 3.0
    args = ["--notify", str(hook), "--notify-timeout", str(timeout_s)]
    with Cluster(3, Loopback(), extra_args=args, env=env) as c:
        old = c.wait_for_master()
        followers = [n for n in c.nodes if n is not old]

        def hanging(n: Node) -> Call | None:
            got = calls(records, n)
            return got[-1] if got and got[-1].pids and got[-1].end is None else None

        hung = {n.name: c.wait_for(partial(hanging, n), WAIT_S, f"{n}'s hook to hang") for n in followers}
        t_kill = c.crash(old, host=True)
        new_run = c.wait_for_run(after=t_kill)
        took = new_run.start - t_kill
        bound = TEST_TIMING.failover_bound_s() + SCRIPT_START_SLACK_S
        assert took <= bound, f"failover took {took:.3f}s beside a hung hook, bound {bound:.3f}s"
        new = next(n for n in followers if n.name == new_run.node)
        # the failover did not wait for the hook: it still hangs, its `master` waits behind it
        assert all(alive(p) for p in hung[new.name].pids), "the hook was gone before the failover ended"
        assert calls(records, new)[-1].event == "slave"
        wait_last(c, records, new, "master", new)
        for n in followers:
            wait_log(c, n, "result=timeout")
            assert not any(alive(p) for p in hung[n.name].pids), "the hung hook's group was not killed"
        finished = next(line for line in c.log(new).splitlines() if "result=timeout" in line)
        assert "event=hook_finished" in finished and "hook_event=slave" in finished
        assert c.query(new)["hooks"]["timed_out"] == 1


def test_a_failing_hook_is_logged_and_counted_and_changes_nothing(tmp_path: Path) -> None:
    hook, records = install(tmp_path)
    env = {"HOOK_DIR": str(records), "HOOK_MODE": "fail"}
    with Cluster(3, Loopback(), extra_args=["--notify", str(hook)], env=env, http=True) as c:
        master = c.wait_for_master()
        c.wait_for_run(node=master)
        port = c.http_port
        assert port is not None
        for n in c.nodes:
            wait_log(c, n, "result=failed")
            doc = c.query(n)["hooks"]
            assert doc["path"] == str(hook) and doc["delivered"] == 0 and doc["dropped"] == 0
            assert doc["last_event"] == ("master" if n is master else "slave")
            log = c.log(n)
            assert "event=hook_finished" in log and "result=failed status=3" in log
            assert 'line="failing on purpose"' in log
            m = metrics_of(n, port)
            assert m[("pyquorum_hook_runs_total", (("result", "failed"),))] == doc["failed"]
            assert m[("pyquorum_hook_runs_total", (("result", "ok"),))] == 0
            assert m[("pyquorum_hook_runs_total", (("result", "timeout"),))] == 0
            assert m[("pyquorum_hook_events_dropped_total", ())] == 0
        code, out, _ = cli(c, master, "status")
        assert code == 0 and f"Notify hook: {hook}: last master" in out and "1 failed" in out
        assert c.master() is master


def test_a_stop_while_a_hook_hangs_exits_within_the_drain_bound_and_leaves_no_hook(tmp_path: Path) -> None:
    hook, records = install(tmp_path)
    env = {"HOOK_DIR": str(records), "HOOK_MODE": "hangall"}  # every hook hangs for 60 s
    with Cluster(3, Loopback(), extra_args=["--notify", str(hook)], env=env) as c:
        master = c.wait_for_master()
        c.wait_for_run(node=master)

        def hanging() -> tuple[int, ...] | None:
            got = calls(records, master)
            return got[-1].pids if got and got[-1].pids else None

        pids = c.wait_for(hanging, WAIT_S, "the master's hook to hang")
        t = c.shutdown(master)
        assert c.wait_exit(master) == 0
        took = time.monotonic() - t
        bound = G + K + HOOK_DRAIN_S + SHUTDOWN_SLACK_S
        assert took <= bound, f"the stop took {took:.3f}s beside a hung hook, bound {bound:.3f}s"
        assert took >= HOOK_DRAIN_S * 0.9, f"{took:.3f}s: the hook was not given its drain time"
        assert not any(alive(p) for p in pids), "the hung hook's group outlived the daemon"
        log = c.log(master)
        assert "event=hook_finished" in log and "result=shutdown" in log
        dropped = [
            ln for ln in log.splitlines() if "event=hook_dropped" in ln and "hook_event=stopping" in ln
        ]
        assert dropped and "reason=shutdown" in dropped[0]
        c.wait_for_master(exclude=[master])  # the others go on


def test_a_reload_adds_the_hook_which_hears_the_role_now_and_removes_it(tmp_path: Path) -> None:
    hook, records = install(tmp_path)
    env = {"HOOK_DIR": str(records), "HOOK_MODE": ""}
    with Cluster(3, Loopback(), env=env, config_file=True) as c:
        master = c.wait_for_master()
        for n in c.nodes:
            c.write_config(n, {**c.config_values(n), "notify": str(hook), "notify_timeout": 5})
            code, out, err = cli(c, n, "reload")
            assert code == 0, err
            assert f"notify off -> {hook} (5 s)" in out
        for n in c.nodes:
            wait_last(c, records, n, "master" if n is master else "slave", master)
            assert [x.seq for x in calls(records, n)] == [1]
        for n in c.nodes:
            c.write_config(n, c.config_values(n))
            code, out, err = cli(c, n, "reload")
            assert code == 0 and f"notify {hook} (5 s) -> off" in out, (out, err)
        before = {n.name: len(calls(records, n)) for n in c.nodes}
        t_kill = c.crash(master)
        c.wait_for_run(after=t_kill)
        time.sleep(2 * E)
        assert {n.name: len(calls(records, n)) for n in c.nodes} == before
