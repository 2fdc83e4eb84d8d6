"""A deterministic simulation of a pyquorum cluster: the real core, a fake network, fake clocks.

In the spirit of etcd-io/raft's test ``network`` and trio's fake network: everything that is not the
core (message delivery, clocks, processes, disks) is simulated here, driven by one seeded
``random.Random``. The same seed gives the same run, event for event; a failing run raises
``Violation`` with the seed and the last few hundred trace lines.

What is modelled
----------------
* Network: per-datagram delay with jitter (so reordering) and an optional long tail (a few datagrams
  delayed by seconds), loss at a rate for every link and per directed link (asymmetric loss),
  duplication, directed link cuts (isolate, majority/minority, bridge, ring, one-way). Nodes with
  different timing do not hear each other: the cluster fingerprint covers the timing (protocol.md §1).
* Clocks: each node's monotonic clock runs at a constant rate within ``1 +- drift_bound`` of true
  time, from an arbitrary offset. The variant ``wall_clock`` adds jumps (a clock that can be set).
* Processes: crash of the daemon alone (its guard then stops the script), of the whole host (the script
  dies at once), restart from the persisted hard state, restart with another timing (a rolling
  configuration change), a lost state directory (restart with nothing on disk), SIGSTOP-like pauses
  (the node executes nothing; datagrams wait in its socket buffer; its clock runs on), planned
  shutdown, and ``resign()`` called on any node at any moment (the daemon may call it).
* The wire: every message goes through the real ``pyquorum.wire.Endpoint`` as the daemon's do, so
  the network carries bytes. Each life of a node has its own endpoint, with a boot epoch picked by
  the daemon's rule from the one on its simulated disk (``next_boot_epoch``, a wall clock that never
  goes back); epoch handshakes, replay refusals of duplicated datagrams, and datagrams from or to an
  earlier life (delivered after a restart, and refused) are part of every run. ``keyed=True`` signs
  with HMAC-SHA256, otherwise CRC-32 as without a key file.
* The script, WORST CASE: once started it runs until the moment its stop is complete. A requested stop
  completes at min(request + G + K, kill deadline) on the node's clock; absent renewal, the guard
  kills it exactly at the kill deadline, even while the daemon is paused or dead. Scripts may also
  crash by themselves.

Invariants checked after every event, on true simulated time (protocol.md §6)
-------------------------------------------------------------------------------
* at most one master per term; one vote per node per term (across restarts); terms never decrease;
* no two script runs (any nodes, any terms) alive at the same moment;
* fencing tokens increase from one run to the next (equal only for a restart on the same master);
* every kill deadline a node obeys is backed by a heartbeat round that a majority really acknowledged
  (the lease), no script starts without a live lease, and a master whose lease has lapsed steps down
  in time to give its script the full stop grace.
"""

from __future__ import annotations

import hashlib
import heapq
import random
import typing
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pyquorum.core.lease import Timing
from pyquorum.core.messages import (
    Heartbeat,
    HeartbeatResponse,
    Message,
    VoteResponse,
)
from pyquorum.core.node import (
    HardState,
    Node,
    Ready,
    Role,
    StartScript,
    StopScript,
)
from pyquorum.core.quorum import quorum_size
from pyquorum.wire import Deliver, Endpoint, Handshake, KeyRing, Reject, cluster_fingerprint, next_boot_epoch
from tests.sim.variants import VARIANTS, rules_for

SIM_VARIANTS = frozenset({"no_persist", "wall_clock"})
EPS = 1e-9
WALL_CLOCK_BASE_S = 1.7e9  # the simulated wall clocks' reading at time 0, give or take a node's offset

# event kinds
_TICK, _DELIVER, _DEATH, _RESUME, _CALL = range(5)


class Violation(AssertionError):
    """A safety or liveness property failed. The message has the seed and the trace."""


@dataclass
class ScriptRun:
    node: int
    token: int
    start: float
    gen: int  # the daemon incarnation that started it: only that one hears of its end
    end: float | None = None


