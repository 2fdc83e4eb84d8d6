"""The election state machine: one ``Node`` per pyquorum server, with no I/O at all.

What this module owns
---------------------
The node's term and vote, its role (SLAVE, PRECANDIDATE, CANDIDATE, MASTER), who it believes is
master, the master's heartbeat rounds and lease, and the decision when the script may run and by
when it must be dead. It is the whole protocol of docs/protocol.md; the runtime and the simulation
are thin shells that move bytes, read clocks and spawn processes.

What it must not know
---------------------
Sockets, clocks, processes, files, threads, asyncio (tests/core/test_purity.py fails if it imports
any). Time and randomness are inputs: every call takes ``now`` (a monotonic clock reading of the
caller's choice) and the node owns a seeded ``random.Random``. The same inputs in the same order give
the same outputs, which is what makes the simulation reproducible from a seed. Which variant of the
rules it runs is an input too (``pyquorum.core.rules``): production code has no test branches.

How the caller drives it (after etcd-io/raft's Node/Ready)
----------------------------------------------------------
1. Feed inputs: ``step(sender, message, now)`` for each datagram, ``tick(now)`` when ``next_wakeup()``
   has passed, ``script_stopped(now, ...)`` when the script is reaped, ``shutdown(now)`` or
   ``resign(now, ...)`` on request.
2. Take ``ready()``. In this order: persist ``ready.hard_state`` (fsync) if it is set, THEN send
   ``ready.messages``, THEN obey ``ready.script`` actions and push ``ready.kill_deadline`` to the
   script's guard, THEN log ``ready.events``. Then call ``advance(ready)``.
   Sending before persisting breaks protocol.md §3.4 (a restart could vote twice in a term).

How a message is handled (after etcd-io/raft's Step)
----------------------------------------------------
Every input goes through ``_step``: first the term (protocol.md §3.1: a higher term makes us a slave
of it, a lower one is answered where that helps the sender and otherwise dropped; pre-votes are the
one exception), then the handler of the current role, ``_step_slave``, ``_step_candidate`` (for both
PRECANDIDATE and CANDIDATE) or ``_step_master``. ``tick(now)`` feeds the timeouts that are due as
``Timeout`` inputs through the same path, so a timeout is handled like a message. Every role change
goes through a ``_become_*`` method, which refuses a transition that the table below does not allow:

    from \\ to      SLAVE                          PRECANDIDATE     CANDIDATE       MASTER
    SLAVE          a higher term                  election due     -               -
    PRECANDIDATE   higher term, a master, slot    -                pre-vote        -
                   over                                            majority
    CANDIDATE      higher term, a master, slot    -                -               vote majority
                   over
    MASTER         higher term, lease lapsed,     -                -               -
                   resigned

(A cluster of one goes SLAVE -> PRECANDIDATE -> CANDIDATE -> MASTER in one step: it is its own
majority.) The outputs are data: messages, script actions, a kill deadline, a hard state to persist,
and typed ``Event``s (a kind and fields) that the runtime logs as ``event=<kind> term=<t> k=v ...``.

Invariants (checked by tests/sim after every step)
--------------------------------------------------
* At most one master per term; one vote per node per term; terms never decrease (protocol.md §6).
* The script runs only between a ``StartScript`` and the moment it is reaped, which the runtime
  guarantees is no later than the last kill deadline emitted; every kill deadline is
  ``t_ack + L_kill`` for a heartbeat round really acknowledged by a majority (protocol.md §4.2).

Honest limits
-------------
Safety rests on the clock-rate bound ``Timing.drift_bound`` holding for the monotonic clocks of all
nodes, and on the runtime reaping the script by the kill deadline (which the guard process enforces
even when the daemon is frozen). A whole-host pause (VM freeze) stops the guard too: only fencing
tokens protect against that (protocol.md §4.5). A lost state is recovered only one node at a time
(protocol.md §3.9).
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from pyquorum.core.address import sort_nodes
from pyquorum.core.errors import LocalProtocolError
from pyquorum.core.lease import Timing
from pyquorum.core.messages import (
    Heartbeat,
    HeartbeatResponse,
    Message,
    PreVoteRequest,
    PreVoteResponse,
    Resign,
    StepDown,
    StepDownResponse,
    VoteRequest,
    VoteResponse,
)
from pyquorum.core.quorum import quorum_size
from pyquorum.core.rules import KEEPALIVE_PROPOSERS, RULES, Rules


class Role(enum.Enum):
    SLAVE = "slave"
    PRECANDIDATE = "precandidate"
    CANDIDATE = "candidate"
    MASTER = "master"


# The transition table of the module docstring: the roles each role may become.
TRANSITIONS: dict[Role, frozenset[Role]] = {
    Role.SLAVE: frozenset({Role.SLAVE, Role.PRECANDIDATE}),
    Role.PRECANDIDATE: frozenset({Role.SLAVE, Role.CANDIDATE}),
    Role.CANDIDATE: frozenset({Role.SLAVE, Role.MASTER}),
    Role.MASTER: frozenset({Role.SLAVE}),
}


class ScriptState(enum.Enum):
    IDLE = "idle"  # no script process exists (reaped)
    RUNNING = "running"
    STOPPING = "stopping"  # stop requested, not yet reaped


# protocol.md §3.9: ``voted_for`` of a node that lost its state and then learned the cluster's terms: it
# may have voted in this term before, for someone it no longer knows, so it votes for nobody in it.
UNKNOWN_VOTE = "?"


@dataclass(frozen=True, slots=True)
class HardState:
    """What must survive a restart: persisted before any message that depends on it is sent.

    ``promise_s`` (protocol.md §3.6): the longest ``E + D`` under which this node may have acknowledged a
    master and not yet waited out; the next run's restart embargo covers it. ``recovering``
    (protocol.md §3.9): this node's state was lost, so it may have voted in terms it does not remember;
    it grants no vote and does not campaign until it has heard the term of every other member.
    """

    term: int = 0
    voted_for: str | None = None
    promise_s: float = 0.0
    recovering: bool = False


@dataclass(frozen=True, slots=True)
class StartScript:
    """Start the script with fencing token ``token``; it must be reaped by ``kill_deadline``."""

    token: int
    kill_deadline: float


@dataclass(frozen=True, slots=True)
class StopScript:
    """Stop the script now (SIGTERM; SIGKILL after the grace); reaped by ``kill_deadline``."""

    kill_deadline: float
    reason: str


ScriptAction = StartScript | StopScript


class EventKind(enum.Enum):
    """What an ``Event`` reports: the ``event=`` word of the log line (docs/operations.md)."""

    ELECTION_STARTED = "election_started"  # alive
    ELECTION_FAILED = "election_failed"  # phase got members needed retry_in_s
    BECAME_CANDIDATE = "became_candidate"
    BECAME_MASTER = "became_master"  # votes members
    LEASE_ESTABLISHED = "lease_established"  # acked members
    SCRIPT_STARTING = "script_starting"  # token deadline_in_s
    STEPPED_DOWN = "stepped_down"  # reason (lost_quorum acked needed deadline_in_s | higher_term from)
    BECAME_SLAVE = "became_slave"  # was reason
    NEW_TERM = "new_term"  # reason from
    FOLLOWING = "following"  # master
    MASTER_RESIGNED = "master_resigned"  # master successor
    VOTED = "voted"  # candidate
    IGNORED_MASTER = "ignored_master"  # sender: another master of our own term (a broken or forged peer)
    RESIGNING = "resigning"  # role reason
    RESIGNED = "resigned"  # successor
    STOPPED = "stopped"
    RECOVERED = "recovered"  # heard
    STEP_DOWN_REQUESTED = "step_down_requested"  # (master) sender to preempt accepted reason
    STEP_DOWN_ANSWERED = "step_down_answered"  # (the requester) master accepted reason


@dataclass(frozen=True, slots=True)
class Event:
    """One state change, for the operator's log: ``event=became_master term=7 votes=3 members=3``."""

    kind: EventKind
    term: int
    fields: tuple[tuple[str, object], ...] = ()

    def get(self, name: str) -> object:
        return dict(self.fields).get(name)

    def __str__(self) -> str:
        parts = [f"event={self.kind.value}", f"term={self.term}"]
        parts += [f"{k}={_text(v)}" for k, v in self.fields]
        return " ".join(parts)


