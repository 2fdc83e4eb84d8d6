"""Live hostile traffic (docs/security.md §7): real daemons on loopback, attacked by this test process.

Each test runs a 3-node cluster without a script (``Cluster(3, Loopback(), script=None)``, tests/harness:
``python -m pyquorum`` subprocesses on 127.0.0.x, heartbeat 0.05 s, election timeout 0.5 s) and sends
from 127.0.0.1:

* ``test_flood_changes_nothing``: with a key file, every node is flooded, one kind after the other,
  with ``PER_KIND`` datagrams of each kind (``keyed_attacks`` lists them). For each kind the
  ``rejected`` counters the daemon reports over its control socket must show the reasons expected
  for it and no other (so nothing got past the MAC that should not have). Then: the master is the
  same node in the same term, every daemon runs and still accepts its peers' datagrams, the logs
  hold no Traceback and only rate-limited reject lines, nothing was ever sent to the attacker's
  address, and SIGTERM to the master still fails over. Run with ``-s`` to see the counters of each attack.
* ``test_without_key_runs_unauthenticated``: no key file: the daemon runs and says so at start-up and
  in its status; datagrams claiming a member from another source address are refused.
* ``test_key_rotation_with_sighup``: [k1] -> [k1, k2] -> [k2, k1] -> [k2], SIGHUP after each rewrite,
  one node at a time: the master never changes, no datagram is refused for its key, each node's
  peers are seen signing with the new key before the old one is retired, and then the old is refused.
* ``test_refuses_key_file_readable_by_others``: exit 2, "chmod 600", no key material printed.

Where replayed datagrams come from, without sniffing (which needs privileges CI does not have):
genuine datagrams are *captured* by binding a member's address while that member's daemon is not
running, so the real daemons send their real, signed datagrams to this test process:

* before the cluster starts, node 0 runs alone while the test holds nodes 1 and 2's addresses: that
  captures node 0's datagrams from an earlier life (its boot epoch is higher once it starts again);
* once the cluster runs, a slave V is stopped and the test holds V's address: that captures the live
  nodes' datagrams addressed to V's earlier life, and their ClusterInfo answers (below).

The test does not need the key for those. What it cannot do without sniffing is capture a datagram a
running receiver has already *accepted* and replay it into the same life ("replayed", "too-old"): that
is covered by tests/test_replay.py, not here.

Cross-cluster traffic (another cluster fingerprint, signed with the right key) is sent while V is
down, as V in V's then-current epoch, which is what a misconfigured V would send: the live nodes count
it ("cluster-mismatch"), log it rate-limited, and answer with one ClusterInfo sent to V's configured
address, never to the datagram's source. Replayed once V has restarted, it is "stale-epoch": V greets
every peer at its start (protocol.md §3.2), so every live node knows V's new epoch.

The test holds the key (it is the operator) for the attacks that need one: a former member (right
key, not a member) and the cross-cluster datagrams. Everything else is sent without the key.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import secrets
import select
import signal
import socket
import struct
import subprocess
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pyquorum import keyfile
from pyquorum.core import messages
from pyquorum.wire.codec import VERSION, ClusterInfo, Codec, WireMessage, cluster_fingerprint
from pyquorum.wire.keyring import KeyRing
from tests.harness.cluster import Cluster, Loopback, Node

pytestmark = pytest.mark.slow

HUGE_TERM = 2**62
PER_KIND = 2000  # datagrams of each kind sent to each node
RATE = 4000.0  # per node and second: a flood, yet it leaves CPU for three daemons on a shared host
MAX_REJECT_LOG_LINES = 60  # the daemon logs one per reason per 10 s; about 15 reasons here
MAX_LOG_BYTES = 64 * 1024
MAX_BACKLOG = 48 * 1024  # bytes queued at a daemon's socket before the flood waits (~50 datagrams)

Datagram = tuple[bytes, tuple[str, int]]
Status = dict[str, Any]


# -- small tools ------------------------------------------------------------------------------


def write_key_file(path: Path, lines: Sequence[str], mode: int = 0o600) -> None:
    """Replace ``path`` atomically with these key lines, with ``mode``."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def key_lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln and not ln.startswith("#")]


