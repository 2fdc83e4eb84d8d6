"""One process harness for the real-process tests and benchmarks: ``Cluster(size, backend, ...)``.

    with Cluster(3, Loopback(), keys=True) as c:
        master = c.wait_for_master()
        t_kill = c.crash(master, host=True)      # its daemon, guard and script at one moment
        new = c.wait_for_run(after=t_kill)       # the next script run
    # leaving the block checks the runs and the logs; then everything the cluster started is killed

What it starts. ``size`` daemons at the backend's addresses, node i named by its canonical id
(``127.0.0.12:20123``), logging to ``<dir>/h<i>.log`` with its state in ``<dir>/state/h<i>``, each a
child of this process in a session of its own (pyquorum._localcluster, which the demo shares), dying
with this process (PDEATHSIG, where ``setpriv`` exists). Every node runs the workload
(tests/harness/workload.py; ``script=None``: none); a ``RunMonitor`` follows its record (runs.py).

Backends. ``Loopback()``: 127.0.0.x and one free UDP port, no root; one network stack for all, so the
network faults raise ``Unsupported``, which tests/conftest.py turns into a skip that says why.
``Netns()``: each node a host of its own in a network namespace, broken by nftables (tests/netns/hosts.py).

Faults, named as in the simulation (tests/sim/sim.py): ``crash(node, host=False)``, ``pause(node,
host=False)``, ``resume``, ``shutdown`` (SIGTERM: a planned stop), ``restart``, ``kill_script``; on the
network ``isolate``, ``partition``, ``cut(src, dst)``, ``loss``, ``heal`` (``with c.network():`` makes
several changes at once). A process fault returns the moment just before it acted, leaves what it did
and saw in ``evidence``, and raises ``FaultFailed`` if it did not take effect.

Leaving the ``with`` block normally runs ``check()``: no two runs overlapped, tokens increased, the
register held (runs.py), no Traceback in any log. ``close()`` runs either way: it prints the logs' tails
and the runs if the block raised, SIGKILLs every daemon and then every process carrying the cluster's
tag until none is left, stops the monitor, closes the backend (namespaces, rules) and removes the
temporary directory (unless PQTEST_KEEP=1). With ``journal=True`` every start and
every ``note()`` is a line of ``faults.jsonl`` with the state after it: the netns checker's input.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from pyquorum import keyfile as keyfiles
from pyquorum._localcluster import TIMING_KEYS, LocalCluster, Node, daemon_argv, free_udp_port
from pyquorum.core.lease import Timing
from tests.harness.procfs import alive, cmdline, freeze, signal_all, stopped, tagged_pids, wait_until
from tests.harness.runs import RECORD, REGISTER, Run, check_runs, read_register, start_monitor
from tests.harness.workload import CONTROL_VAR, RECORD_VAR, REGISTER_VAR
from tests.netns import hosts
from tests.timing import TEST_TIMING

__all__ = ["Cluster", "ClusterError", "FaultFailed", "Loopback", "Netns", "Node", "Unsupported"]
__all__ += ["install_workload"]

DEFAULT_WAIT_S = 30.0  # generous: the host is shared; timing assertions use measured times, not waits
START_ATTEMPTS = 4  # a port taken between the probe and the daemons' bind: again, elsewhere
LIVE_LINE_AGE_S = 0.25  # a run is "running" while it wrote a line this recently (it ticks every 5 ms)
SCRIPT_HEAD_START_S = 0.02  # after a host pause the script resumes this long before its guard and daemon
PDEATHSIG = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []


def install_workload(path: Path) -> Path:
    """Copy the workload (workload.py) to ``path`` as an executable script of this Python; ``path``."""
    source = Path(__file__).with_name("workload.py").read_text(encoding="utf-8")
    path.write_text(f"#!{sys.executable} -IS\n{source}", encoding="utf-8")
    path.chmod(0o755)
    return path


def free_tcp_port() -> int:
    """A TCP port the kernel says is free (on every loopback address, as far as it can tell)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ClusterError(AssertionError):
    """A wait failed or a daemon died that no one stopped; the message ends with the logs' tails."""


