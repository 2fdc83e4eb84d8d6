"""``pyquorum demo``: a three-node cluster on 127.0.0.1 that shows a failover every few seconds.

Each node is a real daemon (``python -m pyquorum``) in its own session, with a temporary state dir, a
shared key file and a sample script that prints its fencing token every second. The demo follows the
nodes through their status.json files (see ``runtime.storage.STATUS_KEYS``), kills the master's daemon
with SIGKILL, measures the time until another node's status shows its script running, then restarts
the killed node, and does it again every ``interval_s`` until Ctrl-C (or ``rounds`` failovers). This
module is the story; starting, observing and sweeping the daemons is ``pyquorum._localcluster``, which
the test harness shares.

Whatever happens, it leaves nothing behind: daemons get SIGTERM then SIGKILL to their process group and
are reaped; then every process that carries this demo's tag in its environment (the daemons' guards and
scripts inherit it) is killed; then the temp dir is removed. Linux only (it reads /proc for that sweep).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import IO, Any, TypeVar

from pyquorum import keyfile
from pyquorum._localcluster import LocalCluster, Node, alive, daemon_argv, free_udp_ports
from pyquorum.core.address import DEFAULT_PORT
from pyquorum.core.lease import Timing

__all__ = ["SAMPLE_SCRIPT", "DemoFailed", "free_udp_ports", "run"]

HOST = "127.0.0.1"
PREFERRED_PORT = DEFAULT_PORT
NODE_COUNT = 3
# Generous bounds for a loaded laptop or CI runner; the default timing elects in about 1-2 s.
ELECTION_WAIT_S = 30.0
RESTART_GRACE_S = 5.0

SAMPLE_SCRIPT = """\
# pyquorum demo: the work a master does. PYQUORUM_TERM is the fencing token: a real script would pass
# it to whatever it writes to, which rejects writes carrying a token lower than one it has seen.
import os
import signal
import sys
import time

node = os.environ.get("PYQUORUM_NODE", "?")
term = os.environ.get("PYQUORUM_TERM", "?")


def stop(signum, frame):
    print(f"[{node}] got SIGTERM, stopping cleanly (fencing token {term})", flush=True)
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
while True:
    print(f"[{node}] working as master, fencing token {term}", flush=True)
    time.sleep(1)
