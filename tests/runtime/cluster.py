"""A real pyquorum cluster on loopback, for tests and benchmarks (tests/runtime/test_cluster.py, bench/).

    with Cluster(3, timing=TUNED, key=True) as c:
        master = c.wait_for_master()
        c.kill9(master, script=True)
        new = c.wait_for_master(newer_than=c.status(master)["term"])
        c.check()                       # no two script runs overlapped, tokens increased, no Traceback

What it starts. ``size`` daemons (``python -m pyquorum -v``) as subprocesses, node ``i`` bound to
``127.0.0.<i+1>`` (loopback only: every address of 127.0.0.0/8 is local on Linux) and one UDP port free
on all of them, each in a session of its own (``start_new_session``), with a state dir and a log file
(stdout and stderr, ``-v``) under one temporary directory; optionally a shared key file made with
``pyquorum keygen``. Every node runs the WORKLOAD below as its script unless ``script=False``.

The workload. A small Python script that appends one line per event to a shared record file, each line
a single ``write()`` to an O_APPEND descriptor (so lines from several processes never mix)::

    <PYQUORUM_NODE> <pid> <time.monotonic()> <PYQUORUM_TERM> <event> [detail]

Events: ``start`` (first thing after the interpreter is up; detail ``cluster=<PYQUORUM_CLUSTER>``),
``tick`` every ``tick_s`` (5 ms), ``term`` (SIGTERM received), ``exit`` (detail ``code=N``, written just
before ``os._exit``). On SIGKILL the last line is a tick. Its behaviour comes from a JSON control file
that it re-reads whenever it changes (``Cluster.set_workload``): per node or for all (``"*"``),
``exit_after_s`` and ``exit_code`` (exit by itself), ``term_delay_s`` (keep ticking that long after
SIGTERM before exiting: a script that ignores SIGTERM, so that the SIGKILL path is exercised).

When a run ends (the checker's choice). A run lasts from its ``start`` line until its process is GONE,
not until its last line: a watcher thread in this process opens a pidfd for every pid it sees in the
record (within 5 ms of its first line) and notes ``time.monotonic()`` when the kernel reports the
process terminated. That is an upper bound on the moment of death, within scheduling latency, and
correct whatever killed it (the guard's SIGKILL, the test's, PDEATHSIG). A run whose end the watcher
did not see falls back to: still alive (/proc) -> open-ended; ``exit`` line -> that line; otherwise its
last tick, flagged as a lower bound (``Run.end_is_lower_bound``). Limit: a run's start is its ``start``
line, so the interpreter's own start-up (~10-20 ms, ``python -I -S``) before it is not counted.

``check_runs`` then asserts that no two runs overlap in time and that tokens increase: every run's
``PYQUORUM_TERM`` is greater than that of every earlier run, or equal to the previous run's when the
same node restarted its script in the same term (protocol.md §3.8).

Leaving the ``with`` block normally runs ``check()`` (unless ``check_on_exit=False``): the runs, and no
Traceback in any daemon log. Teardown (``close()``, run by ``__exit__`` even when the test fails):
SIGKILL to each daemon's process group (its session), then SIGKILL to every process whose environment
carries this cluster's tag (the daemons' guards and scripts inherit it: they run in sessions of their
own), repeated until none is left, then every daemon is reaped and the temporary directory removed
(``keep=True`` or PQTEST_KEEP=1 keeps it). When the ``with`` body raised, the tail of every log and
the runs are printed first, so that pytest shows them.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import pyquorum
from pyquorum.core.lease import Timing
from pyquorum.runtime.storage import STATUS_FILE_NAME, read_status

T = TypeVar("T")

TAG_VAR = "PQTEST_CLUSTER"
RECORD_VAR = "PQTEST_RECORD"
CONTROL_VAR = "PQTEST_CONTROL"
# Generous: the host is shared with other test suites. Timing assertions use measured times, never
# these waits.
DEFAULT_WAIT_S = 30.0
# Port range for clusters: below the kernel's ephemeral range (32768-60999), so that UDP clients of
# other tests rarely hold our port, and away from pyquorum's default 51621 (the demo's).
PORT_RANGE = (20000, 32000)
START_ATTEMPTS = 4

# The timings the tests use where the default is not the point: 10x faster than the defaults.
TUNED = Timing(heartbeat_interval_s=0.05, election_timeout_s=0.5, stop_timeout_s=0.2)
DEFAULT = Timing()

WORKLOAD = """\
import os, time
T0 = time.monotonic()
import json, signal

