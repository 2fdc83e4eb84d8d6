"""What the daemon knows about itself and its cluster: the counters, and ONE snapshot every reader reads.

What this module owns
---------------------
* ``Counters``: everything the daemon counts (datagrams by direction and type, role changes,
  elections and their durations, script exits by reason) and the wire's facts about each peer (the
  term of its last message, the key id it signs with, the master's round trip to it). Each counter
  exists from the start at 0, so a reader sees the whole set whether or not anything happened yet.
* ``Snapshot``: a frozen picture of the node at one moment, built on demand (``Daemon.snapshot()``)
  from the core, the counters and the supervisor. ``status.json``, the control socket's ``status``
  command, the HTTP ``/status`` and ``/metrics`` all read a snapshot, so two of them can never
  disagree: there is no second source of truth. ``Snapshot.to_json()`` is the documented,
  versioned form (``API_VERSION``; docs/operations.md lists every field); ``render_text`` and
  ``exit_code`` work on that JSON form, which is what ``pyquorum status`` receives.
* ``RateLimiter``: at most one log line per key per interval (a flood of bad datagrams must not fill
  the disk), counting what it suppressed.

What it must not do
-------------------
Cost anything while nobody asks: counting is an integer increment per event or datagram, and a
snapshot is built only when something reads it (a status request, a scrape, a state change for
``status.json``).

How a peer is known (protocol.md §3.2)
--------------------------------------
Followers of a live master no longer hear each other: only the master hears everyone (their
acknowledgements), and it tells its followers who is live in every heartbeat. So a member row says
how its facts are known: ``heard`` (a datagram from it was accepted within the election timeout E),
``master_report`` (the master we follow listed it as live in its last heartbeat, itself at most E
old), or ``none`` (neither: unreachable, as far as this node can tell). Its term is the term of its
last message we accepted, and so unknown for a follower we never heard; the round-trip time is the
master's, from a heartbeat round's send to that peer's acknowledgement, and unknown elsewhere.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from pyquorum.core.messages import (
    MESSAGE_NAMES,
    Heartbeat,
    HeartbeatResponse,
    Message,
    PreVoteRequest,
    PreVoteResponse,
)
from pyquorum.core.node import Event, EventKind, Node, Role
from pyquorum.wire import ClusterInfo, Hello
from pyquorum.wire.operate import Silence, SilenceResponse, Timeline, TimelineResponse

__all__ = [
    "API_VERSION",
    "DATAGRAM_TYPES",
    "ELECTION_BUCKETS_S",
    "ELECTION_RESULTS",
    "ROLES",
    "SCRIPT_EXIT_REASONS",
    "Counters",
    "PeerStatus",
    "RateLimiter",
    "ScriptStatus",
    "Snapshot",
    "exit_code",
    "peer_statuses",
    "render_text",
]

API_VERSION: Final = 1
"""The version of ``Snapshot.to_json()``: a field is only ever added within a version."""

# The wire's message types as they are named in counters and metrics: the core's (named in
# core/messages.py), then the runtime's own.
DATAGRAM_TYPES: Final[dict[type[object], str]] = dict(MESSAGE_NAMES.items()) | {
    Hello: "hello",
    ClusterInfo: "cluster_info",
    Timeline: "timeline",
    TimelineResponse: "timeline_response",
    Silence: "silence",
    SilenceResponse: "silence_response",
}
ROLES: Final = tuple(role.value for role in Role)
# won: became master; failed: its slot ended without a majority (event election_failed); yielded:
# it became a slave during its campaign (another master appeared, or a higher term).
ELECTION_RESULTS: Final = ("won", "failed", "yielded")
# requested: stopped by the daemon (step-down, shutdown); success: exited 0 by itself; failure: a
# non-zero exit code; signal: killed by a signal nobody here sent; lost: its guard died or was
# abandoned; start_failed: it could not be started at all.
SCRIPT_EXIT_REASONS: Final = ("requested", "success", "failure", "signal", "lost", "start_failed")
# An election takes one or two round trips when it is won at once, up to a slot (E/4) when votes
# are missing; these cover 1 ms to 10 s (Prometheus' default buckets, shifted down a decade).
ELECTION_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# The master keeps the send times of this many recent heartbeat rounds to time their acknowledgements.
_ROUND_TIMES_KEPT = 8


class RateLimiter:
    """At most one event per key per interval; counts what it suppressed."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def allow(self, key: str, now: float) -> int | None:
        """None if suppressed; else how many were suppressed since the last allowed one."""
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] += 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)


