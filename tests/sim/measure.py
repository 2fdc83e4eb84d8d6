"""Failover measurements in simulated time (used by tests and by bench/sim_failover.py)."""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass

from pyquorum.core.lease import Timing
from tests.sim.sim import Cluster


@dataclass(frozen=True)
class Stats:
    trials: int
    median_s: float
    p99_s: float
    max_s: float


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


def _new_script_after(c: Cluster, since: float, limit: float) -> float | None:
    step = c.timing.heartbeat_interval_s / 4
    while c.now < since + limit:
        c.run_for(step)
        for run in c.runs:
            if run.start >= since:
                return run.start - since
    return None


def crash_failover(timing: Timing, n: int = 3, *, trials: int = 200, seed: int = 0) -> Stats:
    """kill -9 of the master's host (daemon and script) at a random moment; time until the new
    master's script starts. Network: 0.2-2 ms one-way delay, clocks drifting within the bound."""
    out = []
    rng = random.Random(seed)
    for i in range(trials):
        c = Cluster(n, timing, seed=seed * 100_000 + i)
        c.run_for(3 * timing.election_timeout_s + rng.uniform(0, timing.heartbeat_interval_s * 3))
        m = c.master()
        assert m is not None and c.running_script() == m
        c.crash(m, with_script=True)
        t = _new_script_after(c, c.now, 10 * timing.failover_bound_s())
        assert t is not None, f"no failover in trial {i}"
        out.append(t)
    return Stats(trials, statistics.median(out), percentile(out, 0.99), max(out))


def handover(timing: Timing, n: int = 3, *, trials: int = 100, seed: int = 0) -> Stats:
    """Planned stop of the master (its script exits at once on SIGTERM): time from the script's
    exit to the new master's script start."""
    out = []
    for i in range(trials):
        c = Cluster(n, timing, seed=seed * 100_000 + i)
        c.run_for(3 * timing.election_timeout_s)
        m = c.master()
        assert m is not None
        node = c.nodes[c.index[m]]
        c.shutdown(m)
        # a well-behaved script exits on SIGTERM at once
        c.script_crash(m, restart_after=None)
        assert node.run is None
        stopped = c.now
        t = _new_script_after(c, stopped, 10 * timing.failover_bound_s())
        assert t is not None
        out.append(t)
    return Stats(trials, statistics.median(out), percentile(out, 0.99), max(out))
