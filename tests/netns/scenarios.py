"""The scenarios: faults on real hosts, as a story (``h.isolate(master)``, ``h.sleep(2.5)``, ``h.heal``).

Each scenario is a function of a ``Harness``. ``run_scenario`` starts the cluster, waits for a master's
script, marks the cluster "steady", runs the scenario, then heals everything (network, stopped
processes, killed daemons), checks that a script runs again within the liveness bound, lets it settle,
stops every daemon with SIGTERM, and hands the directory to the checker.

Every fault goes through ``Harness.fault``: it records the moment before the fault (``t_before``: the
failover clock starts there, so a measured failover is never too short), does it, records the moment
after (``t``: a minority's deadline counts from there, so it is never too early) and whether it
happened, with evidence (the signal was delivered and the process is stopped or gone; for network
faults ``Harness.heal`` adds how many packets the nft rules dropped). A fault that did not happen
makes the scenario "NOT INJECTED", which is not a pass.

Bounds (the checker asserts them):

- crash-like faults of the master (its host, daemon killed or stopped; isolated; mute; in a minority):
  ``Timing.failover_bound_s()`` (protocol.md §5.1) plus ``SPAWN_ALLOWANCE_S`` for the script's own
  start-up, which the protocol's bound does not include;
- a deaf master (hears nobody): it keeps sending master heartbeats until it steps down at lease age
  ``stop_begin_s``; then the §5.1 bound applies, so ``stop_begin_s + failover_bound_s()`` plus the allowance;
- a killed script: the master restarts it after ``restart_backoff_s`` (1 s, cli.py ``--restart``), plus
  twice the allowance (the guard reports the killed run; a new guard and script start).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyquorum.config import DEFAULT_RESTART_BACKOFF_S
from tests.harness import hookrecord
from tests.harness.cluster import Cluster, ClusterError, FaultFailed, Netns, Node
from tests.harness.hookrecord import calls, check_order, last_call
from tests.netns.checker import SPAWN_ALLOWANCE_S
from tests.netns.hosts import Network

# Daemon start-up (an interpreter importing pyquorum on a loaded machine) before the election clock
# even starts; only used to give up waiting for the first master.
STARTUP_ALLOWANCE_S = 5.0
WARMUP_S = 0.5
SETTLE_S = 1.0
NO_DROP_WAIT_S = 2.0  # Harness.heal: how much longer a network fault that dropped nothing is held


class NotInjected(Exception):
    """The scenario could not inject its fault (e.g. no master to target)."""


@dataclass(frozen=True)
class Scenario:
    name: str
    n: int
    steps: Callable[[Harness], None]
    stable: bool = False  # no election may happen after the steady mark (no faults, 5% loss)
    doc: str = ""
    witness: bool = False  # the lowest host is a --witness (protocol.md §3.11)
    hooks: bool = False  # every node runs a recording --notify hook (tests/harness/hookrecord.py)


class Harness:
    """What a scenario can do to the cluster; every fault is a step of the cluster's journal."""

    def __init__(self, cluster: Cluster, rng: random.Random) -> None:
        assert isinstance(cluster.backend, Netns) and cluster.backend.net is not None
        self.c = cluster
        self.net: Network = cluster.backend.net
        self.timing = cluster.timing
        self.rng = rng
        self._fault_ids = 0
        self._open: dict[int, dict[str, Any]] = {}
        self._dropped_at: dict[int, int] = {}

    # ---- bounds -------------------------------------------------------------------------------------

    @property
    def crash_bound(self) -> float:
        return self.timing.failover_bound_s() + SPAWN_ALLOWANCE_S

    @property
    def deaf_bound(self) -> float:
        return self.timing.stop_begin_s + self.timing.failover_bound_s() + SPAWN_ALLOWANCE_S

    @property
    def restart_bound(self) -> float:
        # the guard reports the killed run, the daemon waits its back-off, then a new guard and script
        # start: the back-off plus two script start-ups' worth of allowance
        return DEFAULT_RESTART_BACKOFF_S + 2 * SPAWN_ALLOWANCE_S

    @property
    def liveness_bound(self) -> float:
        return self.timing.liveness_bound_s(self.c.size) + SPAWN_ALLOWANCE_S

    # ---- looking --------------------------------------------------------------------------------------

    def wait_running(
        self, timeout: float, *, exclude: Sequence[Node] = (), after: float = 0.0
    ) -> Node | None:
        """Wait until one node's script runs (``Cluster.running``); None at the timeout."""
        try:
            probe = lambda: self.c.running(exclude=exclude, after=after)  # noqa: E731
            return self.c.wait_for(probe, timeout, "a running script", watch_exits=False, interval_s=0.01)
        except ClusterError:
            return None

    def master(self, timeout: float | None = None) -> Node:
        """The node whose script runs now (waiting up to the liveness bound for one)."""
        node = self.wait_running(self.liveness_bound if timeout is None else timeout)
        if node is None:
            raise NotInjected("no master's script was running to target")
        return node

    def others(self, *nodes: Node) -> list[Node]:
        return [n for n in self.c.nodes if n not in nodes]

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def wait_new_master(self, old: Node, after: float, timeout: float | None = None) -> Node | None:
        return self.wait_running(
            self.crash_bound + 1.0 if timeout is None else timeout, exclude=[old], after=after
        )

    # ---- faults ---------------------------------------------------------------------------------------

    def fault(
        self,
        name: str,
        do: Callable[[], object],
        *,
        hosts: list[Node],
        network: bool = False,
        minority: list[Node] | None = None,
        failover_bound: float | None = None,
        failover: bool | None = None,
        whole_host_pause: bool = False,
        evidence: str = "",
    ) -> int:
        """Inject one fault; ``do`` raises ``FaultFailed`` if it did not take effect. Returns the
        fault's id for ``heal``. ``minority``: nodes that cannot renew a lease from now on (cut off
        from a majority, or their daemon frozen or dead) until the heal. ``failover_bound``: a new
        run must start within it (``failover=True`` without a bound: measure and report only)."""
        self._fault_ids += 1
        fid = self._fault_ids
        if network:
            self._dropped_at[fid] = self.net.dropped()
        t_before = time.monotonic()
        self.c.evidence = ""
        try:
            do()
            ok = True
        except ClusterError as exc:
            ok = False
            self.c.evidence = self.c.evidence or str(exc).splitlines()[0]
        entry = {
            "id": fid,
            "name": name,
            "hosts": [n.name for n in hosts],
            "t_before": t_before,
            "injected": ok,
            "evidence": evidence or self.c.evidence or ("done" if ok else "failed"),
            "network": network,
            "minority": [n.name for n in minority or []],
            "expect_failover": failover if failover is not None else failover_bound is not None,
            "failover_bound_s": failover_bound,
            "whole_host_pause": whole_host_pause,
        }
        self.c.note("fault", **entry)
        self._open[fid] = entry
        return fid

    def heal(self, fid: int, undo: Callable[[], object] | None = None) -> None:
        """End fault ``fid``: run ``undo`` (if any) and record it, with the packets dropped meanwhile.

        A network fault that has dropped nothing yet is held up to ``NO_DROP_WAIT_S`` longer, until it
        drops one: a short hold of a light random loss can see no packet lost by chance (5% of the 80
        datagrams a second of a 5-node cluster, held 0.5 s: no loss in one run of eight). A fault
        that has still dropped nothing is recorded with 0, and the checker fails it."""
        entry = self._open.pop(fid)
        extra: dict[str, Any] = {}
        if entry["network"]:
            start = self._dropped_at.pop(fid)
            give_up = time.monotonic() + NO_DROP_WAIT_S
            while self.net.dropped() == start and time.monotonic() < give_up:
                time.sleep(0.05)
            extra["dropped"] = self.net.dropped() - start
        t_before = time.monotonic()
        if undo is not None:
            undo()
        self.c.note("heal", fault=fid, name=entry["name"], t_before=t_before, **extra)

    def hold(
        self, fid: int, seconds: float, undo: Callable[[], object] | None = None, *, settle_s: float = 0.5
    ) -> None:
        """Keep fault ``fid`` for ``seconds``, end it (``heal`` with ``undo``), then let the cluster
        settle for ``settle_s``: how most scenarios end a fault."""
        self.sleep(seconds)
        self.heal(fid, undo)
        self.sleep(settle_s)

    def planned_stop(self, node: Node) -> None:
        """SIGTERM to the node's daemon and wait for its exit: the checker wants code 0."""
        self.c.shutdown(node)
        try:
            code: int | None = self.c.wait_exit(node, self.timing.stop_timeout_s + 5.0)
        except ClusterError:
            code = None
        self.c.evidence = f"SIGTERMed daemon {node.pid}: exit status {code}"
        self.c.note("stopped", host=node.name, exit_code=code)
        if code != 0:
            raise FaultFailed(self.c.evidence)

    # network

    def _net(self, change: Callable[[], None]) -> Callable[[], None]:
        def do() -> None:
            with self.c.network():
                change()
            net = self.net
            self.c.evidence = (
                f"nft rules in force: {len(net.cuts)} one-way cuts, isolated {sorted(net.isolated)}, "
                f"loss {net.loss_percent}%"
            )

        return do

    def net_fault(
        self,
        name: str,
        change: Callable[[], None],
        *,
        hosts: list[Node],
        minority: list[Node] | None = None,
        failover_bound: float | None = None,
    ) -> int:
        return self.fault(
            name,
            self._net(change),
            hosts=hosts,
            network=True,
            minority=minority,
            failover_bound=failover_bound,
        )

    # ---- the end ------------------------------------------------------------------------------------

    def heal_everything(self) -> None:
        """Heal the network, resume what is stopped, restart what is dead (open faults are closed).
        The checker expects a script to run within the liveness bound after this (protocol.md §5.2)."""
        for fid in list(self._open):
            self.heal(fid)
        self.c.heal()
        for name in sorted(self.c.paused):
            self.c.resume(self.c.node(name))
        restarted = [n for n in self.c.nodes if not n.running]
        for node in restarted:
            self.c.restart(node, wait=False)
        self.c.note("healed_all", restarted=[n.name for n in restarted])

    def stop_all(self) -> dict[str, int]:
        """Heal everything, then stop every daemon with SIGTERM (planned); their exit codes."""
        self.c.heal()
        for name in sorted(self.c.paused):
            self.c.resume(self.c.node(name))
        live = [n for n in self.c.nodes if n.running]
        self.c.note("shutdown", hosts=[n.name for n in live])
        return self.c.stop(live, grace_s=self.timing.stop_timeout_s + 5.0)


