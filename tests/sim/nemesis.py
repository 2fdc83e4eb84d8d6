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
from typing import Any

from pyquorum.core.lease import MIN_ROUNDS_BEFORE_STOP, Timing
from pyquorum.core.node import Role
from tests.sim.sim import Cluster
from tests.timing import TUNED

NODE_COUNTS = (1, 2, 3, 4, 5, 7)
# Every schedule puts its messages through the real wire (sim.py); one in KEYED_EVERY signs them
# with HMAC-SHA256 as with a key file, the others use CRC-32 as without one. The replay guard and the
# epochs work the same in both; the MAC costs about a third more per datagram, so most schedules
# skip it (8 and the 6 node counts cover every node count with a key every 24 seeds).
KEYED_EVERY = 8


def _with_random_stop(rng: random.Random, h: float, e: float, d: float) -> Timing:
    # heartbeat h, election timeout e, start delay d, and a random stop timeout G that still leaves
    # MIN_ROUNDS_BEFORE_STOP heartbeat rounds before the lease's stop must begin: a valid timing
    probe = Timing(heartbeat_interval_s=h, election_timeout_s=e, start_delay_s=d)
    g_max = probe.lease_kill_s - probe.kill_margin_s - MIN_ROUNDS_BEFORE_STOP * h
    g = rng.uniform(0, g_max)
    t = Timing(heartbeat_interval_s=h, election_timeout_s=e, stop_timeout_s=g, start_delay_s=d)
    assert not t.validate(), t.validate()
    return t


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
    return _with_random_stop(rng, h, e, d)


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


def lower_timing(base: Timing, rng: random.Random) -> Timing:
    """A valid timing with a smaller E + D than ``base``: the target of a rolling change that lowers
    the election timeout (protocol.md §3.6), e.g. from the defaults to the README's tuned profile."""
    e = max(0.1, base.election_timeout_s * rng.uniform(0.2, 0.8))
    h = min(base.heartbeat_interval_s, e / rng.uniform(5, 10))
    d = rng.choice((0.0, base.start_delay_s * rng.uniform(0, 0.5)))
    if e + d >= base.election_timeout_s + base.start_delay_s:
        e, d = 0.8 * base.election_timeout_s, 0.0
    return _with_random_stop(rng, h, e, d)


def _wipe(c: Cluster, rng: random.Random) -> None:
    # protocol.md §3.9 covers state lost on one node at a time: a node that lost its state relearns the
    # terms from every other member, so a second loss before that (or in a cluster of one, where nobody
    # else remembers) can make a term reusable; and a lost disk cannot know under which timing its run
    # acknowledged a master, so a loss during a rolling change that LOWERED the timing is outside it
    # too. Both are documented operator rules; the nemesis loses a disk only where they hold.
    if c.n == 1 or c.amnesia():
        return
    who = _pick(c, rng, prefer_master=0.3)
    node = c.nodes[who]
    if node.disk.promise_s <= node.timing.election_timeout_s + node.timing.start_delay_s + 1e-9:
        c.wipe(who)


def _resign(c: Cluster, rng: random.Random) -> None:
    # resign() on any role, as the daemon may call it (protocol.md §3.7), a few times over the next
    # election timeout (a daemon that resigns after each failed start). The interesting target is a
    # follower while another node campaigns: its stickiness is what the master's lease counts on.
    campaigners = [nd.idx for nd in c.nodes if nd.core is not None and nd.core.role is not Role.SLAVE]
    followers = [
        nd.idx
        for nd in c.nodes
        if nd.core is not None and nd.core.role is Role.SLAVE and nd.core.master is not None
    ]
    if campaigners and followers and rng.random() < 0.7:
        who = rng.choice(followers)
    else:
        who = _pick(c, rng, prefer_master=0.3)
    e = c.timing.election_timeout_s
    c.resign(who)
    for _ in range(rng.randint(0, 3)):
        c.at(c.now + rng.uniform(0, e), lambda: c.resign(who))


def _retime(c: Cluster, rng: random.Random, alt: Timing) -> None:
    # one step of a rolling change: a node restarts with the other of the schedule's two timings
    who = _pick(c, rng, prefer_master=0.2)
    node = c.nodes[who]
    c.retime(who, alt if node.timing == c.timing else c.timing)


