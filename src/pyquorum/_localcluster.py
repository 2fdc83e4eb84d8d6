"""Local pyquorum clusters: the launcher that ``pyquorum demo`` and the test harness share.

What this owns. ``LocalCluster``: the nodes of one cluster on this machine, each named by its canonical
id (``ip:port``) with a log file and a state dir under one directory; starting a node's daemon as a
child of this process with its command line and environment; the one reader of a node's status; which
node is master; a poll loop that notices a daemon that died; stopping the daemons and sweeping every
process they led to. Also UDP ports free on loopback and /proc. It must not know which script the nodes
run, what a test checks, or any network but the addresses it is given. Private (like trio's
``trio.testing``): its only users are the demo and tests/harness.

The tag. Every daemon gets ``PYQUORUM_SWEEP_TAG=<tag>-h<i>`` in its environment. The daemon hands its
environment to its guard and its script (``runtime.daemon``), so /proc/<pid>/environ names the node of
every process a daemon led to, whatever session it moved to and whoever adopted it as an orphan.

Alive. A process is alive while /proc/<pid>/stat exists and its state is not Z (zombie) or X (dead):
a zombie runs nothing and holds nothing but its pid, so it counts as gone, although ``os.kill(pid, 0)``
still finds it. This is the one meaning of "alive" in the demo, the tests and the benchmarks. Linux only.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pyquorum.core.address import DEFAULT_PORT
from pyquorum.core.lease import Timing
from pyquorum.runtime import storage

T = TypeVar("T")
Status = dict[str, Any]
TAG_VAR = "PYQUORUM_SWEEP_TAG"
LOOPBACK = "127.0.0.1"
# Below the kernel's ephemeral range (32768-60999), where other tests' UDP clients take their ports,
# and away from DEFAULT_PORT (the demo's).
PORT_RANGE = (20000, 32000)
# The Timing fields the daemon takes, by their config-file key (the flag is --key-with-dashes).
TIMING_KEYS = ("heartbeat_interval", "election_timeout", "stop_timeout", "start_delay")


def daemon_argv(
    address: str,
    peers: Iterable[str],
    state_dir: Path,
    *,
    script: Path | None = None,
    key_file: Path | None = None,
    timing: Timing | None = None,
    verbosity: int = 1,
    extra: Sequence[str] = (),
    daemon: Sequence[str] = (),
) -> list[str]:
    """The command line of the daemon of ``address`` (``ip:port``); ``daemon`` replaces
    ``python -m pyquorum`` (a wrapper that takes the same arguments)."""
    ip, port = address.rsplit(":", 1)
    argv = [*(daemon or (sys.executable, "-m", "pyquorum")), *(["-" + "v" * verbosity] if verbosity else [])]
    argv += ["-b", ip, "-p", port, "--state-dir", str(state_dir)]
    argv += ["-s", str(script)] if script else []
    argv += ["--key-file", str(key_file)] if key_file else []
    for key in TIMING_KEYS if timing is not None else ():
        argv += ["--" + key.replace("_", "-"), repr(getattr(timing, f"{key}_s"))]
    return [*argv, *extra, *peers]


def _udp_port_free(ip: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((ip, port))
        except OSError:
            return False
    return True


def free_udp_ports(count: int, preferred: int = DEFAULT_PORT, host: str = LOOPBACK) -> list[int]:
    """``preferred`` and the ports after it if all are free on ``host``, else (or if ``preferred`` is
    0) ports chosen by the kernel, all held at once so they are distinct."""
    wanted = list(range(preferred, preferred + count))
    if preferred > 0 and wanted[-1] <= 65535 and all(_udp_port_free(host, port) for port in wanted):
        return wanted
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def free_udp_port(ips: Sequence[str]) -> int:
    """One port of ``PORT_RANGE`` free on every address of ``ips`` right now (someone may still take
    it before the daemons bind it: callers retry on "address in use")."""
    for port in random.sample(range(*PORT_RANGE), 200):
        if all(_udp_port_free(ip, port) for ip in ips):
            return port
    raise OSError(f"no UDP port free on {', '.join(ips)}")


# ---- processes ------------------------------------------------------------------------------------


def stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (``[0]`` is the state, ``[1]`` the
    parent's pid), None if there is no such process."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return data[data.rfind(b")") + 2 :].decode().split()


def alive(pid: object) -> bool:
    """True if ``pid`` is a process that exists and is not a zombie (see the module docstring)."""
    fields = stat(pid) if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None
    return fields is not None and fields[0] not in ("Z", "X")


def tagged_pids(prefix: str) -> dict[int, str]:
    """Live processes whose ``TAG_VAR`` starts with ``prefix``: pid -> tag. Only our own user's
    environments are readable, which covers all we start."""
    key, found = f"{TAG_VAR}={prefix}".encode(), {}
    for name in (n for n in os.listdir("/proc") if n.isdigit() and int(n) != os.getpid()):
        with contextlib.suppress(OSError):
            tag = next(
                (v for v in Path(f"/proc/{name}/environ").read_bytes().split(b"\0") if v.startswith(key)),
                None,
            )
            if tag is not None and alive(int(name)):
                found[int(name)] = tag.split(b"=", 1)[1].decode()
    return found


def signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def sweep(prefix: str, timeout_s: float = 10.0) -> list[int]:
    """SIGCONT (a stopped process would not die before it runs) and SIGKILL every process tagged
    ``prefix...``, again until none is left or ``timeout_s`` has passed; return every pid killed."""
    killed: list[int] = []
    give_up = time.monotonic() + timeout_s
    while (found := tagged_pids(prefix)) and time.monotonic() < give_up:
        signal_all(found, signal.SIGCONT)
        signal_all(found, signal.SIGKILL)
        killed += [pid for pid in found if pid not in killed]
        time.sleep(0.01)
    return killed


# ---- a cluster ------------------------------------------------------------------------------------


@dataclass(eq=False)
class Node:
    """One member: its canonical id, its files, its command line and its current daemon process."""

    index: int  # 1..N in the order of the addresses; its files are h<index>.log and state/h<index>
    name: str  # the canonical id, as in PYQUORUM_NODE and status.json: "127.0.0.12:20123"
    log_path: Path
    state_dir: Path
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    expect_exit: bool = False  # it was stopped or killed on purpose: its exit is no failure
    incarnations: int = 0

    @property
    def ip(self) -> str:
        return self.name.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.name.rsplit(":", 1)[1])

    @property
    def addr(self) -> tuple[str, int]:
        return (self.ip, self.port)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ValueError(f"{self.name} was never started")
        return self.proc.pid

    def __str__(self) -> str:
        return self.name


class LocalCluster:
    """The daemons of one cluster on this machine. Node ``i`` logs to ``<directory>/h<i>.log`` and
    keeps its state in ``<directory>/state/h<i>``. The owner sets each node's ``argv`` and calls
    ``spawn``; ``stop`` then ``sweep`` end it all. Failures are raised as ``error``."""

    def __init__(
        self, directory: Path, addresses: Sequence[str], tag: str, *, error: type[Exception]
    ) -> None:
        self.dir, self.tag, self.error = directory, tag, error
        self.env: dict[str, str] = {}  # added to every daemon's environment
        self.with_script = True  # a master counts once its status shows its script running
        self.nodes = [
            Node(i, a, directory / f"h{i}.log", directory / "state" / f"h{i}", [])
            for i, a in enumerate(addresses, 1)
        ]

    @property
    def members(self) -> list[str]:
        return [n.name for n in self.nodes]

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def node_env(self, node: Node) -> dict[str, str]:
        """This environment with this copy of pyquorum importable, unbuffered output and the node's tag."""
        path = [str(Path(__file__).resolve().parent.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
        tag = {TAG_VAR: f"{self.tag}-h{node.index}"}
        return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1", **self.env, **tag}

    def spawn(self, node: Node) -> None:
        """Start the node's daemon (again) in a session of its own, its output appended to its log.
        Its pid is its process group's id while it is our unreaped child."""
        if node.running:
            raise ValueError(f"{node} is already running")
        node.incarnations += 1
        node.expect_exit = False
        node.state_dir.parent.mkdir(parents=True, exist_ok=True)
        with node.log_path.open("ab") as log:
            log.write(f"---- start #{node.incarnations} at {time.monotonic():.6f}\n".encode())
            log.flush()
            node.proc = subprocess.Popen(
                node.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.node_env(node),
                cwd=self.dir,
            )

    def status(self, node: Node) -> Status | None:
        """The status.json of the node's running daemon (``storage.STATUS_KEYS``); None if it does not
        run or has not written one yet. The one place that reads a node's status file (cheap to
        poll: the daemon writes it on a change of role, term, master, script or key; ``query`` asks
        the daemon itself)."""
        try:
            st = storage.read_status(node.state_dir / storage.STATUS_FILE_NAME)
        except (OSError, ValueError):  # written atomically: a bug elsewhere; the caller polls again
            return None
        return st if st is not None and node.running and st.get("pid") == node.pid else None

    def query(self, node: Node, command: str = "status", timeout_s: float = 5.0) -> Any:
        """Ask the node's running daemon over its control socket (runtime/control.py): for
        ``status``, the whole ``api_version`` 1 document (counters, members, lease), which
        status.json does not hold. Raises ``control.Unreachable`` if it does not answer."""
        from pyquorum.runtime import control

        return control.request(node.state_dir, command, timeout_s=timeout_s)

    def master_status(self) -> tuple[Node, Status] | None:
        """The node whose status says master (and that its script runs, if the nodes have one), with
        that status; the highest term if several say so: a stale master has not noticed yet."""
        found = [
            (n, st) for n in self.nodes if (st := self.status(n)) is not None and st.get("role") == "master"
        ]
        found = [(n, st) for n, st in found if not self.with_script or isinstance(st.get("script_pid"), int)]
        return max(found, key=lambda f: int(f[1]["term"]), default=None)

    def master(self) -> Node | None:
        found = self.master_status()
        return None if found is None else found[0]

    def failure(self, text: str) -> Exception:
        return self.error(text)

    def wait_for(
        self,
        probe: Callable[[], T | None],
        timeout_s: float,
        what: str,
        *,
        watch_exits: bool = True,
        interval_s: float = 0.005,
        sleep: Callable[[float], None] = time.sleep,
    ) -> T:
        """Call ``probe`` until it returns something other than None or False and return that. Fails
        (``self.failure``) after ``timeout_s``, or as soon as a daemon exits that no one stopped or
        killed, unless not ``watch_exits``."""
        give_up = time.monotonic() + timeout_s
        while (result := probe()) is None or result is False:
            for n in self.nodes if watch_exits else []:
                if n.proc is not None and n.proc.poll() is not None and not n.expect_exit:
                    raise self.failure(f"the daemon of {n} exited with code {n.proc.returncode} ({what})")
            if time.monotonic() > give_up:
                raise self.failure(f"no {what} within {timeout_s:.1f} s")
            sleep(interval_s)
        return result

    def log(self, node: Node) -> str:
        try:
            return node.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def stop(
        self, nodes: Iterable[Node] | None = None, *, grace_s: float, sig: int = signal.SIGTERM
    ) -> dict[str, int]:
        """Send ``sig`` to the daemons of ``nodes`` (all by default) that run, reap each within
        ``grace_s``, else SIGKILL it first; their exit codes by name. SIGTERM is a planned stop: each
        daemon stops its script and resigns."""
        running = [n for n in (self.nodes if nodes is None else nodes) if n.running]
        for n in running:
            n.expect_exit = True
            # still our unreaped child: its pid, its session's process group id, cannot be reused
            with contextlib.suppress(ProcessLookupError):
                os.killpg(n.pid, sig)
        give_up, codes = time.monotonic() + grace_s, {}
        for n in running:
            assert n.proc is not None
            try:
                codes[n.name] = n.proc.wait(max(0.0, give_up - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(n.pid, signal.SIGKILL)
                codes[n.name] = n.proc.wait()
        return codes

    def sweep(self, timeout_s: float = 10.0) -> list[int]:
        """Kill every process left that carries this cluster's tag (guards, scripts, orphans)."""
        return sweep(f"{self.tag}-", timeout_s)