def names_of(nodes: Sequence[Node]) -> str:
    return "[" + ", ".join(map(str, nodes)) + "]"


# ---- scenario steps ---------------------------------------------------------------------------------


def baseline(h: Harness) -> None:
    h.sleep(5.0)


def kill_master(host: bool) -> Callable[[Harness], None]:
    """kill -9 the master's host, or only its daemon (a minority of one until restarted); once
    another master runs, restart it: the restart embargo, then it follows."""

    def steps(h: Harness) -> None:
        m = h.master()
        master_failover(
            h,
            m,
            f"kill -9 {'host' if host else 'daemon'} {m} (master)",
            lambda: h.c.crash(m, host=host),
            undo=lambda: h.c.restart(m, wait=False),
            hold_s=1.0,
            minority=None if host else [m],
        )

    return steps


def master_failover(
    h: Harness,
    m: Node,
    name: str,
    do: Callable[[], object],
    *,
    undo: Callable[[], object],
    hold_s: float,
    minority: list[Node] | None = None,
    whole_host_pause: bool = False,
) -> None:
    """Fault the master ``m``, wait for another to run (within the crash bound), then hold and undo."""
    f = h.fault(
        name,
        do,
        hosts=[m],
        minority=minority,
        failover_bound=h.crash_bound,
        whole_host_pause=whole_host_pause,
    )
    h.wait_new_master(m, after=0)
    h.hold(f, hold_s, undo)


