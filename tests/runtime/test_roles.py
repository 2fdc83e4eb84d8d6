"""Priorities, pre-emption and witnesses with real daemons on loopback. Reference: protocol.md §3.10,
§3.11. Leaving each ``with`` block checks that no two runs overlapped and tokens increased."""

from __future__ import annotations

import pytest

from pyquorum.runtime.storage import PersistedState, StateStore
from tests.harness.cluster import Cluster, Loopback

pytestmark = pytest.mark.slow


def known_new(c: Cluster) -> None:
    """What `pyquorum init` does on each node of a brand-new cluster: without it a node recovers
    (protocol.md §3.9) and which node is elected first depends on who recovered first."""
    for node in c.nodes:
        with StateStore(node.state_dir) as store:
            store.save(PersistedState(members=tuple(c.members)))


def test_the_highest_priority_is_elected_first_and_a_witness_never_runs_the_script() -> None:
    c = Cluster(3, Loopback(), launch=False)
    low, mid, high = c.nodes
    c.add_args("--priority", f"{high.name}=2", "--witness", low.name)
    known_new(c)
    with c:
        c.start()
        master = c.wait_for_master()
        assert master is high
        c.crash(high)
        successor = c.wait_for_master(exclude=[high])
        assert successor is mid  # the witness, lowest address, never proposes
        c.wait_for_run(node=mid)
        ran = {run.node for run in c.runs()}
    assert low.name not in ran and mid.name in ran, ran


def test_a_preferred_node_takes_the_role_back_by_a_clean_handover() -> None:
    c = Cluster(3, Loopback(), launch=False)
    low, mid, high = c.nodes
    c.add_args("--priority", f"{high.name}=2", "--preempt-after", "2")
    known_new(c)
    with c:
        c.start()
        first = c.wait_for_master()
        assert first is high  # known-new nodes: the first election goes by priority
        c.crash(high)
        assert c.wait_for_master(exclude=[high]) is low
        c.restart(high)
        back = c.wait_for_master(20.0, exclude=[low, mid])  # after about 2 s and a handover
        assert back is high
    runs = c.runs()
    handed = [r for r in runs if r.node == low.name]
    assert handed and all(r.end is not None for r in handed)
