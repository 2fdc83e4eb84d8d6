"""The systems the comparison runs on network-namespace hosts, each behind the same small interface.

What this owns. ``System`` is what the runner (compare.py) can do to any of them: start it on the
hosts of a ``Network`` with ``lanes`` independent copies of the job, tell which host runs each lane's
script, inject a fault into one host (``crash_host``, ``crash_daemon``, ``freeze``/``thaw``,
``planned_stop``; isolation is the runner's, with nftables), undo it (``restore``) and stop everything
(``close``). Three implementations:

- ``Pyquorum``: lane L is one cluster of the process harness (tests/harness/cluster.py: ``Cluster(n,
  Netns(net, port=7000 + L))``) at a given ``Timing``: the harness's daemon command line
  (``pyquorum._localcluster.daemon_argv``), its status reader and its fault methods (``crash``,
  ``pause``/``resume``, ``shutdown``, ``restart``). This is the only class that knows pyquorum.
- ``EtcdLock``: one etcd member per host (a 3-member cluster, clients on 10.99.0.i:2379, peers on
  :2380, etcd's default heartbeat 100 ms and election timeout 1000 ms) and, per host and lane,
  ``etcdctl --endpoints=<all three> lock --ttl T lane<L> -- <script>``.
- ``Keepalived``: one keepalived per host (VRRP only, unicast to the other hosts, advert_int 1,
  priority 150, 100, 50 on h1, h2, h3, state BACKUP with nopreempt), one vrrp_instance per lane
  (virtual_router_id 51 + L, virtual address 10.99.0.(100 + L) on eth0: inside the test subnet
  only), whose notify_master / notify_backup / notify_fault / notify_stop scripts start and stop
  the job.

Lanes. A lane is one copy of the job with its own lock (pyquorum cluster, etcd lock name, VRRP
instance). All lanes start on the same host and every fault hits a whole host, so one fault is one
trial in each lane whose script ran on that host: ``lanes`` trials for the price of one fault, which
is what makes 30 trials of a 10 s lease fit in minutes. The lanes' trials share the moment of the
fault and the state of the hosts; what differs between them is each lock's own phase (heartbeats,
lease renewals, adverts), which is what decides the failover.

The job. Every lane's job is the harness's workload (tests/harness/workload.py), and each lane has a
directory laid out as a harness cluster's: ``lane<L>/`` with the record (``workload.log``, lines
``<node> <pid> <t> <token> <event> [detail]``), ``exits.log`` and the register, followed by a
``RunMonitor`` (tests/harness/runs.py). The record's node names the host: pyquorum's daemon gives its
canonical id ``10.99.0.i:port``; etcdctl's and keepalived's jobs are given ``PYQUORUM_NODE=10.99.0.i``
(the workload reads the node from that variable alone). Their token is -1 (they have no fencing token
the workload reads): the harness's fencing checks are run on pyquorum's lanes only.

Processes. Everything started in host i runs under ``ip netns exec <ns of host i>``, in a session of
its own, with ``PYQUORUM_SWEEP_TAG=<that namespace>`` in its environment, which every descendant
inherits (etcd members, etcdctl, keepalived, its notify scripts, daemons, guards and scripts): the
harness's Netns backend tags pyquorum's processes the same way, so ``host_pids`` finds a whole host,
whatever lane or system started it, and ``close`` (and the next run's sweep, if this one was killed)
every process of the run. Processes die with the benchmark even if it is SIGKILLed
(PR_SET_PDEATHSIG=SIGKILL via ``setpriv``, as the harness starts its daemons). Nothing listens outside
the namespaces: etcd binds 10.99.0.i only, keepalived runs inside the host's namespace, and the range
10.99.0.0/24 exists only there.

Honest limits: keepalived's notify scripts are asynchronous (its maintainer says their order is not
deterministic); they take a lock per lane so a start and a stop never interleave, but a stop may run
before a start it was meant to follow. etcd is given no TLS and no authentication, like pyquorum's
runs here are given a key: neither changes the timing studied.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

from compare_report import Run

from pyquorum import keyfile
from pyquorum._localcluster import daemon_argv
from pyquorum.core.lease import Timing

# The pieces of the process harness this benchmark reuses, all imported here and nowhere else in bench/.
from tests.harness.cluster import (
    LIVE_LINE_AGE_S,
    PDEATHSIG,
    Cluster,
    ClusterError,
    Netns,
    Node,
    install_workload,
)
from tests.harness.procfs import (
    TAG_VAR,
    alive,
    cmdline,
    freeze,
    signal_all,
    stopped,
    sweep,
    sweep_stale,
    tagged_pids,
    wait_until,
)
from tests.harness.runs import (
    RECORD,
    REGISTER,
    RunMonitor,
    overlaps,
    read_register,
    run_problems,
    start_monitor,
)
from tests.harness.workload import RECORD_VAR, REGISTER_VAR
from tests.netns import hosts
from tests.netns.hosts import PREFIX, Network, exclusive, namespaces

__all__ = [
    "FAILURES",
    "PREFIX",
    "BenchError",
    "EtcdLock",
    "Keepalived",
    "Lab",
    "Pyquorum",
    "System",
    "alive",
    "exclusive",
    "install_packages",
    "missing_packages",
    "namespaces",
    "signal_all",
    "tagged_pids",
    "unavailable",
    "versions",
    "wait_for",
]

PYQUORUM_PORT = 7000  # lane L's cluster on port 7000 + L
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
KEEPALIVED_ADVERT_INT_S = 1.0
# Distinct priorities, as keepalived's examples give them: when the master fails, the best backup's
# master-down timer (3 adverts + skew, skew = (256 - priority)/256 s) fires first and only it takes
# over. 150, 100, 50 on h1, h2, h3 put 0.2 s between the timers: with 10 apart (39 ms) a loaded host
# sometimes let the lower backup win, which nopreempt then keeps.
KEEPALIVED_PRIORITY = 150
KEEPALIVED_PRIORITY_STEP = 50
VRID_BASE = 51
VIP_BASE = 100  # lane L's virtual address is 10.99.0.(100 + L)
# What the notify script allows the job between SIGTERM and SIGKILL: pyquorum's default stop timeout.
NOTIFY_STOP_GRACE_S = 0.5
DEBIAN_PACKAGES = {"etcd": "etcd-server", "etcdctl": "etcd-client", "keepalived": "keepalived"}
NODE_VAR = "PYQUORUM_NODE"  # the workload's node field: for the other systems' jobs, the host's address


class BenchError(RuntimeError):
    """A system could not be started or brought back; the message says which and why."""


# What ends one system's run but not the benchmark's: its own failures and the harness's (a wait that
# timed out, a fault that did not take effect: ClusterError and its FaultFailed).
FAILURES: tuple[type[Exception], ...] = (BenchError, ClusterError)


def wait_for(what: str, predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.01) -> None:
    give_up = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > give_up:
            raise BenchError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def _env_var(pid: int, name: str) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None
    prefix = f"{name}=".encode()
    return next((v[len(prefix) :].decode() for v in env if v.startswith(prefix)), None)


# ---- Debian packages ----------------------------------------------------------------------------


def missing_packages() -> list[str]:
    """The Debian packages whose commands are not on PATH."""
    return sorted({pkg for cmd, pkg in DEBIAN_PACKAGES.items() if shutil.which(cmd) is None})


def install_packages(log: Callable[[str], None]) -> None:
    """apt-get install what is missing (as root), after checking with apt-cache policy that each has a
    candidate. Services are kept from starting while installing (a policy-rc.d that says no, unless
    one exists): the benchmark runs its own instances inside the namespaces, never Debian's."""
    need = missing_packages()
    if not need:
        return
    if os.geteuid() != 0:
        raise BenchError(f"missing {' '.join(need)} and not root: apt-get install -y {' '.join(need)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def candidates() -> dict[str, str]:
        out = subprocess.run(
            ["apt-cache", "policy", *need], capture_output=True, text=True, env=env, check=False
        ).stdout
        found, pkg = {}, ""
        for line in out.splitlines():
            if line and not line.startswith(" "):
                pkg = line.rstrip(":")
            elif line.strip().startswith("Candidate:"):
                found[pkg] = line.split(":", 1)[1].strip()
        return found

    have = candidates()
    if any(have.get(p, "(none)") == "(none)" for p in need):
        log("apt-get update (no candidate yet for " + ", ".join(need) + ")")
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, capture_output=True)
        have = candidates()
    none = [p for p in need if have.get(p, "(none)") == "(none)"]
    if none:
        raise BenchError(f"apt-cache policy: no installation candidate for {' '.join(none)}")
    log("installing " + ", ".join(f"{p} {have[p]}" for p in need))
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:
        policy.write_text("#!/bin/sh\n# bench/compare.py: no service starts while it installs\nexit 101\n")
        policy.chmod(0o755)
    try:
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", *need], env=env, check=True, capture_output=True, text=True
        )
    except subprocess.CalledProcessError as exc:
        raise BenchError(f"apt-get install {' '.join(need)} failed: {exc.stderr.strip()[-400:]}") from exc
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)
    if missing_packages():
        raise BenchError(f"installed {' '.join(need)} but {missing_packages()} still missing")


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for name, argv in (("etcd", ["etcd", "--version"]), ("keepalived", ["keepalived", "--version"])):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
            text = (proc.stdout + proc.stderr).strip().splitlines()
            out[name] = text[0] if text else "?"
    return out


