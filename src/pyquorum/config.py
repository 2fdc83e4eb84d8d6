"""One node's configuration, checked as a whole before anything starts (after etcd ``Config.validate``).

``Config`` holds resolved values only: addresses are IP addresses (the CLI resolves host names), the
script is an absolute path. ``validate()`` returns every problem at once, each saying what to do, so an
operator fixes the command line in one go instead of one error per attempt; ``warnings()`` lists what
works but is probably not what was meant. Nothing here sends a packet: the checks of the bind address
only ``bind()`` a UDP socket and close it.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from pyquorum import keyfile
from pyquorum.core.address import NodeAddress, sort_nodes
from pyquorum.core.errors import ConfigError
from pyquorum.core.lease import Timing

RestartPolicy = Literal["on-failure", "always", "never"]
RESTART_POLICIES: tuple[str, ...] = get_args(RestartPolicy)

# How log lines are written (runtime/logs.py): text for people and journald, json for collectors.
LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[str, ...] = get_args(LogFormat)
# --log-level and the configuration file's log_level; -v is "info", -vv is "debug".
LOG_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# What happens when the script exits on its own while this node is master (the supervisor applies it):
# on-failure restarts it after a non-zero exit or a signal, always restarts it after any exit, never
# leaves it stopped (the node stays master). on-failure is systemd's and supervisord's usual choice: a
# script that finished its job cleanly is not run again, one that crashed is.
DEFAULT_RESTART: RestartPolicy = "on-failure"
# systemd's RestartSec is 100 ms and Kubernetes' CrashLoopBackOff starts at 10 s; 1 s is in between:
# long enough not to spin on a script that fails at once, short enough that one crash costs little.
# The delay doubles after each failure up to 30 s (supervisord and Kubernetes cap at 30 s and 5 min).
DEFAULT_RESTART_BACKOFF_S = 1.0
DEFAULT_RESTART_BACKOFF_MAX_S = 30.0
# systemd's StartLimitBurst=5 within StartLimitIntervalSec=10 s, widened to 60 s because our backoff
# (1+2+4+8 s) spreads 5 failures over 15 s. After that many failures the node resigns so another node,
# perhaps with a healthier disk or network, can try.
DEFAULT_MAX_FAILURES = 5
DEFAULT_FAILURE_WINDOW_S = 60.0
# A notify hook (--notify, runtime/hooks.py) is SIGKILLed with its process group after this long.
# Pacemaker's alert agents get 30 s by default: ample for a hook that posts to a chat or updates a
# load balancer, short enough that a hung one holds up the next event by half a minute at most.
DEFAULT_NOTIFY_TIMEOUT_S = 30.0


def _fmt(x: float) -> str:
    # repr() of a float is the shortest text that round-trips: the same value always gives the same
    # fingerprint text, on every node.
    return repr(float(x))


@dataclass(frozen=True)
class Config:
    """Everything one node needs to run. Build it (the CLI does), call ``validate()`` and refuse to
    start if it returns anything, print ``warnings()``, then hand it to ``runtime.daemon.run``."""

    me: NodeAddress
    """This node: the address and UDP port it binds, and its identity in the cluster."""
    peers: tuple[NodeAddress, ...]
    """The other members, resolved to IP addresses."""
    state_dir: Path
    """Where term, vote, boot epoch, the lock and status.json live; one directory per node."""
    peer_names: tuple[str, ...] = ()
    """The peers as the operator wrote them (``db2:6000``), same order as ``peers``, for messages."""
    script: str | None = None
    """Absolute path of the executable run on the master, or None to only elect."""
    timing: Timing = field(default_factory=Timing)
    key_file: Path | None = None
    """The shared keyring that authenticates cluster traffic; None sends and accepts it unsigned."""
    restart: RestartPolicy = DEFAULT_RESTART
    restart_backoff_s: float = DEFAULT_RESTART_BACKOFF_S
    restart_backoff_max_s: float = DEFAULT_RESTART_BACKOFF_MAX_S
    max_failures: int = DEFAULT_MAX_FAILURES
    """Resign after this many script failures within ``failure_window_s``."""
    failure_window_s: float = DEFAULT_FAILURE_WINDOW_S
    log_level: int = logging.WARNING
    log_format: LogFormat = "text"
    http: NodeAddress | None = None
    """Where the HTTP listener (/metrics, /status, /leader, /health) listens; None: no listener."""
    priorities: tuple[tuple[str, int], ...] = ()
    """(member id, priority) for the members given one; the others have 0 (protocol.md §3.10)."""
    witnesses: tuple[str, ...] = ()
    """Member ids of the witnesses: they vote and never become master (protocol.md §3.11)."""
    preempt_after_s: float | None = None
    """Let a preferred node take the role back by a clean handover after this long (§3.10)."""
    notify: str | None = None
    """Absolute path of the program told of each role change (runtime/hooks.py), or None."""
    notify_timeout_s: float = DEFAULT_NOTIFY_TIMEOUT_S
    """A notify hook still running after this long is SIGKILLed with its process group."""

    @property
    def node_id(self) -> str:
        """This node's canonical id, e.g. ``127.0.0.1:51621`` or ``[::1]:51621``."""
        return str(self.me)

    @property
    def members(self) -> tuple[str, ...]:
        """Canonical ids of every member, this node included, in protocol order."""
        return tuple(sort_nodes({str(self.me), *(str(p) for p in self.peers)}))

    @property
    def timing_text(self) -> str:
        """The timing every node must share, one line: ``heartbeat_interval_s=0.1 ...``, for
        ``ClusterInfo`` and logs. Fields in a fixed order, floats in repr form: stable text."""
        return " ".join(self._timing_fields())

    @property
    def cluster_text(self) -> str:
        """What every node of one cluster must agree on, the text the fingerprint hashes: a
        version line, ``members=<ids in protocol order>``, then one ``name=value`` line per timing
        field (the lines of ``timing_text``). A node that receives another cluster's fingerprint
        counts nothing from it."""
        lines = ["pyquorum-cluster-v1", f"members={','.join(self.members)}", *self._timing_fields()]
        # Who may be master, and in what order (protocol.md §3.10, §3.11): only when set, so that a
        # cluster without them keeps the fingerprint it always had.
        if any(p for _, p in self.priorities):
            lines.append("priorities=" + ",".join(f"{m}={p}" for m, p in sorted(self.priorities) if p))
        if self.witnesses:
            lines.append("witnesses=" + ",".join(sorted(self.witnesses)))
        if self.preempt_after_s is not None:
            lines.append(f"preempt_after_s={_fmt(self.preempt_after_s)}")
        return "\n".join(lines) + "\n"

    @property
    def is_witness(self) -> bool:
        return self.node_id in self.witnesses

    def _timing_fields(self) -> list[str]:
        t = self.timing
        return [
            f"heartbeat_interval_s={_fmt(t.heartbeat_interval_s)}",
            f"election_timeout_s={_fmt(t.election_timeout_s)}",
            f"stop_timeout_s={_fmt(t.stop_timeout_s)}",
            f"start_delay_s={_fmt(t.start_delay_s)}",
            f"drift_bound={_fmt(t.drift_bound)}",
            f"kill_margin_s={_fmt(t.kill_margin_s)}",
        ]

    def _check_roles(self) -> list[str]:
        problems: list[str] = []
        voters = [m for m in self.members if m not in self.witnesses]
        if self.witnesses and not voters:
            problems.append(
                "every member is a --witness: a witness never becomes master, so nothing would run"
            )
        if self.preempt_after_s is not None and not self.preempt_after_s > 0:
            problems.append(f"--preempt-after must be positive (got {self.preempt_after_s})")
        return problems

    def peer_name(self, index: int) -> str:
        """How the operator wrote peer ``index``, with its resolved address if that differs."""
        resolved = str(self.peers[index])
        given = self.peer_names[index] if index < len(self.peer_names) else resolved
        return given if given == resolved else f"{given} ({resolved})"

    def validate(self, *, check_port: bool = True) -> list[str]:
        """Every reason this node cannot start, each with what to do; empty when it can.

        Call it before the daemon binds its socket: it also reports a port that is already in use,
        unless ``check_port`` is false (``check-config`` next to this node's running daemon).
        """
        problems: list[str] = []
        problems += self._check_members()
        problems += self._check_bind(check_port)
        problems += check_script(self.script)
        problems += check_state_dir(self.state_dir)
        problems += self.timing.validate()
        problems += self._check_roles()
        problems += check_key_file(self.key_file)
        problems += self._check_restart()
        problems += check_http(self.http, check_port=check_port)
        problems += check_notify(self.notify, self.notify_timeout_s)
        return problems

    def warnings(self) -> list[str]:
        """What works but is probably not meant; print each, then go on."""
        found: list[str] = []
        n = len(self.members)
        if n == 1:
            found.append("a cluster of 1 server has nothing to fail over to; list the other servers")
        elif n == 2:
            found.append(
                "2 servers: a majority of 2 is 2, so a master needs both up. This works but gives "
                "no high availability: when either server fails, nobody runs the script. Add a "
                "third server (any small machine will do)"
            )
        elif n % 2 == 0:
            found.append(
                f"{n} servers: a majority needs {n // 2 + 1}, so it survives {n // 2 - 1} failures, "
                f"no more than {n - 1} servers would; use an odd number of servers"
            )
        if self.preempt_after_s is not None and not any(p for _, p in self.priorities):
            found.append("--preempt-after has nothing to do without --priority: give the preferred nodes one")
        if self.is_witness and self.script is not None:
            found.append(
                f"this node is a --witness: it never becomes master, so its -s/--script "
                f"{self.script} never runs"
            )
        if self.key_file is None:
            found.append(
                "cluster traffic is unauthenticated: anyone who can send UDP to port "
                f"{self.me.port} can disrupt elections; use --key-file (create one with "
                "'pyquorum keygen PATH' and copy it to every server)"
            )
        return found

    def _check_members(self) -> list[str]:
        problems: list[str] = []
        names = [self.peer_name(i) for i in range(len(self.peers))]
        for name, peer in zip(names, self.peers, strict=True):
            if peer == self.me:
                problems.append(
                    f"this node ({self.me}) is listed among its own peers as {name}: list only the "
                    "OTHER servers (or give this node another -b/-p)"
                )
        for peer, count in Counter(self.peers).items():
            if count > 1 and peer != self.me:
                same = [n for n, p in zip(names, self.peers, strict=True) if p == peer]
                problems.append(
                    f"peer {peer} is listed {count} times ({', '.join(same)}): list each server once"
                )
        for name, peer in zip(names, self.peers, strict=True):
            if peer.ip.version != self.me.ip.version:
                problems.append(
                    f"peer {name} is IPv{peer.ip.version} but the bind address {self.me.ip} is "
                    f"IPv{self.me.ip.version}, and one UDP socket cannot reach both: give every "
                    "server in the bind address's family (or bind an address of the other family)"
                )
        return problems

    def _check_bind(self, check_port: bool) -> list[str]:
        ip = self.me.ip
        if ip.is_unspecified or ip.is_multicast:
            return [
                f"-b/--bind {ip} is not a unicast address: give this node's own address, the one "
                "its peers list for it"
            ]
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        # Binding (ip, 0) proves the address is local without touching the port; nothing is sent.
        for port in (0, self.me.port) if check_port else (0,):
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                try:
                    sock.bind((str(ip), port))
                except OSError as exc:
                    return [_bind_problem(self.me, port, exc)]
        return []

    def _check_restart(self) -> list[str]:
        problems: list[str] = []
        if self.restart not in RESTART_POLICIES:
            problems.append(f"--restart {self.restart!r} is not one of {', '.join(RESTART_POLICIES)}")
        if not self.restart_backoff_s > 0:
            problems.append(f"restart backoff must be positive (got {self.restart_backoff_s})")
        if not self.restart_backoff_max_s >= self.restart_backoff_s:
            problems.append(
                f"restart backoff cap ({self.restart_backoff_max_s}s) must be at least the first "
                f"delay ({self.restart_backoff_s}s)"
            )
        if self.max_failures < 1:
            problems.append(f"max failures must be at least 1 (got {self.max_failures})")
        if not self.failure_window_s > 0:
            problems.append(f"failure window must be positive (got {self.failure_window_s})")
        return problems


