"""Randomized fault schedules for the simulation (after Jepsen's nemeses).

``run_schedule(seed, n)`` builds a cluster with randomized timing, injects a seeded random fault every
so often for the schedule's duration, then heals everything and checks liveness: within
``Timing.liveness_bound_s`` a master exists, every node follows it, and its script runs; then nothing changes
for a while (no spurious election). Safety invariants are checked by ``Cluster`` after every event.
The seed alone reproduces the run: ``python -m tests.sim.soak --seed S --nodes N``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from pyquorum.core.lease import MIN_ROUNDS_BEFORE_STOP, Timing
from pyquorum.core.node import Role
from tests.sim.sim import Cluster
from tests.timing import TUNED

NODE_COUNTS = (1, 2, 3, 4, 5, 7)


def random_timing(rng: random.Random) -> Timing:
    """A valid timing profile: the defaults, the tuned profile, or random valid values."""
    pick = rng.random()
    if pick < 0.3:
        return Timing()
    if pick < 0.5:
        return TUNED
    h = rng.choice((0.02, 0.05, 0.1, 0.2))
    e = h * rng.uniform(5, 15)
    d = rng.choice((0.0, 0.0, rng.uniform(0, e)))
    base = Timing(heartbeat_interval_s=h, election_timeout_s=e, start_delay_s=d)
    g_max = base.lease_kill_s - base.kill_margin_s - MIN_ROUNDS_BEFORE_STOP * h
    g = rng.uniform(0, g_max)
    t = Timing(heartbeat_interval_s=h, election_timeout_s=e, stop_timeout_s=g, start_delay_s=d)
    assert not t.validate(), t.validate()
    return t


@dataclass
class ScheduleResult:
    seed: int
    n: int
    simulated_s: float
    faults: int
    elections: int
    events: int


def _bridge(c: Cluster, rng: random.Random) -> None:
    order = list(range(c.n))
    rng.shuffle(order)
    mid, rest = order[0], order[1:]
    half = len(rest) // 2
    a, b = rest[:half], rest[half:]
    c.cut_links([(x, y) for x in a for y in b])
    c.log(f"NEMESIS bridge via {c.names[mid]}")


def _ring(c: Cluster, rng: random.Random) -> None:
    """Majorities ring: every node sees a majority, no two see the same one (exact for 5)."""
    order = list(range(c.n))
    rng.shuffle(order)
    k = c.quorum // 2  # neighbours on each side
    pairs = []
    for i in range(c.n):
        for j in range(c.n):
            d = min((i - j) % c.n, (j - i) % c.n)
            if d > k:
                pairs.append((order[i], order[j]))
    c.cut_links(pairs, both=False)
    c.log("NEMESIS majorities ring")


def _pick(c: Cluster, rng: random.Random, *, prefer_master: float = 0.5) -> int:
    m = c.master()
    if m is not None and rng.random() < prefer_master:
        return c.index[m]
    return rng.randrange(c.n)


def inject_random_fault(c: Cluster, rng: random.Random) -> None:
    e = c.timing.election_timeout_s
    op = rng.random()
    if op < 0.10:
        c.isolate(_pick(c, rng))
    elif op < 0.18:
        nodes = list(range(c.n))
        rng.shuffle(nodes)
        k = rng.randint(1, max(1, c.n // 2))
        c.partition(nodes[:k], nodes[k:])
    elif op < 0.22 and c.n >= 3:
        _bridge(c, rng)
    elif op < 0.26 and c.n >= 5:
        _ring(c, rng)
    elif op < 0.32 and c.n >= 2:
        a, b = rng.sample(range(c.n), 2)
        if rng.random() < 0.5:
            m = c.master()
            a = c.index[m] if m else a
            b = b if b != a else (a + 1) % c.n
        c.cut_links([(a, b)], both=False)
    elif op < 0.42:
        c.heal()
    elif op < 0.48:
        c.net.loss = rng.choice((0.0, 0.05, 0.2, 0.4))
        c.log(f"NEMESIS loss {c.net.loss}")
    elif op < 0.52:
        c.net.duplicate = rng.choice((0.0, 0.1, 0.3))
        c.net.delay_min, c.net.delay_max = rng.choice(((0.0002, 0.002), (0.001, 0.02), (0.0, 0.05)))
        c.log(f"NEMESIS duplicate {c.net.duplicate} delay {c.net.delay_min}-{c.net.delay_max}")
    elif op < 0.58:
        c.crash(_pick(c, rng), with_script=rng.random() < 0.5)
    elif op < 0.62:
        # kill -9 and an immediate restart (systemd Restart=always): tests the restart embargo
        who = _pick(c, rng, prefer_master=0.2)
        c.crash(who)
        c.run_for(rng.uniform(0, e / 4))
        c.restart(who)
    elif op < 0.74:
        down = [nd.idx for nd in c.nodes if nd.core is None]
        if down:
            c.restart(rng.choice(down))
    elif op < 0.79:
        c.shutdown(_pick(c, rng, prefer_master=0.8))
    elif op < 0.90:
        c.pause(_pick(c, rng), rng.uniform(0.05, 3 * e))
    elif op < 0.95:
        c.script_crash(_pick(c, rng, prefer_master=1.0), rng.choice((0.0, 0.2, None)))
    else:
        c.clock_jump(rng.randrange(c.n), rng.uniform(-3 * e, 3 * e))


def heal_all(c: Cluster, rng: random.Random | None = None) -> None:
    """Heal the network and bring every node back; with ``rng``, sometimes leave a minority down
    or cut off (liveness needs only a majority that is up and connected both ways)."""
    c.heal()
    c.net.delay_min, c.net.delay_max = 0.0002, 0.002
    for nd in c.nodes:
        if nd.paused:
            nd.paused_until = -1.0  # cancels the pending resume event
            c._resume(nd)
    # a node in the middle of a planned shutdown finishes it, then comes back like the others
    c.run_for(c.timing.stop_timeout_s + c.timing.kill_margin_s + 0.01)
    for nd in c.nodes:
        if nd.core is None:
            c.restart(nd.idx)
    if rng is not None and c.n >= 3 and rng.random() < 0.3:
        minority = rng.sample(range(c.n), rng.randint(1, c.n - c.quorum))
        for idx in minority:
            if rng.random() < 0.5:
                c.crash(idx, with_script=rng.random() < 0.5)
            else:
                c.isolate(idx)


def check_liveness(c: Cluster, *, stable_for: float) -> None:
    """protocol.md §5.2: a healthy cluster has one master, followed by all, running its script."""
    bound = c.timing.liveness_bound_s(c.n)
    healed = c.now
    c.run_for(bound)
    m = c.master()
    if m is None:
        c.fail(f"LIVENESS: no master {bound:.3f}s after healing; roles {c.roles()}")
    assert m is not None
    master_core = c.nodes[c.index[m]].core
    assert master_core is not None
    disabled = master_core.script_disabled_term == master_core.term  # --restart never, after an exit
    if c.script and not disabled and c.running_script() != m:
        c.fail(f"LIVENESS: master {m} runs no script {bound:.3f}s after healing")
    cut_off = {a for a, _ in c.cut}
    for nd in c.nodes:
        if nd.core is None or nd.idx in cut_off:
            continue  # the minority left down or isolated
        if nd.name != m and nd.core.master != m:
            c.fail(f"LIVENESS: {nd.name} does not follow {m} {c.now - healed:.3f}s after healing")
    term = c.nodes[c.index[m]].core.term  # type: ignore[union-attr]
    c.run_for(stable_for)
    core = c.nodes[c.index[m]].core
    if core is None or core.role is not Role.MASTER or core.term != term:
        c.fail(f"STABILITY: master {m} term {term} changed without a fault within {stable_for}s")


def run_schedule(
    seed: int,
    n: int,
    *,
    duration: float = 60.0,
    broken: Iterable[str] = (),
    timing: Timing | None = None,
    check_live: bool = True,
) -> ScheduleResult:
    """One randomized schedule of at least ``duration`` simulated seconds. Raises ``Violation``."""
    rng = random.Random(seed * 1_000_003 + n)
    timing = timing or random_timing(rng)
    c = Cluster(n, timing, seed=seed, broken=broken)
    e = timing.election_timeout_s
    stable = max(5.0, 10 * e)
    tail = timing.liveness_bound_s(n) + stable
    fault_until = max(duration - tail, duration / 2)
    c.run_for(rng.uniform(0, 3 * e))
    faults = 0
    while c.now < fault_until:
        inject_random_fault(c, rng)
        faults += 1
        c.run_for(rng.expovariate(1.0 / (rng.choice((0.3, 1.0, 3.0)) * e)))
    heal_all(c, rng)
    if check_live:
        check_liveness(c, stable_for=stable)
    if c.now < duration:
        c.run_until(duration)
    return ScheduleResult(seed, n, c.now, faults, len(c.master_changes), c.events_processed)


def find_violation(
    broken: Iterable[str], *, max_schedules: int = 1000, duration: float = 60.0, first_seed: int = 0
) -> tuple[int, str] | None:
    """Run schedules until one fails; returns (schedules run, the violation's first line)."""
    from tests.sim.sim import Violation

    for i in range(max_schedules):
        n = (3, 5, 4, 7, 2)[i % 5]
        try:
            run_schedule(first_seed + i, n, duration=duration, broken=broken, check_live=False)
        except Violation as exc:
            return i + 1, str(exc).splitlines()[0]
    return None