# ---- the lab: networks, files, clean-up ---------------------------------------------------------


class Lab:
    """This run's networks, temp dir and key. ``close()`` removes everything it made; creating one
    first removes what runs that were SIGKILLed left (their processes, namespaces and temp dirs, found
    by the dead pid in their names; a live run's are never touched)."""

    def __init__(self) -> None:
        sweep_stale(PREFIX)
        hosts.sweep()
        for path in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
            owner = path.name[len(PREFIX) :].split("x", 1)[0]
            if path.is_dir() and owner.isdigit() and not Path(f"/proc/{owner}").exists():
                shutil.rmtree(path, ignore_errors=True)
        self.run = hosts.run_id()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{self.run}-"))
        self.key_file = self.tmp / "cluster.key"
        keyfile.keygen(self.key_file)
        self.networks: dict[int, Network] = {}

    def network(self, n: int) -> Network:
        if n not in self.networks:
            net = Network(self.run, n)
            net.create()
            self.networks[n] = net
        return self.networks[n]

    def leftovers(self) -> tuple[list[int], list[str]]:
        prefix = f"{PREFIX}{self.run}-"
        return list(tagged_pids(prefix)), [ns for ns in namespaces() if ns.startswith(prefix)]

    def close(self) -> str:
        sweep(f"{PREFIX}{self.run}-", timeout_s=5.0)
        for net in self.networks.values():
            net.destroy()
        shutil.rmtree(self.tmp, ignore_errors=True)
        pids, names = self.leftovers()
        return f"clean-up: {len(pids)} processes and {len(names)} namespaces of run {self.run} left"


def unavailable() -> str | None:
    """None if this machine can run the benchmark (root, ip, nft, namespaces), else why not."""
    return hosts.why_unavailable()


# ---- the interface ------------------------------------------------------------------------------