def check_http(http: NodeAddress | None, *, check_port: bool = True) -> list[str]:
    """Problems of the ``--http`` address: not an address of this host, or its TCP port in use
    (unless not ``check_port``: next to the running daemon, which holds it)."""
    if http is None:
        return []
    family = socket.AF_INET6 if http.ip.version == 6 else socket.AF_INET
    for port in (0, http.port) if check_port else (0,):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((str(http.ip), port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return [f"--http {http}: TCP port {port} is in use: choose another port"]
                if exc.errno == errno.EADDRNOTAVAIL:
                    return [f"--http {http}: {http.ip} is not an address of this host"]
                return [f"--http {http}: cannot listen there: {exc.strerror or exc}"]
    return []


def check_script(script: str | None) -> list[str]:
    """Problems of the script path (absolute, as ``Config.script``); None has none."""
    return _check_executable(script, "script", "-s/--script")


def check_notify(notify: str | None, timeout_s: float) -> list[str]:
    """Problems of the notify hook's path (absolute, executable) and of its timeout."""
    problems = _check_executable(notify, "notify hook", "--notify")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        problems.append(f"--notify-timeout must be a positive number of seconds (got {timeout_s})")
    return problems


def _check_executable(path: str | None, what: str, option: str) -> list[str]:
    # the script and the notify hook: an absolute path to an executable regular file
    if path is None:
        return []
    if not os.path.isabs(path):
        return [f"{what} {path!r} must be an absolute path"]
    if not os.path.exists(path):
        return [f"{what} {path} does not exist: check the {option} path"]
    if not os.path.isfile(path):
        return [f"{what} {path} is not a regular file: {option} takes an executable file"]
    if not os.access(path, os.X_OK):
        return [f"{what} {path} is not executable: run 'chmod +x {path}'"]
    return []


def check_state_dir(state_dir: Path) -> list[str]:
    """Problems of a state dir: it must be a writable directory, or creatable."""
    if state_dir.exists():
        if not state_dir.is_dir():
            return [f"state dir {state_dir} exists but is not a directory: use --state-dir"]
        if not os.access(state_dir, os.W_OK | os.X_OK):
            return [
                f"state dir {state_dir} is not writable by this user: fix its permissions or use --state-dir"
            ]
        return []
    # It will be created; the nearest existing ancestor must let us do that.
    ancestor = state_dir.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        return [
            f"state dir {state_dir} cannot be created ({ancestor} is not a writable "
            "directory): create it, or use --state-dir"
        ]
    return []


def check_key_file(key_file: Path | None) -> list[str]:
    """Problems of a key file: missing, unreadable, malformed or readable by others."""
    if key_file is None:
        return []
    try:
        keyfile.load_keyring(key_file)
    except ConfigError as exc:
        return list(exc.problems)
    except OSError as exc:
        return [f"key file {key_file}: {exc.strerror or exc}"]
    return []


def _bind_problem(me: NodeAddress, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRNOTAVAIL:
        return (
            f"-b/--bind {me.ip} is not an address of this host: give one of its own addresses "
            "(see 'ip -brief address')"
        )
    if exc.errno == errno.EADDRINUSE:
        return (
            f"UDP port {port} on {me.ip} is in use (another pyquorum node?): stop it, or give "
            "this node another -p/--port"
        )
    if exc.errno == errno.EACCES and port < 1024:
        return f"UDP port {port} needs root or CAP_NET_BIND_SERVICE: choose -p/--port 1024 or above"
    return f"cannot bind UDP {me}: {exc.strerror or exc}"
