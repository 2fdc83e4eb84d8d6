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
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import IO, TypeVar

from pyquorum import keyfile
from pyquorum._localcluster import LOOPBACK, LocalCluster, Node, Status, alive, daemon_argv, free_udp_ports
from pyquorum.core.address import DEFAULT_PORT
from pyquorum.core.lease import Timing

__all__ = ["SAMPLE_SCRIPT", "DemoFailed", "free_udp_ports", "run"]

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
    port: int = DEFAULT_PORT,
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
        self.rounds, self.out, self.own_process = rounds, out, own_process
        self.interval_s = max(interval_s, 1.0)
        self.first_kill_after_s = min(5.0, self.interval_s)
        self.t0 = time.monotonic()
        self.stopping = False
        self.problems: list[str] = []
        self.timing = Timing()
        self.rejoining: Node | None = None
        self.echoed: dict[Node, int] = {}  # how far each node's log has been searched for script lines
        names = [f"{LOOPBACK}:{p}" for p in free_udp_ports(NODE_COUNT, port)]
        tmp = Path(tempfile.mkdtemp(prefix="pyquorum-demo-"))  # main() removes it, whatever happens
        self.cluster = LocalCluster(tmp, names, str(tmp), error=DemoFailed)

    # -- the story ---------------------------------------------------------------------------

    def main(self) -> int:
        # Signals only set a flag: the story notices within 0.1 s, and cleanup is bounded.
        signals = (
            (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
        )
        previous = {sig: signal.signal(sig, self._on_signal) for sig in signals}
        if self.own_process:
            _set_child_subreaper(True)
        try:
            self._setup()
            self._story()
        except _Stopped:
            self._say("stopping (Ctrl-C)")
        except DemoFailed as exc:
            self._say(f"DEMO FAILED: {exc}")
            self._show_logs()
            return 1
        finally:
            self._cleanup()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 1 if self.problems else 0

    def _story(self) -> None:
        self._say(
            f"starting {NODE_COUNT} pyquorum daemons on {LOOPBACK}, ports "
            f"{', '.join(str(n.port) for n in self.cluster.nodes)} ({self.timing.describe()})"
        )
        for node in self.cluster.nodes:
            self.cluster.spawn(node)
        master, status = self._wait(self.cluster.master_status, "a first master")
        self._say(
            f"{master.name} is master (term {status['term']}), running the sample script "
            f"(pid {status['script_pid']})"
        )
        failovers: list[float] = []
        next_kill = time.monotonic() + self.first_kill_after_s
        while self.rounds == 0 or len(failovers) < self.rounds:
            self._sleep_until(next_kill)
            master, status = self._wait(self.cluster.master_status, "a master")
            t_kill = time.monotonic()
            failovers.append(self._failover(master, status))
            next_kill = t_kill + self.interval_s
        median = statistics.median(failovers)
        self._say(f"done: {len(failovers)} failover(s), median {median:.2f} s, worst {max(failovers):.2f} s")

    def _failover(self, victim: Node, status: Status) -> float:
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
        gone_after: list[float] = []

        def new_master() -> tuple[Node, Status] | None:
            if not gone_after and not alive(old_script):
                gone_after.append(time.monotonic() - t_kill)
            found = self.cluster.master_status()
            return found if found is not None and int(found[1]["term"]) > old_term else None

        new, new_status = self._wait(new_master, "another node to take over")
        took = time.monotonic() - t_kill
        self._say(
            f"{new.name} took over after {took:.2f} s: term {new_status['term']}, script pid "
            f"{new_status['script_pid']}"
        )
        deadline = t_kill + self.timing.stop_timeout_s + RESTART_GRACE_S
        while not gone_after and time.monotonic() < deadline:
            self._sleep(0.02)
            if not alive(old_script):
                gone_after.append(time.monotonic() - t_kill)
        if gone_after:
            self._say(f"the old script (pid {old_script}) was gone {gone_after[0]:.2f} s after the kill")
        else:
            problem = f"the old script (pid {old_script}) still runs {deadline - t_kill:.1f} s after the kill"
            self.problems.append(problem)
            self._say(f"PROBLEM: {problem}")
        self.cluster.spawn(victim)
        self._say(f"restarted {victim.name}")
        self.rejoining = victim
        return took

    # -- set-up and cleanup ------------------------------------------------------------------

    def _setup(self) -> None:
        script, key_file = self.cluster.dir / "sample-script", self.cluster.dir / "cluster.key"
        script.write_text(f"#!{sys.executable}\n{SAMPLE_SCRIPT}", encoding="utf-8")
        script.chmod(0o755)
        keyfile.keygen(key_file)
        for node in self.cluster.nodes:
            peers = [other for other in self.cluster.members if other != node.name]
            node.argv = daemon_argv(node.name, peers, node.state_dir, script=script, key_file=key_file)

    def _cleanup(self) -> None:
        self.stopping = True
        # SIGTERM first: each daemon stops its script and resigns, as in production.
        self.cluster.stop(grace_s=self.timing.stop_timeout_s + RESTART_GRACE_S)
        self._echo_script_lines()
        if leftovers := self.cluster.sweep(timeout_s=3.0):
            self._say(f"killed {len(leftovers)} leftover process(es) of the demo")
        if self.own_process:
            _reap_orphans()
            _set_child_subreaper(False)
        shutil.rmtree(self.cluster.dir, ignore_errors=True)
        self._say(f"stopped every process the demo started; removed {self.cluster.dir}")

    # -- observing ---------------------------------------------------------------------------

    def _wait(self, probe: Callable[[], T | None], what: str) -> T:
        return self.cluster.wait_for(probe, ELECTION_WAIT_S, what, interval_s=0.02, sleep=self._sleep)

    def _sleep_until(self, moment: float) -> None:
        while (left := moment - time.monotonic()) > 0:
            self._sleep(min(left, 0.1))
            self._note_rejoin()

    def _note_rejoin(self) -> None:
        node = self.rejoining
        status = None if node is None else self.cluster.status(node)
        if node is None or status is None or status.get("master") in (None, node.name):
            return
        self.rejoining = None
        role, master, term = status.get("role"), status["master"], status["term"]
        self._say(f"{node.name} rejoined as a {role}, following {master} (term {term})")

    def _echo_script_lines(self) -> None:
        # The daemons, guards and scripts all append to the node's log; only whole lines are searched.
        for node in self.cluster.nodes:
            with contextlib.suppress(OSError), node.log_path.open("rb") as log:
                log.seek(self.echoed.get(node, 0))
                text = log.read()
                text = text[: text.rfind(b"\n") + 1]
                self.echoed[node] = self.echoed.get(node, 0) + len(text)
                for match in _SCRIPT_LINE.finditer(text.decode("utf-8", "replace")):
                    self._say(f"  script: {match.group(0)}")

    def _sleep(self, seconds: float) -> None:
        if self.stopping:
            raise _Stopped
        time.sleep(seconds)
        self._echo_script_lines()
        if self.stopping:
            raise _Stopped

    def _say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", file=self.out, flush=True)

    def _show_logs(self, lines: int = 15) -> None:
        for node in self.cluster.nodes:
            self._say(f"last lines of {node.name}'s log:")
            for line in self.cluster.log(node).splitlines()[-lines:]:
                print(f"    {line}", file=self.out, flush=True)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True


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