class System(abc.ABC):
    """One system on ``net`` with ``lanes`` copies of the job; files in ``workdir``, lane L's record
    in ``workdir/lane<L>`` (``lane_dir``). A subclass sets ``monitors``: one ``RunMonitor`` per lane."""

    kind: ClassVar[str]

    def __init__(self, name: str, net: Network, workdir: Path, lanes: int) -> None:
        self.name = name
        self.net = net
        self.lanes = lanes
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.monitors: list[RunMonitor] = []
        self._hosts = {net.ip(h): h for h in net.hosts}

    def lane_dir(self, lane: int) -> Path:
        return self.workdir / f"lane{lane}"

    # ---- what the runner uses -----------------------------------------------------------------------

    @abc.abstractmethod
    def start(self) -> None:
        """Start everything; return once every lane's script runs (on the lowest host, see lanes)."""

    @abc.abstractmethod
    def agents(self, host: int) -> list[int]:
        """The live pids of this system's daemon on ``host`` (every lane's): what a daemon crash kills."""

    @abc.abstractmethod
    def crash_host(self, host: int) -> str:
        """kill -9 of everything on ``host`` at one moment; return evidence, raise if not injected."""

    @abc.abstractmethod
    def crash_daemon(self, host: int) -> str:
        """kill -9 of the daemon(s) on ``host`` (every lane's) at one moment; return evidence."""

    @abc.abstractmethod
    def freeze(self, host: int) -> str:
        """SIGSTOP of the daemon(s) on ``host``; return evidence."""

    @abc.abstractmethod
    def thaw(self, host: int) -> None:
        """SIGCONT of what ``freeze`` stopped."""

    @abc.abstractmethod
    def planned_stop(self, host: int) -> str:
        """Stop the daemon(s) on ``host`` the way the system's documentation says; return evidence."""

    @abc.abstractmethod
    def restore(self, host: int, fault: str) -> None:
        """After ``fault`` on ``host`` was undone: start again whatever of this host is not running
        and return once every lane is back to full strength (every host can take over again)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop every process of this system and its monitors; its files stay."""

    @abc.abstractmethod
    def successor_timeout_s(self) -> float:
        """How long to wait for a successor after a fault before calling the trial a failure."""

    @abc.abstractmethod
    def period_s(self) -> float:
        """The system's own renewal period: faults are injected at a random phase within it."""

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """How this system is configured, for results.json and docs/benchmarks.md."""

    def problems(self) -> list[str]:
        """Alarms in the system's own logs (tracebacks, internal errors)."""
        return []

    def context(self) -> str:
        """State worth recording just before a fault (read before the clock starts)."""
        return ""

    def extras(self, lane: int, runs: list[tuple[int, float]]) -> list[int]:
        """Of ``lane``'s scripts (pid, start) still alive after a round, the ones the benchmark ends:
        all but the newest, unless the system can say which one holds the lock."""
        return [pid for pid, _ in sorted(runs, key=lambda r: r[1])[:-1]]

    # ---- the job's runs, from the harness's monitors ----------------------------------------------

    def host_of(self, node: str) -> int:
        """The host a record's node field names: ``10.99.0.i:port`` (pyquorum) or ``10.99.0.i``."""
        host = self._hosts.get(node.rsplit(":", 1)[0] if ":" in node else node)
        if host is None:
            raise BenchError(
                f"{self.name}: a record names node {node!r}, which is no host of {self.net.base}"
            )
        return host

    def runs(self) -> list[Run]:
        """Every lane's runs so far, each on its host and lane (tests/harness/runs.py ``Run``: from its
        start line until its process was gone, None while it runs)."""
        return [
            Run(self.host_of(r.node), lane, r.pid, r.start, r.last, r.end)
            for lane, monitor in enumerate(self.monitors)
            for r in monitor.runs()
        ]

    def monitor_max_gap_s(self) -> float:
        """The longest wake-up gap of any lane's monitor: the most by which an end can be late."""
        return max((m.max_gap_s for m in self.monitors), default=0.0)

    def live(self) -> dict[int, list[int]]:
        """lane -> hosts whose script in that lane is alive and wrote a line within LIVE_LINE_AGE_S."""
        out: dict[int, list[int]] = {lane: [] for lane in range(self.lanes)}
        now = time.monotonic()
        for r in self.runs():
            if r.end is None and now - r.last <= LIVE_LINE_AGE_S:
                out[r.lane].append(r.host)
        return out

    def live_pids(self) -> dict[int, list[tuple[int, float]]]:
        """lane -> (pid, start) of every script not seen gone, whatever it last wrote."""
        out: dict[int, list[tuple[int, float]]] = {lane: [] for lane in range(self.lanes)}
        for r in self.runs():
            if r.end is None:
                out[r.lane].append((r.pid, r.start))
        return out

    def steady(self) -> bool:
        """Every lane has exactly one live script."""
        return all(len(h) == 1 for h in self.live().values())

    def host_pids(self, host: int) -> dict[int, str]:
        """Every live process of ``host``, whichever system or lane started it (tagged with its
        namespace's name): pid -> tag."""
        ns = self.net.ns(host)
        return {p: tag for p, tag in tagged_pids(ns).items() if tag == ns}

    def wait_all_lanes_on(self, host: int, timeout_s: float) -> None:
        wait_for(
            f"{self.name}: every lane's script to run on h{host}",
            lambda: all(hs == [host] for hs in self.live().values()),
            timeout_s,
        )

    def stop_monitors(self) -> None:
        """Let every monitor see the last ends (up to 3 s), then stop them."""
        give_up = time.monotonic() + 3.0
        while any(m.unended() for m in self.monitors) and time.monotonic() < give_up:
            time.sleep(0.01)
        for m in self.monitors:
            m.stop()


# ---- pyquorum -----------------------------------------------------------------------------------