@dataclass(slots=True)
class _PeerWire:
    term: int | None = None
    key_id: int | None = None
    rtt_s: float | None = None


class Counters:
    """Everything counted since the daemon started; every series present from 0 (module docstring)."""

    def __init__(self, peers: Iterable[str]) -> None:
        self.sent: dict[type[object], int] = dict.fromkeys(DATAGRAM_TYPES, 0)
        self.received: dict[type[object], int] = dict.fromkeys(DATAGRAM_TYPES, 0)
        self.role_changes: dict[str, int] = dict.fromkeys(ROLES, 0)
        self.elections: dict[str, int] = dict.fromkeys(ELECTION_RESULTS, 0)
        self.script_exits: dict[str, int] = dict.fromkeys(SCRIPT_EXIT_REASONS, 0)
        self.election_buckets: list[int] = [0] * len(ELECTION_BUCKETS_S)  # not cumulative
        self.election_count = 0
        self.election_sum_s = 0.0
        self.peers: dict[str, _PeerWire] = {p: _PeerWire() for p in peers}
        self._election_began: float | None = None
        self._round_sent: dict[int, float] = {}

    # -- the wire (runtime/udp.py) --------------------------------------------------------------

    def on_send(self, message: object, now: float) -> None:
        self.sent[type(message)] += 1
        if isinstance(message, Heartbeat) and message.master and message.round not in self._round_sent:
            self._round_sent[message.round] = now
            if len(self._round_sent) > _ROUND_TIMES_KEPT:
                del self._round_sent[min(self._round_sent)]

    def on_deliver(self, sender: str, message: Message, key_id: int, now: float) -> None:
        self.received[type(message)] += 1
        peer = self.peers.get(sender)
        if peer is None:
            return
        peer.key_id = key_id
        # the sender's own term: a pre-vote request asks for its term + 1 (as core/node.py reads it)
        if isinstance(message, PreVoteRequest):
            peer.term = message.term - 1
        elif isinstance(message, PreVoteResponse):
            peer.term = message.voter_term
        else:
            peer.term = message.term
        if isinstance(message, HeartbeatResponse):
            sent = self._round_sent.get(message.round)
            if sent is not None:
                peer.rtt_s = now - sent

    def on_hello(self) -> None:
        self.received[Hello] += 1

    # -- the core's events and the script (runtime/daemon.py) -----------------------------------

    def on_event(self, event: Event, now: float) -> None:
        """Count role changes and elections from the core's events (protocol.md §3.3)."""
        kind = event.kind
        if kind is EventKind.ELECTION_STARTED:
            self.role_changes[Role.PRECANDIDATE.value] += 1
            self._election_began = now
        elif kind is EventKind.BECAME_CANDIDATE:
            self.role_changes[Role.CANDIDATE.value] += 1
        elif kind is EventKind.BECAME_MASTER:
            self.role_changes[Role.MASTER.value] += 1
            self._election_over("won", now)
        elif kind is EventKind.ELECTION_FAILED:
            self.role_changes[Role.SLAVE.value] += 1
            self._election_over("failed", now)
        elif kind is EventKind.BECAME_SLAVE:
            self.role_changes[Role.SLAVE.value] += 1
            self._election_over("yielded", now)
        elif kind in (EventKind.STEPPED_DOWN, EventKind.RESIGNED):
            self.role_changes[Role.SLAVE.value] += 1

    def _election_over(self, result: str, now: float) -> None:
        if self._election_began is None:
            return
        took = max(0.0, now - self._election_began)
        self._election_began = None
        self.elections[result] += 1
        self.election_count += 1
        self.election_sum_s += took
        for i, bound in enumerate(ELECTION_BUCKETS_S):
            if took <= bound:
                self.election_buckets[i] += 1
                break

    def on_script_exit(self, reason: str) -> None:
        self.script_exits[reason] += 1

    def election_histogram(self) -> list[tuple[float, int]]:
        """Cumulative (upper bound, count) pairs, ending with +Inf, as Prometheus defines them."""
        out, total = [], 0
        for bound, n in zip(ELECTION_BUCKETS_S, self.election_buckets, strict=True):
            total += n
            out.append((bound, total))
        out.append((math.inf, self.election_count))
        return out


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """One member as this node sees it (module docstring: how it is known)."""

    id: str
    is_self: bool
    role: str  # this node's own role for itself; else "master", "slave" or "unknown"
    reachable: bool
    known_by: str  # "self", "heard", "master_report" or "none"
    last_heard_s: float | None  # since its last accepted datagram; None: never
    rtt_s: float | None
    term: int | None
    key_id: int | None