class FaultFailed(ClusterError):
    """A fault did not take effect; the message is the evidence."""


class Unsupported(Exception):
    """A fault this backend cannot make (tests/conftest.py turns it into a skip)."""


class Backend:
    """Where a cluster's nodes live: their addresses, how a daemon is started there, and ``net``, the
    network that faults can break (None: it cannot break, and network faults raise ``Unsupported``)."""

    net: hosts.Network | None = None

    def addresses(self, size: int) -> list[str]:
        raise NotImplementedError

    def tag(self) -> str:
        """A tag prefix for this cluster's processes that starts with this process's pid."""
        return f"pql-{os.getpid()}x{os.urandom(3).hex()}"

    def wrap(self, host: int, argv: list[str]) -> list[str]:
        return argv

    def close(self) -> None:
        pass


class Loopback(Backend):
    """127.0.0.<b+1> .. <b+N> (a random b from 10: parallel tests rarely share an address, 127.0.0.1 is
    no member's) and one UDP port free on all of them; no root. Every address of 127/8 is local on
    Linux, and all nodes share one network stack: it cannot break."""

    def addresses(self, size: int) -> list[str]:
        base = random.randrange(10, 250 - size)
        ips = [f"127.0.0.{base + i}" for i in range(size)]
        port = free_udp_port(ips)
        return [f"{ip}:{port}" for ip in ips]


class Netns(Backend):
    """Host i is the network namespace ``<base>-h<i>`` at 10.99.0.i:``port`` (tests/netns/hosts.py);
    its daemon runs under ``ip netns exec``; network faults are nftables rules. ``net``: a Network to
    reuse (its owner removes it); else one is made and removed at close. Several clusters can share
    one Network on different ports (bench/compare.py's lanes): a host's processes carry its
    namespace's name as their tag whichever cluster started them, so a host crash takes all of them.
    Needs root, ip and nft."""

    PORT = 7000

    def __init__(self, net: hosts.Network | None = None, *, port: int = PORT) -> None:
        self.net, self.own, self.port = net, net is None, port

    def addresses(self, size: int) -> list[str]:
        if self.net is None:
            if (why := hosts.why_unavailable()) is not None:
                raise Unsupported(f"Netns: {why}")
            self.net = hosts.Network(hosts.run_id(), size)
            self.net.create()
        return [f"{self.net.ip(h)}:{self.port}" for h in self.net.hosts]

    def tag(self) -> str:
        assert self.net is not None
        return self.net.base  # so that host i's tag <base>-h<i> is its namespace's name

    def wrap(self, host: int, argv: list[str]) -> list[str]:
        assert self.net is not None
        return ["ip", "netns", "exec", self.net.ns(host), *argv]

    def close(self) -> None:
        if self.net is not None and self.own:
            self.net.destroy()
        elif self.net is not None:
            self.net.heal()
            with contextlib.suppress(hosts.HostError):
                self.net.apply()


def _roles(pids: dict[int, str]) -> str:
    return ", ".join(f"{role} {pid}" for role, pid in sorted((r, p) for p, r in pids.items())) or "nothing"