def isolate_fault(h: Harness, node: Node, role: str, failover_bound: float | None = None) -> int:
    """Cut ``node`` off from everyone (a minority of one) until healed; ``role`` names it in the journal."""
    return h.net_fault(
        f"isolate {node} ({role})",
        lambda: h.c.isolate(node),
        hosts=[node],
        minority=[node],
        failover_bound=failover_bound,
    )


def stop_daemon_fault(h: Harness, m: Node) -> int:
    """SIGSTOP the master ``m``'s daemon (a minority of one) until SIGCONT: a crash, as seen by the rest."""
    return h.fault(
        f"SIGSTOP daemon {m} (master)",
        lambda: h.c.pause(m),
        hosts=[m],
        minority=[m],
        failover_bound=h.crash_bound,
    )


def kill_daemon_restart_at_once(h: Harness) -> None:
    """kill -9 the master's daemon and start it again at once (systemd Restart=always, RestartSec=0):
    its old guard is still stopping the old script; the restart embargo (protocol.md §3.6) covers it."""
    m = h.master()

    def crash_and_restart() -> None:
        try:
            h.c.crash(m)
        finally:
            h.c.restart(m, wait=False)

    f = h.fault(
        f"kill -9 daemon {m} (master), restarted at once",
        crash_and_restart,
        hosts=[m],
        failover_bound=h.crash_bound,
    )
    h.hold(f, 2.0, settle_s=0.0)