@dataclass(frozen=True, slots=True)
class ScriptStatus:
    path: str | None
    running: bool
    pid: int | None
    uptime_s: float | None
    starts: int
    restarts: int
    last_exit: Mapping[str, Any] | None  # code, signal, reason, error, ago_s


@dataclass(frozen=True, slots=True)
class HookStatus:
    """The notify hook (runtime/hooks.py), when ``--notify`` is set."""

    path: str
    timeout_s: float
    seq: int  # of the last event queued (0: none yet)
    last_event: str | None
    last_term: int | None
    last_master: str | None
    pending: int  # waiting, not counting the one that runs
    running_pid: int | None
    delivered: int
    failed: int
    timed_out: int
    dropped: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The node at one moment. Build one with ``Daemon.snapshot()``; read it, never change it."""

    version: str
    pid: int
    node: str
    uptime_s: float
    members: tuple[str, ...]
    quorum: int
    role: str
    term: int
    master: str | None
    has_quorum: bool
    recovering: bool
    authenticated: bool
    send_key_id: int | None
    key_ids: tuple[int, ...]
    lease_remaining_s: float | None
    kill_deadline_remaining_s: float | None
    loop_lag_s: float
    loop_on_time: bool
    peers: tuple[PeerStatus, ...]
    script: ScriptStatus
    datagrams_sent: Mapping[str, int]
    datagrams_received: Mapping[str, int]
    datagrams_rejected: Mapping[str, int]
    role_changes: Mapping[str, int]
    elections: Mapping[str, int]
    script_exits: Mapping[str, int]
    election_histogram: tuple[tuple[float, int], ...]
    election_sum_s: float
    hooks: HookStatus | None = None
    taken_at: float = field(default_factory=time.monotonic)

    @property
    def is_master(self) -> bool:
        return self.role == Role.MASTER.value

    def to_json(self) -> dict[str, Any]:
        """The ``api_version`` 1 document (docs/operations.md, "status --json")."""
        return {
            "api_version": API_VERSION,
            "version": self.version,
            "node": self.node,
            "pid": self.pid,
            "uptime_s": _round(self.uptime_s),
            "cluster": {
                "members": list(self.members),
                "size": len(self.members),
                "quorum": self.quorum,
                "has_quorum": self.has_quorum,
                "master": self.master,
                "term": self.term,
                "authenticated": self.authenticated,
                "send_key_id": self.send_key_id,
                "key_ids": list(self.key_ids),
            },
            "self": {
                "role": self.role,
                "recovering": self.recovering,
                "lease_remaining_s": _round(self.lease_remaining_s),
                "kill_deadline_remaining_s": _round(self.kill_deadline_remaining_s),
                "loop_lag_s": _round(self.loop_lag_s),
                "loop_on_time": self.loop_on_time,
            },
            "members": [
                {
                    "id": p.id,
                    "self": p.is_self,
                    "role": p.role,
                    "reachable": p.reachable,
                    "known_by": p.known_by,
                    "last_heard_s": _round(p.last_heard_s),
                    "rtt_s": None if p.rtt_s is None else round(p.rtt_s, 6),
                    "term": p.term,
                    "key_id": p.key_id,
                }
                for p in self.peers
            ],
            "script": {
                "path": self.script.path,
                "running": self.script.running,
                "pid": self.script.pid,
                "uptime_s": _round(self.script.uptime_s),
                "starts": self.script.starts,
                "restarts": self.script.restarts,
                "last_exit": None if self.script.last_exit is None else dict(self.script.last_exit),
            },
            "counters": {
                "datagrams_sent": dict(self.datagrams_sent),
                "datagrams_received": dict(self.datagrams_received),
                "datagrams_rejected": dict(self.datagrams_rejected),
                "role_changes": dict(self.role_changes),
                "elections": dict(self.elections),
                "script_exits": dict(self.script_exits),
            },
            "hooks": None
            if self.hooks is None
            else {
                "path": self.hooks.path,
                "timeout_s": self.hooks.timeout_s,
                "seq": self.hooks.seq,
                "last_event": self.hooks.last_event,
                "last_term": self.hooks.last_term,
                "last_master": self.hooks.last_master,
                "pending": self.hooks.pending,
                "running_pid": self.hooks.running_pid,
                "delivered": self.hooks.delivered,
                "failed": self.hooks.failed,
                "timed_out": self.hooks.timed_out,
                "dropped": self.hooks.dropped,
            },
            "election_durations": {
                "buckets": [["+Inf" if math.isinf(b) else b, n] for b, n in self.election_histogram],
                "count": self.election_histogram[-1][1],
                "sum_s": round(self.election_sum_s, 6),
            },
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def fresh_master(node: Node, now: float) -> str | None:
    """The master this node follows, if it heard it within E (or itself, as master): protocol.md §3.2."""
    if node.role is Role.MASTER:
        return node.me
    heard = node.last_master_heard
    if node.master is None or heard is None or now - heard >= node.timing.election_timeout_s:
        return None
    return node.master


def peer_statuses(node: Node, counters: Counters, now: float) -> tuple[PeerStatus, ...]:
    """Every member, this node included, in protocol order, as this node knows it."""
    e = node.timing.election_timeout_s
    master = fresh_master(node, now)
    # the master's report of who is live, valid while the master itself is (protocol.md §3.2)
    report_fresh = (
        master is not None
        and master != node.me
        and node.reported_at is not None
        and now - node.reported_at < e
    )
    reported = node.reported if report_fresh else frozenset()
    rows = []
    for member in node.order:
        if member == node.me:
            rows.append(PeerStatus(member, True, node.role.value, True, "self", None, None, node.term, None))
            continue
        heard_at = node.last_heard.get(member)
        ago = None if heard_at is None else max(0.0, now - heard_at)
        if ago is not None and ago < e:
            known_by = "heard"
        elif member in reported:
            known_by = "master_report"
        else:
            known_by = "none"
        reachable = known_by != "none"
        role = "master" if member == master else "slave" if reachable and master is not None else "unknown"
        wire = counters.peers.get(member) or _PeerWire()
        rtt = wire.rtt_s if node.role is Role.MASTER and known_by == "heard" else None
        rows.append(PeerStatus(member, False, role, reachable, known_by, ago, rtt, wire.term, wire.key_id))
    return tuple(rows)


# ---- reading the JSON form (what `pyquorum status` receives) -----------------------------------


def exit_code(doc: Mapping[str, Any]) -> int:
    """The monitoring-plugin code of a status document: 0 a master is known and this node has a
    majority; 1 a warning (a member unreachable); 2 critical (no majority, or no master)."""
    cluster = doc["cluster"]
    if not cluster["has_quorum"] or cluster["master"] is None:
        return 2
    if not all(m["reachable"] for m in doc["members"]):
        return 1
    return 0


_STATE_WORDS = {0: "OK", 1: "WARNING", 2: "CRITICAL"}
_KNOWN_BY = {"self": "this node", "heard": "heard", "master_report": "master's report", "none": "-"}


def render_text(doc: Mapping[str, Any]) -> str:
    """A status document as a crm_mon-like screen for a person (docs/operations.md, "Reading status")."""
    c, me, script = doc["cluster"], doc["self"], doc["script"]
    code = exit_code(doc)
    reachable = sum(1 for m in doc["members"] if m["reachable"])
    keys = f"authenticated (signs with key {c['send_key_id']})" if c["authenticated"] else "UNAUTHENTICATED"
    lines = [
        f"{_STATE_WORDS[code]}: cluster of {c['size']}, quorum {'yes' if c['has_quorum'] else 'NO'} "
        f"({reachable} of {c['size']} reachable, {c['quorum']} needed), master "
        f"{c['master'] or 'NONE'}, term {c['term']}, {keys}",
        f"This node: {doc['node']} {me['role']}{' (recovering)' if me['recovering'] else ''}, "
        f"daemon pid {doc['pid']} up {_duration(doc['uptime_s'])}, pyquorum {doc['version']}",
        f"  lease {_seconds_left(me['lease_remaining_s'])}, kill deadline "
        f"{_seconds_left(me['kill_deadline_remaining_s'])}, loop "
        f"{'on time' if me['loop_on_time'] else 'LATE'} (lag {me['loop_lag_s'] * 1000:.1f} ms)",
        "",
        "Members:",
    ]
    table = [("", "MEMBER", "ROLE", "REACHABLE", "LAST HEARD", "RTT", "TERM", "KEY", "KNOWN BY")]
    for m in doc["members"]:
        table.append(
            (
                "*" if m["id"] == c["master"] else "",
                m["id"],
                m["role"],
                "yes" if m["reachable"] else "NO",
                "-" if m["last_heard_s"] is None else f"{m['last_heard_s']:.2f}s ago",
                "-" if m["rtt_s"] is None else f"{m['rtt_s'] * 1000:.2f}ms",
                "-" if m["term"] is None else str(m["term"]),
                "-" if m["key_id"] is None else str(m["key_id"]),
                _KNOWN_BY.get(m["known_by"], m["known_by"]),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines += [
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table
    ]
    lines += ["", "Script: " + _script_line(script)]
    hooks = doc.get("hooks")
    if hooks is not None:
        lines.append("Notify hook: " + _hook_line(hooks))
    return "\n".join(lines)


def _hook_line(hooks: Mapping[str, Any]) -> str:
    if hooks["last_event"] is None:
        last = "no event yet"
    else:
        last = f"last {hooks['last_event']} (seq {hooks['seq']}, term {hooks['last_term']})"
    running = "" if hooks["running_pid"] is None else f", running pid {hooks['running_pid']}"
    return (
        f"{hooks['path']}: {last}{running}, {hooks['pending']} waiting; {hooks['delivered']} ok, "
        f"{hooks['failed']} failed, {hooks['timed_out']} timed out, {hooks['dropped']} dropped"
    )


def _script_line(script: Mapping[str, Any]) -> str:
    if script["path"] is None:
        return "none configured (this node only elects)"
    if script["running"]:
        state = f"running, pid {script['pid']}, up {_duration(script['uptime_s'])}"
    else:
        state = "not running"
    text = f"{script['path']}: {state}; {script['starts']} starts, {script['restarts']} restarts"
    last = script["last_exit"]
    if last is not None:
        how = f"signal {last['signal']}" if last.get("signal") else f"code {last.get('code')}"
        if last.get("error"):
            how = str(last["error"])
        text += f"; last exit: {how} ({last['reason']}) {_duration(last['ago_s'])} ago"
    return text


def _seconds_left(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s left"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s"