def random_shape(rng: random.Random, n: int, timing: Timing) -> dict[str, Any]:
    """Who may be master and in what order (protocol.md §3.10, §3.11): most schedules have equal
    priorities and no witness; some have priorities (and sometimes pre-emption), some a witness."""
    shape: dict[str, Any] = {}
    if n >= 2 and rng.random() < 0.35:
        shape["priorities"] = {i: rng.randrange(3) for i in range(n)}
        if rng.random() < 0.5:
            shape["preempt_after_s"] = rng.uniform(2, 8) * timing.election_timeout_s
    if n >= 3 and rng.random() < 0.2:
        shape["witnesses"] = {rng.randrange(n)}
    return shape


def inject_random_fault(c: Cluster, rng: random.Random, alt: Timing | None = None) -> None:
    """One seeded fault. ``alt``: a second timing for rolling configuration changes (none: no retime)."""
    e = c.timing.election_timeout_s
    op = rng.random()
    if op < 0.08:
        c.isolate(_pick(c, rng))
    elif op < 0.15:
        nodes = list(range(c.n))
        rng.shuffle(nodes)
        k = rng.randint(1, max(1, c.n // 2))
        c.partition(nodes[:k], nodes[k:])
    elif op < 0.18 and c.n >= 3:
        _bridge(c, rng)
    elif op < 0.21 and c.n >= 5:
        _ring(c, rng)
    elif op < 0.26 and c.n >= 2:
        a, b = rng.sample(range(c.n), 2)
        if rng.random() < 0.5:
            m = c.master()
            a = c.index[m] if m else a
            b = b if b != a else (a + 1) % c.n
        c.cut_links([(a, b)], both=False)
    elif op < 0.34:
        c.heal()
    elif op < 0.38:
        c.net.loss = rng.choice((0.0, 0.05, 0.2, 0.4))
        c.log(f"NEMESIS loss {c.net.loss}")
    elif op < 0.42 and c.n >= 2:
        # asymmetric loss: one node's inbound, or one direction of one link (protocol.md §3.3)
        loss = rng.choice((0.3, 0.6, 0.8))
        if rng.random() < 0.5:
            c.lossy_inbound(_pick(c, rng), loss)
        else:
            a, b = rng.sample(range(c.n), 2)
            c.lossy_link(a, b, loss)
    elif op < 0.45:
        c.net.duplicate = rng.choice((0.0, 0.1, 0.3))
        c.net.delay_min, c.net.delay_max = rng.choice(((0.0002, 0.002), (0.001, 0.02), (0.0, 0.05)))
        c.log(f"NEMESIS duplicate {c.net.duplicate} delay {c.net.delay_min}-{c.net.delay_max}")
    elif op < 0.48:
        c.net.tail = rng.choice((0.01, 0.05))
        c.net.tail_s = rng.choice((0.05, 0.2)) * e
        c.log(f"NEMESIS long-tail delays {c.net.tail} from {c.net.tail_s:.3f}s")
    elif op < 0.54:
        c.crash(_pick(c, rng), with_script=rng.random() < 0.5)
    elif op < 0.58:
        # kill -9 and an immediate restart (systemd Restart=always): tests the restart embargo
        who = _pick(c, rng, prefer_master=0.2)
        c.crash(who)
        c.run_for(rng.uniform(0, e / 4))
        c.restart(who)
    elif op < 0.68:
        down = [nd.idx for nd in c.nodes if nd.core is None]
        if down:
            c.restart(rng.choice(down))
    elif op < 0.72:
        c.shutdown(_pick(c, rng, prefer_master=0.8))
    elif op < 0.81:
        c.pause(_pick(c, rng), rng.uniform(0.05, 3 * e))
    elif op < 0.85:
        c.script_crash(_pick(c, rng, prefer_master=1.0), rng.choice((0.0, 0.2, None)))
    elif op < 0.88:
        _resign(c, rng)
    elif op < 0.90:
        # pyquorum step-down on any member, to the next node or to a random one (protocol.md §3.10)
        to = rng.choice([None, rng.randrange(c.n)])
        c.step_down(_pick(c, rng, prefer_master=0.3), to)
    elif op < 0.92:
        _wipe(c, rng)
    elif op < 0.97:
        if alt is not None:
            _retime(c, rng, alt)
    else:
        c.clock_jump(rng.randrange(c.n), rng.uniform(-3 * e, 3 * e))


def heal_all(c: Cluster, rng: random.Random | None = None) -> None:
    """Heal the network and bring every node back, all with the cluster's timing; with ``rng``,
    sometimes leave a minority down or cut off (liveness needs only a majority that is up and
    connected both ways)."""
    c.heal()
    c.net.delay_min, c.net.delay_max = 0.0002, 0.002
    for nd in c.nodes:
        if nd.paused:
            nd.paused_until = -1.0  # cancels the pending resume event
            c._resume(nd)
    # a node in the middle of a planned shutdown finishes it, then comes back like the others
    c.run_for(max(nd.timing.stop_timeout_s + nd.timing.kill_margin_s for nd in c.nodes) + 0.01)
    for nd in c.nodes:
        if nd.timing != c.timing:
            c.retime(nd.idx, c.timing)  # the rolling change completes
        elif nd.core is None:
            c.restart(nd.idx)
    # A node that lost its state recovers once it has heard every member (protocol.md §3.9): the
    # operator rule is to take no node down before that (§8), so wait for it (a handshake and a few
    # heartbeat rounds), then perhaps leave a minority down.
    waited = 0.0
    while waited < 5 * c.timing.election_timeout_s and any(
        nd.core is not None and nd.core.recovering for nd in c.nodes
    ):
        c.run_for(c.timing.heartbeat_interval_s)
        waited += c.timing.heartbeat_interval_s
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
    if c.preempt_after_s is not None:
        # protocol.md §3.10: the preferred live node may still take the role by a clean handover
        # (a stop grace, a start delay), perhaps twice (priority 0 -> 1 -> 2, each after following
        # the new master for --preempt-after): everything below is checked once that had its time
        c.run_for(2 * (c.preempt_after_s + bound))
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
    if c.preempt_after_s is not None:
        mi = c.index[m]
        up = [  # the non-witnesses that are up and connected both ways with the master
            nd.idx
            for nd in c.nodes
            if nd.core is not None
            and nd.idx not in c.witnesses
            and (nd.idx == mi or ((mi, nd.idx) not in c.cut and (nd.idx, mi) not in c.cut))
        ]
        best = max(c.priorities.get(i, 0) for i in up)
        if c.priorities.get(c.index[m], 0) < best:
            c.fail(
                f"PREEMPTION: master {m} (priority {c.priorities.get(c.index[m], 0)}) although a node of "
                f"priority {best} is up and connected, {2 * (c.preempt_after_s + bound):.2f}s later"
            )
    term = c.nodes[c.index[m]].core.term  # type: ignore[union-attr]
    handovers = len(c.preemptions)
    c.run_for(stable_for)
    if len(c.preemptions) != handovers:
        extra = len(c.preemptions) - handovers
        c.fail(f"FLAPPING: {extra} pre-emptions on a stable network within {stable_for}s")
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
    keyed: bool | None = None,
) -> ScheduleResult:
    """One randomized schedule of at least ``duration`` simulated seconds. Raises ``Violation``.
    ``keyed`` defaults to one seed in ``KEYED_EVERY``."""
    rng = random.Random(seed * 1_000_003 + n)
    timing = timing or random_timing(rng)
    if keyed is None:
        keyed = seed % KEYED_EVERY == 0
    shape = random_shape(rng, n, timing)
    c = Cluster(n, timing, seed=seed, broken=broken, keyed=keyed, **shape)
    e = timing.election_timeout_s
    stable = max(5.0, 10 * e)
    preempt = shape.get("preempt_after_s")
    tail = timing.liveness_bound_s(n) * (3 if preempt else 1) + stable + 2 * (preempt or 0.0)
    fault_until = max(duration - tail, duration / 2)
    alt = lower_timing(timing, rng)
    c.run_for(rng.uniform(0, 3 * e))
    faults = 0
    while c.now < fault_until:
        inject_random_fault(c, rng, alt)
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