def kill_script(h: Harness) -> None:
    m = h.master()
    f = h.fault(
        f"kill -9 script on {m}", lambda: h.c.kill_script(m), hosts=[m], failover_bound=h.restart_bound
    )
    h.hold(f, 2.0, settle_s=0.0)


def stop_daemon_master(h: Harness) -> None:
    m = h.master()
    f = stop_daemon_fault(h, m)
    h.hold(f, 3 * h.timing.election_timeout_s + 0.5, lambda: h.c.resume(m))


def pause_host_master(h: Harness) -> None:
    """protocol.md §4.5: a VM pause. Timing cannot stop the resumed script for a moment; fencing must."""
    m = h.master()
    master_failover(
        h,
        m,
        f"SIGSTOP host {m} (master, VM pause)",
        lambda: h.c.pause(m, host=True),
        undo=lambda: h.c.resume(m),
        hold_s=0.5,
        whole_host_pause=True,
    )


def isolate_master(h: Harness) -> None:
    f = isolate_fault(h, h.master(), "master", h.crash_bound)
    h.hold(f, 2.0, h.c.heal)


def witness_partition(h: Harness) -> None:
    """protocol.md §3.11: two servers and a witness. The master is cut off: the other server takes
    over with the witness's vote; the witness is cut off: nothing changes; it never runs the script."""
    witness = h.c.nodes[0]
    m = h.master()
    assert m is not witness, f"the witness {witness} runs the script"
    h.hold(isolate_fault(h, m, "master", h.crash_bound), 2.0, h.c.heal, settle_s=1.0)
    h.hold(isolate_fault(h, witness, "witness"), 2.0, h.c.heal)
    ran = {run.node for run in h.c.runs()}
    assert witness.name not in ran, f"the witness {witness} ran the script: {sorted(ran)}"


def hooks_flapping(h: Harness) -> None:
    """docs/operations.md §13: the master's links flap (as ``flapping``) while every node's notify
    hook records its calls, each taking 0.3 s so that events queue. Healed, each node's last call
    names its role under the master, and every node's calls are in order: SEQ 1, 2, 3... with none
    dropped, one at a time, never the same event twice in a row (checked again with ``stopping``
    last once the daemons have stopped: run_scenario)."""
    flapping(h)
    m = h.master()
    records = h.c.dir / "records"  # hookrecord.install(workdir), in run_scenario
    for n in h.c.nodes:
        want = ("master", m.name) if n is m else ("slave", m.name)
        h.c.wait_for(
            lambda n=n, want=want: last_call(records, n) == want or None,  # type: ignore[misc]
            h.liveness_bound + 5.0,
            f"{n}'s hook to hear {want}",
            watch_exits=False,
        )
        check_order(records, n, stopped=False)
    assert any(len(calls(records, n)) >= 3 for n in h.c.nodes), "the flapping changed no role"