NODE = os.environ.get("PYQUORUM_NODE", "?").replace(" ", "_")
TERM = os.environ.get("PYQUORUM_TERM", "?").replace(" ", "_")
CLUSTER = os.environ.get("PYQUORUM_CLUSTER", "?").replace(" ", "_")
CONTROL = os.environ.get("PQTEST_CONTROL", "")
FD = os.open(os.environ["PQTEST_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
PID = os.getpid()


def emit(event, t=None):
    t = time.monotonic() if t is None else t
    os.write(FD, f"{NODE} {PID} {t!r} {TERM} {event}\\n".encode())


class Term(Exception):
    pass


def on_term(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a lingering script ignores the rest
    raise Term


settings, stamp = {}, None


def reload():
    global settings, stamp
    try:
        st = os.stat(CONTROL)
        if (st.st_mtime_ns, st.st_size) == stamp:
            return
        with open(CONTROL) as f:
            data = json.load(f)
        stamp = (st.st_mtime_ns, st.st_size)
    except (OSError, ValueError):
        return
    settings = {**data.get("*", {}), **data.get(NODE, {})}


def finish(code):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # exit is the last line
    emit(f"exit code={code}")
    os._exit(code)


emit(f"start cluster={CLUSTER}", T0)
try:  # the handler raises Term: install it inside the try, so that no Traceback can reach the log
    signal.signal(signal.SIGTERM, on_term)
    while True:
        emit("tick")
        if CONTROL:
            reload()
        after = settings.get("exit_after_s")
        if after is not None and time.monotonic() - T0 >= after:
            finish(int(settings.get("exit_code", 0)))
        time.sleep(settings.get("tick_s", 0.005))
except Term:
    emit("term")
    linger_until = time.monotonic() + float(settings.get("term_delay_s", 0))
    while time.monotonic() < linger_until:
        emit("tick")
        time.sleep(settings.get("tick_s", 0.005))
    finish(0)
"""


# ---------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Record:
    """One line of the workload's record."""

    node: str
    pid: int
    t: float
    token: int
    event: str
    detail: str


@dataclass
class Run:
    """One run of the workload: one process, from its ``start`` line until it was gone."""

    node: str
    pid: int
    token: int
    start: float
    last: float
    end: float
    end_is_lower_bound: bool = False
    cluster: str | None = None
    term_at: float | None = None
    exit_at: float | None = None
    exit_code: int | None = None
    has_start: bool = True

    @property
    def alive(self) -> bool:
        return self.end == float("inf")

    def __str__(self) -> str:
        end = (
            "running"
            if self.alive
            else f"{self.end:.3f}" + (" (lower bound)" if self.end_is_lower_bound else "")
        )
        return f"run node={self.node} pid={self.pid} token={self.token} [{self.start:.3f}, {end}]"


def parse_records(text: str) -> list[Record]:
    """The lines of a record file; a line cut short (a writer killed mid-way cannot do that with one
    write(), but a reader may catch the file growing) is ignored."""
    records = []
    for line in text.splitlines():
        parts = line.split(" ", 5)
        if len(parts) < 5:
            continue
        try:
            records.append(
                Record(
                    parts[0],
                    int(parts[1]),
                    float(parts[2]),
                    int(parts[3]),
                    parts[4],
                    parts[5] if len(parts) > 5 else "",
                )
            )
        except ValueError:
            continue
    return records


def build_runs(records: Iterable[Record], gone: dict[int, float] | None = None) -> list[Run]:
    """Group records by process into runs, ordered by start; ``gone`` maps pid -> the moment the
    process was seen to terminate (see the module docstring for the fallbacks)."""
    gone = gone or {}
    runs: dict[int, Run] = {}
    for r in records:
        run = runs.get(r.pid)
        if run is None:
            run = runs[r.pid] = Run(r.node, r.pid, r.token, r.t, r.t, r.t, has_start=False)
        run.start = min(run.start, r.t)
        run.last = max(run.last, r.t)
        if r.event == "start":
            run.has_start = True
            run.cluster = r.detail.removeprefix("cluster=")
        elif r.event == "term":
            run.term_at = r.t
        elif r.event == "exit":
            run.exit_at = r.t
            with contextlib.suppress(ValueError):
                run.exit_code = int(r.detail.removeprefix("code="))
    for run in runs.values():
        if run.pid in gone:
            run.end = max(gone[run.pid], run.last)
        elif pid_alive(run.pid):
            run.end = float("inf")
        elif run.exit_at is not None:
            run.end = run.exit_at
        else:
            run.end, run.end_is_lower_bound = run.last, True
    return sorted(runs.values(), key=lambda run: run.start)


def check_runs(runs: Sequence[Run]) -> None:
    """Assert protocol.md P4 and P5 on real processes: no two runs overlap in time (a run lasts
    until its process is gone), and tokens increase (equal only for the same node's restart)."""
    problems = []
    latest: Run | None = None  # the run that ends last among those started so far
    previous: Run | None = None
    top_token = 0
    for run in runs:
        if not run.has_start:
            problems.append(f"{run} has no start line")
        if latest is not None and run.start < latest.end:
            problems.append(f"OVERLAP: {run} started before {latest} was gone")
        if previous is not None:
            same_restart = run.node == previous.node and run.token == previous.token
            if not (run.token > top_token or (same_restart and run.token == top_token)):
                problems.append(f"TOKEN: {run} does not exceed the earlier tokens (highest {top_token})")
        top_token = max(top_token, run.token)
        if latest is None or run.end > latest.end:
            latest = run
        previous = run
    assert not problems, "\n".join([*problems, "runs:", *map(str, runs)])


class _Watcher(threading.Thread):
    """Follows the record file and notes when each process in it terminates (pidfd_open + poll)."""

    def __init__(self, path: Path) -> None:
        super().__init__(name=f"watch {path}", daemon=True)
        self.path = path
        self.gone: dict[int, float] = {}
        self.lock = threading.Lock()
        self._halt = threading.Event()
        self._seen: set[int] = set()
        self._offset = 0
        self._partial = b""
        self._fds: dict[int, int] = {}  # pidfd -> pid (a fallback poll of /proc when no pidfd)
        self._polled: set[int] = set()
        self._poller = select.poll()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                self.scan()
                events = self._poller.poll(5)
                now = time.monotonic()
                with self.lock:
                    for fd, _ in events:
                        pid = self._fds.pop(fd)
                        self._poller.unregister(fd)
                        os.close(fd)
                        self.gone.setdefault(pid, now)
                    for pid in [p for p in self._polled if not pid_alive(p)]:
                        self._polled.discard(pid)
                        self.gone.setdefault(pid, now)
        finally:
            for fd in self._fds:
                os.close(fd)

    def scan(self) -> None:
        """Read what the record grew by and start watching new pids (also called by readers)."""
        with self.lock:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except FileNotFoundError:
                return
            self._offset += len(data)
            lines = (self._partial + data).split(b"\n")
            self._partial = lines.pop()
            for line in lines:
                parts = line.split(b" ", 3)
                if len(parts) < 3 or not parts[1].isdigit() or int(parts[1]) in self._seen:
                    continue
                pid = int(parts[1])
                self._seen.add(pid)
                try:
                    fd = os.pidfd_open(pid)
                except ProcessLookupError:
                    self.gone.setdefault(pid, time.monotonic())
                except (AttributeError, OSError):  # no pidfd (old kernel): poll /proc instead
                    self._polled.add(pid)
                else:
                    self._fds[fd] = pid
                    self._poller.register(fd, select.POLLIN)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=2.0)


# ---------------------------------------------------------------------------------------------- processes


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (a zombie runs nothing)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _stat(pid: int) -> tuple[str, int, list[str]] | None:
    """(state, ppid, all fields after the command name) from /proc/<pid>/stat, None if gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].decode().split()
    return fields[0], int(fields[1]), fields


def tagged_pids(tag: str) -> list[int]:
    """Live processes (not zombies) whose environment carries ``TAG_VAR=tag``: our daemons, guards
    and scripts. Only our own user's processes are readable, which is all we start."""
    marker = f"{TAG_VAR}={tag}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{name}/environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0") and pid_alive(int(name)):
            found.append(int(name))
    return found


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, their children ...), found through /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None and st[0] != "Z":
            children.setdefault(st[1], []).append(int(name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (/proc/<pid>/stat utime + stime)."""
    st = _stat(pid)
    if st is None:
        raise ProcessLookupError(pid)
    fields = st[2]  # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise ProcessLookupError(pid)


def timing_args(timing: Timing) -> list[str]:
    """The command-line options that give a daemon ``timing``."""
    return [
        "--heartbeat-interval",
        repr(timing.heartbeat_interval_s),
        "--election-timeout",
        repr(timing.election_timeout_s),
        "--stop-timeout",
        repr(timing.stop_timeout_s),
        "--start-delay",
        repr(timing.start_delay_s),
    ]


# ---------------------------------------------------------------------------------------------- the cluster


class ClusterError(AssertionError):
    """The cluster did not do what a wait expected; the message includes the logs' tails."""


@dataclass(eq=False)
class Node:
    """One member: its address, files and current daemon process (None when not running)."""

    index: int
    ip: str
    port: int
    state_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    expect_exit: bool = False
    incarnations: int = 0
    log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """The node's identity, as in PYQUORUM_NODE and status.json: ``127.0.0.1:20123``."""
        return f"{self.ip}:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ValueError(f"{self.name} is not running")
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __str__(self) -> str:
        return self.name


class Cluster:
    """``size`` pyquorum daemons on loopback; see the module docstring. Use as a context manager."""

    def __init__(
        self,
        size: int = 3,
        *,
        timing: Timing = TUNED,
        key: bool = False,
        script: bool = True,
        restart: str | None = None,
        extra_args: Sequence[str] = (),
        workload: dict[str, Any] | None = None,
        check_on_exit: bool = True,
        keep: bool = False,
    ) -> None:
        self.size = size
        self.timing = timing
        self.key = key
        self.script = script
        self.restart_policy = restart
        self.extra_args = list(extra_args)
        self.check_on_exit = check_on_exit
        self.keep = keep or os.environ.get("PQTEST_KEEP") == "1"
        self.tag = uuid.uuid4().hex
        self.dir = Path(tempfile.mkdtemp(prefix="pyquorum-cluster-"))
        self.record_path = self.dir / "record.txt"
        self.control_path = self.dir / "control.json"
        self.script_path = self.dir / "workload.py"
        self.key_path = self.dir / "cluster.key"
        self.nodes: list[Node] = []
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self._control: dict[str, dict[str, Any]] = {"*": dict(workload or {})}
        self._watcher = _Watcher(self.record_path)
        self._closed = False
        self.env: dict[str, str] = {}

    # -- life cycle -------------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        try:
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
        self.close(failed=exc is not None)

    def start(self) -> None:
        """Write the workload and key, pick a free port, start every daemon and wait until each
        has written its status.json (``ready_at``). Retries with another port if one was taken."""
        self.script_path.write_text(f"#!{sys.executable} -IS\n{WORKLOAD}", encoding="utf-8")
        self.script_path.chmod(0o755)
        self._write_control()
        if self.key:
            subprocess.run(
                [sys.executable, "-m", "pyquorum", "keygen", str(self.key_path)],
                check=True,
                capture_output=True,
                env=self._base_env(),
            )
        self.env = self._base_env()
        self._watcher.start()
        for attempt in range(START_ATTEMPTS):
            self._make_nodes(_free_port(self.size))
            self.started_at = time.monotonic()
            for node in self.nodes:
                self._spawn(node)
            try:
                self.wait_for(self._all_ready, DEFAULT_WAIT_S, "every daemon to write its status")
                self.ready_at = time.monotonic()
                return
            except ClusterError:
                in_use = any("in use" in self.log(n) for n in self.nodes)
                if not in_use or attempt == START_ATTEMPTS - 1:
                    raise
                self._kill_all()  # someone took the port between our probe and the bind: again
                for node in self.nodes:
                    if node.log_file is not None:
                        node.log_file.close()

    def _base_env(self) -> dict[str, str]:
        package_parent = str(Path(pyquorum.__file__).resolve().parent.parent)
        path = os.environ.get("PYTHONPATH")
        return dict(
            os.environ,
            PYTHONPATH=package_parent + (os.pathsep + path if path else ""),
            PYTHONUNBUFFERED="1",
            **{TAG_VAR: self.tag, RECORD_VAR: str(self.record_path), CONTROL_VAR: str(self.control_path)},
        )

    def _make_nodes(self, port: int) -> None:
        self.nodes = []
        for i in range(self.size):
            node_dir = self.dir / f"node{i + 1}"
            node_dir.mkdir(exist_ok=True)
            self.nodes.append(Node(i, f"127.0.0.{i + 1}", port, node_dir / "state", node_dir / "daemon.log"))

    def command(self, node: Node) -> list[str]:
        """The daemon's command line."""
        cmd = [sys.executable, "-m", "pyquorum", "-v", "-b", node.ip, "-p", str(node.port)]
        cmd += ["--state-dir", str(node.state_dir), *timing_args(self.timing)]
        if self.script:
            cmd += ["-s", str(self.script_path)]
        if self.key:
            cmd += ["--key-file", str(self.key_path)]
        if self.restart_policy is not None:
            cmd += ["--restart", self.restart_policy]
        cmd += self.extra_args
        return cmd + [other.name for other in self.nodes if other is not node]

    def _spawn(self, node: Node) -> None:
        if node.running:
            raise ValueError(f"{node} is already running")
        if node.log_file is None:
            node.log_file = node.log_path.open("ab")
        node.incarnations += 1
        node.log_file.write(f"---- harness: start #{node.incarnations} at {time.monotonic():.3f}\n".encode())
        node.log_file.flush()
        node.expect_exit = False
        node.proc = subprocess.Popen(
            self.command(node),
            stdin=subprocess.DEVNULL,
            stdout=node.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=self.env,
            cwd=self.dir,
        )

    def _all_ready(self) -> bool | None:
        return all(self.status(n) is not None for n in self.nodes) or None

    def close(self, failed: bool = False) -> None:
        """Kill everything this cluster started, reap the daemons, remove the temp dir. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if failed:
            with contextlib.suppress(Exception):
                print(self.report(), file=sys.stderr)
        try:
            self._kill_all()
        finally:
            if self._watcher.is_alive():
                self._watcher.stop()
            for node in self.nodes:
                if node.log_file is not None:
                    node.log_file.close()
            if self.keep:
                print(f"kept {self.dir}", file=sys.stderr)
            else:
                shutil.rmtree(self.dir, ignore_errors=True)

    def _kill_all(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.expect_exit = True
                # still our unreaped child: its pid, which is its session's process group id, is ours
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.proc.pid, signal.SIGKILL)
        give_up = time.monotonic() + 10.0
        while (left := tagged_pids(self.tag)) and time.monotonic() < give_up:
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
        for node in self.nodes:
            if node.proc is not None:
                node.proc.wait()
        if left := tagged_pids(self.tag):
            raise ClusterError(f"processes {left} survived SIGKILL for 10 s")

    # -- observing --------------------------------------------------------------------------------

    def node(self, name: str) -> Node:
        """The node called ``name`` (``127.0.0.2:20123``)."""
        return next(n for n in self.nodes if n.name == name)

    def status(self, node: Node) -> dict[str, Any] | None:
        """The status.json of the node's running daemon, None if not running or not written yet."""
        if not node.running:
            return None
        try:
            status = read_status(node.state_dir / STATUS_FILE_NAME)
        except (OSError, ValueError):
            return None
        if status is None or status.get("pid") != node.pid:
            return None
        return status

    def master(self) -> Node | None:
        """The node whose daemon says it is master (and runs its script, if the cluster has one);
        the highest term if several say so (a stale master has not noticed yet)."""
        found = []
        for node in self.nodes:
            st = self.status(node)
            if st is None or st.get("role") != "master":
                continue
            if self.script and not isinstance(st.get("script_pid"), int):
                continue
            found.append((int(st["term"]), node))
        return max(found, key=lambda f: f[0])[1] if found else None

    def wait_for_master(
        self, timeout: float = DEFAULT_WAIT_S, *, newer_than: int = 0, exclude: Iterable[Node] = ()
    ) -> Node:
        """Wait until a node (not in ``exclude``) is master of a term above ``newer_than`` and runs
        its script; return it. Raises ``ClusterError`` on timeout or if a daemon exits unexpectedly."""
        excluded = set(exclude)

        def probe() -> Node | None:
            m = self.master()
            if m is None or m in excluded:
                return None
            st = self.status(m)
            return m if st is not None and int(st["term"]) > newer_than else None

        return self.wait_for(probe, timeout, f"a master of a term above {newer_than}")

    def wait_for(
        self, probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.005
    ) -> T:
        """Call ``probe`` until it returns something other than None (or False); fail after
        ``timeout`` or as soon as a daemon exits that no one killed."""
        give_up = time.monotonic() + timeout
        while True:
            result = probe()
            if result is not None and result is not False:
                return result
            for node in self.nodes:
                if node.proc is not None and node.proc.poll() is not None and not node.expect_exit:
                    raise ClusterError(
                        f"the daemon of {node} exited with code {node.proc.returncode} while waiting for "
                        f"{what}\n{self.report()}"
                    )
            if time.monotonic() > give_up:
                raise ClusterError(f"no {what} within {timeout:.1f} s\n{self.report()}")
            time.sleep(interval)

    def records(self) -> list[Record]:
        """Every line the workload wrote so far."""
        try:
            return parse_records(self.record_path.read_text(encoding="utf-8", errors="replace"))
        except FileNotFoundError:
            return []

    def runs(self) -> list[Run]:
        """The workload's runs so far, in order of start, each ending when its process was gone."""
        self._watcher.scan()
        with self._watcher.lock:
            gone = dict(self._watcher.gone)
        return build_runs(self.records(), gone)

    def wait_for_run(
        self, timeout: float = DEFAULT_WAIT_S, *, after: float = 0.0, node: Node | None = None
    ) -> Run:
        """The first run that started after ``after`` (a ``time.monotonic()``), on ``node`` if given."""
        return self.wait_for(
            lambda: next(
                (r for r in self.runs() if r.start > after and (node is None or r.node == node.name)), None
            ),
            timeout,
            f"a script run started after {after:.3f}" + (f" on {node}" if node else ""),
        )

    def gone_at(self, pid: int, timeout: float = DEFAULT_WAIT_S) -> float:
        """Wait until the workload process ``pid`` is gone; return when it was (see Run.end)."""
        self.wait_for(lambda: not pid_alive(pid), timeout, f"script pid {pid} to be gone")
        time.sleep(0.01)  # let the watcher record it
        self._watcher.scan()
        with self._watcher.lock:
            if pid in self._watcher.gone:
                return self._watcher.gone[pid]
        return time.monotonic()

    def log(self, node: Node) -> str:
        try:
            return node.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def check(self) -> list[Run]:
        """The end-of-test checks: no two script runs overlapped, tokens increased (``check_runs``),
        and no daemon log holds a Traceback. Returns the runs."""
        runs = self.runs()
        check_runs(runs)
        for node in self.nodes:
            assert "Traceback" not in self.log(node), f"Traceback in the log of {node}:\n{self.log(node)}"
        return runs

    def report(self, lines: int = 25) -> str:
        """The tail of every daemon log and of the record, for a failure message."""
        out = [f"cluster dir {self.dir}"]
        for node in self.nodes:
            tail = self.log(node).splitlines()[-lines:]
            out.append(f"--- {node} (running={node.running}) last {len(tail)} lines:")
            out += [f"    {line}" for line in tail]
        out.append("--- runs:")
        with contextlib.suppress(Exception):
            out += [f"    {run}" for run in self.runs()]
        return "\n".join(out)

    # -- acting -----------------------------------------------------------------------------------

    def set_workload(self, node: Node | None = None, **settings: Any) -> None:
        """Change how the workload behaves (for ``node`` or all): running scripts see it within a tick."""
        self._control.setdefault("*" if node is None else node.name, {}).update(settings)
        self._write_control()

    def _write_control(self) -> None:
        tmp = self.control_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._control), encoding="utf-8")
        os.replace(tmp, self.control_path)

    def script_pids(self, node: Node) -> list[int]:
        """The guard(s) and script(s) under the node's daemon."""
        return descendants(node.pid) if node.running else []

    def kill9(self, node: Node, *, script: bool = False) -> float:
        """SIGKILL the node's daemon and, with ``script``, also its guard and script (a crash of
        the whole node: all are frozen with SIGSTOP first, so that the guard cannot act on the
        daemon's death). Reaps the daemon; returns the time of the kill."""
        victims = [node.pid, *(self.script_pids(node) if script else [])]
        node.expect_exit = True
        if script:
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
        t_kill = time.monotonic()
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert node.proc is not None
        node.proc.wait()
        return t_kill

    def sigterm(self, node: Node) -> float:
        """SIGTERM the node's daemon (a planned stop); returns the time it was sent."""
        node.expect_exit = True
        t = time.monotonic()
        os.kill(node.pid, signal.SIGTERM)
        return t

    def sigstop(self, node: Node) -> float:
        """Freeze the node's daemon only (its guard runs on); returns the time."""
        t = time.monotonic()
        os.kill(node.pid, signal.SIGSTOP)
        return t

    def sigcont(self, node: Node) -> float:
        t = time.monotonic()
        os.kill(node.pid, signal.SIGCONT)
        return t

    def wait_exit(self, node: Node, timeout: float = DEFAULT_WAIT_S) -> int:
        """Wait for the node's daemon to exit; return its exit code."""
        assert node.proc is not None
        node.expect_exit = True
        try:
            return node.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{node} did not exit within {timeout} s\n{self.report()}") from None

    def restart(self, node: Node) -> None:
        """Start the node's daemon again (same address, state dir and log). It must have exited."""
        if node.running:
            raise ValueError(f"{node} is still running")
        self._spawn(node)
        self.wait_for(lambda: self.status(node) is not None, DEFAULT_WAIT_S, f"{node} to start")


def _free_port(count: int) -> int:
    """A UDP port free on 127.0.0.1 .. 127.0.0.<count> right now."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(*PORT_RANGE)
        with contextlib.ExitStack() as stack:
            try:
                for i in range(count):
                    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                    sock.bind((f"127.0.0.{i + 1}", port))
            except OSError:
                continue
            return port
    raise ClusterError("no free UDP port found")


@contextlib.contextmanager
def cluster(size: int = 3, **kwargs: Any) -> Iterator[Cluster]:
    """``with cluster(3, timing=TUNED) as c:`` (the same as ``with Cluster(...)``)."""
    with Cluster(size, **kwargs) as c:
        yield c