class Cluster(LocalCluster):
    """``size`` pyquorum daemons on ``backend``; see the module docstring. Use it as a context
    manager. ``keys``: True (a new shared key), one key file for all, or one (or None) per node."""

    def __init__(
        self,
        size: int,
        backend: Backend,
        *,
        timing: Timing = TEST_TIMING,
        keys: bool | Path | Sequence[Path | None] | None = None,
        script: bool | Path | None = True,
        restart: str | None = None,
        extra_args: Sequence[str] = (),
        workload: dict[str, Any] | None = None,
        daemon: Sequence[str] = (),
        env: dict[str, str] | None = None,
        verbosity: int = 1,
        directory: Path | None = None,
        journal: bool = False,
        launch: bool = True,
        check_on_exit: bool = True,
        http: bool = False,
        config_file: bool = False,
    ) -> None:
        self.backend, self.size, self.timing = backend, size, timing
        addresses = backend.addresses(size)
        self.owns_dir = directory is None
        directory = directory or Path(tempfile.mkdtemp(prefix="pyquorum-cluster-"))
        directory.mkdir(parents=True, exist_ok=True)
        super().__init__(directory, addresses, backend.tag(), error=ClusterError)
        self.script = install_workload(directory / "workload") if script is True else script or None
        self.with_script = self.script is not None
        if keys is True:
            keyfiles.keygen(keys := directory / "cluster.key")
        self.key_files = list(keys) if isinstance(keys, Sequence) else [keys or None] * size
        self.options: dict[str, Any] = {"timing": timing, "verbosity": verbosity, "daemon": daemon}
        # --http: one TCP port, on each node's own address; a --config file per node, if asked
        self.http_port = free_tcp_port() if http else None
        self.config_file = config_file
        self.options["extra"] = [*(["--restart", restart] if restart else []), *extra_args]
        self.env.update(env or {})
        self.env.update({RECORD_VAR: str(directory / RECORD), REGISTER_VAR: str(directory / REGISTER)})
        self.env[CONTROL_VAR] = str(directory / "control.json")
        self.journal = directory / "faults.jsonl" if journal else None
        self.paused: dict[str, bool] = {}  # name -> paused as a whole host (else its daemon alone)
        self.evidence = ""
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.launch, self.check_on_exit = launch, check_on_exit
        self.keep = os.environ.get("PQTEST_KEEP") == "1"
        self._control: dict[str, dict[str, Any]] = {"*": dict(workload or {})}
        self._depth = 0
        self._closed = False
        self._write_control()
        self._set_argv()
        self.monitor = start_monitor(directory)

    def add_args(self, *args: str) -> None:
        """More daemon options for every node, before ``start()`` (e.g. --priority NODE=N, which
        needs the nodes' addresses: build the cluster with ``launch=False``)."""
        self.options["extra"] = [*self.options["extra"], *args]
        self._set_argv()

    def _set_argv(self) -> None:
        for node, key_file in zip(self.nodes, self.key_files, strict=True):
            peers = [p for p in self.members if p != node.name]
            if self.config_file:
                self.write_config(node, self.config_values(node, key_file))
                daemon = self.options["daemon"] or (sys.executable, "-m", "pyquorum")
                argv = [*daemon, "--config", str(self.config_path(node)), *self.options["extra"]]
            else:
                argv = daemon_argv(
                    node.name, peers, node.state_dir, script=self.script, key_file=key_file, **self.options
                )
            if self.http_port is not None:
                argv += ["--http", f"{node.ip}:{self.http_port}"]
            node.argv = self.backend.wrap(node.index, [*PDEATHSIG, *argv])

    # ---- configuration files (config_file=True) -----------------------------------------------------

    def config_path(self, node: Node) -> Path:
        return self.dir / f"h{node.index}.toml"

    def config_values(self, node: Node, key_file: Path | None = None) -> dict[str, Any]:
        """What the node's --config file holds: every option the command line would have had."""
        values: dict[str, Any] = {
            "bind": node.ip,
            "port": node.port,
            "peers": [p for p in self.members if p != node.name],
            "state_dir": str(node.state_dir),
            **{key: getattr(self.timing, f"{key}_s") for key in TIMING_KEYS},
            "log_level": ["warning", "info", "debug"][min(2, self.options["verbosity"])],
        }
        if self.script is not None:
            values["script"] = str(self.script)
        if key_file is not None:
            values["key_file"] = str(key_file)
        return values

    def write_config(self, node: Node, values: dict[str, Any]) -> None:
        """(Re)write the node's --config file: a reload reads it again."""
        lines = [f"{key} = {json.dumps(value)}" for key, value in values.items()]  # TOML's subset
        tmp = self.config_path(node).with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, self.config_path(node))

    # ---- life cycle ---------------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        try:
            if self.launch:
                self.start()
        except BaseException:
            self.close(failed=True)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None and self.check_on_exit:
            try:
                self.check()
            except BaseException:
                self.close(failed=True)
                raise
        self.close(failed=exc is not None and not isinstance(exc, Unsupported))

    def start(self, nodes: Sequence[Node] | None = None, *, wait: bool = True) -> None:
        """Start the daemons of ``nodes`` (every node by default) and wait until each has written its
        status. The whole cluster starts again elsewhere if its port was taken before the daemons bound it."""
        whole = nodes is None
        targets = list(self.nodes if nodes is None else nodes)
        for attempt in range(START_ATTEMPTS if whole else 1):
            if whole:
                self.started_at = time.monotonic()
            for node in targets:
                self.spawn(node)
                self.note("start", host=node.name, incarnation=node.incarnations)
            try:
                if wait:
                    self.wait_for(
                        lambda: all(self.status(n) for n in targets) or None, DEFAULT_WAIT_S, "statuses"
                    )
                break
            except ClusterError:
                if attempt == START_ATTEMPTS - 1 or not any("in use" in self.log(n) for n in targets):
                    raise
                self.stop(grace_s=5.0, sig=signal.SIGKILL)
                for node, address in zip(self.nodes, self.backend.addresses(self.size), strict=True):
                    node.name = address
                self._set_argv()
        if whole:
            self.ready_at = time.monotonic()

    def close(self, failed: bool = False) -> list[int]:
        """Kill everything this cluster started and remove what it made (see the module docstring);
        return the pids the sweep had to kill after the daemons. Idempotent."""
        if self._closed:
            return []
        self._closed = True
        if failed:
            with contextlib.suppress(Exception):
                print(self.report(), file=sys.stderr)
        left: list[int] = []
        try:
            self.stop(grace_s=10.0, sig=signal.SIGKILL)
            left = self.sweep()
            if survivors := tagged_pids(f"{self.tag}-"):
                raise ClusterError(f"processes {sorted(survivors)} survived SIGKILL for 10 s")
        finally:
            give_up = time.monotonic() + 3.0
            while self.monitor.unended() and time.monotonic() < give_up:
                time.sleep(0.01)
            self.monitor.stop()
            self.backend.close()
            if self.keep:
                print(f"kept {self.dir}", file=sys.stderr)
            elif self.owns_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
        return left

    # ---- observing ----------------------------------------------------------------------------------

    def failure(self, text: str) -> Exception:
        return ClusterError(f"{text}\n{self.report()}")

    def wait_for_master(
        self, timeout_s: float = DEFAULT_WAIT_S, *, newer_than: int = 0, exclude: Iterable[Node] = ()
    ) -> Node:
        """Wait until a node not in ``exclude`` is master of a term above ``newer_than`` (and runs its
        script, if the cluster has one); return it."""
        excluded = set(exclude)

        def probe() -> Node | None:
            m = self.master()
            st = None if m is None or m in excluded else self.status(m)
            return m if st is not None and int(st["term"]) > newer_than else None

        return self.wait_for(probe, timeout_s, f"master of a term above {newer_than}")

    def runs(self) -> list[Run]:
        """The workload's runs so far, by start, each ending when its process was gone."""
        return self.monitor.runs()

    def wait_for_run(
        self, timeout_s: float = DEFAULT_WAIT_S, *, after: float = 0.0, node: Node | None = None
    ) -> Run:
        """The first run that started after ``after`` (a ``time.monotonic()``), on ``node`` if given."""
        return self.wait_for(
            lambda: next(
                (r for r in self.runs() if r.start > after and node in (None, self.node(r.node))), None
            ),
            timeout_s,
            f"script run after {after:.3f}" + (f" on {node}" if node else ""),
        )

    def running(self, *, exclude: Iterable[Node] = (), after: float = 0.0) -> Node | None:
        """The node whose script runs now, if exactly one does (it wrote a line within
        ``LIVE_LINE_AGE_S``), that run started after ``after`` and the node is not in ``exclude``."""
        now = time.monotonic()
        live = [r for r in self.runs() if r.alive and now - r.last <= LIVE_LINE_AGE_S]
        node = self.node(live[0].node) if len(live) == 1 and live[0].start > after else None
        return None if node in set(exclude) else node

    def gone_at(self, pid: int, timeout_s: float = DEFAULT_WAIT_S) -> float:
        """Wait until the workload process ``pid`` is gone; return when it was (see runs.py)."""
        self.wait_for(lambda: not alive(pid), timeout_s, f"script pid {pid} to be gone")
        seen = {r.pid: r.end for r in self.runs() if r.end_how in ("pidfd", "late")}
        return seen.get(pid) or time.monotonic()

    def check(self) -> list[Run]:
        """The end-of-test checks (runs.py ``check_runs``, and no Traceback in any log); the runs."""
        runs = self.runs()
        check_runs(runs, read_register(self.dir))
        for node in self.nodes:
            assert "Traceback" not in self.log(node), f"Traceback in the log of {node}:\n{self.log(node)}"
        return runs

    def report(self, lines: int = 25) -> str:
        """The tail of every daemon's log and the runs, for a failure message."""
        out = [f"cluster dir {self.dir}"]
        for node in self.nodes:
            tail = self.log(node).splitlines()[-lines:]
            out += [
                f"--- {node} (running={node.running}) last {len(tail)} lines:",
                *(f"    {t}" for t in tail),
            ]
        with contextlib.suppress(Exception):
            out += ["--- runs:", *(f"    {run}" for run in self.runs())]
        return "\n".join(out)

    def processes(self, node: Node) -> dict[int, str]:
        """Every live process of the node: pid -> daemon, guard, script or other."""
        tag, script = f"{self.tag}-h{node.index}", str(self.script).encode()
        roles = {}
        for pid in (p for p, t in tagged_pids(tag).items() if t == tag):
            cmd, daemon = cmdline(pid), node.proc is not None and pid == node.proc.pid
            is_a = {"daemon": daemon, "guard": b"guard.py" in cmd, "script": script in cmd}  # first wins
            roles[pid] = next((role for role, yes in is_a.items() if yes), "other")
        return roles

    def up(self) -> list[Node]:
        """The nodes whose daemon runs and is not paused."""
        return [n for n in self.nodes if n.running and n.name not in self.paused]

    def note(self, kind: str, **fields: Any) -> float:
        """With a journal, append one step: the time, ``fields`` and the state after it."""
        t, net = time.monotonic(), self.backend.net
        if self.journal is not None:
            names = {n.index: n.name for n in self.nodes}
            cuts = sorted([names[a], names[b]] for a, b in (net.cuts if net else ()))
            state = {"up": [n.name for n in self.up()], "paused": sorted(self.paused), "cuts": cuts}
            state["loss"] = net.loss_percent if net else 0
            with self.journal.open("a") as f:
                f.write(json.dumps({"t": t, "kind": kind, **fields, **state}) + "\n")
        return t

    # ---- acting: the workload, processes, the network -------------------------------------------

    def set_workload(self, node: Node | None = None, **settings: Any) -> None:
        """Change how the workload behaves (for ``node`` or all): running scripts see it within a tick."""
        self._control.setdefault("*" if node is None else node.name, {}).update(settings)
        self._write_control()

    def _write_control(self) -> None:
        tmp = self.dir / "control.json.tmp"
        tmp.write_text(json.dumps(self._control), encoding="utf-8")
        os.replace(tmp, self.dir / "control.json")

    def _done(self, ok: bool, evidence: str) -> None:
        self.evidence = evidence
        if not ok:
            raise FaultFailed(evidence)

    def crash(self, node: Node, *, host: bool = False) -> float:
        """kill -9 of the node's daemon (its guard then stops the script, protocol.md §4.4), or with
        ``host`` of the whole host: every process of the node frozen, then all killed at one moment."""
        if not node.running:
            raise FaultFailed(f"{node} does not run")
        node.expect_exit = True
        self.paused.pop(node.name, None)
        victims = freeze(lambda: self.processes(node)) if host else {node.pid: "daemon"}
        t = time.monotonic()
        signal_all(victims, signal.SIGKILL)
        code = node.proc.wait(10.0)  # type: ignore[union-attr]
        if host:
            ok = bool(victims) and wait_until(victims, "gone") and not self.processes(node)
            self._done(ok, f"froze then SIGKILLed {_roles(victims)}: {'all' if ok else 'NOT all'} gone")
        else:
            self._done(code == -signal.SIGKILL, f"SIGKILLed daemon {node.pid}: exit status {code}")
        return t

    def pause(self, node: Node, *, host: bool = False) -> float:
        """SIGSTOP the node's daemon (its guard and script run on), or with ``host`` every process of
        the node: a VM pause (protocol.md §4.5)."""
        t = time.monotonic()
        victims = freeze(lambda: self.processes(node)) if host else {node.pid: "daemon"}
        signal_all(victims, signal.SIGSTOP)
        self.paused[node.name] = host
        ok = bool(victims) and wait_until(victims, "stopped", 2.0) and any(stopped(p) for p in victims)
        self._done(ok, f"SIGSTOPped {_roles(victims)}: " + ("state T" if ok else "NOT all stopped"))
        return t

    def resume(self, node: Node) -> float:
        """SIGCONT what ``pause`` stopped; after a host pause the script first, ``SCRIPT_HEAD_START_S``
        before the others: the worst order for safety, which only fencing covers (protocol.md §4.5)."""
        host = self.paused.pop(node.name, False)
        procs = self.processes(node) if host else {node.pid: "daemon"}
        scripts = [p for p, role in procs.items() if role == "script"]
        t = time.monotonic()
        signal_all(scripts, signal.SIGCONT)
        if scripts:
            time.sleep(SCRIPT_HEAD_START_S)
        signal_all([p for p in procs if p not in scripts], signal.SIGCONT)
        return t

    def shutdown(self, node: Node) -> float:
        """SIGTERM to the node's daemon: a planned stop (``wait_exit`` for its exit code)."""
        node.expect_exit = True
        t = time.monotonic()
        os.kill(node.pid, signal.SIGTERM)
        return t

    def wait_exit(self, node: Node, timeout_s: float = DEFAULT_WAIT_S) -> int:
        """Wait for the node's daemon to exit; its exit code."""
        node.expect_exit = True
        try:
            return node.proc.wait(timeout_s)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            raise self.failure(f"{node} did not exit within {timeout_s} s") from None

    def restart(self, node: Node, *, wait: bool = True) -> None:
        """Start the node's daemon again (same address, state dir and log), after it exited."""
        self.start([node], wait=wait)

    def kill_script(self, node: Node) -> float:
        """kill -9 of the node's script (its guard reports it; the daemon may restart it)."""
        pids = [p for p, role in self.processes(node).items() if role == "script"]
        t = time.monotonic()
        signal_all(pids, signal.SIGKILL)
        ok = bool(pids) and wait_until(pids, "gone")
        self._done(ok, f"SIGKILLed script {pids}: " + ("gone" if ok else "NOT gone"))
        return t

    @contextlib.contextmanager
    def network(self) -> Iterator[hosts.Network]:
        """The backend's network, for several changes at once: its rules change when the outermost
        block ends. Raises ``Unsupported`` where the network cannot break."""
        if (net := self.backend.net) is None:
            raise Unsupported(
                f"{type(self.backend).__name__} cannot break the network: its nodes share one stack"
            )
        self._depth += 1
        try:
            yield net
        finally:
            self._depth -= 1
            if self._depth == 0:
                net.apply()

    def isolate(self, node: Node) -> None:
        """Cut the node off both ways; its own sends fail too."""
        with self.network() as net:
            net.isolate(node.index)

    def partition(self, *groups: Iterable[Node]) -> None:
        """Cut every link between nodes of different groups."""
        with self.network() as net:
            net.partition(*({n.index for n in g} for g in groups))

    def cut(self, src: Node, dst: Node) -> None:
        """``dst`` no longer hears ``src`` (one direction)."""
        with self.network() as net:
            net.cut(src.index, dst.index)

    def loss(self, percent: int) -> None:
        """Every node drops each datagram it receives with probability ``percent``/100."""
        with self.network() as net:
            net.loss(percent)

    def heal(self) -> None:
        """Forget every network fault (nothing to do where the network cannot break)."""
        if self.backend.net is not None:
            with self.network() as net:
                net.heal()
