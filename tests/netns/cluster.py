"""Real pyquorum daemons on the hosts of a ``Network``, their processes, and a log of what was done.

What this owns. ``Cluster`` starts one daemon per host with ``ip netns exec <ns> pyquorum -b 10.99.0.<i>
...``, each in its own session, logging to ``h<i>.log``; it breaks processes the way production does
(SIGKILL of a whole host, of the daemon, of the script; SIGSTOP of the daemon or of the whole host) and
writes every step to ``faults.jsonl``; ``RunMonitor`` watches the script runs. The checker
(``checker.py``) then reads only files, so a failed scenario can be checked again from its directory.

Which processes belong to a host. Every daemon is started with ``PQT_TAG=<its namespace>`` in its
environment; the daemon passes its environment to the guard and the script (daemon.py
``_script_env``), so ``/proc/<pid>/environ`` names the host of every process it led to, whatever its
session. ``host_pids`` reads it; a whole-host kill first SIGSTOPs every tagged process until no new
one appears (so nothing can fork or act any more: the moment of the crash), then SIGKILLs them all.

When a script run ends. A run starts at its first line (its first effect) and ends when its process
has exited: ``RunMonitor`` opens a pidfd for each new pid it reads in the workload log and records the
moment poll() says the process is gone. That moment is never before the true exit (it can only be
late, by the monitor's wake-up latency), so an overlap can be over-reported but never missed. If the
process is already gone when the monitor first sees its pid, the end is the moment it found out
(``late``), again never early. ``exits.log`` has one line per run: ``<pid> <end> pidfd|late``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyquorum.core.lease import Timing
from tests.netns import hosts
from tests.netns.hosts import Network

TAG_VAR = "PQT_TAG"
PORT = 7000
WORKLOAD_SOURCE = Path(__file__).with_name("workload.py")
# A run is "live" for the harness while it has written a line this recently (the script ticks every 5 ms).
LIVE_LINE_AGE_S = 0.25
# After a host pause, the script resumes this long before its guard and daemon (see resume_host).
SCRIPT_HEAD_START_S = 0.02


def pyquorum_command() -> list[str]:
    exe = Path(sys.executable).with_name("pyquorum")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "pyquorum"]


# ---- processes ----------------------------------------------------------------------------------


def _environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1])


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def tagged_pids(prefix: str, *, exact: bool = False) -> dict[int, str]:
    """Live processes (not zombies) whose tag starts with ``prefix`` (or is ``prefix``): pid -> tag."""
    found: dict[int, str] = {}
    key = f"{TAG_VAR}={prefix}".encode()
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        pid = int(name)
        for var in _environ(pid).split(b"\0"):
            if var == key if exact else var.startswith(key):
                st = _stat(pid)
                if st is not None and st[0] not in ("Z", "X"):
                    found[pid] = var.split(b"=", 1)[1].decode()
                break
    return found


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def stopped(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] in ("T", "t")


def kill_all(pids: Iterator[int] | list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _describe(roles: dict[int, str]) -> str:
    return ", ".join(f"{role} {pid}" for pid, role in sorted(roles.items(), key=lambda item: item[1]))


def sweep_processes() -> list[int]:
    """SIGKILL the processes of earlier runs whose test process is gone (see ``hosts.sweep``)."""
    victims = []
    for pid, tag in tagged_pids(hosts.PREFIX).items():
        owner = tag[len(hosts.PREFIX) :].split("x", 1)[0]
        if owner.isdigit() and not alive(int(owner)):
            victims.append(pid)
    kill_all(victims, signal.SIGCONT)
    kill_all(victims, signal.SIGKILL)
    return victims


# ---- the script runs ----------------------------------------------------------------------------


@dataclass
class RunView:
    host: str
    pid: int
    token: int
    start: float
    last: float
    end: float | None = None


class RunMonitor(threading.Thread):
    """Reads the workload log as it grows and records when each script process exits (pidfd)."""

    def __init__(self, workload: Path, exits: Path) -> None:
        super().__init__(name="pqt-run-monitor", daemon=True)
        self.workload = workload
        self.exits_path = exits
        self.runs: dict[int, RunView] = {}
        self.lock = threading.Lock()
        self.max_gap_s = 0.0  # the longest time between two polls: the worst wake-up latency seen
        self._stop_event = threading.Event()
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # surfaced by stop()
            self._error = exc

    def _loop(self) -> None:
        poller = select.poll()
        by_fd: dict[int, int] = {}
        pending = b""
        last_poll = time.monotonic()
        with open(self.workload, "rb") as log, open(self.exits_path, "a") as exits:

            def ended(pid: int, at: float, how: str) -> None:
                with self.lock:
                    self.runs[pid].end = at
                exits.write(f"{pid} {at:.6f} {how}\n")
                exits.flush()

            while True:
                final = self._stop_event.is_set()
                for fd, _ in poller.poll(2):
                    now = time.monotonic()
                    pid = by_fd.pop(fd)
                    poller.unregister(fd)
                    os.close(fd)
                    ended(pid, now, "pidfd")
                now = time.monotonic()
                self.max_gap_s = max(self.max_gap_s, now - last_poll)
                last_poll = now
                chunk = log.read()
                if chunk:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for raw in lines:
                        parts = raw.decode(errors="replace").split()
                        if len(parts) != 5:
                            continue
                        host, pid, t, token = parts[0], int(parts[1]), float(parts[2]), int(parts[3])
                        view = self.runs.get(pid)
                        if view is None:
                            with self.lock:
                                self.runs[pid] = RunView(host, pid, token, t, t)
                            try:
                                fd = os.pidfd_open(pid)
                            except ProcessLookupError:
                                ended(pid, time.monotonic(), "late")
                                continue
                            by_fd[fd] = pid
                            poller.register(fd, select.POLLIN)
                        else:
                            view.last = max(view.last, t)
                if final:
                    for fd in by_fd:
                        os.close(fd)
                    return

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)
        if self._error is not None:
            raise RuntimeError(f"the run monitor failed: {self._error!r}") from self._error

    def live(self, now: float | None = None) -> list[RunView]:
        """Runs that have not ended and wrote a line within ``LIVE_LINE_AGE_S``."""
        now = time.monotonic() if now is None else now
        with self.lock:
            return [r for r in self.runs.values() if r.end is None and now - r.last <= LIVE_LINE_AGE_S]

    def unended(self) -> list[RunView]:
        with self.lock:
            return [r for r in self.runs.values() if r.end is None]


# ---- the cluster --------------------------------------------------------------------------------


@dataclass
class Daemon:
    host: int
    proc: subprocess.Popen[bytes]
    started_at: float
    incarnation: int


@dataclass
class Cluster:
    """The daemons of one scenario on ``net``; files go to ``workdir``."""

    net: Network
    workdir: Path
    timing: Timing
    key_file: Path
    scenario: str = ""
    broken: str = ""  # PQT_BROKEN for broken_daemon.py: test the tester; "" runs the real command
    daemons: dict[int, Daemon] = field(default_factory=dict)
    paused: set[int] = field(default_factory=set)  # hosts whose daemon (or whole host) is SIGSTOPped
    incarnations: dict[int, int] = field(default_factory=dict)
    exit_codes: list[tuple[int, int | None, str]] = field(default_factory=list)
    monitor: RunMonitor | None = None
    evidence: str = ""  # what the last fault method did and saw, for the fault log
    meta: dict[str, Any] = field(default_factory=dict)  # more for meta.json (the scenario's flags)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workload = self.workdir / "workload.log"
        self.register = self.workdir / "register"
        self.faults_path = self.workdir / "faults.jsonl"
        self.script = self.workdir / "workload"
        for path in (
            self.workload,
            self.faults_path,
            Path(f"{self.register}.log"),
            self.workdir / "exits.log",
        ):
            path.touch()
        self.script.write_text(f"#!{sys.executable} -IS\n" + WORKLOAD_SOURCE.read_text())
        self.script.chmod(0o755)
        self.monitor = RunMonitor(self.workload, self.workdir / "exits.log")
        self.monitor.start()
        t = self.timing
        meta = {
            "scenario": self.scenario,
            "n": self.net.n,
            "hosts": {f"h{h}": self.net.ip(h) for h in self.net.hosts},
            "heartbeat_interval_s": t.heartbeat_interval_s,
            "election_timeout_s": t.election_timeout_s,
            "stop_timeout_s": t.stop_timeout_s,
            "start_delay_s": t.start_delay_s,
            **self.meta,
        }
        (self.workdir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        self.record("state")

    # ---- naming -------------------------------------------------------------------------------------

    def tag(self, host: int) -> str:
        return self.net.ns(host)

    def log_path(self, host: int) -> Path:
        return self.workdir / f"h{host}.log"

    def state_dir(self, host: int) -> Path:
        return self.workdir / "state" / f"h{host}"

    # ---- the fault log ------------------------------------------------------------------------------

    def up(self) -> list[int]:
        """Hosts whose daemon runs and is not stopped."""
        return sorted(h for h, d in self.daemons.items() if d.proc.poll() is None and h not in self.paused)

    def record(self, kind: str, **fields: Any) -> float:
        """Append one step to faults.jsonl with the time and the state after it; return the time."""
        now = time.monotonic()
        entry = {
            "t": now,
            "kind": kind,
            **fields,
            "up": self.up(),
            "paused": sorted(self.paused),
            "cuts": sorted(self.net.cuts),
            "loss": self.net.loss_percent,
        }
        with open(self.faults_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        return now

    # ---- daemons ------------------------------------------------------------------------------------

    def start(self, host: int) -> None:
        """Start host's daemon (again: same state dir) in a session of its own."""
        assert host not in self.daemons or self.daemons[host].proc.poll() is not None, f"h{host} runs"
        t = self.timing
        peers = [f"{self.net.ip(p)}:{PORT}" for p in self.net.hosts if p != host]
        cmd = [
            "ip", "netns", "exec", self.net.ns(host), *self._command(),
            "-b", self.net.ip(host), "-p", str(PORT), "-s", str(self.script),
            "--state-dir", str(self.state_dir(host)), "--key-file", str(self.key_file),
            "--heartbeat-interval", repr(t.heartbeat_interval_s),
            "--election-timeout", repr(t.election_timeout_s),
            "--stop-timeout", repr(t.stop_timeout_s),
            "--start-delay", repr(t.start_delay_s),
            "-vv" if os.environ.get("PYQUORUM_NETNS_DEBUG") else "-v", *peers,
        ]  # fmt: skip
        env = dict(os.environ)
        if self.broken:
            env["PQT_BROKEN"] = self.broken
        env.update(
            {
                TAG_VAR: self.tag(host),
                "PQT_HOST": f"h{host}",
                "PQT_WORKLOAD": str(self.workload),
                "PQT_REGISTER": str(self.register),
            }
        )
        self.incarnations[host] = self.incarnations.get(host, 0) + 1
        n = self.incarnations[host]
        with open(self.log_path(host), "ab") as log:
            log.write(f"=== pqt: h{host} incarnation {n} starts at {time.monotonic():.6f}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.daemons[host] = Daemon(host, proc, time.monotonic(), n)
        self.paused.discard(host)
        self.record("start", host=host, incarnation=n)

    def _command(self) -> list[str]:
        if self.broken:
            return [sys.executable, str(Path(__file__).with_name("broken_daemon.py"))]
        # If the test process dies (SIGKILL), its daemons die with it: setpriv sets PDEATHSIG and
        # execs, so the daemon's pid, session and environment are unchanged. The next run's sweep
        # covers what is left even without it.
        if shutil.which("setpriv"):
            return ["setpriv", "--pdeathsig", "KILL", *pyquorum_command()]
        return pyquorum_command()

    def start_all(self) -> None:
        for h in self.net.hosts:
            self.start(h)

    def daemon_pid(self, host: int) -> int:
        return self.daemons[host].proc.pid

    def host_pids(self, host: int) -> dict[int, str]:
        """Every live process of this host: pid -> role (daemon, guard, script)."""
        pids = {}
        for pid in tagged_pids(self.tag(host), exact=True):
            cmd = _cmdline(pid)
            if host in self.daemons and pid == self.daemons[host].proc.pid:
                role = "daemon"
            elif b"guard.py" in cmd:
                role = "guard"
            elif str(self.script).encode() in cmd:
                role = "script"
            else:
                role = "other"
            pids[pid] = role
        return pids

    def _reap(self, host: int, timeout: float = 10.0) -> int | None:
        d = self.daemons.get(host)
        if d is None:
            return None
        try:
            code = d.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return code

    def wait_gone(self, pids: list[int], timeout: float = 5.0) -> bool:
        give_up = time.monotonic() + timeout
        while any(alive(p) for p in pids):
            if time.monotonic() > give_up:
                return False
            time.sleep(0.002)
        return True

    def stop(self, host: int, timeout: float | None = None) -> int | None:
        """SIGTERM the daemon (a planned stop) and wait for it to exit; return its exit code."""
        d = self.daemons[host]
        timeout = timeout if timeout is not None else self.timing.stop_timeout_s + 5.0
        d.proc.send_signal(signal.SIGTERM)
        code = self._reap(host, timeout)
        self.evidence = f"SIGTERMed daemon {d.proc.pid}: exit status {code}"
        self.exit_codes.append((host, code, "sigterm"))
        self.record("stopped", host=host, exit_code=code)
        return code

    def freeze_host(self, host: int) -> dict[int, str]:
        """SIGSTOP every process of the host until no new one appears; return them (pid -> role)."""
        frozen: dict[int, str] = {}
        for _ in range(50):
            new = {p: role for p, role in self.host_pids(host).items() if p not in frozen}
            if not new:
                break
            kill_all(list(new), signal.SIGSTOP)
            frozen.update(new)
        return frozen

    def kill_host(self, host: int) -> bool:
        """kill -9 the whole host: daemon, guard and script at one moment. True if all are gone."""
        frozen = self.freeze_host(host)
        kill_all(list(frozen), signal.SIGKILL)
        self._reap(host)
        gone = self.wait_gone(list(frozen)) and not self.host_pids(host)
        self.exit_codes.append((host, self.daemons[host].proc.returncode, "sigkill-host"))
        self.paused.discard(host)
        self.evidence = f"froze then SIGKILLed {_describe(frozen)}: " + (
            "all gone" if gone else "NOT all gone"
        )
        return gone and bool(frozen)

    def kill_daemon(self, host: int) -> bool:
        d = self.daemons[host]
        with contextlib.suppress(ProcessLookupError):
            d.proc.send_signal(signal.SIGKILL)
        code = self._reap(host)
        self.exit_codes.append((host, code, "sigkill-daemon"))
        self.paused.discard(host)
        self.evidence = f"SIGKILLed daemon {d.proc.pid}: exit status {code}"
        return code == -signal.SIGKILL

    def script_pids(self, host: int) -> list[int]:
        return [p for p, role in self.host_pids(host).items() if role == "script"]

    def kill_script(self, host: int) -> bool:
        pids = self.script_pids(host)
        kill_all(pids, signal.SIGKILL)
        gone = bool(pids) and self.wait_gone(pids)
        self.evidence = f"SIGKILLed script {pids}: " + ("gone" if gone else "NOT gone")
        return gone

    def stop_daemon(self, host: int) -> bool:
        """SIGSTOP the daemon alone (its guard and script are in sessions of their own)."""
        pid = self.daemon_pid(host)
        os.kill(pid, signal.SIGSTOP)
        self.paused.add(host)
        ok = self._wait_stopped([pid])
        self.evidence = f"SIGSTOPped daemon {pid}: " + ("state T" if ok else "NOT stopped")
        return ok

    def cont_daemon(self, host: int) -> None:
        os.kill(self.daemon_pid(host), signal.SIGCONT)
        self.paused.discard(host)

    def pause_host(self, host: int) -> bool:
        """SIGSTOP every process of the host: a VM pause (protocol.md §4.5)."""
        frozen = self.freeze_host(host)
        self.paused.add(host)
        ok = bool(frozen) and self._wait_stopped(list(frozen))
        self.evidence = f"SIGSTOPped {_describe(frozen)}: " + ("state T" if ok else "NOT all stopped")
        return ok

    def resume_host(self, host: int) -> None:
        """SIGCONT the host's processes, the script ``SCRIPT_HEAD_START_S`` before the others: the worst
        order for safety (it runs before its guard can enforce the expired deadline), which only
        fencing can cover (protocol.md §4.5)."""
        pids = self.host_pids(host)
        scripts = [p for p, role in pids.items() if role == "script"]
        kill_all(scripts, signal.SIGCONT)
        if scripts:
            time.sleep(SCRIPT_HEAD_START_S)
        kill_all([p for p in pids if p not in scripts], signal.SIGCONT)
        self.paused.discard(host)

    def _wait_stopped(self, pids: list[int], timeout: float = 2.0) -> bool:
        give_up = time.monotonic() + timeout
        while not all(stopped(p) or not alive(p) for p in pids):
            if time.monotonic() > give_up:
                return False
            time.sleep(0.001)
        return any(stopped(p) for p in pids)

    def down(self) -> list[int]:
        """Hosts whose daemon is not running (killed or stopped by a fault)."""
        return [h for h in self.net.hosts if h not in self.daemons or self.daemons[h].proc.poll() is not None]

    # ---- what runs ----------------------------------------------------------------------------------

    def running_host(self) -> int | None:
        """The host whose script runs now (None if none, or if several: the checker will say)."""
        assert self.monitor is not None
        live = self.monitor.live()
        if len(live) != 1:
            return None
        return int(live[0].host[1:])

    def wait_running(self, timeout: float, *, not_host: int | None = None, after: float = 0.0) -> int | None:
        """Wait until one host's script runs (optionally: another host than ``not_host``, in a run
        that started after ``after``); return the host, or None at the timeout."""
        assert self.monitor is not None
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            h = self.running_host()
            if h is not None and h != not_host:
                run = self.monitor.live()[0]
                if run.start > after:
                    return h
            time.sleep(0.01)
        return None

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    # ---- the end ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every daemon (planned, SIGTERM), then SIGKILL whatever of this scenario is left,
        and stop the monitor once every run it saw has ended."""
        final: list[tuple[int, int | None]] = []
        try:
            self.net.heal()
            with contextlib.suppress(hosts.HostError):
                self.net.apply()
            for h in list(self.paused):
                self.resume_host(h)
            live = [h for h in self.net.hosts if h in self.daemons and self.daemons[h].proc.poll() is None]
            self.record("shutdown", hosts=live)
            for h in live:
                self.daemons[h].proc.send_signal(signal.SIGTERM)
            for h in live:
                code = self._reap(h, self.timing.stop_timeout_s + 5.0)
                self.exit_codes.append((h, code, "final-sigterm"))
                final.append((h, code))
        finally:
            left = self.kill_leftovers()
            if self.monitor is not None:
                give_up = time.monotonic() + 3.0
                while self.monitor.unended() and time.monotonic() < give_up:
                    time.sleep(0.01)
                self.monitor.stop()
            gap = None if self.monitor is None else round(self.monitor.max_gap_s, 4)
            self.record("closed", final_exit_codes=final, leftovers=left, monitor_max_gap_s=gap)

    def kill_leftovers(self) -> list[int]:
        left = list(tagged_pids(f"{self.net.base}-"))
        kill_all(left, signal.SIGCONT)
        kill_all(left, signal.SIGKILL)
        for d in self.daemons.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                d.proc.wait(5)
        self.wait_gone(left)
        return left
