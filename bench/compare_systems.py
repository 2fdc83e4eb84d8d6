"""The systems the comparison runs on network-namespace hosts, each behind the same small interface.

What this owns. ``System`` is what the runner (compare.py) can do to any of them: start it on the
hosts of a ``Network`` with ``lanes`` independent copies of the job, tell which host runs each lane's
script, inject a fault into one host (``crash_host``, ``crash_daemon``, ``freeze``/``thaw``,
``planned_stop``; isolation is the runner's, with nftables), undo it (``restore``) and stop everything
(``close``). Three implementations:

- ``Pyquorum``: one daemon per host and lane (lane L on UDP port 7000 + L), run as the netns suite runs
  them, at a given ``Timing``. This is the only class that knows pyquorum's command line and its
  ``status.json``: switching the benchmark to another harness means replacing this class alone.
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

The job. Every lane runs the netns suite's workload (tests/netns/workload.py) with
``PQT_HOST=h<i>.l<L>``; all lanes append to one log, so one ``RunMonitor`` (pidfd) watches every run.

Processes. Everything started in host i runs under ``ip netns exec <ns of host i>``, in a session of
its own, with ``PQT_TAG=<that namespace>`` in its environment, which every descendant inherits (etcd
members, etcdctl, keepalived, its notify scripts, daemons, guards and scripts): ``host_pids`` finds a
whole host that way, and ``close`` (and the next run's sweep, if this one was killed) every process of
the run. Processes started directly get PR_SET_PDEATHSIG=SIGKILL (``setpriv``), so they die with the
benchmark even if it is SIGKILLed. Nothing listens outside the namespaces: etcd binds 10.99.0.i only,
keepalived runs inside the host's namespace, and the range 10.99.0.0/24 exists only there.

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
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

from compare_report import Run

from pyquorum.core.lease import Timing

# The pieces of the netns suite this benchmark reuses, all imported here and nowhere else in bench/.
from tests.netns import hosts
from tests.netns.cluster import (
    TAG_VAR,
    WORKLOAD_SOURCE,
    RunMonitor,
    alive,
    kill_all,
    pyquorum_command,
    stopped,
    sweep_processes,
    tagged_pids,
)
from tests.netns.hosts import PREFIX, Network, namespaces

__all__ = [
    "PREFIX",
    "BenchError",
    "EtcdLock",
    "Keepalived",
    "Lab",
    "Pyquorum",
    "System",
    "alive",
    "install_packages",
    "kill_all",
    "missing_packages",
    "namespaces",
    "tagged_pids",
    "unavailable",
    "versions",
    "wait_for",
]

PYQUORUM_PORT = 7000
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


class BenchError(RuntimeError):
    """A system could not be started or brought back; the message says which and why."""


def wait_for(what: str, predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.01) -> None:
    give_up = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > give_up:
            raise BenchError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0") if part]
    except OSError:
        return []


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
        sweep_processes()
        hosts.sweep()
        for path in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
            owner = path.name[len(PREFIX) :].split("x", 1)[0]
            if path.is_dir() and owner.isdigit() and not Path(f"/proc/{owner}").exists():
                shutil.rmtree(path, ignore_errors=True)
        self.run = hosts.run_id()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{hosts.PREFIX}{self.run}-"))
        self.key_file = self.tmp / "cluster.key"
        subprocess.run([*pyquorum_command(), "keygen", str(self.key_file)], check=True, capture_output=True)
        self.networks: dict[int, Network] = {}

    def network(self, n: int) -> Network:
        if n not in self.networks:
            net = Network(self.run, n)
            net.create()
            self.networks[n] = net
        return self.networks[n]

    def leftovers(self) -> tuple[list[int], list[str]]:
        prefix = f"{hosts.PREFIX}{self.run}-"
        return list(tagged_pids(prefix)), [ns for ns in hosts.namespaces() if ns.startswith(prefix)]

    def close(self) -> str:
        pids, _ = self.leftovers()
        kill_all(pids, signal.SIGCONT)
        kill_all(pids, signal.SIGKILL)
        give_up = time.monotonic() + 5.0
        while any(alive(p) for p in pids) and time.monotonic() < give_up:
            time.sleep(0.01)
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
    """One system on ``net`` with ``lanes`` copies of the job; files in ``workdir``."""

    kind: ClassVar[str]

    def __init__(self, name: str, net: Network, workdir: Path, lanes: int) -> None:
        self.name = name
        self.net = net
        self.lanes = lanes
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.workload = workdir / "workload.log"
        self.workload.touch()
        (workdir / "exits.log").touch()
        self.script = workdir / "workload"
        self.script.write_text(f"#!{sys.executable} -IS\n" + WORKLOAD_SOURCE.read_text())
        self.script.chmod(0o755)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.monitor = RunMonitor(self.workload, workdir / "exits.log")
        self.monitor.start()
        self._frozen: list[int] = []

    # ---- what the runner uses -----------------------------------------------------------------------

    @abc.abstractmethod
    def start(self) -> None:
        """Start everything; return once every lane's script runs (on the lowest host, see lanes)."""

    @abc.abstractmethod
    def agents(self, host: int) -> list[int]:
        """The live pids of this system's daemon on ``host`` (every lane's): what a daemon crash kills."""

    @abc.abstractmethod
    def planned_stop(self, host: int) -> str:
        """Stop the daemon(s) on ``host`` the way the system's documentation says; return evidence."""

    @abc.abstractmethod
    def restore(self, host: int, fault: str) -> None:
        """After ``fault`` on ``host`` was undone: start again whatever of this host is not running
        and return once every lane is back to full strength (every host can take over again)."""

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

    # ---- shared machinery -----------------------------------------------------------------------

    def env(self, host: int, lane: int | None = None) -> dict[str, str]:
        env = {**os.environ, TAG_VAR: self.net.ns(host), "PQT_WORKLOAD": str(self.workload)}
        if lane is not None:
            env.update(self.lane_env(host, lane))
        return env

    def lane_env(self, host: int, lane: int) -> dict[str, str]:
        return {"PQT_HOST": f"h{host}.l{lane}", "PQT_REGISTER": str(self.workdir / f"lane{lane}.register")}

    def spawn(self, host: int, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        """Start ``argv`` in host's namespace, in its own session, dying with the benchmark."""
        pdeath = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
        with open(log, "ab") as out:
            out.write(f"=== bench: start at {time.monotonic():.6f}: {' '.join(argv)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.net.ns(host), *pdeath, *argv],
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

    def runs(self) -> list[Run]:
        with self.monitor.lock:
            views = list(self.monitor.runs.values())
        out = []
        for v in views:
            host, _, lane = v.host.partition(".l")
            out.append(Run(int(host[1:]), int(lane), v.pid, v.start, v.last, v.end))
        return out

    def live(self) -> dict[int, list[int]]:
        """lane -> hosts whose script in that lane is alive and wrote a line within 0.25 s."""
        out: dict[int, list[int]] = {lane: [] for lane in range(self.lanes)}
        for v in self.monitor.live():
            host, _, lane = v.host.partition(".l")
            out.setdefault(int(lane), []).append(int(host[1:]))
        return out

    def live_pids(self) -> dict[int, list[tuple[int, float]]]:
        """lane -> (pid, start) of every script not seen to exit, whatever it last wrote."""
        out: dict[int, list[tuple[int, float]]] = {lane: [] for lane in range(self.lanes)}
        for v in self.monitor.unended():
            _, _, lane = v.host.partition(".l")
            out.setdefault(int(lane), []).append((v.pid, v.start))
        return out

    def steady(self) -> bool:
        """Every lane has exactly one live script."""
        return all(len(h) == 1 for h in self.live().values())

    def host_pids(self, host: int) -> list[int]:
        return list(tagged_pids(self.net.ns(host), exact=True))

    def _stop_and_kill(self, pids: list[int]) -> bool:
        # SIGSTOP first, so that none of them can act on the others' deaths, then SIGKILL: one moment.
        kill_all(pids, signal.SIGSTOP)
        kill_all(pids, signal.SIGKILL)
        give_up = time.monotonic() + 5.0
        while any(alive(p) for p in pids) and time.monotonic() < give_up:
            time.sleep(0.002)
        self.reap()
        return not any(alive(p) for p in pids)

    def crash_host(self, host: int) -> str:
        """kill -9 everything on the host at one moment: SIGSTOP every tagged process until no new one
        appears, then SIGKILL them all. Returns evidence; raises if anything survived."""
        frozen: set[int] = set()
        for _ in range(50):
            new = [p for p in self.host_pids(host) if p not in frozen]
            if not new:
                break
            kill_all(new, signal.SIGSTOP)
            frozen.update(new)
        if not frozen or not self._stop_and_kill(sorted(frozen)):
            raise BenchError(f"h{host}: host crash not injected ({len(frozen)} processes found)")
        return f"froze and SIGKILLed {len(frozen)} processes of h{host}: all gone"

    def crash_daemon(self, host: int) -> str:
        pids = self.agents(host)
        if not pids or not self._stop_and_kill(pids):
            raise BenchError(f"h{host}: daemon crash not injected (pids {pids})")
        return f"froze and SIGKILLed daemon pids {pids}: gone"

    def freeze(self, host: int) -> str:
        pids = self.agents(host)
        kill_all(pids, signal.SIGSTOP)
        give_up = time.monotonic() + 2.0
        while not all(stopped(p) or not alive(p) for p in pids) and time.monotonic() < give_up:
            time.sleep(0.001)
        if not pids or not all(stopped(p) for p in pids):
            raise BenchError(f"h{host}: freeze not injected (pids {pids})")
        self._frozen = pids
        return f"SIGSTOPped daemon pids {pids}: state T"

    def thaw(self, host: int) -> None:
        kill_all(self._frozen, signal.SIGCONT)
        self._frozen = []

    def close(self) -> None:
        """Stop every daemon (SIGTERM, 5 s), then SIGKILL whatever of this network is left."""
        try:
            for h in self.net.hosts:
                kill_all([p for p in self.agents(h) if stopped(p)], signal.SIGCONT)
            self._graceful_stop()
        finally:
            left = list(tagged_pids(f"{self.net.base}-"))
            kill_all(left, signal.SIGCONT)
            kill_all(left, signal.SIGKILL)
            for p in self.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
            self.reap()
            give_up = time.monotonic() + 3.0
            while self.monitor.unended() and time.monotonic() < give_up:
                time.sleep(0.01)
            self.monitor.stop()

    def _graceful_stop(self) -> None:
        procs = [p for p in self.procs if p.poll() is None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        give_up = time.monotonic() + 5.0
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, give_up - time.monotonic()))

    def wait_all_lanes_on(self, host: int, timeout_s: float) -> None:
        wait_for(
            f"{self.name}: every lane's script to run on h{host}",
            lambda: all(hs == [host] for hs in self.live().values()),
            timeout_s,
        )


# ---- pyquorum -----------------------------------------------------------------------------------


class Pyquorum(System):
    """pyquorum daemons: the adapter. Another harness (tests/harness) can replace this class alone."""

    kind = "pyquorum"

    def __init__(
        self, name: str, net: Network, workdir: Path, lanes: int, timing: Timing, key_file: Path
    ) -> None:
        super().__init__(name, net, workdir, lanes)
        self.timing = timing
        self.key_file = key_file
        self.daemons: dict[tuple[int, int], subprocess.Popen[bytes]] = {}

    def _start(self, host: int, lane: int) -> None:
        t = self.timing
        port = PYQUORUM_PORT + lane
        peers = [f"{self.net.ip(p)}:{port}" for p in self.net.hosts if p != host]
        argv = [
            *pyquorum_command(), "-b", self.net.ip(host), "-p", str(port), "-s", str(self.script),
            "--state-dir", str(self._state_dir(host, lane)), "--key-file", str(self.key_file),
            "--heartbeat-interval", repr(t.heartbeat_interval_s),
            "--election-timeout", repr(t.election_timeout_s),
            "--stop-timeout", repr(t.stop_timeout_s), "-v", *peers,
        ]  # fmt: skip
        log = self.workdir / f"h{host}.l{lane}.log"
        self.daemons[(host, lane)] = self.spawn(host, argv, self.env(host, lane), log)

    def _state_dir(self, host: int, lane: int) -> Path:
        return self.workdir / "state" / f"h{host}.l{lane}"

    def _status(self, host: int, lane: int) -> dict[str, Any]:
        """The node's status.json (role, master, term ...), {} while it has none."""
        try:
            data = json.loads((self._state_dir(host, lane) / "status.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def start(self) -> None:
        # h1's daemons start first, so h1 usually wins every lane; a start-up race that another host
        # won is undone by a planned stop of that lane's master: the lowest address proposes first
        # (README "How the election works"), so h1 takes over. Aligned lanes make every fault a trial
        # in every lane.
        for lane in range(self.lanes):
            self._start(1, lane)
        wait_for(f"{self.name}: h1's daemons up", partial(self._all_status, 1), 30.0, 0.05)
        for h in self.net.hosts[1:]:
            for lane in range(self.lanes):
                self._start(h, lane)
        wait_for(f"{self.name}: one script per lane", self.steady, 30.0)
        for _ in range(5):
            wrong = {lane: hs[0] for lane, hs in self.live().items() if hs != [1]}
            if not wrong:
                break
            for lane, h in wrong.items():
                proc = self.daemons[(h, lane)]
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)
            wait_for(f"{self.name}: one script per lane", self.steady, 30.0)
            for h in set(wrong.values()):
                self.restore(h, "align")
        self.wait_all_lanes_on(1, 30.0)
        wait_for(f"{self.name}: every node to follow a master", self._all_follow, 30.0, 0.05)

    def _all_status(self, host: int) -> bool:
        return all(self._status(host, lane) for lane in range(self.lanes))

    def _all_follow(self) -> bool:
        return all(self._status(h, lane).get("master") for h in self.net.hosts for lane in range(self.lanes))

    def agents(self, host: int) -> list[int]:
        return [p.pid for (h, _), p in self.daemons.items() if h == host and p.poll() is None]

    def planned_stop(self, host: int) -> str:
        pids = self.agents(host)
        kill_all(pids, signal.SIGTERM)
        return f"SIGTERM to daemon pids {pids}"

    def restore(self, host: int, fault: str) -> None:
        restarted = [lane for lane in range(self.lanes) if self.daemons[(host, lane)].poll() is not None]
        self.reap()
        for lane in restarted:
            self._start(host, lane)

        def following() -> bool:
            return all(
                self._status(host, lane).get("role") == "slave" and self._status(host, lane).get("master")
                for lane in range(self.lanes)
            )

        wait_for(f"{self.name}: h{host} to follow a master again", following, 30.0, 0.05)
        if restarted:
            # a restarted node grants no vote for one election timeout (protocol.md restart embargo):
            # the next fault must find every node able to vote
            time.sleep(self.timing.election_timeout_s * 1.2)

    def successor_timeout_s(self) -> float:
        return self.timing.failover_bound_s() + 5.0

    def period_s(self) -> float:
        return self.timing.heartbeat_interval_s

    def config(self) -> dict[str, Any]:
        t = self.timing
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
            "command": "pyquorum -b IP -p PORT -s SCRIPT --key-file K --heartbeat-interval H "
            "--election-timeout E --stop-timeout G -v PEERS",
        }

    def problems(self) -> list[str]:
        found = []
        for log in sorted(self.workdir.glob("h*.l*.log")):
            text = log.read_text(errors="replace")
            for alarm in ("Traceback", "event=internal_error", "event=fatal"):
                if alarm in text:
                    found.append(f"{self.name} {log.name}: {alarm}")
        return found


# ---- etcdctl lock -------------------------------------------------------------------------------


class EtcdLock(System):
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
        for v in self.monitor.unended():
            h, _, run_lane = v.host.partition(".l")
            if int(run_lane) == lane and alive(v.pid) and _env_var(v.pid, "ETCD_LOCK_KEY") == owner:
                return int(h[1:])
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
# job detached (keepalived scripts are one-shot) and records its pid; otherwise it stops that pid
# (SIGTERM, SIGKILL after {grace} s). One lock per lane: keepalived runs these asynchronously.
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
    PQT_HOST={host}.l$lane PQT_REGISTER=$dir/lane$lane.register setsid {script} \
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


class Keepalived(System):
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
                    dir=self.workdir,
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
            if (cmd := _cmdline(p)) and os.path.basename(cmd[0]) == "keepalived"
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