class Pyquorum(System):
    """pyquorum: lane L is a harness ``Cluster`` on the hosts' port 7000 + L (see the docstring)."""

    kind = "pyquorum"

    def __init__(
        self, name: str, net: Network, workdir: Path, lanes: int, timing: Timing, key_file: Path
    ) -> None:
        super().__init__(name, net, workdir, lanes)
        self.timing = timing
        self.clusters: list[Cluster] = []
        for lane in range(lanes):
            backend = Netns(net, port=PYQUORUM_PORT + lane)
            cluster = Cluster(net.n, backend, timing=timing, keys=key_file, directory=self.lane_dir(lane))
            self.clusters.append(cluster)
        self.monitors = [c.monitor for c in self.clusters]

    def _nodes(self, host: int) -> list[tuple[Cluster, Node]]:
        """Every lane's node on ``host`` (node i of a cluster is host i: Netns orders them so)."""
        return [(c, c.nodes[host - 1]) for c in self.clusters]

    def _wait_statuses(self, nodes: list[tuple[Cluster, Node]], what: str) -> None:
        for c, n in nodes:
            c.wait_for(partial(c.status, n), 30.0, f"{what}: status of {n}")

    def start(self) -> None:
        # h1's daemons start first, so h1 usually wins every lane; a start-up race that another host
        # won is undone by a planned stop of that lane's master: the lowest address proposes first
        # (README "How the election works"), so h1 takes over. Aligned lanes make every fault a trial
        # in every lane.
        for c in self.clusters:
            c.start(c.nodes[:1], wait=False)
        self._wait_statuses(self._nodes(1), f"{self.name}: h1's daemons up")
        for c in self.clusters:
            c.start(c.nodes[1:], wait=False)
        wait_for(f"{self.name}: one script per lane", self.steady, 30.0)
        for _ in range(5):
            wrong = {lane: hs[0] for lane, hs in self.live().items() if hs != [1]}
            if not wrong:
                break
            for lane, h in wrong.items():
                c = self.clusters[lane]
                c.shutdown(c.nodes[h - 1])
                c.wait_exit(c.nodes[h - 1], 10.0)
            wait_for(f"{self.name}: one script per lane", self.steady, 30.0)
            for h in set(wrong.values()):
                self.restore(h, "align")
        self.wait_all_lanes_on(1, 30.0)
        wait_for(f"{self.name}: every node to follow a master", self._all_follow, 30.0, 0.05)

    def _follows(self, c: Cluster, n: Node) -> bool:
        st = c.status(n)
        return st is not None and st.get("role") == "slave" and bool(st.get("master"))

    def _all_follow(self) -> bool:
        """Every lane has a master and each of its other nodes follows one."""
        for c in self.clusters:
            master = c.master()
            if master is None or not all(self._follows(c, n) for n in c.nodes if n is not master):
                return False
        return True

    def agents(self, host: int) -> list[int]:
        return [n.pid for _, n in self._nodes(host) if n.running]

    def crash_host(self, host: int) -> str:
        # Lane 0's harness crash freezes and kills every process tagged with the host's namespace,
        # which is every lane's (Netns tags by host): one moment for all. The other lanes' daemons
        # are then reaped as expected exits.
        (first, node), *rest = self._nodes(host)
        first.crash(node, host=True)
        codes = {str(n): c.wait_exit(n, 10.0) for c, n in rest}
        if any(code != -signal.SIGKILL for code in codes.values()):
            raise BenchError(f"h{host}: host crash: the other lanes' daemons exited {codes}")
        return first.evidence + (
            f"; the other lanes' daemons: exit {sorted(set(codes.values()))}" * bool(rest)
        )

    def crash_daemon(self, host: int) -> str:
        # every lane's daemon SIGSTOPped first, so none acts on the others' deaths: one moment
        nodes = self._nodes(host)
        for c, n in nodes:
            c.pause(n)
        evidence = []
        for c, n in nodes:
            c.crash(n)
            evidence.append(c.evidence)
        return "SIGSTOPped, then " + "; ".join(evidence)

    def freeze(self, host: int) -> str:
        evidence = []
        for c, n in self._nodes(host):
            c.pause(n)
            evidence.append(c.evidence)
        return "; ".join(evidence)

    def thaw(self, host: int) -> None:
        for c, n in self._nodes(host):
            c.resume(n)

    def planned_stop(self, host: int) -> str:
        pids = []
        for c, n in self._nodes(host):
            c.shutdown(n)
            pids.append(n.pid)
        return f"SIGTERM to daemon pids {pids}"

    def restore(self, host: int, fault: str) -> None:
        restarted = []
        for c, n in self._nodes(host):
            if n.expect_exit:  # crashed or stopped: reaped (a planned stop may still be under way)
                c.wait_exit(n, 30.0)
            if not n.running:
                c.restart(n, wait=False)
                restarted.append((c, n))
        self._wait_statuses(restarted, f"{self.name}: h{host} restarted")
        wait_for(
            f"{self.name}: h{host} to follow a master again",
            lambda: all(self._follows(c, n) for c, n in self._nodes(host)),
            30.0,
            0.05,
        )
        if restarted:
            # a restarted node grants no vote for one election timeout (protocol.md §3.6, the restart
            # embargo): the next fault must find every node able to vote
            time.sleep(self.timing.election_timeout_s * 1.2)

    def close(self) -> None:
        # Each cluster's close kills its daemons, sweeps every process of its hosts (so lane 0's
        # takes every lane's: they share the hosts' tags), stops its monitor and heals the network.
        for c in self.clusters:
            c.close()

    def successor_timeout_s(self) -> float:
        return self.timing.failover_bound_s() + 5.0

    def period_s(self) -> float:
        return self.timing.heartbeat_interval_s

    def config(self) -> dict[str, Any]:
        t = self.timing
        argv = daemon_argv(
            "IP:PORT", ["PEERS"], Path("STATE"), script=Path("SCRIPT"), key_file=Path("K"), timing=t
        )
        return {
            "system": self.name,
            "kind": self.kind,
            "nodes": self.net.n,
            "lanes": self.lanes,
            "heartbeat_interval_s": t.heartbeat_interval_s,
            "election_timeout_s": t.election_timeout_s,
            "stop_timeout_s": t.stop_timeout_s,
            "failover_bound_s": round(t.failover_bound_s(), 3),
            "documented_failover_s": round(t.failover_bound_s(), 3),
            "documented_as": "Timing.failover_bound_s() (protocol.md §5.1)",
            "command": " ".join(["pyquorum", *argv[3:]]),  # argv[:3]: this Python -m pyquorum
        }

    def problems(self) -> list[str]:
        """Alarms in the daemons' logs, and the harness's own checks of every lane's runs: no two
        overlapped, the token rose from run to run, one node per token, the register held
        (tests/harness/runs.py, protocol.md §6)."""
        found = []
        for lane, c in enumerate(self.clusters):
            for n in c.nodes:
                text = c.log(n)
                for alarm in ("Traceback", "event=internal_error", "event=fatal"):
                    if alarm in text:
                        found.append(f"{self.name} lane {lane} {n.log_path.name}: {alarm}")
            runs = c.runs()
            found += [
                f"{self.name} lane {lane}: overlap: {b} started before {a} was gone"
                for a, b in overlaps(runs)
            ]
            found += [f"{self.name} lane {lane}: {p}" for p in run_problems(runs, read_register(c.dir))]
        return found


