"""When notify hooks fire: ``hook_event_for`` driven by the real core, in the simulation.

Every node of an ``Announcing`` cluster announces what ``hook_event_for`` gives after each of its
Ready, as the daemon does, and after each Ready the rules of runtime/hooks.py are checked: no two
announcements in a row are the same; ``master`` is the last announcement exactly while the node is
master; nothing follows ``stopping``. The stories then check which events an operator sees, and the
flapping tests measure the fastest rate of events, which the queue bound (``queue_bound``) relies on.
"""

from __future__ import annotations

import random

import pytest

from pyquorum.core.lease import Timing
from pyquorum.core.node import Ready, Role
from pyquorum.runtime.hooks import (
    EVENTS_PER_ELECTION_TIMEOUT,
    Announcement,
    HookEvent,
    hook_event_for,
    queue_bound,
)
from tests.sim.sim import Cluster, SimNode
from tests.timing import DEFAULT, TUNED

A, B, C, D, E5 = (f"127.0.0.{i}:51621" for i in range(1, 6))
NOTIFY_TIMEOUT_S = 30.0  # the default --notify-timeout

MASTER, SLAVE, NO_QUORUM, STOPPING = (
    HookEvent.MASTER,
    HookEvent.SLAVE,
    HookEvent.NO_QUORUM,
    HookEvent.STOPPING,
)


class Announcing(Cluster):
    """A simulated cluster whose nodes announce hook events as the daemon does."""

    def __init__(self, n: int, timing: Timing | None = None, *, seed: int = 0) -> None:
        # per node name: (true time, announcement), over all its lives; per (node, life): the last
        self.announced: dict[str, list[tuple[float, Announcement]]] = {}
        self.last: dict[tuple[int, int], Announcement] = {}
        super().__init__(n, timing, seed=seed)

    def _process(self, node: SimNode, rd: Ready) -> None:
        super()._process(node, rd)
        core = node.core
        assert core is not None
        life = (node.idx, node.gen)
        last = self.last.get(life)
        status = core.status()
        ann = hook_event_for(last, status, rd.events)
        if ann is not None:
            if ann == last:
                self.fail(f"{node.name} announced {ann} twice in a row")
            if last is not None and last.event is STOPPING:
                self.fail(f"{node.name} announced {ann} after stopping")
            self.last[life] = ann
            self.announced.setdefault(node.name, []).append((self.now, ann))
            self.log(f"{node.name} HOOK {ann.event.value} {ann.term} {ann.master or '-'}")
        now_last = self.last.get(life)
        stopping = now_last is not None and now_last.event is STOPPING
        if (
            now_last is not None
            and not stopping
            and (now_last.event is MASTER) != (status.role is Role.MASTER)
        ):
            self.fail(f"{node.name} is {status.role.value} but its last announcement is {now_last}")

    def events_of(self, name: str, since: float = 0.0) -> list[tuple[HookEvent, int, str | None]]:
        return [(a.event, a.term, a.master) for t, a in self.announced.get(name, []) if t >= since]

    def kinds(self, name: str, since: float = 0.0) -> list[HookEvent]:
        return [event for event, _, _ in self.events_of(name, since)]

    def most_in_window(self, window_s: float) -> int:
        """The most announcements one node made within any ``window_s`` of true time."""
        worst = 0
        for entries in self.announced.values():
            times = [t for t, _ in entries]
            first = 0
            for i, t in enumerate(times):
                while t - times[first] >= window_s:
                    first += 1
                worst = max(worst, i - first + 1)
        return worst


def settled(n: int = 3, timing: Timing | None = None, seed: int = 1) -> Announcing:
    c = Announcing(n, timing, seed=seed)
    c.run_for(3 * c.timing.election_timeout_s)
    return c


def test_hook_events_of_a_first_election() -> None:
    c = settled(3)
    assert c.events_of(A) == [(MASTER, 1, A)]
    assert c.events_of(B) == [(SLAVE, 1, A)]
    assert c.events_of(C) == [(SLAVE, 1, A)]


@pytest.mark.parametrize("n", [3, 5])
def test_hook_events_crash_failover_never_says_no_quorum(n: int) -> None:
    """A clean failover: the new master says master, the others follow it; no node, at any seed,
    reports a lost majority (which would page an operator for nothing)."""
    for seed in range(20):
        c = settled(n, seed=seed)
        c.crash(A, with_script=True)
        since = c.now
        c.run_for(DEFAULT.failover_bound_s() + DEFAULT.election_timeout_s)
        assert c.master() == B
        term = c.nodes[1].core.term  # type: ignore[union-attr]
        assert c.events_of(B, since) == [(MASTER, term, B)], seed
        for name in c.names[2:]:
            assert c.events_of(name, since) == [(SLAVE, term, B)], (seed, name)


def test_hook_events_minority_reports_no_quorum_and_rejoins() -> None:
    """Reference: protocol.md §4.3 (a master that loses its majority steps down)."""
    c = settled(5)
    c.partition([0, 1], [2, 3, 4])
    cut = c.now
    c.run_for(4.0)
    t = DEFAULT
    assert c.kinds(A, cut) == [NO_QUORUM]
    (when_a, _), *_ = [(time, a) for time, a in c.announced[A] if time >= cut]
    # the master steps down L_kill - G - K after its newest acknowledged round (at most h before the cut)
    assert t.stop_begin_s - t.heartbeat_interval_s <= when_a - cut <= t.stop_begin_s + t.heartbeat_interval_s
    assert c.kinds(B, cut) == [NO_QUORUM]
    assert c.master() == C
    for name in (C, D, E5):
        assert NO_QUORUM not in c.kinds(name, cut)
    c.heal()
    healed = c.now
    c.run_for(2.0)
    term = c.nodes[2].core.term  # type: ignore[union-attr]
    assert c.events_of(A, healed) == [(SLAVE, term, C)]
    assert c.events_of(B, healed) == [(SLAVE, term, C)]