@dataclass
class NetConfig:
    delay_min: float = 0.0002
    delay_max: float = 0.002
    loss: float = 0.0
    duplicate: float = 0.0
    # the long tail: this fraction of datagrams is delayed by a Pareto-distributed extra time of at
    # least tail_s, capped at tail_max_s (a congested switch, a retransmitting wireless hop)
    tail: float = 0.0
    tail_s: float = 0.05
    tail_max_s: float = 5.0


@dataclass
class SimNode:
    idx: int
    name: str
    rate: float
    offset: float
    core: Node | None = None
    disk: HardState = field(default_factory=HardState)
    gen: int = 0  # incarnation: bumped on crash, invalidates its pending events
    timer: int = 0  # bumped whenever a new tick is scheduled
    paused: bool = False
    paused_until: float = 0.0
    last_resume: float = -1e9
    inbox: list[tuple[int, bytes]] = field(default_factory=list)
    deferred_stops: list[float | None] = field(default_factory=list)
    run: ScriptRun | None = None
    deadline_real: float = 0.0  # guard's current kill deadline, true time
    death_at: float | None = None  # scheduled end of a requested stop, true time
    death_version: int = 0
    max_term: int = 0
    jump: float = 0.0  # wall_clock variant: accumulated clock jumps
    timing: Timing = field(default_factory=Timing)  # this node's configuration (a rolling change differs)
    wiped: bool = False  # its state was lost and it has not yet heard every member since (§3.9)
    heard: set[int] = field(default_factory=set)  # members it received a datagram from since its boot
    endpoint: Endpoint | None = None  # this life's wire
    disk_epoch: int = 0  # the boot epoch on its disk, as state.json holds it

    def local(self, real: float) -> float:
        return self.offset + self.rate * real + self.jump

    def real_of(self, local: float) -> float:
        return (local - self.offset - self.jump) / self.rate

    @property
    def up(self) -> bool:
        return self.core is not None