@pytest.fixture
def attacker() -> Iterator[socket.socket]:
    """The attacker: an ordinary UDP socket on 127.0.0.1, which is no member's address."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    yield sock
    sock.close()


def udp_sockets() -> dict[tuple[str, int], tuple[int, int]]:
    """``(bytes queued, datagrams dropped)`` of every IPv4 UDP socket on this host, by local
    address, from Linux's /proc/net/udp ({} elsewhere)."""
    try:
        lines = Path("/proc/net/udp").read_text(encoding="ascii").splitlines()[1:]
    except OSError:
        return {}
    out = {}
    for line in lines:
        f = line.split()
        ip_hex, port_hex = f[1].split(":")
        ip = socket.inet_ntoa(struct.pack("=I", int(ip_hex, 16)))  # the kernel prints it host-endian
        out[(ip, int(port_hex, 16))] = (int(f[4].split(":")[1], 16), int(f[12]))
    return out


def send_paced(sock: socket.socket, datagrams: Sequence[Datagram], rate: float) -> None:
    """Send everything at most at ``rate`` datagrams per second, and never while a receiving
    socket holds more than ``MAX_BACKLOG`` bytes: the test is about what hostile datagrams do to a
    daemon, not about starving it of CPU (a flood beyond its pace only delays its peers'
    heartbeats behind the queue: liveness, docs/security.md §2)."""
    dests = {dest for _, dest in datagrams}
    start = time.monotonic()
    since_check = 0
    for i, (data, dest) in enumerate(datagrams):
        with contextlib.suppress(OSError):  # ENOBUFS and the like: one attack datagram fewer
            sock.sendto(data, dest)
        since_check += len(data)
        if i % 32 == 31 or since_check > 64 * 1024:
            since_check = 0
            ahead = start + (i + 1) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline:
                queues = udp_sockets()
                if all(queues.get(d, (0, 0))[0] <= MAX_BACKLOG for d in dests):
                    break
                time.sleep(0.002)


def pending(sock: socket.socket) -> list[bytes]:
    """Whatever was sent to ``sock`` (nothing ever should be, for the attacker's)."""
    got = []
    while select.select([sock], [], [], 0)[0]:
        got.append(sock.recv(65536))
    return got


def recrc(body: bytes) -> bytes:
    """An unauthenticated datagram's trailer: anyone can compute it."""
    return body + zlib.crc32(body).to_bytes(4, "big")


