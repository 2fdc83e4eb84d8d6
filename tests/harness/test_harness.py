"""The harness itself: its one meaning of alive, the run monitor on a real workload process, and a fault
a backend cannot make being a clear skip. Reference: tests/harness/*.py docstrings; protocol.md §3.8."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness.cluster import Cluster, Loopback, Netns, Node, Unsupported
from tests.harness.procfs import alive
from tests.harness.runs import RECORD, REGISTER, RunMonitor, read_register
from tests.harness.workload import CONTROL_VAR, RECORD_VAR, REGISTER_VAR
from tests.netns import hosts


def test_alive_counts_a_zombie_as_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, 0)  # the zombie still exists: a signal reaches it
        assert not alive(proc.pid), "an exited, unreaped child runs nothing"
    finally:
        proc.wait()
    assert not alive(proc.pid) and not alive(0) and not alive(True)
    assert alive(os.getpid())


def test_monitor_ends_a_killed_run_when_its_process_is_gone(tmp_path: Path) -> None:
    for name in (RECORD, "exits.log"):
        (tmp_path / name).touch()
    monitor = RunMonitor(tmp_path)
    monitor.start()
    env = {**os.environ, "PYQUORUM_NODE": "127.0.0.9:1", "PYQUORUM_TERM": "4", "PYQUORUM_CLUSTER": "a,b"}
    env |= {RECORD_VAR: str(tmp_path / RECORD), REGISTER_VAR: str(tmp_path / REGISTER), CONTROL_VAR: ""}
    script = Path(__file__).with_name("workload.py")
    proc = subprocess.Popen([sys.executable, "-IS", str(script)], env=env)
    try:
        deadline = time.monotonic() + 10
        while not (runs := monitor.runs()) or runs[0].last - runs[0].start < 0.05:
            assert time.monotonic() < deadline, "no ticks"
            time.sleep(0.01)
        assert runs[0].alive and runs[0].has_start and runs[0].cluster == "a,b"
        t_kill = time.monotonic()
        proc.kill()
        proc.wait()
        while (run := monitor.runs()[0]).end_how != "pidfd":
            assert time.monotonic() < deadline + 5, f"the monitor did not see {run} end"
    finally:
        proc.kill()
        proc.wait()
        monitor.stop()
    assert (run.node, run.token) == ("127.0.0.9:1", 4)
    assert run.end is not None and run.last < t_kill <= run.end, "ended when its process was gone, not before"
    assert f"{proc.pid} " in (tmp_path / "exits.log").read_text()
    writes = read_register(tmp_path)
    assert writes and all(w[1:4] == ("127.0.0.9:1", proc.pid, 4) and w[4] == "accept" for w in writes)


def test_loopback_cannot_break_the_network() -> None:
    with Cluster(3, Loopback(), script=None, launch=False) as c:
        with pytest.raises(Unsupported, match="Loopback cannot break the network"):
            c.isolate(c.nodes[0])
        c.heal()  # nothing was broken: not a failure


netns = pytest.param(Netns, marks=[pytest.mark.netns, pytest.mark.xdist_group("netns")], id="netns")


def follows(c: Cluster, node: Node, master: Node) -> bool:
    st = c.status(node)
    return st is not None and st["master"] == master.name


@pytest.mark.slow
@pytest.mark.parametrize("backend", [pytest.param(Loopback, id="loopback"), netns])
def test_isolated_master_is_replaced_and_rejoins_after_the_heal(backend: type[Loopback | Netns]) -> None:
    """Reference: protocol.md §4.2, §5.1: one story on both backends; on Loopback it is a skip that
    says why. Leaving the block checks that the two masters' scripts never overlapped."""
    with contextlib.ExitStack() as stack:
        if backend is Netns:
            stack.enter_context(hosts.exclusive())
        c = stack.enter_context(Cluster(3, backend()))
        old = c.wait_for_master()
        old_term = int(c.status(old)["term"])  # type: ignore[index]
        c.isolate(old)
        new = c.wait_for_master(newer_than=old_term, exclude=[old])
        assert new is not old
        c.heal()
        c.wait_for(lambda: follows(c, old, new), 10.0, f"{old} to follow {new}")
        assert [r.node for r in c.runs()] == [old.name, new.name]