class Cluster:
    """A simulated cluster. Drive it with the fault methods and ``run_for``/``run_until``."""

    def __init__(
        self,
        n: int,
        timing: Timing | None = None,
        *,
        seed: int = 0,
        broken: Iterable[str] = (),
        drift: bool = True,
        script: bool = True,
        trace_len: int = 300,
        rates: Iterable[float] | None = None,
        keyed: bool = False,
        priorities: dict[int, int] | None = None,
        witnesses: Iterable[int] = (),
        preempt_after_s: float | None = None,
    ) -> None:
        self.priorities = dict(priorities or {})
        self.witnesses = frozenset(witnesses)
        self.preempt_after_s = preempt_after_s
        self.preemptions: list[float] = []  # when a master accepted a pre-emption (protocol.md §3.10)
        self.seed = seed
        self.rng = random.Random(seed)
        self.timing = timing or Timing()
        broken = frozenset(broken)
        unknown = broken - SIM_VARIANTS - VARIANTS.keys()
        if unknown:
            raise ValueError(f"unknown broken variants {sorted(unknown)}")
        self.sim_broken = broken & SIM_VARIANTS
        self.core_broken = broken - SIM_VARIANTS
        self.rules = rules_for(self.core_broken)
        self.n = n
        self.quorum = quorum_size(n)
        self.names = [f"127.0.0.{i + 1}:51621" for i in range(n)]
        self.index = {name: i for i, name in enumerate(self.names)}
        self.addresses = [(f"127.0.0.{i + 1}", 51621) for i in range(n)]
        self.fingerprint = cluster_fingerprint(self.names, self.timing.describe())
        key = hashlib.sha256(b"pyquorum simulation %d" % seed).digest()
        self.keyring = KeyRing(send_key_id=1, keys={1: key}) if keyed else None
        self.wire_rejects: Counter[str] = Counter()  # every refusal of every life's endpoint
        self.wire_delivered = 0  # datagrams the endpoints handed on to a core
        self.now = 0.0
        self.net = NetConfig()
        self.cut: set[tuple[int, int]] = set()
        self.link_loss: dict[tuple[int, int], float] = {}  # (src, dst) -> loss on that direction only
        self.queue: list[tuple[float, int, int, int, int, object]] = []
        self._seq = 0
        self.trace: deque[str] = deque(maxlen=trace_len)
        self.script = script
        rho = self.timing.drift_bound if drift else 0.0
        given = list(rates) if rates is not None else None
        self.nodes = [
            SimNode(
                i,
                name,
                rate=given[i] if given is not None else 1.0 + self.rng.uniform(-rho, rho),
                offset=self.rng.uniform(0, 1000),
                timing=self.timing,
            )
            for i, name in enumerate(self.names)
        ]
        # observations for the invariants
        self.masters: dict[int, int] = {}
        self.votes: dict[tuple[int, int], int] = {}
        self.rounds: dict[tuple[int, int, int], tuple[float, set[int]]] = {}
        self.best_lease: dict[tuple[int, int], float] = {}
        self.runs: list[ScriptRun] = []
        self.last_token: tuple[int, int] | None = None  # (token, node)
        self.events_processed = 0
        self.messages_sent = 0
        self.events: Counter[str] = Counter()  # the core's events, by kind
        self.sent_by = [0] * n  # datagrams each node sent (the cost of idling, protocol.md §5.4)
        self.plain_sent_by = [0] * n  # of them, plain heartbeats: the keep-alive of protocol.md §3.2
        self.master_changes: list[tuple[float, int, int]] = []  # (time, node, term)
        for node in self.nodes:
            self._boot(node)

    # ------------------------------------------------------------------ plumbing

    def _push(self, at: float, kind: int, idx: int, gen: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self.queue, (at, self._seq, kind, idx, gen, payload))

    def log(self, text: str) -> None:
        self.trace.append(f"{self.now:10.4f} {text}")

    def fail(self, what: str) -> None:
        raise Violation(
            f"{what}\nseed={self.seed} n={self.n} broken={sorted(self.core_broken | self.sim_broken)} "
            f"timing={self.timing.describe()}\n--- last {len(self.trace)} trace lines ---\n"
            + "\n".join(self.trace)
        )

    def _boot(self, node: SimNode) -> None:
        node.gen += 1
        node.heard = set()
        node.paused = False
        node.inbox = []
        node.deferred_stops = []
        disk, disk_epoch = node.disk, node.disk_epoch
        if "no_persist" in self.sim_broken:
            disk, disk_epoch = HardState(), 0
        # the daemon's order: the new epoch is on disk before its first datagram (docs/security.md §5)
        wall_clock_us = int((WALL_CLOCK_BASE_S + node.offset + self.now) * 1e6)
        node.disk_epoch = next_boot_epoch(disk_epoch, wall_clock_us)
        node.endpoint = Endpoint(
            local=node.name,
            members=self.names,
            cluster_fp=self.fingerprint,
            keyring=self.keyring,
            epoch=node.disk_epoch,
        )
        node.core = Node(
            node.name,
            self.names,
            node.timing,
            now=node.local(self.now),
            rng=random.Random(self.rng.getrandbits(64)),
            hard_state=disk,
            rules=self.rules,
            priorities={self.names[i]: p for i, p in self.priorities.items()},
            witnesses=frozenset(self.names[i] for i in self.witnesses),
            preempt_after_s=self.preempt_after_s,
        )
        if node.core.term < node.max_term:
            self.fail(f"term decreased on {node.name} across restart: {node.max_term} -> {node.core.term}")
        self._after(node)

    def _schedule_tick(self, node: SimNode) -> None:
        assert node.core is not None
        node.timer += 1
        # + 1e-9: converting clocks must not land a hair before the wakeup (a tick that does nothing)
        at = max(self.now, node.real_of(node.core.next_wakeup()) + 1e-9)
        self._push(at, _TICK, node.idx, node.gen, node.timer)

    # ------------------------------------------------------------------ running

    def run_until(self, t: float) -> None:
        """Process every event up to true time ``t`` (inclusive), then set the clock to ``t``."""
        q = self.queue
        while q and q[0][0] <= t:
            at, _, kind, idx, gen, payload = heapq.heappop(q)
            self.now = at
            self.events_processed += 1
            if kind == _CALL:
                assert callable(payload)
                payload()
                continue
            node = self.nodes[idx]
            if kind == _DEATH:
                if gen == node.death_version and node.run is not None:
                    self._script_dies(node, "stopped")
                continue
            # a datagram is for the socket, not for one life: one sent to an earlier life arrives
            # (and is refused by the endpoint) if the node is up again by then
            if node.core is None or (gen != node.gen and kind != _DELIVER):
                continue
            if kind == _TICK:
                if payload != node.timer or node.paused:
                    continue
                node.core.tick(node.local(self.now))
                self._after(node)
            elif kind == _DELIVER:
                src, data = typing.cast("tuple[int, bytes]", payload)
                if node.paused:
                    node.inbox.append((src, data))
                    continue
                msg = self._receive(node, src, data)
                if msg is not None:
                    self._heard(node, src)
                    node.core.step(self.names[src], msg, node.local(self.now))
                    self._after(node)
            elif kind == _RESUME and node.paused and payload == node.paused_until:
                self._resume(node)
        self.now = max(self.now, t)

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def at(self, t: float, fn: Callable[[], None]) -> None:
        """Call ``fn`` at true time ``t`` (a scheduled fault)."""
        self._push(t, _CALL, -1, 0, fn)

    # ------------------------------------------------------------------ the runtime's job

    def _after(self, node: SimNode) -> None:
        """Carry out the node's Ready exactly as the real runtime does: persist, send, script."""
        core = node.core
        assert core is not None
        rd = core.ready()
        if not rd.empty():
            self._process(node, rd)
        core.advance(rd)
        if rd.finished:
            self.log(f"{node.name} finished")
            node.core = None
            node.gen += 1
            return
        self._check_node(node)
        self._schedule_tick(node)

    def _process(self, node: SimNode, rd: Ready) -> None:
        core = node.core
        assert core is not None
        t_local = node.local(self.now)
        if rd.hard_state is not None:
            node.disk = rd.hard_state
        for ev in rd.events:
            self.events[ev.kind.value] += 1
            if (
                ev.kind.value == "step_down_requested"
                and ev.get("preempt")
                and ev.get("reason") == "accepted"
            ):
                self.preemptions.append(self.now)
            self.log(f"{node.name} {ev}")
        for dest, msg in rd.messages:
            if isinstance(msg, Heartbeat) and not msg.master:
                self.plain_sent_by[node.idx] += 1
            self._observe_send(node, self.index[dest], msg, t_local)
            self._send(node.idx, self.index[dest], msg)
        for act in rd.script:
            if isinstance(act, StartScript):
                self._start_script(node, act, t_local)
            else:
                self._stop_script(node, act, t_local)
        if rd.kill_deadline is not None and node.run is not None:
            self._check_lease(node, rd.kill_deadline, "renewal")
            node.deadline_real = max(node.deadline_real, node.real_of(rd.kill_deadline))
            self._push(node.deadline_real, _DEATH, node.idx, node.death_version, None)

    def _heard(self, node: SimNode, src: int) -> None:
        node.heard.add(src)
        if node.wiped and len(node.heard) == self.n - 1:
            node.wiped = False

    def amnesia(self) -> bool:
        """Whether a node whose state was lost has not yet heard every other member (protocol.md §3.9)."""
        return any(nd.wiped for nd in self.nodes)

    def _send(self, src: int, dst: int, msg: Message | None, data: bytes | None = None) -> None:
        """Carry ``msg`` (encoded here) or the encoded ``data`` from ``src`` to ``dst``."""
        self.messages_sent += 1
        self.sent_by[src] += 1
        net, rng = self.net, self.rng
        if (src, dst) in self.cut or (net.loss and rng.random() < net.loss):
            return
        link = self.link_loss.get((src, dst))
        if link and rng.random() < link:
            return
        if self.nodes[src].timing != self.nodes[dst].timing:
            return  # another fingerprint: the receiver counts nothing from it (protocol.md §1)
        # Encoded only when the network carries it (two thirds of all sends hit a cut link): a
        # dropped datagram would only have used up a sequence number, and receivers see gaps anyway.
        if data is None:
            sender = self.nodes[src].endpoint
            assert sender is not None and msg is not None
            data = sender.send(self.names[dst], msg).data  # the daemon's encode: seq, epoch, echo
        copies = 2 if net.duplicate and rng.random() < net.duplicate else 1
        for _ in range(copies):
            delay = net.delay_min + (net.delay_max - net.delay_min) * rng.random()
            if net.tail and rng.random() < net.tail:
                delay += min(net.tail_max_s, net.tail_s * rng.paretovariate(1.2))
            self._push(self.now + delay, _DELIVER, dst, self.nodes[dst].gen, (src, data))

    def _receive(self, node: SimNode, src: int, data: bytes) -> Message | None:
        """The daemon's receive path: the message to step, or None if the endpoint refused it."""
        assert node.endpoint is not None
        result = node.endpoint.receive(data, self.addresses[src])
        if isinstance(result, Deliver):
            self.wire_delivered += 1
            return result.message
        if isinstance(result, Reject):
            self.wire_rejects[result.reason] += 1
            self.log(f"{node.name} WIRE refused {result.reason} from {self.names[src]}")
            if result.reply is not None:  # a Hello, to complete the sender's epoch handshake
                self._send(node.idx, src, None, result.reply.data)
        elif isinstance(result, Handshake):
            self.log(f"{node.name} WIRE hello from {self.names[src]}")
        else:
            self.fail(f"{node.name} took a datagram of its own cluster for another's: {result}")
        return None

    # ------------------------------------------------------------------ the script model

    def _start_script(self, node: SimNode, act: StartScript, t_local: float) -> None:
        if not self.script:
            return
        if act.kill_deadline <= t_local + EPS:
            self.fail(f"{node.name} started its script with an expired lease (deadline {act.kill_deadline})")
        self._check_lease(node, act.kill_deadline, "start")
        for other in self.nodes:
            if other.run is not None:
                self.fail(
                    f"OVERLAP: {node.name} starts its script (token {act.token}) while "
                    f"{other.name}'s script (token {other.run.token}, started {other.run.start:.4f}) "
                    "may still run"
                )
        if self.last_token is not None:
            token, who = self.last_token
            if act.token < token or (act.token == token and who != node.idx):
                self.fail(
                    f"fencing token {act.token} on {node.name} after token {token} on {self.names[who]}"
                )
        self.last_token = (act.token, node.idx)
        run = ScriptRun(node.idx, act.token, self.now, node.gen)
        self.runs.append(run)
        node.run = run
        node.death_at = None
        node.death_version += 1
        node.deadline_real = node.real_of(act.kill_deadline)
        self._push(node.deadline_real, _DEATH, node.idx, node.death_version, None)
        self.log(f"{node.name} SCRIPT START token={act.token}")

    def _stop_script(self, node: SimNode, act: StopScript, t_local: float) -> None:
        if node.run is None:
            return
        t = node.timing
        grace = t.stop_timeout_s + t.kill_margin_s
        # protocol.md §4.3: a master steps down while its script still has the whole grace left,
        # unless the daemon was paused past that moment (then only the guard's deadline holds).
        recently_paused = self.now - node.last_resume < t.lease_kill_s * 2 or node.paused
        if (
            act.kill_deadline - t_local < grace - 1e-6
            and not recently_paused
            and not act.reason.startswith(("shutdown", "resign"))
        ):
            self.fail(
                f"{node.name} stepped down too late: {act.kill_deadline - t_local:.4f}s left before its kill "
                f"deadline, needs G + K = {grace:.4f}s ({act.reason})"
            )
        self._request_death(node, t_local, act.kill_deadline)

    def _request_death(self, node: SimNode, t_local: float, deadline_local: float | None) -> None:
        t = node.timing
        end_local = t_local + t.stop_timeout_s + t.kill_margin_s
        if deadline_local is not None:
            end_local = min(end_local, deadline_local)
        death = max(self.now, node.real_of(end_local))
        if node.death_at is None or death < node.death_at:
            node.death_at = death
            self._push(death, _DEATH, node.idx, node.death_version, None)

    def _script_dies(self, node: SimNode, how: str, *, restart_after: float | None = 0.0) -> None:
        run = node.run
        assert run is not None
        # The script ends at the requested stop's end or, absent renewal, at the guard's kill
        # deadline, whichever is first; an event for an earlier moment is stale (the lease was renewed).
        end = min(node.deadline_real, node.death_at if node.death_at is not None else node.deadline_real)
        if self.now < end - EPS:
            return
        run.end = self.now
        node.run = None
        node.death_at = None
        node.death_version += 1
        self.log(f"{node.name} SCRIPT END token={run.token} ({how})")
        if node.core is None or node.gen != run.gen:
            return  # the daemon that started it is gone; its successor never knew of it
        if node.paused:
            node.deferred_stops.append(restart_after)
            return
        node.core.script_stopped(node.local(self.now), restart_after=restart_after)
        self._after(node)

    # ------------------------------------------------------------------ invariants

    def _observe_send(self, node: SimNode, dst: int, msg: Message, t_local: float) -> None:
        i = node.idx
        if isinstance(msg, VoteResponse) and msg.granted:
            prior = self.votes.setdefault((i, msg.term), dst)
            if prior != dst:
                self.fail(
                    f"DOUBLE VOTE: {node.name} voted for {self.names[prior]} and {self.names[dst]} "
                    f"in term {msg.term}"
                )
        elif isinstance(msg, Heartbeat) and msg.master:
            key = (i, msg.term, msg.round)
            if key not in self.rounds:
                self.rounds[key] = (t_local, {i})
                self._count_acks(key)
        elif isinstance(msg, HeartbeatResponse):
            key = (dst, msg.term, msg.round)
            entry = self.rounds.get(key)
            if entry is not None:
                entry[1].add(i)
                self._count_acks(key)

    def _count_acks(self, key: tuple[int, int, int]) -> None:
        sent, ackers = self.rounds[key]
        if len(ackers) >= self.quorum:
            lk = (key[0], key[1])
            if sent > self.best_lease.get(lk, -1e18):
                self.best_lease[lk] = sent
            del self.rounds[key]

    def _check_lease(self, node: SimNode, deadline: float, what: str) -> None:
        """protocol.md §4.2: a kill deadline must come from a round a majority really acknowledged."""
        assert node.core is not None
        lease_start = deadline - node.timing.lease_kill_s
        best = self.best_lease.get((node.idx, node.core.term))
        if self.n == 1:
            best = node.core.lease_start  # a single node is its own majority: it sends no datagrams
        if best is None or lease_start > best + 1e-7:
            self.fail(
                f"LEASE: {node.name} {what} with kill deadline {deadline:.4f} implying a lease from "
                f"{lease_start:.4f}, but its newest majority-acknowledged round was sent at {best}"
            )

    def _check_node(self, node: SimNode) -> None:
        core = node.core
        assert core is not None
        if core.term < node.max_term:
            self.fail(f"term decreased on {node.name}: {node.max_term} -> {core.term}")
        node.max_term = core.term
        if core.role is Role.MASTER:
            if node.idx in self.witnesses:
                self.fail(f"WITNESS {node.name} is master in term {core.term} (protocol.md §3.11)")
            prior = self.masters.setdefault(core.term, node.idx)
            if prior != node.idx:
                self.fail(f"TWO MASTERS in term {core.term}: {self.names[prior]} and {node.name}")
            if prior == node.idx and (not self.master_changes or self.master_changes[-1][2] != core.term):
                self.master_changes.append((self.now, node.idx, core.term))
            # protocol.md §4.3: a master without a live lease must have stepped down
            t_local = node.local(self.now)
            start = core.lease_start if core.lease_start is not None else core.became_master_at
            if t_local > start + node.timing.stop_begin_s + 1e-6 and self.now - node.last_resume > 1e-6:
                self.fail(
                    f"{node.name} is still master {t_local - start:.4f}s after its last acknowledged "
                    f"round (must step down after {node.timing.stop_begin_s:.4f}s)"
                )

    # ------------------------------------------------------------------ faults

    def _nodes(self, who: Iterable[int | str]) -> list[SimNode]:
        return [self.nodes[w if isinstance(w, int) else self.index[w]] for w in who]

    def isolate(self, who: int | str) -> None:
        (node,) = self._nodes([who])
        for other in range(self.n):
            if other != node.idx:
                self.cut.add((node.idx, other))
                self.cut.add((other, node.idx))
        self.log(f"NEMESIS isolate {node.name}")

    def partition(self, *groups: Iterable[int]) -> None:
        """Only nodes in the same group can talk."""
        member: dict[int, int] = {}
        for g, grp in enumerate(groups):
            for i in grp:
                member[i] = g
        for a in range(self.n):
            for b in range(self.n):
                if a != b and member.get(a, -1 - a) != member.get(b, -1 - b):
                    self.cut.add((a, b))
        self.log(f"NEMESIS partition {[sorted(g) for g in groups]}")

    def cut_links(self, pairs: Iterable[tuple[int, int]], *, both: bool = True) -> None:
        for a, b in pairs:
            self.cut.add((a, b))
            if both:
                self.cut.add((b, a))
        self.log(f"NEMESIS cut {sorted(self.cut)}")

    def heal(self) -> None:
        self.cut.clear()
        self.link_loss.clear()
        self.net.loss = 0.0
        self.net.duplicate = 0.0
        self.net.tail = 0.0
        self.log("NEMESIS heal")

    def lossy_link(self, src: int | str, dst: int | str, loss: float) -> None:
        """Drop ``loss`` of what ``src`` sends to ``dst`` (that direction only: asymmetric loss)."""
        a, b = self._nodes([src, dst])
        self.link_loss[(a.idx, b.idx)] = loss
        self.log(f"NEMESIS loss {loss} on {a.name} -> {b.name}")

    def lossy_inbound(self, who: int | str, loss: float) -> None:
        """Drop ``loss`` of every datagram sent to ``who``; what it sends arrives (protocol.md §3.3)."""
        (node,) = self._nodes([who])
        for other in range(self.n):
            if other != node.idx:
                self.link_loss[(other, node.idx)] = loss
        self.log(f"NEMESIS inbound loss {loss} at {node.name}")

    def crash(self, who: int | str, *, with_script: bool = False) -> None:
        """kill -9 of the daemon (its guard stops the script) or of the whole host."""
        (node,) = self._nodes([who])
        if node.core is None:
            return
        node.core = None
        node.gen += 1
        node.paused = False
        self.log(f"NEMESIS crash {node.name}{' with script' if with_script else ''}")
        node.inbox = []
        node.deferred_stops = []
        if node.run is not None:
            if with_script:
                node.death_at = self.now
                self._script_dies(node, "host crash")
            else:
                # protocol.md §4.4: the guard sees its pipe close and stops the script on its own
                self._request_death(node, node.local(self.now), None)

    def restart(self, who: int | str) -> None:
        (node,) = self._nodes([who])
        if node.core is not None:
            return
        self.log(f"NEMESIS restart {node.name}")
        self._boot(node)

    def shutdown(self, who: int | str) -> None:
        """Planned stop (SIGTERM to the daemon)."""
        (node,) = self._nodes([who])
        if node.core is None or node.paused:
            return
        self.log(f"NEMESIS shutdown {node.name}")
        node.core.shutdown(node.local(self.now))
        self._after(node)

    def pause(self, who: int | str, seconds: float) -> None:
        """SIGSTOP the daemon for ``seconds`` (its guard and script keep running)."""
        (node,) = self._nodes([who])
        if node.core is None or node.paused:
            return
        node.paused = True
        node.paused_until = self.now + seconds
        self.log(f"NEMESIS pause {node.name} for {seconds:.3f}s")
        self._push(node.paused_until, _RESUME, node.idx, node.gen, node.paused_until)

    def _resume(self, node: SimNode) -> None:
        node.paused = False
        node.last_resume = self.now
        self.log(f"NEMESIS resume {node.name}")
        core = node.core
        assert core is not None
        t = node.local(self.now)
        # the kernel kept the datagrams; the process first runs its overdue timers
        core.tick(t)
        self._after(node)
        for restart_after in node.deferred_stops:
            if node.core is None:
                return
            node.core.script_stopped(t, restart_after=restart_after)
            self._after(node)
        node.deferred_stops = []
        inbox, node.inbox = node.inbox, []
        for src, data in inbox:
            if node.core is None or node.paused:
                return
            msg = self._receive(node, src, data)
            if msg is not None:
                self._heard(node, src)
                node.core.step(self.names[src], msg, t)
                self._after(node)

    def resign(self, who: int | str) -> None:
        """Call ``resign()`` on the node, whatever its role: the daemon may (protocol.md §3.7)."""
        (node,) = self._nodes([who])
        if node.core is None or node.paused:
            return
        done = node.core.resign(node.local(self.now), "nemesis")
        self.log(f"NEMESIS resign {node.name} ({node.core.role.value}, {'resigning' if done else 'refused'})")
        self._after(node)

    def step_down(self, who: int | str, to: int | str | None = None) -> None:
        """An operator runs ``pyquorum step-down [--to]`` on ``who`` (protocol.md §3.10)."""
        (node,) = self._nodes([who])
        if node.core is None or node.paused:
            return
        target = "" if to is None else self._nodes([to])[0].name
        answer = node.core.request_step_down(node.local(self.now), target)
        self.log(f"NEMESIS step-down on {node.name} to={target or '-'}: {answer or 'sent to the master'}")
        self._after(node)

    def wipe(self, who: int | str) -> None:
        """Lose the node's state directory: crash it, and restart it with nothing on disk (§3.9)."""
        (node,) = self._nodes([who])
        self.crash(who)
        node.disk = HardState(recovering=True)
        node.disk_epoch = 0  # lost with the state file: the wall clock keeps the epoch rising
        node.max_term = 0  # terms cannot be monotonic across a lost disk; votes must still be unique
        node.wiped = self.n > 1
        self.log(f"NEMESIS wipe {node.name}")
        self._boot(node)

    def retime(self, who: int | str, timing: Timing) -> None:
        """Restart the node with another timing (one step of a rolling change, protocol.md §3.6)."""
        (node,) = self._nodes([who])
        self.crash(who)
        node.timing = timing
        self.log(f"NEMESIS retime {node.name} {timing.describe()}")
        self._boot(node)

    def script_crash(self, who: int | str, restart_after: float | None = 0.5) -> None:
        (node,) = self._nodes([who])
        if node.run is None:
            return
        self.log(f"NEMESIS script crash on {node.name}")
        node.death_at = self.now
        self._script_dies(node, "crashed", restart_after=restart_after)

    def clock_jump(self, who: int | str, seconds: float) -> None:
        """Only meaningful for the ``wall_clock`` variant: a monotonic clock never jumps."""
        (node,) = self._nodes([who])
        if "wall_clock" not in self.sim_broken:
            return
        node.jump += seconds
        self.log(f"NEMESIS clock jump {node.name} {seconds:+.3f}s")
        if node.core is not None:
            self._schedule_tick(node)

    # ------------------------------------------------------------------ queries

    def master(self) -> str | None:
        """The node that is master in the highest term, if any is master now."""
        best: tuple[int, str] | None = None
        for node in self.nodes:
            if node.core is not None and node.core.role is Role.MASTER:
                cand = (node.core.term, node.name)
                best = cand if best is None or cand > best else best
        return best[1] if best else None

    def running_script(self) -> str | None:
        for node in self.nodes:
            if node.run is not None:
                return node.name
        return None

    def roles(self) -> dict[str, str]:
        return {
            n.name: ("down" if n.core is None else n.core.role.value + ("(paused)" if n.paused else ""))
            for n in self.nodes
        }
