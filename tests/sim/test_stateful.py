"""Hypothesis stateful tests: arbitrary fault sequences against the simulated cluster.

Rules deliver time, partition, heal, crash, restart, pause, shut down and make the network lossy;
the simulator checks every invariant after every event (protocol.md §6), and the invariants below are
checked after every rule. Hypothesis shrinks a failure to a minimal sequence of faults.
Test the tester: the same machine over a deliberately broken core must fail.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pyquorum.core.lease import Timing
from pyquorum.core.node import Role
from tests.sim.sim import Cluster, Violation

TIMING = Timing(heartbeat_interval_s=0.05, election_timeout_s=0.5, stop_timeout_s=0.2)


class ClusterMachine(RuleBasedStateMachine):
    broken: frozenset[str] = frozenset()

    def __init__(self) -> None:
        super().__init__()
        self.c: Cluster | None = None
        self.max_term: dict[int, int] = {}

    @initialize(n=st.sampled_from([2, 3, 4, 5]), seed=st.integers(0, 2**32))
    def start(self, n: int, seed: int) -> None:
        self.c = Cluster(n, TIMING, seed=seed, broken=self.broken)

    @property
    def cluster(self) -> Cluster:
        assert self.c is not None
        return self.c

    @rule(seconds=st.floats(0.001, 2.0))
    def advance(self, seconds: float) -> None:
        self.cluster.run_for(seconds)

    @rule(data=st.data())
    def isolate(self, data: st.DataObject) -> None:
        self.cluster.isolate(data.draw(st.integers(0, self.cluster.n - 1)))

    @rule(data=st.data())
    def partition(self, data: st.DataObject) -> None:
        n = self.cluster.n
        side = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
        self.cluster.partition([i for i in range(n) if side[i]], [i for i in range(n) if not side[i]])

    @rule(data=st.data())
    def one_way(self, data: st.DataObject) -> None:
        n = self.cluster.n
        a = data.draw(st.integers(0, n - 1))
        b = data.draw(st.integers(0, n - 1).filter(lambda x: x != a))
        self.cluster.cut_links([(a, b)], both=False)

    @rule()
    def heal(self) -> None:
        self.cluster.heal()

    @rule(loss=st.sampled_from([0.0, 0.1, 0.3]), dup=st.sampled_from([0.0, 0.2]))
    def lossy(self, loss: float, dup: float) -> None:
        self.cluster.net.loss = loss
        self.cluster.net.duplicate = dup

    @rule(data=st.data(), with_script=st.booleans())
    def crash(self, data: st.DataObject, with_script: bool) -> None:
        self.cluster.crash(data.draw(st.integers(0, self.cluster.n - 1)), with_script=with_script)

    @rule(data=st.data())
    def restart(self, data: st.DataObject) -> None:
        self.cluster.restart(data.draw(st.integers(0, self.cluster.n - 1)))

    @rule(data=st.data(), seconds=st.floats(0.01, 2.0))
    def pause(self, data: st.DataObject, seconds: float) -> None:
        self.cluster.pause(data.draw(st.integers(0, self.cluster.n - 1)), seconds)

    @rule(data=st.data())
    def shutdown(self, data: st.DataObject) -> None:
        self.cluster.shutdown(data.draw(st.integers(0, self.cluster.n - 1)))

    @invariant()
    def terms_never_decrease_and_one_master_per_term(self) -> None:
        if self.c is None:
            return
        masters: dict[int, str] = {}
        for node in self.c.nodes:
            if node.core is None:
                continue
            assert node.core.term >= self.max_term.get(node.idx, 0)
            self.max_term[node.idx] = node.core.term
            if node.core.role is Role.MASTER:
                assert masters.setdefault(node.core.term, node.name) == node.name

    @invariant()
    def at_most_one_script(self) -> None:
        if self.c is not None:
            assert sum(1 for n in self.c.nodes if n.run is not None) <= 1


class BrokenClusterMachine(ClusterMachine):
    broken = frozenset({"no_prevote_stickiness", "double_vote"})


SETTINGS = settings(
    max_examples=1000,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
    database=None,
)

TestCluster = ClusterMachine.TestCase
TestCluster.settings = SETTINGS


def test_stateful_machine_catches_a_broken_core() -> None:
    """Test the tester: a core that votes twice and ignores stickiness must be caught."""
    from hypothesis.stateful import run_state_machine_as_test

    with pytest.raises(Violation):
        run_state_machine_as_test(
            BrokenClusterMachine,
            # finding it is the point; shrinking would only cost time
            settings=settings(
                SETTINGS, max_examples=300, report_multiple_bugs=False, phases=[Phase.generate]
            ),
        )