class Recorder:
    """Holds members' addresses while their daemons are down, and keeps what the others send them."""

    def __init__(self, addrs: Iterable[tuple[str, int]]) -> None:
        self.socks: dict[tuple[str, int], socket.socket] = {}
        for addr in addrs:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(addr)
            self.socks[addr] = sock
        self.captured: list[Datagram] = []

    def drain(self, timeout_s: float = 0.0) -> None:
        select.select(list(self.socks.values()), [], [], timeout_s)
        for addr, sock in self.socks.items():
            while select.select([sock], [], [], 0)[0]:
                self.captured.append((sock.recv(65536), addr))

    def record_until(self, done: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, f"timed out capturing {what}: {len(self.captured)} datagrams"
            self.drain(0.02)

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()


def hostile_cluster(keys: Path | Sequence[Path] | None, verbosity: int = 1) -> Cluster:
    """The cluster under attack: no script; the test starts the nodes."""
    return Cluster(3, Loopback(), script=None, keys=keys, verbosity=verbosity, launch=False)


def stop(c: Cluster, node: Node) -> int:
    """SIGTERM and wait; returns the exit code."""
    c.shutdown(node)
    return c.wait_exit(node, timeout_s=5.0)


def persisted(node: Node) -> dict[str, Any]:
    """state.json: term, vote and boot_epoch."""
    data: dict[str, Any] = json.loads((node.state_dir / "state.json").read_text(encoding="utf-8"))
    return data


def agreed_master(c: Cluster, among: Sequence[Node] | None = None) -> tuple[Node, int] | None:
    """The master every running node of ``among`` follows, in one term, if they all agree."""
    nodes = [n for n in (c.nodes if among is None else among) if n.running]
    sts = [c.status(n) for n in nodes]
    masters = {(s["master"], s["term"]) for s in sts if s is not None}
    if not nodes or None in sts or len(masters) != 1:
        return None
    name, term = masters.pop()
    master = next((n for n in nodes if n.name == name), None)
    st = None if master is None else c.status(master)
    return None if master is None or st is None or st["role"] != "master" else (master, int(term))


def wait_for_master(
    c: Cluster, timeout_s: float = 15.0, among: Sequence[Node] | None = None
) -> tuple[Node, int]:
    return c.wait_for(lambda: agreed_master(c, among), timeout_s, "a master all nodes follow")


def assert_all_running(c: Cluster) -> None:
    for node in c.nodes:
        code = node.proc and node.proc.returncode
        assert node.running, f"{node.name} exited with {code}:\n" + c.log(node)[-3000:]


def statuses(c: Cluster, nodes: Iterable[Node]) -> dict[str, Status]:
    """What each daemon says over its control socket, as the few fields these tests read. The
    counters are exact at the moment of the query: ``received`` counts every datagram, accepted
    (by type) or refused (by reason)."""
    out = {}
    for node in nodes:
        doc = c.query(node)
        counters = doc["counters"]
        rejected = counters["datagrams_rejected"]
        out[node.name] = {
            "role": doc["self"]["role"],
            "term": doc["cluster"]["term"],
            "master": doc["cluster"]["master"],
            "authenticated": doc["cluster"]["authenticated"],
            "send_key_id": doc["cluster"]["send_key_id"],
            "peer_key_ids": {m["id"]: m["key_id"] for m in doc["members"] if not m["self"]},
            # the peers it hears itself: a follower of a live master hears only the master
            "heard_key_ids": {m["id"]: m["key_id"] for m in doc["members"] if m["known_by"] == "heard"},
            "rejected": rejected,
            "received": sum(counters["datagrams_received"].values()) + sum(rejected.values()),
            "updated_monotonic": time.monotonic(),
        }
    return out


def rejected_total(st: Status) -> int:
    return sum(st["rejected"].values())


def accepted(st: Status) -> int:
    """Datagrams handed on to the core: received minus every rejected one."""
    return int(st["received"]) - rejected_total(st)


def delta(after: Status, before: Status) -> Counter[str]:
    diff: Counter[str] = Counter(after["rejected"])
    diff.subtract(before["rejected"])
    return +diff


def settle(
    c: Cluster, nodes: Sequence[Node], sent_to_each: int, before: dict[str, Status]
) -> dict[str, Status]:
    """Wait until every node has counted all we sent it, or counted nothing new for 0.3 s (the
    rest was dropped by a full socket buffer); return the statuses."""
    last: dict[str, tuple[float, int]] = {}
    done: dict[str, Status] = {}
    deadline = time.monotonic() + 15.0
    while len(done) < len(nodes):
        assert time.monotonic() < deadline, f"counters did not settle: {last}"
        for node in nodes:
            if node.name in done:
                continue
            st = statuses(c, [node])[node.name]
            counted = rejected_total(st) - rejected_total(before[node.name])
            prev = last.get(node.name)
            if counted >= sent_to_each or (
                prev is not None and st["updated_monotonic"] > prev[0] + 0.3 and counted == prev[1]
            ):
                done[node.name] = st
            elif prev is None or counted != prev[1]:
                last[node.name] = (st["updated_monotonic"], counted)
        time.sleep(0.05)
    return done


def logged_more(c: Cluster, node: Node, event: str, seen: int) -> Callable[[], bool | None]:
    """A probe: has ``node`` logged ``event`` more than ``seen`` times?"""
    return lambda: c.log(node).count(event) > seen or None


def assert_master(c: Cluster, master: Node, term: int) -> None:
    found = agreed_master(c)
    assert found is not None and found[0] is master and found[1] == term, (
        f"expected {master.name} master in term {term}: {[c.status(n) for n in c.nodes]}"
    )


# -- the attacks ------------------------------------------------------------------------------


@dataclass
class Attack:
    """One kind of hostile datagram, and the reasons each node must count for it: every reason in
    ``expect[node]`` must appear, and nothing outside ``expect[node] | allow``."""

    name: str
    datagrams: list[Datagram]
    expect: dict[str, set[str]]
    allow: set[str] = field(default_factory=set)


def protocol_messages(term: int, members: Sequence[str]) -> list[messages.Message]:
    """What an attacker wants a node to believe: grants, a master, a resignation, huge terms."""
    return [
        messages.VoteResponse(term=term, granted=True),
        messages.PreVoteResponse(term=term, granted=True, voter_term=term),
        messages.Heartbeat(term=term, master=True, round=term),
        messages.HeartbeatResponse(term=term, round=term),
        messages.VoteRequest(term=term),
        messages.PreVoteRequest(term=term),
        messages.Resign(term=term, successor=members[-1]),
    ]


def cycle_to(items: Sequence[bytes], n: int, rng: random.Random) -> list[bytes]:
    out = list(itertools.islice(itertools.cycle(items), n))
    rng.shuffle(out)
    return out


@dataclass
class Scene:
    """What the attacks are built from."""

    cluster: Cluster
    ring: KeyRing  # the real key
    fp: bytes  # the cluster fingerprint, read off a genuine datagram (it is not secret)
    epochs: dict[str, int]  # each member's current boot epoch, from its state.json
    early_life: list[Datagram]  # node 0's genuine datagrams from before its restart
    to_old_v: list[Datagram]  # the live nodes' genuine datagrams to V's earlier life
    cross_cluster: list[Datagram]  # what the test sent as a misconfigured V
    rng: random.Random

    def forged(self, keyring: KeyRing | None, term: int, sender: str | None = None) -> list[Datagram]:
        """``PER_KIND`` datagrams to each node, as a peer (or ``sender``), with envelope fields its
        replay guard would accept (current epochs, the right echo, fresh sequence numbers): only
        the key or the membership can refuse them."""
        members = self.cluster.members
        out: list[Datagram] = []
        for node in self.cluster.nodes:
            senders = [sender] if sender else [m for m in members if m != node.name]
            pool = []
            for i, (who, msg) in enumerate(itertools.product(senders, protocol_messages(term, members))):
                codec = Codec(
                    local=who, cluster_fp=self.fp, members=frozenset([*members, who]), keyring=keyring
                )
                for k in range(8):
                    pool.append(
                        codec.encode(
                            msg,
                            receiver=node.name,
                            sender_epoch=self.epochs.get(who, 1),
                            seq=10**12 + 8 * i + k,
                            echo_epoch=self.epochs[node.name],
                        )
                    )
            out += [(d, node.addr) for d in cycle_to(pool, PER_KIND, self.rng)]
        return out


def keyed_attacks(s: Scene) -> list[Attack]:
    nodes = s.cluster.nodes
    names = [n.name for n in nodes]
    rng = s.rng

    def everywhere(datagrams: Sequence[bytes]) -> list[Datagram]:
        return [(d, n.addr) for n in nodes for d in datagrams]

    def each(*reasons: str) -> dict[str, set[str]]:
        return {n: set(reasons) for n in names}

    # random bytes of random length up to 1500 (the limit is 1200)
    garbage = [os.urandom(rng.randrange(0, 1501)) for _ in range(PER_KIND)]
    # genuine datagrams cut short, and oversized datagrams up to the largest UDP payload
    genuine = [d for d, _ in s.early_life + s.to_old_v]
    cut = [d[: rng.randrange(0, len(d))] for d in cycle_to(genuine, PER_KIND // 2, rng)]
    big = [b"PQ\x02\x01" + s.fp + os.urandom(size - 12) for size in (1201, 1500, 4096, 9000, 30000, 65507)]
    oversized = [big[i % len(big)] for i in range(PER_KIND - len(cut))]
    # other versions, key ids we do not have, key id 0 with a random tail
    headers = []
    for _ in range(PER_KIND):
        choices = [(0, 1), (VERSION - 1, 1), (255, 1), (VERSION, rng.randrange(2, 256)), (VERSION, 0)]
        version, key_id = rng.choice(choices)  # VERSION - 1: an older pyquorum
        headers.append(b"PQ" + bytes((version, key_id)) + s.fp + os.urandom(rng.randrange(60, 200)))
    wrong = KeyRing(send_key_id=s.ring.send_key_id, keys={s.ring.send_key_id: secrets.token_bytes(32)})
    other_id = 200 if s.ring.send_key_id != 200 else 201
    unknown = KeyRing(send_key_id=other_id, keys={other_id: secrets.token_bytes(32)})
    stranger = f"127.0.0.1:{nodes[0].port}"

    def replay(name: str, captured: list[Datagram], at_receiver: str) -> Attack:
        # every captured datagram to every node: its own receiver, and the others
        expect: dict[str, set[str]] = {n: set() for n in names}
        for _, to in captured:
            for n in nodes:
                expect[n.name].add(at_receiver if n.addr == to else "wrong-receiver")
        pool = [d for d, _ in captured]
        return Attack(name, everywhere(cycle_to(pool, PER_KIND, rng)), expect)

    return [
        Attack(
            "garbage",
            everywhere(garbage),
            each("bad-magic", "too-large", "truncated"),
            allow={"bad-version", "unknown-key", "unauthenticated", "bad-mac"},  # random bytes "PQ..."
        ),
        Attack(
            "truncated-or-oversized", everywhere(cut + oversized), each("truncated", "bad-mac", "too-large")
        ),
        Attack(
            "bad-version-or-key-id",
            everywhere(headers),
            each("bad-version", "unknown-key", "unauthenticated"),
        ),
        Attack("wrong-key", s.forged(wrong, 5), each("bad-mac")),
        Attack("forged-grants-and-master-term-2**62-wrong-key", s.forged(wrong, HUGE_TERM), each("bad-mac")),
        Attack("key-id-not-ours", s.forged(unknown, HUGE_TERM), each("unknown-key")),
        Attack("unsigned-claiming-member", s.forged(None, HUGE_TERM), each("unauthenticated")),
        Attack(
            "former-member-right-key", s.forged(s.ring, HUGE_TERM, sender=stranger), each("unknown-sender")
        ),
        replay("replay-sender-earlier-life", s.early_life, "stale-epoch"),
        replay("replay-to-receiver-earlier-life", s.to_old_v, "bad-echo"),
        replay("replay-cross-cluster-after-restart", s.cross_cluster, "stale-epoch"),
    ]


# -- the tests --------------------------------------------------------------------------------


def test_flood_changes_nothing(tmp_path: Path, attacker: socket.socket) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    key_file = tmp_path / "cluster.key"
    keyfile.keygen(key_file)
    ring = keyfile.load_keyring(key_file)
    report = [f"seed={seed}"]
    with hostile_cluster(key_file) as c:
        n0, others = c.nodes[0], c.nodes[1:]

        # Phase 0: node 0's earlier life. The test holds nodes 1 and 2's addresses and keeps what
        # node 0, alone, sends them: genuine signed heartbeats and pre-vote requests.
        rec = Recorder(n.addr for n in others)
        try:
            c.start([n0])
            rec.record_until(
                lambda: all(sum(1 for _, to in rec.captured if to == n.addr) >= 8 for n in others),
                10.0,
                "node 0's datagrams from its earlier life",
            )
            assert stop(c, n0) == 0
            rec.drain()
        finally:
            rec.close()
        early_life = rec.captured
        fp = early_life[0][0][4:12]

        # Phase 1: the cluster; node 0 starts again, with a higher boot epoch
        c.start()
        master, term = wait_for_master(c)

        # Phase 2: stop a slave V and hold its address. As V, in V's current epoch, send the live
        # nodes cross-cluster datagrams (right key, another fingerprint); keep what they send V.
        v = next(n for n in c.nodes if n is not master)
        live = [n for n in c.nodes if n is not v]
        assert stop(c, v) == 0
        v_epoch = int(persisted(v)["boot_epoch"])
        other_fp = cluster_fingerprint(c.members, "heartbeat_interval_s=0.06 (a misconfigured node)")
        cross = Codec(local=v.name, cluster_fp=other_fp, members=frozenset(c.members), keyring=ring)
        msgs = itertools.cycle(protocol_messages(HUGE_TERM, c.members))
        cross_cluster = [
            (cross.encode(msg, receiver=n.name, sender_epoch=v_epoch, seq=2**40 + i, echo_epoch=0), n.addr)
            for i, msg in zip(range(PER_KIND), msgs, strict=False)
            for n in live
        ]
        before_cross = statuses(c, live)
        ours = Codec(local=v.name, cluster_fp=fp, members=frozenset(c.members), keyring=ring)
        rec = Recorder([v.addr])
        try:
            for i in range(0, len(cross_cluster), 64):
                send_paced(attacker, cross_cluster[i : i + 64], RATE * len(live))
                rec.drain()

            def decoded() -> list[tuple[str, WireMessage, bytes]]:
                out = []
                for data, _ in rec.captured:
                    env, msg = ours.decode(data)  # genuine: the real key verifies it
                    out.append((env.sender, msg, data))
                return out

            def enough() -> bool:
                # the master keeps sending V its heartbeats; a follower of a live master sends V
                # nothing (protocol.md §3.2) but answers V's cross-cluster datagrams with a ClusterInfo
                got = decoded()
                heartbeats = sum(1 for s, m, _ in got if s == master.name and not isinstance(m, ClusterInfo))
                return heartbeats >= 8 and all(
                    any(s == n.name and isinstance(m, ClusterInfo) for s, m, _ in got) for n in live
                )

            rec.record_until(enough, 10.0, "datagrams to V's earlier life, and ClusterInfo answers")
            captured = decoded()
        finally:
            rec.close()
        after_cross = settle(c, live, PER_KIND, before_cross)
        infos = Counter(s for s, m, _ in captured if isinstance(m, ClusterInfo))
        report.append(f"ClusterInfo answers received at V's address: {dict(infos)}")
        assert all(1 <= infos[n.name] <= 2 for n in live), f"ClusterInfo: one per 10 s each: {infos}"
        to_old_v = [(d, v.addr) for _, m, d in captured if not isinstance(m, ClusterInfo)]
        for n in live:
            got_cross = delta(after_cross[n.name], before_cross[n.name])
            report.append(f"cross-cluster-right-key ({PER_KIND}/node) at {n.name}: {dict(got_cross)}")
            assert set(got_cross) == {"cluster-mismatch"}, f"{n.name}: {got_cross}"
            lines = [ln for ln in c.log(n).splitlines() if "event=cluster_mismatch" in ln]
            assert 1 <= len(lines) <= 2, f"{n.name} logged cluster_mismatch {len(lines)} times"
        c.restart(v)
        c.wait_for(lambda: agreed_master(c), 10.0, "V back, following the master")
        assert_master(c, master, term)

        # Phase 3: the flood, one kind after the other
        epochs = {n.name: int(persisted(n)["boot_epoch"]) for n in c.nodes}
        attacks = keyed_attacks(Scene(c, ring, fp, epochs, early_life, to_old_v, cross_cluster, rng))
        time.sleep(0.6)  # the restart's handshake rejects ("bad-echo") are counted and written
        queues = udp_sockets()
        drops_before = {n.name: queues.get(n.addr, (0, 0))[1] for n in c.nodes}
        flood_start = time.monotonic()
        for attack in attacks:
            before = statuses(c, c.nodes)
            send_paced(attacker, attack.datagrams, RATE * len(c.nodes))
            after = settle(c, c.nodes, len(attack.datagrams) // len(c.nodes), before)
            row = []
            for n in c.nodes:
                got = delta(after[n.name], before[n.name])
                row.append(f"{n.ip}={dict(sorted(got.items()))}")
                missing = attack.expect[n.name] - set(got)
                stray = set(got) - attack.expect[n.name] - attack.allow
                assert not missing, f"{attack.name}: {n.name} counted {dict(got)}: nothing for {missing}"
                assert not stray, f"{attack.name}: {n.name} counted {dict(got)}: {stray} unexpected"
            report.append(f"{attack.name} ({len(attack.datagrams) // len(c.nodes)}/node): " + " ".join(row))

        queues = udp_sockets()
        drops = {n.ip: queues.get(n.addr, (0, 0))[1] - drops_before[n.name] for n in c.nodes}
        took = time.monotonic() - flood_start
        report.append(
            f"flood: {sum(len(a.datagrams) for a in attacks)} datagrams in {took:.1f}s "
            f"(with the pauses to read the counters); dropped by the kernel at the daemons' sockets: {drops}"
        )

        # Phase 4: nothing changed, everyone still listens, the logs stayed small
        assert_all_running(c)
        assert_master(c, master, term)
        sample = {name: accepted(st) for name, st in statuses(c, c.nodes).items()}
        time.sleep(1.2)
        for name, st in statuses(c, c.nodes).items():
            assert accepted(st) >= sample[name] + 10, f"{name} stopped accepting its peers: {st}"
            assert st["authenticated"] is True
        for n in c.nodes:
            text = c.log(n)
            assert "Traceback" not in text, text[-3000:]
            rejects = sum(1 for ln in text.splitlines() if "event=datagram_rejected" in ln)
            size = n.log_path.stat().st_size
            counted = statuses(c, [n])[n.name]["rejected"]
            report.append(f"{n.name}: {counted} reject log lines={rejects} log bytes={size}")
            assert rejects <= MAX_REJECT_LOG_LINES, f"{n.name} logged {rejects} rejects"
            assert size <= MAX_LOG_BYTES, f"{n.name}'s log is {size} bytes"
        reflected = pending(attacker)
        assert not reflected, f"{len(reflected)} datagrams were sent to the attacker's address"

        # Phase 5: the cluster still fails over
        c.shutdown(master)
        new_master, new_term = wait_for_master(c, 10.0, among=[n for n in c.nodes if n is not master])
        assert new_term > term
        assert c.wait_exit(master, timeout_s=5.0) == 0
        report.append(f"failover: {master.name} term {term} -> {new_master.name} term {new_term}")
    print("\n" + "\n".join(report))


def test_without_key_runs_unauthenticated(attacker: socket.socket) -> None:
    with hostile_cluster(None, verbosity=0) as c:  # the default log level
        # Read the fingerprint off a genuine datagram: hold node 2's address for a moment.
        rec = Recorder([c.nodes[2].addr])
        try:
            c.start(c.nodes[:2])
            rec.record_until(lambda: bool(rec.captured), 10.0, "a genuine datagram")
        finally:
            rec.close()
        fp = rec.captured[0][0][4:12]
        c.start(c.nodes[2:])
        master, term = wait_for_master(c)
        for name, st in statuses(c, c.nodes).items():
            assert st["authenticated"] is False and st["send_key_id"] is None, name
        for n in c.nodes:
            assert "cluster traffic is UNAUTHENTICATED" in c.log(n), c.log(n)

        # Without a key anyone can compute the CRC. A member is tied to its address instead.
        epochs = {n.name: int(persisted(n)["boot_epoch"]) for n in c.nodes}
        datagrams: list[Datagram] = []
        for n in c.nodes:
            peer = next(m for m in c.members if m != n.name)
            plain = Codec(local=peer, cluster_fp=fp, members=frozenset(c.members), keyring=None)
            signed = Codec(
                local=peer,
                cluster_fp=fp,
                members=frozenset(c.members),
                keyring=KeyRing(send_key_id=1, keys={1: secrets.token_bytes(32)}),
            )
            for i in range(PER_KIND // 4):
                hb = messages.Heartbeat(term=HUGE_TERM, master=True, round=i)
                env = {"sender_epoch": epochs[peer], "seq": 10**12 + i, "echo_epoch": epochs[n.name]}
                good = plain.encode(hb, receiver=n.name, **env)
                body = good[:-4]
                # msg_type, then the heartbeat's 19 bytes: term, master, round, a 1-byte live bitmap
                at = len(body) - 20
                datagrams += [
                    (d, n.addr)
                    for d in (
                        good,  # a member's heartbeat, term 2**62, from the attacker's address
                        signed.encode(hb, receiver=n.name, **env),
                        good[:-1] + bytes([good[-1] ^ 1]),
                        recrc(body[:at] + b"\x63" + body[at + 1 :]),  # message type 99
                        recrc(body[:-11] + b"\x02" + body[-10:]),  # master flag 2
                        recrc(body + b"\x00"),
                    )
                ]
        before = statuses(c, c.nodes)
        send_paced(attacker, datagrams, RATE * len(c.nodes))
        after = settle(c, c.nodes, len(datagrams) // len(c.nodes), before)
        expect = {"wrong-source", "unexpected-mac", "bad-checksum", "bad-type", "bad-field", "trailing-bytes"}
        for n in c.nodes:
            got = delta(after[n.name], before[n.name])
            print(f"no key, {n.name}: {dict(sorted(got.items()))}")
            assert set(got) == expect, f"{n.name}: {dict(got)}"
            assert "event=datagram_rejected reason=wrong-source" in c.log(n)
            assert "Traceback" not in c.log(n)
        assert_master(c, master, term)
        assert_all_running(c)
        assert not pending(attacker)


def test_key_rotation_with_sighup(tmp_path: Path, attacker: socket.socket) -> None:
    both = tmp_path / "keys"
    assert keyfile.keygen(both) == 1
    assert keyfile.keygen(both, add=True) == 2
    k1, k2 = key_lines(both)
    files = [tmp_path / f"node{i}.key" for i in range(3)]  # every host has its own copy
    for f in files:
        write_key_file(f, [k1])
    ring1 = keyfile.load_keyring(files[0])
    with hostile_cluster(files) as c:
        c.start()
        master, term = wait_for_master(c)
        before = statuses(c, c.nodes)

        def step(lines: list[str], sends: int, accepts: list[int]) -> None:
            for node, f in zip(c.nodes, files, strict=True):
                reloads = c.log(node).count("event=keys_reloaded")
                write_key_file(f, lines)
                os.kill(node.pid, signal.SIGHUP)
                c.wait_for(
                    logged_more(c, node, "event=keys_reloaded", reloads),
                    5.0,
                    f"{node.name} to reload its keys",
                )
                ids = ",".join(map(str, accepts))
                assert f"event=keys_reloaded send_key_id={sends} key_ids={ids}" in c.log(node)
                time.sleep(0.2)  # one node at a time, as an operator would
                assert_master(c, master, term)

            def peers_see_it() -> bool | None:
                # every node signs with `sends`, and every peer it hears does too: the master hears
                # both others (their acknowledgements), a follower the master (protocol.md §3.2)
                sts = statuses(c, c.nodes)
                return (
                    all(
                        st["send_key_id"] == sends
                        and st["heard_key_ids"]
                        and set(st["heard_key_ids"].values()) == {sends}
                        for st in sts.values()
                    )
                    and len(sts[master.name]["heard_key_ids"]) == 2
                ) or None

            # an operator checks this before the next step: on the master, every peer signs with `sends`
            c.wait_for(peers_see_it, 5.0, f"every node seeing its peers sign with key {sends}")

        step([k1, k2], 1, [1, 2])  # 1. add k2: accept both, still sign with k1
        step([k2, k1], 2, [1, 2])  # 2. switch: sign with k2, still accept k1
        step([k2], 2, [2])  # 3. retire k1
        assert_master(c, master, term)
        for name, st in statuses(c, c.nodes).items():
            got = delta(st, before[name])
            assert not set(got) & {"unknown-key", "bad-mac"}, f"{name} refused a peer's key: {got}"

        # The retired key is refused now, even on an otherwise fresh-looking vote grant.
        target = c.nodes[1]
        old = Codec(local=c.members[0], cluster_fp=bytes(8), members=frozenset(c.members), keyring=ring1)
        grant = messages.VoteResponse(term=HUGE_TERM, granted=True)
        grants = [
            old.encode(grant, receiver=target.name, sender_epoch=1, seq=i, echo_epoch=1) for i in range(50)
        ]
        before_t = statuses(c, [target])[target.name]
        send_paced(attacker, [(d, target.addr) for d in grants], RATE)
        c.wait_for(
            lambda: delta(statuses(c, [target])[target.name], before_t)["unknown-key"] >= 50 or None,
            5.0,
            "the retired key refused",
        )

        # A reload that would weaken the key file is refused: the node keeps its keys and runs.
        node = c.nodes[2]
        failures = c.log(node).count("event=reload_failed")
        write_key_file(files[2], [k2], mode=0o644)
        os.kill(node.pid, signal.SIGHUP)
        c.wait_for(logged_more(c, node, "event=reload_failed", failures), 5.0, "a refusal")
        assert f"chmod 600 {files[2]}" in c.log(node)
        time.sleep(0.3)
        assert_master(c, master, term)
        assert_all_running(c)
        for n in c.nodes:
            assert "Traceback" not in c.log(n)
            assert k1.split()[1] not in c.log(n) and k2.split()[1] not in c.log(n)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_refuses_key_file_readable_by_others(tmp_path: Path, mode: int) -> None:
    key_file = tmp_path / "cluster.key"
    keyfile.keygen(key_file)
    os.chmod(key_file, mode)
    with hostile_cluster(key_file) as c:
        node = c.nodes[0]
        proc = subprocess.run(node.argv, env=c.node_env(node), capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2, proc.stderr
        assert f"chmod 600 {key_file}" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert key_lines(key_file)[0].split()[1] not in proc.stderr + proc.stdout
        assert not (node.state_dir / "status.json").exists(), "it must refuse before it starts"
