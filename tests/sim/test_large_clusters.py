"""Randomized fault schedules at 25, 51 and 101 nodes: the quiet followers and the master's live report
at the sizes the cost work is about (protocol.md §3.2, §5), a few schedules per commit.

Each schedule is one of tests/sim/nemesis.py's (crashes, restarts, partitions, pauses, drops, clock
drift, with every safety invariant checked after each event and liveness after healing), at least
``DURATION_S`` simulated seconds. Nine schedules take about 60 s of CPU (most of it the 101-node ones). More:
``python -m tests.sim.soak --node-counts 25,51,101 --schedules 300``.
"""

from __future__ import annotations

import os

import pytest

from tests.sim.nemesis import run_schedule

SIZES = (25, 51, 101)
SCHEDULES_PER_SIZE = 3
DURATION_S = 30.0
SEED_BASE = int(os.environ.get("PYQUORUM_SIM_SEED_BASE", "0")) + 500_000


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("k", range(SCHEDULES_PER_SIZE))
def test_large_cluster_schedule_keeps_every_invariant(n: int, k: int) -> None:
    """Reference: protocol.md §6 (safety invariants) and §5.2 (liveness after healing)."""
    seed = SEED_BASE + 1000 * n + k
    result = run_schedule(seed, n, duration=DURATION_S)
    assert result.simulated_s >= DURATION_S
    assert result.faults > 0