def _text(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None or value == "" else str(value)


@dataclass(slots=True)
class Ready:
    """Everything the caller must do, in field order (see the module docstring)."""

    hard_state: HardState | None = None
    messages: list[tuple[str, Message]] = field(default_factory=list)
    script: list[ScriptAction] = field(default_factory=list)
    kill_deadline: float | None = None
    events: list[Event] = field(default_factory=list)
    finished: bool = False

    def empty(self) -> bool:
        return (
            self.hard_state is None
            and not self.messages
            and not self.script
            and self.kill_deadline is None
            and not self.events
        )


class TimeoutKind(enum.Enum):
    EMBARGO_OVER = "embargo_over"  # the previous run's promise is waited out (§3.6)
    LEASE_LAPSED = "lease_lapsed"  # master: no acknowledged round for L_kill - G - K (§4.3)
    SCRIPT_DUE = "script_due"  # master: the script may start (lease, D, restart backoff)
    CAMPAIGN_OVER = "campaign_over"  # (pre)candidate: its slot S ended (§3.3)
    REQUEST_DUE = "request_due"  # (pre)candidate: re-send unanswered requests
    ELECTION_TIMER = "election_timer"  # slave: checked on every tick; an attempt when due (§3.3)
    HEARTBEAT_DUE = "heartbeat_due"  # everyone, every h (§3.2)


@dataclass(frozen=True, slots=True)
class Timeout:
    """An input the node gives itself from ``tick()``; never on the wire."""

    kind: TimeoutKind


Input = Message | Timeout


@dataclass(slots=True)
class _Round:
    sent_at: float
    acks: set[str]


@dataclass(frozen=True, slots=True)
class Status:
    node: str
    role: Role
    term: int
    master: str | None
    script: ScriptState
    lease_deadline: float | None


class Node:
    """One member's view of the election. See the module docstring for how to drive it."""

    def __init__(
        self,
        me: str,
        members: Sequence[str],
        timing: Timing,
        *,
        now: float,
        rng: random.Random,
        hard_state: HardState | None = None,
        rules: Rules = RULES,
        priorities: Mapping[str, int] | None = None,
        witnesses: frozenset[str] = frozenset(),
        preempt_after_s: float | None = None,
    ) -> None:
        if me not in members:
            raise LocalProtocolError(f"{me} is not among the members {list(members)}")
        if len(set(members)) != len(members):
            raise LocalProtocolError(f"duplicate members in {list(members)}")
        if not witnesses <= set(members) or set(priorities or ()) - set(members):
            raise LocalProtocolError("priorities and witnesses must name members")
        self.me = me
        self.members = frozenset(members)
        # protocol.md §3.10, §3.11: who proposes first, and who never does
        self.priority = {m: (priorities or {}).get(m, 0) for m in members}
        self.witnesses = frozenset(witnesses)
        self.abstains = me in self.witnesses and rules.witness_abstains
        self.preempt_after_s = preempt_after_s
        self.order = sort_nodes(self.members)  # protocol.md §3.3: lowest address proposes first
        self.peers = [m for m in self.order if m != me]
        # protocol.md §3.3, §3.10, §3.11: the members that may propose, in the order they do: higher
        # priority first, then the address order (a stable sort); witnesses never propose
        self.proposers = sorted(
            (m for m in self.order if m not in self.witnesses or not rules.witness_abstains),
            key=lambda m: -self.priority[m],
        )
        # protocol.md §3.2: whom a node with no live master keeps alive, in this order: the proposers
        # ranked before it; all of them if it does not propose itself
        if me in self.proposers:
            self.keepalive_order = self.proposers[: self.proposers.index(me)]
        else:
            self.keepalive_order = list(self.proposers)
        self.quorum = quorum_size(len(self.members))
        self.timing = timing
        self.rng = rng
        self.rules = rules
        hs = hard_state or HardState()
        self.term = hs.term
        self.voted_for = hs.voted_for
        self.role = Role.SLAVE
        self.master: str | None = None
        self.started_at = now
        # protocol.md §3.6: the restart embargo covers what the previous run promised (its E + D) as well
        # as this run's E; until it has passed, the larger promise stays on disk.
        self.embargo_s = rules.embargo_s(timing, hs.promise_s)
        self.promise_s = max(hs.promise_s, timing.election_timeout_s + timing.start_delay_s)
        self._promise_settled = False
        # protocol.md §3.9: a node that lost its state heard nothing yet; it needs every member's term.
        self.recovering = hs.recovering and rules.recovers_lost_state
        self.heard_terms: dict[str, int] = {}
        self._hs_dirty = self.promise_s != hs.promise_s or self.recovering != hs.recovering
        self.demoted_until = now
        self.last_heard: dict[str, float] = {}
        # protocol.md §3.2: who the master last said it heard from, and when we heard it say so
        self.reported: frozenset[str] = frozenset()
        self.reported_at: float | None = None
        self.plain_sent: dict[str, float] = {}  # when we last sent each peer a plain heartbeat
        # protocol.md §3.2: the first heartbeat duty of a life goes to every peer (first contact)
        self.greeted = not rules.greet_every_peer
        # protocol.md §3.10: since when each peer has been heard without a gap of more than 3h, and
        # since when we follow our master so; a pre-emption needs --preempt-after of both
        self.connected_since: dict[str, float] = {}
        self.following_since = now
        self.next_preempt_at = now
        self.successor_hint = ""  # the successor a step-down request named
        # protocol.md §3.3: the last time we accepted a live master's heartbeat (or sent one as master)
        self.last_master_heard: float | None = None
        self.attempt_at: float | None = None
        self.quiet_until = now
        # (master, term) that resigned: its heartbeats of that term, reordered behind the Resign, are void
        self.resigned: tuple[str, int] | None = None
        # campaign
        self.grants: set[str] = set()
        self.campaign_ends_at = 0.0
        self.next_request_at = 0.0
        # master
        self.round = 0
        self.rounds: dict[int, _Round] = {}
        self.lease_start: float | None = None
        self.became_master_at = 0.0
        self.next_heartbeat_at = now
        # script
        self.script_state = ScriptState.IDLE
        self.script_not_before = now
        self.script_disabled_term = -1
        self.kill_deadline: float | None = None
        # shutdown / resign
        self.leaving = False
        self.final = False
        self.finished = False
        self._ready = Ready()
        if self.recovering and not self.peers:
            # a cluster of one has nobody to ask: it can only take its own (lost) word (§3.9, limits)
            self._finish_recovery()

    # ------------------------------------------------------------------ inputs

    def step(self, sender: str, msg: Message, now: float) -> None:
        """Handle one message from ``sender`` (an authenticated member id). Then call ``ready()``."""
        if self.finished or sender not in self.members or sender == self.me:
            return
        previous = self.last_heard.get(sender)
        if previous is None or now - previous > self._connection_gap_s():
            self.connected_since[sender] = now
        self.last_heard[sender] = now
        self._skip_quiet_rounds(now)
        if self.recovering:
            self._learn_term(sender, msg)
        self._step(sender, msg, now)

    def tick(self, now: float) -> None:
        """Feed the timeouts that are due (heartbeats, elections, the lease) through the same path as
        messages. Call at ``next_wakeup()`` or later; then call ``ready()``."""
        if self.finished:
            return
        self._skip_quiet_rounds(now)
        for kind in self._due(now):
            self._step(self.me, Timeout(kind), now)

    def script_stopped(self, now: float, *, restart_after: float | None = 0.0) -> None:
        """The script's process group is gone and reaped.

        ``restart_after``: if this was an unexpected exit while master, the earliest time (seconds
        from now) to start it again in this term; ``None`` means not again in this term.
        """
        was = self.script_state
        self.script_state = ScriptState.IDLE
        self.kill_deadline = None
        if was is ScriptState.RUNNING and self.role is Role.MASTER and not self.leaving:
            if restart_after is None:
                self.script_disabled_term = self.term
            else:
                self.script_not_before = now + restart_after
        if self.leaving:
            self._finish_leaving(now)

    def resign(self, now: float, reason: str) -> bool:
        """Give up mastership (e.g. the script keeps failing): stop the script, then tell the peers
        (protocol.md §3.7). The node stays a member and may become master again later.

        Only a master resigns: on any other role this changes nothing and returns False (the leaving
        path would drop the stickiness that the lease of the master we follow counts on)."""
        if not self.rules.may_resign(self.role is Role.MASTER):
            return False
        self._leave(now, reason, final=False)
        return True

    def request_step_down(self, now: float, to: str = "") -> str | None:
        """Ask the master to hand over (protocol.md §3.10), to ``to`` if given. On the master itself
        the request is decided at once: the reason (``STEP_DOWN_REASONS``) is returned. Elsewhere it
        is sent to the master we follow and None is returned: the answer comes back as a
        ``step_down_answered`` event. Without a live master to ask, the answer is at once:
        "no-majority" if we hear fewer than a majority of the members, else "not-master"."""
        if to and to not in self.members:
            raise LocalProtocolError(f"{to!r} is not a member")
        if self.role is Role.MASTER:
            return self._decide_step_down(self.me, StepDown(self.term, to), now)
        if self.master is None or self.master == self.me or not self._has_live_master(now):
            # protocol.md §3.10: nobody to ask; say why, as the master would
            return "no-majority" if len(self._alive(now)) < self.quorum else "not-master"
        self._send(self.master, StepDown(self.term, to))
        return None

    def shutdown(self, now: float) -> None:
        """Planned stop: stop the script, resign so a peer takes over at once, then ``finished``."""
        self._leave(now, "shutdown", final=True)

    # ------------------------------------------------------------------ outputs

    def ready(self) -> Ready:
        """What to do now (see the module docstring for the order). Then call ``advance()``."""
        rd = self._ready
        if self._hs_dirty:
            rd.hard_state = self.hard_state
        rd.finished = self.finished
        return rd

    def advance(self, ready: Ready) -> None:
        """Acknowledge that ``ready`` has been carried out."""
        if ready is not self._ready:
            raise LocalProtocolError("advance() called with a Ready that is not the current one")
        if ready.hard_state is not None:
            self._hs_dirty = False
        self._ready = Ready()

    def next_wakeup(self) -> float:
        """The latest time at which ``tick`` must be called next (infinity once finished)."""
        if self.finished:
            return float("inf")
        t = self._heartbeat_due_at()
        if not self._promise_settled:
            t = min(t, self.started_at + self.embargo_s)
        if self.role is Role.MASTER:
            t = min(t, self._stop_at())
            start_at = self._script_may_start_at()
            if start_at is not None:
                t = min(t, start_at)
        elif self.role in (Role.PRECANDIDATE, Role.CANDIDATE):
            t = min(t, self.next_request_at, self.campaign_ends_at)
        elif not self.leaving:
            due = self._election_due_at()
            t = min(t, due if self.attempt_at is None else max(due, self.attempt_at))
        return t

    def status(self) -> Status:
        deadline = None
        if self.role is Role.MASTER and self.lease_start is not None:
            deadline = self._deadline()
        return Status(self.me, self.role, self.term, self.master, self.script_state, deadline)

    def lease_ends_at(self) -> float | None:
        """Read-only, for status displays: when this master steps down and stops its script unless
        a newer round is acknowledged (protocol.md §4.3); None unless master with a lease."""
        if self.role is not Role.MASTER or self.lease_start is None:
            return None
        return self._stop_at()

    @property
    def hard_state(self) -> HardState:
        return HardState(self.term, self.voted_for, self.promise_s, self.recovering)

    # ------------------------------------------------------------------ the one path (etcd Step)

    def _step(self, sender: str, msg: Input, now: float) -> None:
        if isinstance(msg, Timeout):
            self._step_role(sender, msg, now)
            return
        # protocol.md §3.1: the term first. The one exception is a pre-vote request: its term is the
        # term its sender WOULD have, and it changes nothing here (§3.3).
        if isinstance(msg, PreVoteRequest):
            self._answer_prevote(sender, msg, now)
            return
        term = msg.voter_term if isinstance(msg, PreVoteResponse) else msg.term
        if term > self.term:
            if isinstance(msg, VoteRequest) and self._sticky(now) is not None:
                # §3.3: while sticky, a higher term does not even change ours (Raft thesis §4.2.3)
                self._send(sender, VoteResponse(self.term, False))
                return
            self._become_slave(now, term, "higher_term", peer=sender)
        elif term < self.term and not isinstance(msg, (PreVoteResponse, StepDownResponse)):
            # (a pre-vote response is judged by the term it answers, which is ours + 1; a step-down
            # answer is news for the operator whatever its term)
            self._step_stale(sender, msg)
            return
        self._step_role(sender, msg, now)

    def _step_role(self, sender: str, msg: Input, now: float) -> None:
        if self.role is Role.MASTER:
            self._step_master(sender, msg, now)
        elif self.role is Role.SLAVE:
            self._step_slave(sender, msg, now)
        else:
            self._step_candidate(sender, msg, now)

    def _step_stale(self, sender: str, msg: Message) -> None:
        """A message of a lower term: answered where the answer helps its sender catch up."""
        if isinstance(msg, Heartbeat) and msg.master and self.resigned != (sender, msg.term):
            # protocol.md §3.5: a stale master learns our term and steps down
            self._send(sender, HeartbeatResponse(self.term, msg.round))
        elif isinstance(msg, VoteRequest):
            self._send(sender, VoteResponse(self.term, False))
        elif isinstance(msg, StepDown):
            self._send(sender, StepDownResponse(self.term, False, "not-master"))

    def _step_slave(self, sender: str, msg: Input, now: float) -> None:
        if isinstance(msg, Timeout):
            if msg.kind is TimeoutKind.ELECTION_TIMER:
                self._election_timer(now)
            else:
                self._common_timeout(msg.kind, now)
        elif isinstance(msg, Heartbeat):
            if msg.master:
                self._follow(sender, msg, now)
            else:
                self._plain_heartbeat(sender, msg, now)
        else:
            self._common_message(sender, msg, now)

    def _step_candidate(self, sender: str, msg: Input, now: float) -> None:
        if isinstance(msg, Timeout):
            if msg.kind is TimeoutKind.CAMPAIGN_OVER:
                self._campaign_over(now)
            elif msg.kind is TimeoutKind.REQUEST_DUE:
                self._send_requests(now)
            else:
                self._common_timeout(msg.kind, now)
        elif isinstance(msg, PreVoteResponse):
            if self.role is Role.PRECANDIDATE and msg.term == self.term + 1 and msg.granted:
                self.grants.add(sender)
                self._maybe_win_prevote(now)
        elif isinstance(msg, VoteResponse):
            if self.role is Role.CANDIDATE and msg.granted:  # msg.term == self.term: §3.1 above
                self.grants.add(sender)
                if len(self.grants) >= self.quorum:
                    self._become_master(now)
        elif isinstance(msg, Heartbeat):
            if msg.master:
                if self.resigned == (sender, msg.term):
                    return  # protocol.md §3.7: a heartbeat overtaken by its master's Resign
                self._become_slave(now, self.term, "master_exists", peer=sender)
                self._follow(sender, msg, now)
            else:
                self._plain_heartbeat(sender, msg, now)
        else:
            self._common_message(sender, msg, now)

    def _step_master(self, sender: str, msg: Input, now: float) -> None:
        if isinstance(msg, Timeout):
            if msg.kind is TimeoutKind.LEASE_LAPSED:
                self._lease_lapsed(now)
            elif msg.kind is TimeoutKind.SCRIPT_DUE:
                self._maybe_start_script(now)
            else:
                self._common_timeout(msg.kind, now)
        elif isinstance(msg, HeartbeatResponse):
            self._on_heartbeat_response(sender, msg, now)
        elif isinstance(msg, Heartbeat):
            if msg.master:
                # Impossible unless a peer is broken or forged (unauthenticated mode): never crash on
                # what a peer says; the simulation's invariants catch a real double master.
                self._emit(EventKind.IGNORED_MASTER, sender=sender)
        else:
            self._common_message(sender, msg, now)

    def _common_message(self, sender: str, msg: Message, now: float) -> None:
        if isinstance(msg, VoteRequest):
            self._on_vote_request(sender, msg, now)
        elif isinstance(msg, Resign):
            self._on_resign(sender, msg, now)
        elif isinstance(msg, StepDown):
            reason = self._decide_step_down(sender, msg, now)
            self._send(sender, StepDownResponse(self.term, reason == "accepted", reason))
        elif isinstance(msg, StepDownResponse):
            self._emit(EventKind.STEP_DOWN_ANSWERED, master=sender, accepted=msg.accepted, reason=msg.reason)
        # anything else is not for this role: a late response, an ack for a round we no longer run

    def _common_timeout(self, kind: TimeoutKind, now: float) -> None:
        if kind is TimeoutKind.HEARTBEAT_DUE:
            self._send_heartbeats(now)
        elif kind is TimeoutKind.EMBARGO_OVER:
            # protocol.md §3.6: what the previous run promised has been waited out
            self._promise_settled = True
            self._set_promise(self.timing.election_timeout_s + self.timing.start_delay_s)

    def _due(self, now: float) -> Iterator[TimeoutKind]:
        # Evaluated lazily, in this order: a timeout handled first may change the role, and so
        # which of the later ones are due (a candidate whose slot ended is a slave at once).
        if not self._promise_settled and now >= self.started_at + self.embargo_s:
            yield TimeoutKind.EMBARGO_OVER
        if self.role is Role.MASTER:
            if now >= self._stop_at():
                yield TimeoutKind.LEASE_LAPSED
            start_at = self._script_may_start_at()
            if self.role is Role.MASTER and start_at is not None and now >= start_at:
                yield TimeoutKind.SCRIPT_DUE
        elif self.role in (Role.PRECANDIDATE, Role.CANDIDATE):
            if now >= self.campaign_ends_at:
                yield TimeoutKind.CAMPAIGN_OVER
            elif now >= self.next_request_at:
                yield TimeoutKind.REQUEST_DUE
        if self.role is Role.SLAVE and not self.leaving:
            yield TimeoutKind.ELECTION_TIMER
        if now >= self.next_heartbeat_at:
            yield TimeoutKind.HEARTBEAT_DUE

    # The heartbeat duty of a quiet follower (protocol.md §3.2). A slave that follows a live master
    # and is not recovering sends nothing when its duty is due: the duty only moves its own time h
    # later. So it need not be woken for it: the duty instants at which it is quiet are skipped
    # (next_wakeup), and accounted for when the node next runs (_skip_quiet_rounds, at the start of
    # every step and tick), exactly as if it had been ticked at each of them. It is woken at the
    # first instant at which it would send again: once E has passed since the last round it
    # accepted (before that, every round it accepts moves that moment later, and its election timer
    # wakes it anyway), or at once when an input ends its quiet (a Resign, a higher term, its master
    # stepping down): its next instant is then the one it would have had. Nothing the node sends, or
    # when, changes; only the wake-ups in which it had nothing to do go.

    def _quiet_until(self) -> float | None:
        """When the quiet of a follower of a live master ends (E after the last round it accepted);
        None if it is not quiet: master, candidate, without a live master, recovering (§3.9: it
        asks the members whose terms it still needs every h), or before its first duty (§3.2)."""
        if self.role is not Role.SLAVE or self.recovering or self.master is None or not self.greeted:
            return None
        if self.last_master_heard is None:
            return None
        return self.last_master_heard + self.timing.election_timeout_s

    def _heartbeat_due_at(self) -> float:
        """The first duty instant (next_heartbeat_at + k h) at which the node is not quiet."""
        t = self.next_heartbeat_at
        quiet_until = self._quiet_until()
        if quiet_until is not None and t < quiet_until:
            h = self.timing.heartbeat_interval_s
            t += math.ceil((quiet_until - t) / h) * h
        return t

    def _skip_quiet_rounds(self, now: float) -> None:
        """Account for the duty instants before ``now`` at which the node was quiet: each would have
        sent nothing and moved next_heartbeat_at h later (_send_heartbeats)."""
        quiet_until = self._quiet_until()
        if quiet_until is None:
            return
        limit = min(now, quiet_until)
        t = self.next_heartbeat_at
        if t < limit:
            h = self.timing.heartbeat_interval_s
            self.next_heartbeat_at = t + math.ceil((limit - t) / h) * h

    # ------------------------------------------------------------------ transitions

    def _to(self, role: Role) -> None:
        if role not in TRANSITIONS[self.role]:
            raise LocalProtocolError(f"impossible transition {self.role.value} -> {role.value}")
        self.role = role

    def _become_slave(self, now: float, term: int, reason: str, **fields: object) -> None:
        old_role, old_term = self.role, self.term
        self._set_term(term)
        self._to(Role.SLAVE)
        self.master = None
        self.grants = set()
        if old_role is Role.MASTER:
            self._stop_script(now, reason)
            if reason == "resigned":
                self._emit(EventKind.RESIGNED, **fields)
            else:
                self._emit(EventKind.STEPPED_DOWN, reason=reason, **fields)
        elif old_role is not Role.SLAVE:
            if reason != "campaign_over":  # election_failed says it, with the numbers
                self._emit(EventKind.BECAME_SLAVE, was=old_role.value, reason=reason, **fields)
        elif term > old_term:
            self._emit(EventKind.NEW_TERM, reason=reason, **fields)

    def _become_precandidate(self, now: float) -> None:
        self._to(Role.PRECANDIDATE)
        self.grants = {self.me}
        self.campaign_ends_at = now + self.timing.slot_s
        self.attempt_at = None
        self._emit(
            EventKind.ELECTION_STARTED,
            for_term=self.term + 1,
            alive=len(self._alive(now)),
            members=len(self.members),
        )
        self._maybe_win_prevote(now)
        if self.role is Role.PRECANDIDATE:
            self._send_requests(now)

    def _become_candidate(self, now: float) -> None:
        self._to(Role.CANDIDATE)
        self._set_term(self.term + 1)
        self.voted_for = self.me
        self._hs_dirty = True
        self.grants = {self.me}
        self._emit(EventKind.BECAME_CANDIDATE)
        if len(self.grants) >= self.quorum:
            self._become_master(now)
        else:
            self._send_requests(now)

    def _become_master(self, now: float) -> None:
        votes = len(self.grants)
        self._to(Role.MASTER)
        self.master = self.me
        self.became_master_at = now
        self.rounds = {}
        self.lease_start = None
        self.script_not_before = now + self.timing.start_delay_s
        self.attempt_at = None
        self._emit(EventKind.BECAME_MASTER, votes=votes, members=len(self.members))
        self.next_heartbeat_at = now  # the first round establishes the lease at once

    # ------------------------------------------------------------------ helpers

    def _emit(self, kind: EventKind, **fields: object) -> None:
        self._ready.events.append(Event(kind, self.term, tuple(fields.items())))

    def _send(self, to: str, msg: Message) -> None:
        self._ready.messages.append((to, msg))

    def _broadcast(self, msg: Message) -> None:
        for p in self.peers:
            self._send(p, msg)

    def _alive(self, now: float) -> list[str]:
        """Ourselves and the live members (``_is_live``), in protocol order. Followers do not hear each
        other while they have a master, nor all of each other without one (protocol.md §3.2): the
        master's report fills in. It is at most E old when a master is lost; the second E covers the
        slots."""
        return [m for m in self.order if m == self.me or self._is_live(m, now)]

    def _proposal_order(self, now: float, exclude: str = "") -> list[str]:
        """protocol.md §3.3, §3.10, §3.11: the live members that may propose (``self.proposers``, which
        are ourselves and the ``_is_live`` ones), in the order they do."""
        return [m for m in self.proposers if m != exclude and (m == self.me or self._is_live(m, now))]

    def _is_live(self, member: str, now: float) -> bool:
        """Heard from within E, or named live by a master's report less than ``report_e`` E old (§3.2)."""
        e = self.timing.election_timeout_s
        heard = self.last_heard.get(member)
        if heard is not None and now - heard < e:
            return True
        fresh = self.reported_at is not None and now - self.reported_at < self.rules.report_e * e
        return fresh and member in self.reported

    def _keepalive_targets(self, now: float) -> list[str]:
        """protocol.md §3.2: the peers this node sends a plain heartbeat to each h. Nobody while it
        follows a live master; otherwise the proposers before it in the proposal order up to and
        including the ``KEEPALIVE_PROPOSERS``-th live one (the dead on the way included, so that
        their return is noticed); and, while recovering (§3.9), every member whose term it lacks."""
        targets: list[str] = []
        if not self._has_live_master(now):
            live = 0
            for m in self.keepalive_order:
                targets.append(m)
                if not self.rules.keepalive_past_the_dead or self._is_live(m, now):
                    live += 1
                    if live == KEEPALIVE_PROPOSERS:
                        break
        if self.recovering:
            targets += [p for p in self.peers if p not in self.heard_terms and p not in targets]
        return targets

    def _connection_gap_s(self) -> float:
        # protocol.md §3.10: three heartbeat intervals without a word break a connection
        return 3 * self.timing.heartbeat_interval_s

    def _has_live_master(self, now: float) -> bool:
        """protocol.md §3.2: we follow a master heard within E (or are the master)."""
        if self.role is Role.MASTER:
            return True
        return (
            self.master is not None
            and self.last_master_heard is not None
            and now - self.last_master_heard < self.timing.election_timeout_s
        )

    def _sticky(self, now: float) -> str | None:
        """Why we refuse any (pre-)vote now, or None. protocol.md §3.3, §3.6 and §3.9."""
        if self.leaving:
            return "leaving"
        if self.role is Role.MASTER:
            return "i am master"
        if self.recovering:
            return "recovering"
        if now - self.started_at < self.embargo_s:
            return "restart embargo"
        stickiness = self.rules.stickiness_e * self.timing.election_timeout_s
        if self.last_master_heard is not None and now - self.last_master_heard < stickiness:
            return "live master"
        return None

    def _deadline(self) -> float:
        if self.lease_start is None:
            raise LocalProtocolError("a kill deadline without a lease")
        return self.lease_start + self.rules.lease_kill_s(self.timing)

    def _stop_at(self) -> float:
        """When the master must step down and send SIGTERM unless a newer round is acknowledged."""
        start = self.lease_start if self.lease_start is not None else self.became_master_at
        return start + self.rules.stop_begin_s(self.timing)

    def _set_term(self, term: int) -> None:
        if term < self.term:
            raise LocalProtocolError(f"term would decrease from {self.term} to {term}")
        if term > self.term:
            self.term = term
            self.voted_for = None
            self._hs_dirty = True

    def _set_promise(self, promise_s: float) -> None:
        if promise_s != self.promise_s:
            self.promise_s = promise_s
            self._hs_dirty = True

    def _stop_script(self, now: float, reason: str) -> None:
        if self.script_state is ScriptState.RUNNING and self.kill_deadline is not None:
            self.script_state = ScriptState.STOPPING
            self._ready.script.append(StopScript(self.kill_deadline, reason))

    # ------------------------------------------------------------------ recovery (protocol.md §3.9)

    def _learn_term(self, sender: str, msg: Message) -> None:
        """A recovering node collects every other member's current term; once it has them all, no
        term it may have voted in is above their maximum, so it takes that term with an unknown vote
        (it votes for nobody in it) and is an ordinary member again."""
        if isinstance(msg, PreVoteRequest):
            term = msg.term - 1  # a pre-vote asks for the sender's term + 1
        elif isinstance(msg, PreVoteResponse):
            term = msg.voter_term
        else:
            term = msg.term
        self.heard_terms[sender] = max(term, self.heard_terms.get(sender, 0))
        if len(self.heard_terms) == len(self.peers):
            self._finish_recovery()

    def _finish_recovery(self) -> None:
        floor = max([self.term, *self.heard_terms.values()])
        self.recovering = False
        self._set_term(floor)
        self.voted_for = UNKNOWN_VOTE
        self._hs_dirty = True
        self._emit(EventKind.RECOVERED, heard=len(self.heard_terms))

    # ------------------------------------------------------------------ slave

    def _election_due_at(self) -> float:
        """protocol.md §3.3: no election before the embargo ends, nor E after the last live master."""
        if self.recovering or self.abstains:
            return float("inf")  # protocol.md §3.9, §3.11: not while recovering, never as a witness
        due = max(self.started_at + self.embargo_s, self.quiet_until)
        if self.last_master_heard is not None:
            due = max(due, self.last_master_heard + self.timing.election_timeout_s)
        return due

    def _election_timer(self, now: float) -> None:
        due = self._election_due_at()
        if now < due:
            self.attempt_at = None
            return
        if self.attempt_at is None:
            # protocol.md §3.3: the k-th lowest live address waits k slots, so the lowest proposes
            # first and a node that cannot win (one-way link) is followed by the next; a node that
            # lost its lease recently waits after all of them (demotion).
            order = self._proposal_order(now)
            rank = len(order) if now < self.demoted_until else order.index(self.me)
            self.attempt_at = due + rank * self.timing.slot_s
        if now >= self.attempt_at:
            self._become_precandidate(now)

    def _plain_heartbeat(self, sender: str, msg: Heartbeat, now: float) -> None:
        if sender == self.master and msg.term == self.term:
            self.master = None  # it stepped down; stickiness still runs from last_master_heard (§3.2)
        # protocol.md §3.2: a node that keeps us alive but that we do not keep alive (a node with no
        # master, a node ranked after us, a recovering node) hears from us only in answer: once per
        # h, so that it learns that we are alive and our term. (A master's rounds already tell it.)
        answer = self.rules.answer_plain and self.role is not Role.MASTER
        if (
            answer
            and now - self.plain_sent.get(sender, -1e18) >= self.timing.heartbeat_interval_s
            and sender not in self._keepalive_targets(now)
        ):
            self.plain_sent[sender] = now
            self._send(sender, Heartbeat(self.term, False, 0))

    def _follow(self, sender: str, msg: Heartbeat, now: float) -> None:
        if self.resigned == (sender, msg.term):
            return  # protocol.md §3.7: a heartbeat overtaken by its master's Resign
        gap = self.last_master_heard is None or now - self.last_master_heard > self._connection_gap_s()
        if self.master != sender or gap:
            self.following_since = now
        if self.master != sender:
            self._emit(EventKind.FOLLOWING, master=sender)
        self.master = sender
        self.attempt_at = None
        self.reported, self.reported_at = msg.live, now
        # protocol.md §3.5: stickiness is set BEFORE the acknowledgement leaves
        self.last_master_heard = now
        self._send(sender, HeartbeatResponse(self.term, msg.round))
        self._maybe_preempt(sender, now)

    def _maybe_preempt(self, master: str, now: float) -> None:
        """protocol.md §3.10: a node preferred to its master, connected to it for --preempt-after,
        asks it for a clean handover to itself, at most once per --preempt-after."""
        after = self.preempt_after_s
        if (
            after is None
            or self.abstains
            or self.recovering
            or self.priority[self.me] <= self.priority[master]
            or now - self.following_since < after
            or now < self.next_preempt_at
        ):
            return
        self.next_preempt_at = now + after
        self._send(master, StepDown(self.term, self.me, preempt=True))

    def _on_resign(self, sender: str, msg: Resign, now: float) -> None:
        if msg.term != self.term or self.master not in (sender, None):
            return  # a stale or duplicated Resign must not lift the current master's stickiness
        self.master = None
        self.last_master_heard = None
        self.resigned = (sender, msg.term)
        self._emit(EventKind.MASTER_RESIGNED, master=sender, successor=msg.successor)
        if self.role is Role.SLAVE and not self.leaving and not self.abstains:
            # protocol.md §3.7: the named successor goes first, the others in the proposal order after it
            order = self._proposal_order(now, exclude=sender)
            if msg.successor in order:
                order = [msg.successor, *(m for m in order if m != msg.successor)]
            rank = order.index(self.me)
            self.attempt_at = max(now, self._election_due_at()) + rank * self.timing.slot_s

    # ------------------------------------------------------------------ votes

    def _answer_prevote(self, sender: str, msg: PreVoteRequest, now: float) -> None:
        # protocol.md §3.3: a pre-vote changes no state; it is granted only for a higher term, when
        # we hear no live master, and not during the restart embargo.
        granted = msg.term > self.term and self._sticky(now) is None
        self._send(sender, PreVoteResponse(msg.term, granted, self.term))

    def _on_vote_request(self, sender: str, msg: VoteRequest, now: float) -> None:
        # msg.term == self.term here (§3.1 in _step): grant at most once per term (§3.4)
        if self._sticky(now) is None and self.rules.may_vote(self.voted_for, sender):
            if self.voted_for != sender:
                self.voted_for = sender
                self._hs_dirty = True
                self._emit(EventKind.VOTED, candidate=sender)
            # a granted vote defers our own candidacy: the candidate should get its chance
            self.attempt_at = max(self.attempt_at or now, now + 2 * self.timing.slot_s)
            self._send(sender, VoteResponse(self.term, True))
        else:
            self._send(sender, VoteResponse(self.term, False))

    # ------------------------------------------------------------------ candidate

    def _maybe_win_prevote(self, now: float) -> None:
        if len(self.grants) >= self.quorum:
            self._become_candidate(now)

    def _send_requests(self, now: float) -> None:
        for p in self.peers:
            if p in self.grants:
                continue
            if self.role is Role.PRECANDIDATE:
                self._send(p, PreVoteRequest(self.term + 1))
            else:
                self._send(p, VoteRequest(self.term))
        self.next_request_at = now + self.timing.retry_interval_s

    def _campaign_over(self, now: float) -> None:
        got, role = len(self.grants), self.role
        alive = self._alive(now)
        self._become_slave(now, self.term, "campaign_over")
        # protocol.md §3.3: after a failed attempt, wait for the others' slots, plus jitter
        self.attempt_at = (
            now + (len(alive) - 1) * self.timing.slot_s + self.rng.uniform(0, self.timing.slot_s)
        )
        self._emit(
            EventKind.ELECTION_FAILED,
            phase="pre-vote" if role is Role.PRECANDIDATE else "vote",
            got=got,
            members=len(self.members),
            needed=self.quorum,
            retry_in_s=self.attempt_at - now,
        )

    # ------------------------------------------------------------------ master

    def _send_heartbeats(self, now: float) -> None:
        h = self.timing.heartbeat_interval_s
        self.next_heartbeat_at = now + h
        if self.role is not Role.MASTER:
            # protocol.md §3.2: a follower of a live master keeps quiet (its acknowledgements prove it
            # alive, the master's report tells the others); a node with none keeps alive the first
            # live proposers before it. A recovering node asks the members whose terms it still
            # needs (§3.9). The first duty of a life greets every peer: the first contact of
            # docs/security.md §5 is then over with each of them before any request needs it.
            targets = self._keepalive_targets(now) if self.greeted else self.peers
            self.greeted = True
            for p in targets:
                self.plain_sent[p] = now
                self._send(p, Heartbeat(self.term, False, 0))
            return
        self.round += 1
        self.rounds[self.round] = _Round(now, {self.me})
        self.last_master_heard = now  # protocol.md §3.5: the master is sticky to itself
        e = self.timing.election_timeout_s
        live = frozenset(p for p in self.peers if p in self.last_heard and now - self.last_heard[p] < e)
        self._broadcast(Heartbeat(self.term, True, self.round, live))
        self._check_acks(self.round, now)

    def _on_heartbeat_response(self, sender: str, msg: HeartbeatResponse, now: float) -> None:
        rnd = self.rounds.get(msg.round)  # msg.term == self.term here (§3.1 in _step)
        if rnd is None:
            return
        rnd.acks.add(sender)
        self._check_acks(msg.round, now)

    def _check_acks(self, number: int, now: float) -> None:
        rnd = self.rounds[number]
        if len(rnd.acks) < self.quorum:
            return
        # protocol.md §4.2: the lease runs from the SEND time of the newest acknowledged round
        start = self.rules.lease_start(rnd.sent_at, now)
        first = self.lease_start is None
        if self.lease_start is None or start > self.lease_start:
            self.lease_start = start
            if self.script_state is ScriptState.RUNNING:
                self.kill_deadline = self._deadline()
                self._ready.kill_deadline = self.kill_deadline
        if first:
            self._emit(EventKind.LEASE_ESTABLISHED, acked=len(rnd.acks), members=len(self.members))
        for old in [r for r in self.rounds if r <= number]:
            del self.rounds[old]
        self._maybe_start_script(now)

    def _script_may_start_at(self) -> float | None:
        if (
            self.script_state is not ScriptState.IDLE
            or self.lease_start is None
            or self.leaving
            or self.script_disabled_term == self.term
        ):
            return None
        return max(self.script_not_before, self.became_master_at + self.timing.start_delay_s)

    def _maybe_start_script(self, now: float) -> None:
        at = self._script_may_start_at()
        if at is None or now < at or now >= self._stop_at():
            return
        self.script_state = ScriptState.RUNNING
        self.kill_deadline = self._deadline()
        self._ready.script.append(StartScript(self.term, self.kill_deadline))
        self._emit(EventKind.SCRIPT_STARTING, token=self.term, deadline_in_s=self.kill_deadline - now)

    def _decide_step_down(self, sender: str, msg: StepDown, now: float) -> str:
        """protocol.md §3.10: accept (and start a clean handover) or say why not."""
        to = msg.to
        if self.role is not Role.MASTER:
            reason = "not-master"
        elif self.leaving:
            reason = "leaving"
        elif self.lease_start is None:
            reason = "no-majority"
        elif to == self.me:
            reason = "is-master"
        elif to in self.witnesses:
            reason = "witness"
        elif to and to not in self._proposal_order(now):
            reason = "not-live"
        elif msg.preempt and (to != sender or self.priority[sender] <= self.priority[self.me]):
            reason = "not-preferred"
        elif (
            msg.preempt
            and self.rules.preempt_needs_connection
            and (now - self.connected_since.get(sender, now) < (self.preempt_after_s or 0.0))
        ):
            reason = "not-connected"
        else:
            reason = "accepted"
        self._emit(EventKind.STEP_DOWN_REQUESTED, sender=sender, to=to, preempt=msg.preempt, reason=reason)
        if reason == "accepted":
            self.successor_hint = to
            self._leave(now, "preempted" if msg.preempt else "step-down", final=False)
        return reason

    def _lease_lapsed(self, now: float) -> None:
        acked = max((len(r.acks) for r in self.rounds.values()), default=1)
        deadline_in = None
        if self.script_state is ScriptState.RUNNING and self.kill_deadline is not None:
            deadline_in = self.kill_deadline - now
        # protocol.md §3.3: a master that could not keep its lease proposes last for a while
        self.demoted_until = now + self.rules.demotion_e * self.timing.election_timeout_s
        self._become_slave(
            now,
            self.term,
            "lost_quorum",
            acked=acked,
            needed=self.quorum,
            members=len(self.members),
            deadline_in_s=deadline_in,
        )

    # ------------------------------------------------------------------ leaving

    def _leave(self, now: float, reason: str, *, final: bool) -> None:
        if self.finished:
            return
        self.final = self.final or final
        if self.leaving:
            return
        self.leaving = True
        self._emit(EventKind.RESIGNING, role=self.role.value, reason=reason)
        if not self.rules.resign_after_reap and self.role is Role.MASTER:
            self._send_resign(now)
        self._stop_script(now, reason)
        if self.script_state is ScriptState.IDLE:
            self._finish_leaving(now)

    def _send_resign(self, now: float) -> str:
        # protocol.md §3.7, §3.10: the successor a step-down named, if still live, else the next in
        # the proposal order
        order = self._proposal_order(now, exclude=self.me)
        successor = self.successor_hint if self.successor_hint in order else (order[0] if order else "")
        self.successor_hint = ""
        self._broadcast(Resign(self.term, successor))
        return successor

    def _finish_leaving(self, now: float) -> None:
        # protocol.md §3.7: Resign only after the script is reaped, so lifting the peers'
        # stickiness cannot let a new master start while our script lives.
        was_master = self.role is Role.MASTER
        if was_master:
            successor = self._send_resign(now) if self.rules.resign_after_reap else ""
            self._become_slave(now, self.term, "resigned", successor=successor)
        if self.final:
            self.finished = True
            self._emit(EventKind.STOPPED)
        else:
            self.leaving = False
            # do not campaign again at once: give the others two election timeouts
            self.quiet_until = now + 2 * self.timing.election_timeout_s
            if self.rules.may_resign(was_master):
                # our own rounds made us sticky to ourselves; a master we now follow (we were deposed
                # while waiting for the script) keeps the stickiness its lease counts on (§3.7)
                self.last_master_heard = None