def split(h: Harness) -> None:
    """Majority/minority: the master and floor(n/2) - 1 others on the minority side."""
    m = h.master()
    minority = [m, *h.rng.sample(h.others(m), h.c.size // 2 - 1)]
    majority = h.others(*minority)
    f = h.net_fault(
        f"split {names_of(minority)}|{names_of(majority)} (master {m} in the minority)",
        lambda: h.c.partition(minority, majority),
        hosts=minority,
        minority=minority,
        failover_bound=h.crash_bound,
    )
    h.hold(f, 2.0, h.c.heal)


def bridge_sides(h: Harness, x: Node, master: Node | None = None) -> tuple[list[Node], Node, list[Node]]:
    """Two halves, ``x`` in the first, and the node between them that hears both: never ``master``.

    With the master in the middle the cut changes nothing: the followers of a live master send to it
    alone (protocol.md §3.2), so no datagram crosses the cut and no nft rule drops one, which the
    checker rightly reports as a fault NOT injected.
    """
    rest = h.others(x)
    h.rng.shuffle(rest)
    rest.sort(key=lambda n: n == master)  # stable: the shuffled order, the master last
    mid, others = rest[0], rest[1:]
    half = (len(others) + 1) // 2
    return [x, *others[: half - 1]], mid, others[half - 1 :]


def bridge(h: Harness) -> None:
    """Jepsen's bridge: two halves that do not hear each other, and one node that hears both."""
    side_a, mid, side_b = bridge_sides(h, h.master())
    f = h.net_fault(
        f"bridge {names_of(side_a)}|{names_of(side_b)} via {mid}",
        lambda: h.c.partition(side_a, side_b),
        hosts=[*side_a, *side_b],
    )
    h.hold(f, 3.0, h.c.heal, settle_s=1.0)


def ring_cuts(h: Harness, order: Sequence[Node]) -> Callable[[], None]:
    """Jepsen's majorities ring over ``order``: every node hears a majority, no two the same one."""
    n = len(order)
    k = (n // 2 + 1) // 2  # neighbours heard on each side: 1 of 5, 2 of 7 (stochastic beyond 5 in Jepsen)

    def change() -> None:
        for i, j in itertools.product(range(n), repeat=2):
            if min((i - j) % n, (j - i) % n) > k:
                h.c.cut(order[i], order[j])

    return change


def oneway_cuts(h: Harness, x: Node, *, mute: bool) -> Callable[[], None]:
    """Mute: nobody hears ``x`` (it hears them); deaf: ``x`` hears nobody (its acknowledgements are lost)."""

    def change() -> None:
        for o in h.others(x):
            h.c.cut(*((x, o) if mute else (o, x)))

    return change


def ring(h: Harness) -> None:
    order = list(h.c.nodes)
    h.rng.shuffle(order)
    f = h.net_fault(f"majorities ring {names_of(order)}", ring_cuts(h, order), hosts=order)
    h.hold(f, 3.0, h.c.heal, settle_s=1.0)


def oneway_master(mute: bool) -> Callable[[Harness], None]:
    def steps(h: Harness) -> None:
        m = h.master()
        what, bound = (f"nobody hears {m}", h.crash_bound) if mute else (f"{m} hears nobody", h.deaf_bound)
        f = h.net_fault(f"one-way: {what} (master)", oneway_cuts(h, m, mute=mute), hosts=[m], minority=[m],
                        failover_bound=bound)  # fmt: skip
        h.hold(f, 2.0, h.c.heal)

    return steps


def loss(percent: int, seconds: float) -> Callable[[Harness], None]:
    def steps(h: Harness) -> None:
        f = h.net_fault(f"random loss {percent}%", lambda: h.c.loss(percent), hosts=list(h.c.nodes))
        h.hold(f, seconds, h.c.heal, settle_s=1.0)

    return steps


def flapping(h: Harness) -> None:
    """The master's links go down and up every 0.1-0.6 s for 4 s."""
    m = h.master()
    f = h.net_fault(f"flapping links of {m} (master)", lambda: h.c.isolate(m), hosts=[m])
    give_up = time.monotonic() + 4.0
    cut = True
    while time.monotonic() < give_up:
        h.sleep(h.rng.uniform(0.1, 0.6))
        with h.c.network():
            h.c.heal()
            if not cut:
                h.c.isolate(m)
        cut = not cut
    h.heal(f, h.c.heal)
    h.sleep(0.5)


def rolling_restart(h: Harness) -> None:
    """Restart every node in turn with SIGTERM (a planned handover when it is the master)."""
    for node in h.c.nodes:
        was_master = h.c.running() is node
        name = f"planned restart of {node}" + (" (master)" if was_master else "")
        # a planned handover (protocol.md §5.3) is far faster than a crash; the crash bound is generous
        bound = h.crash_bound if was_master else None
        f = h.fault(name, lambda node=node: h.planned_stop(node), hosts=[node], failover_bound=bound)  # type: ignore[misc]
        h.heal(f, lambda node=node: h.c.restart(node, wait=False))  # type: ignore[misc]
        # the restarted node is sticky for E; then let it settle before the next one goes
        h.master()
        h.sleep(h.timing.election_timeout_s + 0.5)


def restart_cluster(h: Harness) -> None:
    """kill -9 every host, then start them all again: terms and votes come back from disk."""
    h.master()

    def kill_all() -> None:
        failed = []
        for node in h.c.nodes:
            try:
                h.c.crash(node, host=True)
            except FaultFailed as exc:
                failed.append(str(exc))
        if failed:
            raise FaultFailed("; ".join(failed))

    # measured from the kill: 1 s down, the daemons' start-up, then an election (reported, no bound)
    f = h.fault("kill -9 every host", kill_all, hosts=list(h.c.nodes), failover=True)
    h.sleep(1.0)
    h.heal(f, lambda: h.c.start(wait=False))
    h.master()
    h.sleep(1.0)


def partition_kill(h: Harness) -> None:
    """Isolate the master; once another one runs, kill -9 that one's host too."""
    m = h.master()
    f1 = isolate_fault(h, m, "master", h.crash_bound)
    m2 = h.wait_new_master(m, after=0)
    if m2 is None:
        h.heal(f1, h.c.heal)
        raise NotInjected("no second master appeared to kill")
    f2 = h.fault(
        f"kill -9 host {m2} (new master)",
        lambda: h.c.crash(m2, host=True),
        hosts=[m2],
        failover_bound=h.crash_bound,
    )
    h.sleep(2.0)
    h.heal(f1, h.c.heal)
    h.heal(f2, lambda: h.c.restart(m2, wait=False))
    h.sleep(0.5)


def pause_partition(h: Harness) -> None:
    """SIGSTOP the master's daemon, cut it off, SIGCONT it while still cut off, then heal."""
    m = h.master()
    f1 = stop_daemon_fault(h, m)
    h.sleep(0.2)
    f2 = isolate_fault(h, m, "stopped master")
    h.hold(f1, 1.5, lambda: h.c.resume(m), settle_s=1.5)
    h.heal(f2, h.c.heal)
    h.sleep(0.5)


def _scenarios(n: int) -> list[Scenario]:
    return [
        Scenario(
            f"baseline-{n}", n, baseline, stable=True, doc="no faults: one election, master never changes"
        ),
        Scenario(f"kill-host-master-{n}", n, kill_master(host=True)),
    ]


SCENARIOS_3 = [
    *_scenarios(3),
    Scenario("kill-daemon-master-3", 3, kill_master(host=False)),
    Scenario("kill-daemon-restart-at-once-3", 3, kill_daemon_restart_at_once),
    Scenario("kill-script-3", 3, kill_script),
    Scenario("stop-daemon-master-3", 3, stop_daemon_master),
    Scenario("pause-host-master-3", 3, pause_host_master, doc="protocol.md §4.5: fencing, not overlap"),
    Scenario("isolate-master-3", 3, isolate_master),
    Scenario("oneway-master-mute-3", 3, oneway_master(mute=True)),
    Scenario("oneway-master-deaf-3", 3, oneway_master(mute=False)),
    Scenario("loss-5-3", 3, loss(5, 5.0), stable=True, doc="5% loss: no spurious election"),
    Scenario("loss-20-3", 3, loss(20, 5.0)),
    Scenario("loss-40-3", 3, loss(40, 5.0)),
    Scenario("flapping-3", 3, flapping),
    Scenario("rolling-restart-3", 3, rolling_restart),
    Scenario("restart-cluster-3", 3, restart_cluster),
    Scenario("pause-partition-3", 3, pause_partition),
    Scenario("witness-partition-3", 3, witness_partition, witness=True, doc="protocol.md §3.11"),
    Scenario("hooks-flapping-3", 3, hooks_flapping, hooks=True, doc="docs/operations.md §13"),
]

SCENARIOS_5 = [
    *_scenarios(5),
    Scenario("loss-5-5", 5, loss(5, 5.0), stable=True, doc="5% loss: no spurious election"),
    Scenario("split-5", 5, split),
    Scenario("bridge-5", 5, bridge),
    Scenario("ring-5", 5, ring),
    Scenario("partition-kill-5", 5, partition_kill),
]

SCENARIOS_7 = [
    *_scenarios(7),
    Scenario("split-7", 7, split),
    Scenario("bridge-7", 7, bridge),
    Scenario("ring-7", 7, ring),
    Scenario("partition-kill-7", 7, partition_kill),
]


def run_scenario(
    scenario: Scenario, net: Network, workdir: Path, key_file: Path, *, seed: int, broken: str = ""
) -> Path:
    """Run ``scenario`` on ``net`` (all its hosts healed first) and return its directory for the
    checker. ``broken``: run broken_daemon.py with these variants instead (testing the tester)."""
    net.heal()
    net.apply()
    env = {"PQT_BROKEN": broken} if broken else {}
    if scenario.hooks:
        hook, records = hookrecord.install(workdir)
        env |= {"HOOK_DIR": str(records), "HOOK_MODE": "slow"}
    cluster = Cluster(
        net.n,
        Netns(net),
        keys=key_file,
        daemon=[sys.executable, str(Path(__file__).with_name("broken_daemon.py"))] if broken else (),
        env=env,
        verbosity=2 if os.environ.get("PYQUORUM_NETNS_DEBUG") else 1,
        directory=workdir,
        journal=True,
        launch=False,
    )
    if scenario.witness:
        cluster.add_args("--witness", cluster.nodes[0].name)
    if scenario.hooks:
        cluster.add_args("--notify", str(hook))
    t = cluster.timing
    meta = {"scenario": scenario.name, "n": net.n, "nodes": cluster.members, "stable": scenario.stable}
    meta |= {"seed": seed, "doc": scenario.doc, "broken": broken, "start_delay_s": t.start_delay_s}
    meta |= {"heartbeat_interval_s": t.heartbeat_interval_s, "election_timeout_s": t.election_timeout_s}
    (workdir / "meta.json").write_text(
        json.dumps({**meta, "stop_timeout_s": t.stop_timeout_s}, indent=2) + "\n"
    )
    cluster.note("state")
    h = Harness(cluster, random.Random(seed))
    final: dict[str, int] = {}
    try:
        cluster.start(wait=False)
        if h.wait_running(h.liveness_bound + STARTUP_ALLOWANCE_S) is None:
            cluster.note("startup_failed", waited_s=h.liveness_bound + STARTUP_ALLOWANCE_S)
        else:
            h.sleep(WARMUP_S)
            cluster.note("steady")
            try:
                scenario.steps(h)
            except NotInjected as exc:
                cluster.note("fault", id=-1, name=scenario.name, hosts=[], t_before=time.monotonic(),
                             injected=False, evidence=str(exc))  # fmt: skip
            h.heal_everything()
            h.wait_running(h.liveness_bound)
            h.sleep(SETTLE_S)
        final = h.stop_all()
        if scenario.hooks:
            for node in cluster.nodes:
                hookrecord.check_order(records, node)
    finally:
        left = cluster.close()
        gap = round(cluster.monitor.max_gap_s, 4)
        cluster.note("closed", final_exit_codes=sorted(final.items()), leftovers=left, monitor_max_gap_s=gap)
    return workdir