# ---- what the other systems share: processes started here, the job started by them ------------


class Spawned(System):
    """A system whose processes this class starts (in the hosts' namespaces) and whose lock starts
    the job, with the record of its lane in the job's environment (``lane_env``)."""

    def __init__(self, name: str, net: Network, workdir: Path, lanes: int) -> None:
        super().__init__(name, net, workdir, lanes)
        self.script = install_workload(workdir / "workload")
        for lane in range(lanes):
            self.lane_dir(lane).mkdir(exist_ok=True)
        self.monitors = [start_monitor(self.lane_dir(lane)) for lane in range(lanes)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self._frozen: list[int] = []

    def env(self, host: int, lane: int | None = None) -> dict[str, str]:
        env = {**os.environ, TAG_VAR: self.net.ns(host)}
        if lane is not None:
            env.update(self.lane_env(host, lane))
        return env

    def lane_env(self, host: int, lane: int) -> dict[str, str]:
        """What the job of ``lane`` on ``host`` needs: its node (the host's address), its lane's
        record and register (tests/harness/workload.py)."""
        d = self.lane_dir(lane)
        return {NODE_VAR: self.net.ip(host), RECORD_VAR: str(d / RECORD), REGISTER_VAR: str(d / REGISTER)}

    def spawn(self, host: int, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        """Start ``argv`` in host's namespace, in its own session, dying with the benchmark."""
        with open(log, "ab") as out:
            out.write(f"=== bench: start at {time.monotonic():.6f}: {' '.join(argv)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.net.ns(host), *PDEATHSIG, *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def reap(self) -> None:
        """Collect the exit status of our own children that have ended (no zombies of ours)."""
        self.procs = [p for p in self.procs if p.poll() is None]

    def _kill_frozen(self, pids: list[int]) -> bool:
        # SIGSTOP first, so that none of them can act on the others' deaths, then SIGKILL: one moment.
        signal_all(pids, signal.SIGSTOP)
        signal_all(pids, signal.SIGKILL)
        gone = wait_until(pids, "gone", 5.0)
        self.reap()
        return gone

    def crash_host(self, host: int) -> str:
        """Every process of the host frozen (procfs.freeze: until no new one appears), then all
        SIGKILLed at one moment, as the harness crashes a host."""
        frozen = sorted(freeze(partial(self.host_pids, host)))
        if not frozen or not self._kill_frozen(frozen):
            raise BenchError(f"h{host}: host crash not injected ({len(frozen)} processes found)")
        return f"froze and SIGKILLed {len(frozen)} processes of h{host}: all gone"

    def crash_daemon(self, host: int) -> str:
        pids = self.agents(host)
        if not pids or not self._kill_frozen(pids):
            raise BenchError(f"h{host}: daemon crash not injected (pids {pids})")
        return f"froze and SIGKILLed daemon pids {pids}: gone"

    def freeze(self, host: int) -> str:
        pids = self.agents(host)
        signal_all(pids, signal.SIGSTOP)
        if not pids or not wait_until(pids, "stopped", 2.0) or not all(stopped(p) for p in pids):
            raise BenchError(f"h{host}: freeze not injected (pids {pids})")
        self._frozen = pids
        return f"SIGSTOPped daemon pids {pids}: state T"

    def thaw(self, host: int) -> None:
        signal_all(self._frozen, signal.SIGCONT)
        self._frozen = []

    def close(self) -> None:
        """Stop every daemon (SIGTERM, 5 s), then SIGKILL whatever of this network is left."""
        try:
            for h in self.net.hosts:
                signal_all([p for p in self.agents(h) if stopped(p)], signal.SIGCONT)
            self._graceful_stop()
        finally:
            sweep(f"{self.net.base}-", timeout_s=5.0)
            for p in self.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
            self.reap()
            self.stop_monitors()

    def _graceful_stop(self) -> None:
        procs = [p for p in self.procs if p.poll() is None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        give_up = time.monotonic() + 5.0
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, give_up - time.monotonic()))


# ---- etcdctl lock -------------------------------------------------------------------------------


class EtcdLock(Spawned):
    """A 3-member etcd cluster on the hosts and ``etcdctl lock --ttl T`` per host and lane."""

    kind = "etcd"

    def __init__(self, name: str, net: Network, workdir: Path, lanes: int, ttl_s: int | None) -> None:
        """``ttl_s=None``: find the smallest TTL the cluster grants as requested (``probe_ttl``) once
        the members are up, use it, and rename the system after it (``etcd-ttl<T>-3``)."""
        super().__init__(name, net, workdir, lanes)
        self.ttl_s = ttl_s or 0
        self.ttl_probe: dict[int, int | None] = {}
        self.members: dict[int, subprocess.Popen[bytes]] = {}
        self.lockers: dict[tuple[int, int], subprocess.Popen[bytes]] = {}
        self.endpoints = ",".join(f"http://{net.ip(h)}:{ETCD_CLIENT_PORT}" for h in net.hosts)

    def _start_member(self, host: int) -> None:
        ip = self.net.ip(host)
        cluster = ",".join(f"h{h}=http://{self.net.ip(h)}:{ETCD_PEER_PORT}" for h in self.net.hosts)
        argv = [
            "etcd", "--name", f"h{host}", "--data-dir", str(self.workdir / f"etcd-data-h{host}"),
            "--listen-peer-urls", f"http://{ip}:{ETCD_PEER_PORT}",
            "--initial-advertise-peer-urls", f"http://{ip}:{ETCD_PEER_PORT}",
            "--listen-client-urls", f"http://{ip}:{ETCD_CLIENT_PORT}",
            "--advertise-client-urls", f"http://{ip}:{ETCD_CLIENT_PORT}",
            "--initial-cluster", cluster, "--initial-cluster-state", "new",
            "--initial-cluster-token", f"bench-{self.net.base}",
        ]  # fmt: skip
        self.members[host] = self.spawn(host, argv, self.env(host), self.workdir / f"etcd-h{host}.log")

    def _start_locker(self, host: int, lane: int) -> None:
        argv = [
            "etcdctl", f"--endpoints={self.endpoints}", "lock", f"--ttl={self.ttl_s}", f"lane{lane}",
            "--", str(self.script),
        ]  # fmt: skip
        log = self.workdir / f"h{host}.l{lane}.log"
        self.lockers[(host, lane)] = self.spawn(host, argv, self.env(host, lane), log)

    def etcdctl(self, host: int, *args: str, timeout_s: float = 10.0) -> str:
        """Run one etcdctl command in host's namespace; its stdout ('' on failure)."""
        try:
            proc = subprocess.run(
                ["ip", "netns", "exec", self.net.ns(host), "etcdctl", f"--endpoints={self.endpoints}", *args],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                env=self.env(host),
                check=False,
            )
        except subprocess.TimeoutExpired:
            return ""
        return proc.stdout if proc.returncode == 0 else ""

    def _healthy(self) -> bool:
        out = self.etcdctl(1, "endpoint", "health", "-w", "json", timeout_s=5.0)
        try:
            rows = json.loads(out) if out else []
        except ValueError:
            return False
        return len(rows) == self.net.n and all(r.get("health") for r in rows)

    def _all_queued(self, count: int) -> bool:
        return all(self._queued(lane) == count for lane in range(self.lanes))

    def _queued(self, lane: int) -> int:
        out = self.etcdctl(1, "get", "--prefix", f"lane{lane}/", "--keys-only", timeout_s=5.0)
        return sum(1 for line in out.splitlines() if line.strip())

    def probe_ttl(self) -> int:
        """Ask for leases of 1..5 s and return the smallest TTL granted as requested. etcd raises a
        TTL below its minimum (1.5 election timeouts, rounded up to whole seconds) without an error;
        ``ttl_probe`` keeps what was granted for each request."""
        self.ttl_probe = {t: self.granted_ttl_s(t) for t in range(1, 6)}
        for requested, granted in sorted(self.ttl_probe.items()):
            if granted == requested:
                return requested
        raise BenchError(f"etcd granted no TTL as requested: {self.ttl_probe}")

    def granted_ttl_s(self, requested_s: int) -> int | None:
        """What the cluster grants for ``lease grant requested_s``: etcd raises a TTL below its minimum."""
        out = self.etcdctl(1, "lease", "grant", str(requested_s))
        # "lease 694d77aa9e38260f granted with TTL(2s)"
        if "TTL(" not in out:
            return None
        return int(out.split("TTL(", 1)[1].split("s)", 1)[0])

    def start(self) -> None:
        for h in self.net.hosts:
            self._start_member(h)
        wait_for(f"{self.name}: etcd cluster health", self._healthy, 60.0, 0.2)
        if not self.ttl_s:
            self.ttl_s = self.probe_ttl()
            self.name = f"etcd-ttl{self.ttl_s}-{self.net.n}"
        for i, h in enumerate(self.net.hosts, start=1):
            for lane in range(self.lanes):
                self._start_locker(h, lane)
            # FIFO by key creation: h1 holds every lane, h2 is next in every queue, then h3
            what = f"{self.name}: h{h}'s etcdctl in every lane's queue"
            wait_for(what, partial(self._all_queued, i), 30.0, 0.1)
        self.wait_all_lanes_on(1, 30.0)

    def agents(self, host: int) -> list[int]:
        return [p.pid for (h, _), p in self.lockers.items() if h == host and p.poll() is None]

    def planned_stop(self, host: int) -> str:
        # etcdctl catches SIGTERM and only cancels a context while its command runs: SIGTERM to
        # etcdctl alone stops nothing. A service manager stops the whole group (systemd's default
        # KillMode=control-group): the command exits, etcdctl unlocks and exits. That is done here.
        groups = self.agents(host)
        for pid in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
        return f"SIGTERM to the process groups of etcdctl {groups} (etcdctl and its command)"

    def restore(self, host: int, fault: str) -> None:
        """Restart the member if it is down; keep each lane's true lock holder (its script's
        ETCD_LOCK_KEY is the lane's first key) and queue every other etcdctl again, host by host.
        An etcdctl's session can expire while it waits or while it holds the lock (its host frozen
        or cut off, or its gRPC connection stuck on a member that was), and etcdctl neither notices
        nor exits: only a fresh one is surely in the queue. Each lane's queue is rebuilt in the same
        order (holder, then the other hosts from h1 up), so the lanes stay aligned."""
        if self.members[host].poll() is not None:
            self.reap()
            self._start_member(host)
        wait_for(f"{self.name}: etcd cluster health after h{host}", self._healthy, 60.0, 0.2)
        keep = {lane: h for lane in range(self.lanes) if (h := self._true_holder(lane)) is not None}
        stale = [key for key, p in self.lockers.items() if keep.get(key[1]) != key[0] and p.poll() is None]
        for h, lane in stale:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.lockers[(h, lane)].pid, signal.SIGTERM)
        for h, lane in stale:
            proc = self.lockers[(h, lane)]
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        self.reap()
        first = collections.Counter(keep.values()).most_common(1)[0][0] if keep else self.net.hosts[0]
        orders = {}
        for lane in range(self.lanes):
            holder = keep.get(lane, first)
            orders[lane] = [holder, *(h for h in self.net.hosts if h != holder)]
        try:
            wanted = {lane: int(lane in keep) for lane in range(self.lanes)}
            wait_for(f"{self.name}: stale keys gone", lambda: self._queues() == wanted, 30.0, 0.1)
            for k in range(self.net.n):
                for lane, order in orders.items():
                    if not (k == 0 and lane in keep):
                        self._start_locker(order[k], lane)
                wait_for(f"{self.name}: queues of {k + 1}", partial(self._all_queued, k + 1), 30.0, 0.1)
        except BenchError as exc:
            running = {f"h{h}.l{lane}": p.poll() is None for (h, lane), p in self.lockers.items()}
            raise BenchError(f"{exc}: keys per lane {self._queues()}; etcdctl running {running}") from exc

    def _queues(self) -> dict[int, int]:
        return {lane: self._queued(lane) for lane in range(self.lanes)}

    def _owner_key(self, lane: int) -> str | None:
        """The lane's first key by creation: the lock's owner (concurrency.Mutex)."""
        out = self.etcdctl(1, "get", "--prefix", f"lane{lane}/", "--keys-only", "--sort-by=CREATE")
        keys = [line.strip() for line in out.splitlines() if line.strip()]
        return keys[0] if keys else None

    def _true_holder(self, lane: int) -> int | None:
        """The host whose live script in ``lane`` was given the owner key, or None."""
        owner = self._owner_key(lane)
        if owner is None:
            return None
        for r in self.runs():
            if (
                r.lane == lane
                and r.end is None
                and alive(r.pid)
                and _env_var(r.pid, "ETCD_LOCK_KEY") == owner
            ):
                return r.host
        return None

    def extras(self, lane: int, runs: list[tuple[int, float]]) -> list[int]:
        """Every script but the one whose ETCD_LOCK_KEY is the lane's first key (the lock's owner)."""
        owner = self._owner_key(lane)
        keep = [pid for pid, _ in runs if owner is not None and _env_var(pid, "ETCD_LOCK_KEY") == owner]
        if len(keep) != 1:
            return super().extras(lane, runs)
        return [pid for pid, _ in runs if pid != keep[0]]

    def successor_timeout_s(self) -> float:
        return self.ttl_s + 15.0

    def period_s(self) -> float:
        return self.ttl_s / 3  # clientv3 renews a lease every TTL/3

    def config(self) -> dict[str, Any]:
        return {
            "system": self.name,
            "kind": self.kind,
            "nodes": self.net.n,
            "lanes": self.lanes,
            "ttl_s": self.ttl_s,
            "ttl_probe": {str(k): v for k, v in self.ttl_probe.items()} or None,
            "etcd_heartbeat_ms": 100,
            "etcd_election_timeout_ms": 1000,
            "documented_failover_s": float(self.ttl_s),
            "documented_as": "the session TTL (etcdctl lock --ttl)",
            "command": f"etcdctl --endpoints=<3 members> lock --ttl={self.ttl_s} laneL -- SCRIPT",
        }

    def context(self) -> str:
        leader = self.etcd_leader()
        return f"etcd leader h{leader}" if leader is not None else "etcd leader unknown"

    def etcd_leader(self) -> int | None:
        """The host of etcd's Raft leader now, or None."""
        out = self.etcdctl(1, "endpoint", "status", "-w", "json", timeout_s=5.0)
        try:
            rows = json.loads(out) if out else []
        except ValueError:
            return None
        for r in rows:
            st = r.get("Status", {})
            if st.get("leader") and st.get("leader") == st.get("header", {}).get("member_id"):
                return int(r["Endpoint"].split("//", 1)[1].split(":", 1)[0].rsplit(".", 1)[1])
        return None


# ---- keepalived ---------------------------------------------------------------------------------

_NOTIFY = """#!/bin/sh
# keepalived notify script of {host}: "$0 LANE master|backup|fault|stop". On master it starts the
# job (the harness workload, with its lane's record and register) detached, since keepalived scripts
# are one-shot, and records its pid; otherwise it stops that pid (SIGTERM, SIGKILL after {grace} s).
# One lock per lane: keepalived runs these asynchronously.
lane=$1
event=$2
dir={dir}
pidfile=$dir/{host}.l$lane.pid
exec 9>>"$pidfile.lock"
flock 9
running() {{
    state=$(sed 's/.*) //' /proc/"$1"/stat 2>/dev/null | cut -d' ' -f1)
    [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}}
echo "$(cut -d' ' -f1 /proc/uptime) {host} lane $lane $event" >>"$dir/notify.log"
case $event in
master)
    if [ -s "$pidfile" ] && running "$(cat "$pidfile")"; then exit 0; fi
    {node_var}={ip} {record_var}=$dir/lane$lane/{record} {register_var}=$dir/lane$lane/{register} \
        setsid {script} \
            </dev/null >>"$dir/{host}.jobs.log" 2>&1 9>&- &
    echo $! >"$pidfile"
    ;;
*)
    [ -s "$pidfile" ] || exit 0
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null
    i=0
    while running "$pid" && [ $i -lt {polls} ]; do sleep 0.01; i=$((i + 1)); done
    running "$pid" && kill -KILL "$pid" 2>/dev/null
    rm -f "$pidfile"
    ;;
esac
exit 0
"""


def _priority(host: int) -> int:
    return KEEPALIVED_PRIORITY - KEEPALIVED_PRIORITY_STEP * (host - 1)


class Keepalived(Spawned):
    """keepalived (VRRP, unicast) per host, one vrrp_instance per lane, notify scripts run the job."""

    kind = "keepalived"

    def __init__(self, name: str, net: Network, workdir: Path, lanes: int) -> None:
        super().__init__(name, net, workdir, lanes)
        self.daemons: dict[int, subprocess.Popen[bytes]] = {}
        self.log_marks: dict[int, int] = {}
        self.workdir.chmod(0o700)  # enable_script_security: no one but root may change the scripts
        for h in net.hosts:
            notify = self.workdir / f"notify-h{h}.sh"
            notify.write_text(
                _NOTIFY.format(
                    host=f"h{h}",
                    ip=net.ip(h),
                    dir=self.workdir,
                    node_var=NODE_VAR,
                    record_var=RECORD_VAR,
                    record=RECORD,
                    register_var=REGISTER_VAR,
                    register=REGISTER,
                    script=self.script,
                    grace=NOTIFY_STOP_GRACE_S,
                    polls=int(NOTIFY_STOP_GRACE_S / 0.01),
                )
            )
            notify.chmod(0o700)
            (self.workdir / f"h{h}.conf").write_text(self._conf(h, notify))

    def _conf(self, host: int, notify: Path) -> str:
        lines = [
            "global_defs {",
            f"    router_id h{host}",
            "    script_user root",
            "    enable_script_security",
            "}",
        ]
        peers = [self.net.ip(p) for p in self.net.hosts if p != host]
        for lane in range(self.lanes):
            lines += [
                f"vrrp_instance lane{lane} {{",
                "    state BACKUP",
                "    nopreempt",
                "    interface eth0",
                f"    virtual_router_id {VRID_BASE + lane}",
                f"    priority {_priority(host)}",
                f"    advert_int {KEEPALIVED_ADVERT_INT_S:g}",
                f"    unicast_src_ip {self.net.ip(host)}",
                "    unicast_peer {",
                *[f"        {p}" for p in peers],
                "    }",
                "    virtual_ipaddress {",
                f"        {hosts.SUBNET}.{VIP_BASE + lane}/24 dev eth0",
                "    }",
                *[f'    notify_{ev} "{notify} {lane} {ev}"' for ev in ("master", "backup", "fault", "stop")],
                "}",
            ]
        return "\n".join(lines) + "\n"

    def _start(self, host: int) -> None:
        w = self.workdir
        log = w / f"keepalived-h{host}.log"
        self.log_marks[host] = log.stat().st_size if log.exists() else 0
        argv = [
            "keepalived", "--dont-fork", "--log-console", "--log-detail", "--no-syslog", "--vrrp",
            "--use-file", str(w / f"h{host}.conf"), "--pid", str(w / f"keepalived-h{host}.pid"),
            "--vrrp_pid", str(w / f"vrrp-h{host}.pid"),
        ]  # fmt: skip
        self.daemons[host] = self.spawn(host, argv, self.env(host), log)

    def _all_entered(self, host: int) -> bool:
        return len(self._entered(host)) == self.lanes

    def _entered(self, host: int) -> set[int]:
        """The lanes whose instance on ``host`` entered BACKUP or MASTER since its last start."""
        log = self.workdir / f"keepalived-h{host}.log"
        try:
            with open(log, "rb") as f:
                f.seek(self.log_marks.get(host, 0))
                text = f.read().decode(errors="replace")
        except OSError:
            return set()
        return {
            lane
            for lane in range(self.lanes)
            if f"(lane{lane}) Entering BACKUP STATE" in text or f"(lane{lane}) Entering MASTER STATE" in text
        }

    def start(self) -> None:
        # h1 has the highest priority and, started first, is alone when its master-down timer fires:
        # it becomes master of every lane.
        self._start(1)
        self.wait_all_lanes_on(1, 30.0)
        for h in self.net.hosts[1:]:
            self._start(h)
        for h in self.net.hosts[1:]:
            wait_for(f"{self.name}: h{h} in BACKUP", partial(self._all_entered, h), 30.0)

    def agents(self, host: int) -> list[int]:
        return [
            p
            for p in self.host_pids(host)
            if os.path.basename(cmdline(p).split(b"\0", 1)[0]) == b"keepalived"
        ]

    def planned_stop(self, host: int) -> str:
        proc = self.daemons[host]
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        return f"SIGTERM to keepalived {proc.pid} (systemctl stop keepalived)"

    def restore(self, host: int, fault: str) -> None:
        if self.daemons[host].poll() is not None or not self.agents(host):
            self.reap()
            self._start(host)
            wait_for(f"{self.name}: h{host} back in BACKUP", partial(self._all_entered, host), 30.0)

    def successor_timeout_s(self) -> float:
        return 3 * KEEPALIVED_ADVERT_INT_S + 10.0

    def period_s(self) -> float:
        return KEEPALIVED_ADVERT_INT_S

    def config(self) -> dict[str, Any]:
        # the backup that takes over from h1 is h2: priority 100
        skew = (256 - _priority(2)) / 256
        return {
            "system": self.name,
            "kind": self.kind,
            "nodes": self.net.n,
            "lanes": self.lanes,
            "advert_int_s": KEEPALIVED_ADVERT_INT_S,
            "priority": {f"h{h}": _priority(h) for h in self.net.hosts},
            "documented_failover_s": round(3 * KEEPALIVED_ADVERT_INT_S + skew, 3),
            "documented_as": "3 x advert_int + skew, skew = (256 - priority)/256 (keepalived.conf(5)), "
            f"priority {_priority(2)} (h1's {_priority(1)} gives "
            f"{3 * KEEPALIVED_ADVERT_INT_S + (256 - _priority(1)) / 256:.2f} s)",
            "documented_planned_s": round(skew, 3),
            "command": "keepalived --dont-fork --vrrp -f h<i>.conf (unicast, state BACKUP, nopreempt)",
        }