"""

# The sample script's lines, wherever the supervisor puts them (inherited stdout, or the daemon's
# log with a prefix): echoed to the terminal, everything else goes to the node's log file only.
_SCRIPT_LINE = re.compile(r"\[[^\]\s]+\] (working as master|got SIGTERM).*")

T = TypeVar("T")


class DemoFailed(Exception):
    """The cluster did not do what the demo expected; the message says what."""


class _Stopped(Exception):
    """Ctrl-C or SIGTERM: stop the demo and clean up."""


def run(
    rounds: int = 0,
    interval_s: float = 8.0,
    out: IO[str] | None = None,
    own_process: bool = False,
    port: int = PREFERRED_PORT,
) -> int:
    """Run the demo until Ctrl-C, or until ``rounds`` failovers when ``rounds`` > 0. Returns 0 when
    every failover happened as expected, 1 otherwise. Always stops what it started. The nodes use
    ``port`` and the next two ports when those are free, else (or when ``port`` is 0) any free ports.

    ``own_process`` (the CLI sets it): this process does nothing else, so the demo may make itself a
    child subreaper and reap every orphan it adopts, leaving no zombie even where PID 1 reaps none.
    """
    return _Demo(rounds, interval_s, out or sys.stdout, own_process, port).main()


class _Demo:
    def __init__(self, rounds: int, interval_s: float, out: IO[str], own_process: bool, port: int) -> None:
        self.rounds = rounds
        self.port = port
        self.own_process = own_process
        self.interval_s = max(interval_s, 1.0)
        self.first_kill_after_s = min(5.0, self.interval_s)
        self.out = out
        self.out_lock = threading.Lock()
        self.t0 = time.monotonic()
        self.stopping = False
        self.tmp: Path | None = None
        self.cluster: LocalCluster | None = None
        self.nodes: list[Node] = []
        self.pumps: list[threading.Thread] = []
        self.problems: list[str] = []
        self.timing = Timing()
        self.rejoining: Node | None = None
        self._commands: dict[str, list[str]] = {}

    # -- the story ---------------------------------------------------------------------------

    def main(self) -> int:
        restore = self._install_signal_handlers()
        if self.own_process:
            _set_child_subreaper(True)
        try:
            self._setup()
            self._story()
            return 1 if self.problems else 0
        except _Stopped:
            self._say("stopping (Ctrl-C)")
            return 1 if self.problems else 0
        except DemoFailed as exc:
            self._say(f"DEMO FAILED: {exc}")
            self._show_logs()
            return 1
        finally:
            self._cleanup()
            restore()

    def _story(self) -> None:
        self._say(
            f"starting {NODE_COUNT} pyquorum daemons on {HOST}, ports "
            f"{', '.join(str(n.port) for n in self.nodes)} ({self.timing.describe()})"
        )
        for node in self.nodes:
            self._start(node)
        master, status = self._wait_for(self._master, ELECTION_WAIT_S, "a first master")
        self._say(
            f"{master.name} is master (term {status['term']}), running the sample script "
            f"(pid {status['script_pid']})"
        )
        failovers: list[float] = []
        next_kill = time.monotonic() + self.first_kill_after_s
        while self.rounds == 0 or len(failovers) < self.rounds:
            self._sleep_until(next_kill)
            master, status = self._wait_for(self._master, ELECTION_WAIT_S, "a master")
            t_kill = time.monotonic()
            failovers.append(self._failover(master, status))
            next_kill = t_kill + self.interval_s
        median = statistics.median(failovers)
        self._say(f"done: {len(failovers)} failover(s), median {median:.2f} s, worst {max(failovers):.2f} s")

    def _failover(self, victim: Node, status: dict[str, Any]) -> float:
        assert victim.proc is not None
        old_term, old_script = int(status["term"]), status.get("script_pid")
        self._say(
            f"kill -9 {victim.name}'s daemon (pid {victim.proc.pid}); its guard must stop its "
            f"script (pid {old_script}) within --stop-timeout"
        )
        t_kill = time.monotonic()
        victim.expect_exit = True
        victim.proc.kill()
        victim.proc.wait()
        script_gone_after: list[float] = []

        def new_master() -> tuple[Node, dict[str, Any]] | None:
            if not script_gone_after and not alive(old_script):
                script_gone_after.append(time.monotonic() - t_kill)
            found = self._master()
            return found if found is not None and int(found[1]["term"]) > old_term else None

        new, new_status = self._wait_for(new_master, ELECTION_WAIT_S, "another node to take over")
        took = time.monotonic() - t_kill
        self._say(
            f"{new.name} took over after {took:.2f} s: term {new_status['term']}, script pid "
            f"{new_status['script_pid']}"
        )
        deadline = t_kill + self.timing.stop_timeout_s + RESTART_GRACE_S
        while not script_gone_after and time.monotonic() < deadline:
            self._sleep(0.02)
            if not alive(old_script):
                script_gone_after.append(time.monotonic() - t_kill)
        if script_gone_after:
            self._say(
                f"the old script (pid {old_script}) was gone {script_gone_after[0]:.2f} s after the kill"
            )
        else:
            problem = f"the old script (pid {old_script}) still runs {deadline - t_kill:.1f} s after the kill"
            self.problems.append(problem)
            self._say(f"PROBLEM: {problem}")
        self._start(victim)
        self._say(f"restarted {victim.name}")
        self.rejoining = victim
        return took

    # -- set-up, processes, cleanup ----------------------------------------------------------

    def _setup(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="pyquorum-demo-"))
        script = self.tmp / "sample-script"
        script.write_text(f"#!{sys.executable}\n{SAMPLE_SCRIPT}", encoding="utf-8")
        script.chmod(0o755)
        key_file = self.tmp / "cluster.key"
        keyfile.keygen(key_file)
        names = [f"{HOST}:{port}" for port in free_udp_ports(NODE_COUNT, self.port)]
        self.cluster = LocalCluster(self.tmp, names, str(self.tmp), error=DemoFailed)
        self.nodes = self.cluster.nodes
        for node in self.nodes:
            peers = [other for other in names if other != node.name]
            node.argv = daemon_argv(node.name, peers, node.state_dir, script=script, key_file=key_file)
        self._commands = {node.name: node.argv for node in self.nodes}

    def _start(self, node: Node) -> None:
        assert self.cluster is not None
        self.cluster.spawn(node, subprocess.PIPE)
        assert node.proc is not None and node.proc.stdout is not None
        pump = threading.Thread(
            target=self._pump, args=(node, node.proc.stdout), name=f"pump {node}", daemon=True
        )
        self.pumps.append(pump)
        pump.start()

    def _pump(self, node: Node, pipe: IO[bytes]) -> None:
        # Runs until every writer of the pipe is gone: the daemon, its guard and its script.
        with pipe, node.log_path.open("ab") as log:
            for raw in pipe:
                log.write(raw)
                log.flush()
                match = _SCRIPT_LINE.search(raw.decode("utf-8", "replace"))
                if match:
                    self._say(f"  script: {match.group(0)}")

    def _cleanup(self) -> None:
        self.stopping = True
        if self.cluster is not None:
            # SIGTERM first: each daemon stops its script and resigns, as in production.
            self.cluster.stop(grace_s=self.timing.stop_timeout_s + RESTART_GRACE_S)
            leftovers = self.cluster.sweep(timeout_s=3.0)
            if leftovers:
                self._say(f"killed {len(leftovers)} leftover process(es) of the demo")
        for pump in self.pumps:
            pump.join(timeout=2.0)
        if self.own_process:
            _reap_orphans()
            _set_child_subreaper(False)
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self._say(f"stopped every process the demo started; removed {self.tmp}")

    # -- observing ---------------------------------------------------------------------------

    def _master(self) -> tuple[Node, dict[str, Any]] | None:
        """The node whose daemon says it is master and runs its script (highest term wins)."""
        assert self.cluster is not None
        return self.cluster.master_status()

    def _wait_for(self, probe: Callable[[], T | None], timeout_s: float, what: str) -> T:
        assert self.cluster is not None
        return self.cluster.wait_for(probe, timeout_s, what, interval_s=0.02, sleep=self._sleep)

    def _sleep_until(self, moment: float) -> None:
        while (left := moment - time.monotonic()) > 0:
            self._sleep(min(left, 0.1))
            self._note_rejoin()

    def _note_rejoin(self) -> None:
        node = self.rejoining
        if node is None or self.cluster is None:
            return
        status = self.cluster.status(node)
        if status is None or status.get("master") in (None, node.name):
            return
        self.rejoining = None
        role, master, term = status.get("role"), status["master"], status["term"]
        self._say(f"{node.name} rejoined as a {role}, following {master} (term {term})")

    def _sleep(self, seconds: float) -> None:
        if self.stopping:
            raise _Stopped
        time.sleep(seconds)
        if self.stopping:
            raise _Stopped

    def _say(self, text: str) -> None:
        with self.out_lock:
            print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", file=self.out, flush=True)

    def _show_logs(self, lines: int = 15) -> None:
        for node in self.nodes:
            with contextlib.suppress(OSError):
                tail = node.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
                self._say(f"last lines of {node.name}'s log:")
                for line in tail:
                    print(f"    {line}", file=self.out, flush=True)

    def _install_signal_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.stopping = True  # the main loop notices within 0.1 s; cleanup is bounded

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore


def _set_child_subreaper(on: bool) -> None:
    # Orphans of our daemons (a script whose guard died) become our children instead of init's, so
    # _reap_orphans() can collect them even in a container whose PID 1 reaps nothing.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(36, int(on), 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _reap_orphans() -> None:
    # Only after every Popen has been waited for: waitpid(-1) would otherwise steal their status.
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