def test_hook_events_a_node_alone_reports_no_quorum_first() -> None:
    c = Announcing(3, seed=2)
    c.crash(B)
    c.crash(C)
    c.run_for(5.0)
    assert c.events_of(A) == [(NO_QUORUM, 0, None)]  # once, however often it tries again


def test_hook_events_planned_shutdown_ends_with_stopping() -> None:
    c = settled(3)
    c.shutdown(A)
    since = c.now
    c.run_for(3.0)
    assert c.events_of(A, since) == [(STOPPING, 1, A)]
    assert c.nodes[0].core is None  # finished; nothing else was announced on the way out
    assert c.kinds(B, since) == [MASTER]


def test_hook_events_a_resigned_master_says_slave_then_follows() -> None:
    """A resignation (the step-down the daemon may ask for): not master any more, master unknown,
    then the successor."""
    c = settled(3)
    c.resign(A)
    since = c.now
    c.run_for(3.0)
    term = c.nodes[1].core.term  # type: ignore[union-attr]
    assert c.events_of(A, since) == [(SLAVE, 1, None), (SLAVE, term, B)]


def flap_master(c: Announcing, down_s: float, up_s: float, until: float) -> None:
    """Cut the current master off, reconnect it, and again, until true time ``until``."""
    while c.now < until:
        c.isolate(c.master() or c.names[0])
        c.run_for(down_s)
        c.heal()
        c.run_for(up_s)


# In units of E: the fastest patterns of a search over cuts of 0.2-2 E and reconnections of 0.1-1.5 E,
# and two slower ones.
FLAPS = [(1.4, 0.1), (0.4, 0.5), (0.6, 0.3), (2.0, 2.0), (0.2, 1.0)]


@pytest.mark.parametrize("timing", [DEFAULT, TUNED], ids=["default", "tuned"])
def test_hook_events_flapping_master_stays_within_the_queue_bound(timing: Timing) -> None:
    """The queue bound assumes at most EVENTS_PER_ELECTION_TIMEOUT events per E on one node: with a
    hook hung for its whole timeout meanwhile, nothing is dropped. Measured here, and printed."""
    e = timing.election_timeout_s
    window_s = NOTIFY_TIMEOUT_S * e  # 30 E: one notify timeout at the default timing
    worst = 0
    for down, up in FLAPS:
        c = settled(3, timing, seed=7)
        flap_master(c, down * e, up * e, c.now + 2 * window_s)
        worst = max(worst, c.most_in_window(window_s))
        for name in c.names:
            kinds = c.kinds(name)
            assert kinds.count(MASTER) + kinds.count(SLAVE) + kinds.count(NO_QUORUM) == len(kinds)
    per_e = worst / (window_s / e)
    print(f"flapping ({timing.describe()}): at most {worst} events in {window_s:g} s, {per_e:.2f} per E")
    assert worst <= queue_bound(NOTIFY_TIMEOUT_S * e, e)
    assert per_e <= EVENTS_PER_ELECTION_TIMEOUT
    assert worst > 10  # the flapping really flapped


def random_faults(c: Announcing, rng: random.Random, until: float) -> None:
    n = c.n
    while c.now < until:
        choice = rng.random()
        if choice < 0.3:
            c.isolate(c.master() or rng.choice(c.names))
        elif choice < 0.5:
            order = list(range(n))
            rng.shuffle(order)
            c.partition(order[: n // 2], order[n // 2 :])
        elif choice < 0.65:
            a, b = rng.sample(range(n), 2)
            c.cut_links([(a, b)], both=rng.random() < 0.5)
        elif choice < 0.75:
            c.crash(rng.choice(c.names), with_script=rng.random() < 0.5)
        elif choice < 0.85:
            c.resign(rng.choice(c.names))
        else:
            c.pause(rng.choice(c.names), rng.uniform(0.1, 1.5))
        c.run_for(rng.uniform(0.1, 2.5))
        c.heal()
        for node in c.nodes:
            if node.core is None:
                c.restart(node.name)
        c.run_for(rng.uniform(0.05, 2.0))


@pytest.mark.parametrize("n", [3, 5])
def test_hook_events_keep_their_rules_under_random_faults(n: int) -> None:
    """Partitions, one-way cuts, crashes and restarts (a new life starts announcing afresh),
    resignations, pauses: the rules hold after every Ready (checked in Announcing), and once the
    network heals every live node's last announcement tells the truth."""
    for seed in range(8):
        rng = random.Random(seed)
        c = Announcing(n, seed=seed)
        random_faults(c, rng, 60.0)
        c.heal()
        c.run_for(4 * c.timing.failover_bound_s())
        master = c.master()
        assert master is not None, seed
        term = c.nodes[c.index[master]].core.term  # type: ignore[union-attr]
        for node in c.nodes:
            last = c.last[(node.idx, node.gen)]
            expected = MASTER if node.name == master else SLAVE
            assert (last.event, last.term, last.master) == (expected, term, master), (seed, node.name)
        assert c.most_in_window(NOTIFY_TIMEOUT_S) <= queue_bound(NOTIFY_TIMEOUT_S, 1.0)
