"""The election state machine: one ``Node`` per pyquorum server, with no I/O at all.

What this module owns
---------------------
The node's term and vote, its role (SLAVE, PRECANDIDATE, CANDIDATE, MASTER), who it believes is
master, the master's heartbeat rounds and lease, and the decision when the script may run and by
when it must be dead. It is the whole protocol of docs/protocol.md; the runtime and the simulation
are thin shells that move bytes, read clocks and spawn processes.

What it must not know
---------------------
Sockets, clocks, processes, files, threads, asyncio. Time and randomness are inputs: every call takes
``now`` (a monotonic clock reading of the caller's choice) and the node owns a seeded
``random.Random``. The same inputs in the same order give the same outputs, which is what makes the
simulation reproducible from a seed.

How the caller drives it (after etcd-io/raft's Node/Ready)
----------------------------------------------------------
1. Feed inputs: ``step(sender, message, now)`` for each datagram, ``tick(now)`` when ``next_wakeup()``
   has passed, ``script_stopped(now, ...)`` when the script is reaped, ``shutdown(now)`` or
   ``resign(now, ...)`` on request.
2. Take ``ready()``. In this order: persist ``ready.hard_state`` (fsync) if it is set, THEN send
   ``ready.messages``, THEN obey ``ready.script`` actions and push ``ready.kill_deadline`` to the
   script's guard, THEN log ``ready.events``. Then call ``advance(ready)``.
   Sending before persisting breaks protocol.md §3.4 (a restart could vote twice in a term).

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
tokens protect against that (protocol.md §7).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
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
    VoteRequest,
    VoteResponse,
)
from pyquorum.core.quorum import quorum_size


class Role(enum.Enum):
    SLAVE = "slave"
    PRECANDIDATE = "precandidate"
    CANDIDATE = "candidate"
    MASTER = "master"


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


@dataclass(frozen=True, slots=True)
class Event:
    """One state change, for the operator's log: ``became master term=7 votes=3/3``."""

    text: str
    term: int

    def __str__(self) -> str:
        return self.text


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


# Variants of the protocol with one rule deliberately broken. The simulation must catch each of them
# (tests/sim/test_broken_variants.py: "test the tester"). Production code never sets any of these.
BROKEN_VARIANTS = frozenset(
    {
        "double_vote",  # grants a vote to every candidate of a term (protocol.md §3.4)
        "no_prevote_stickiness",  # grants (pre-)votes while it hears a live master (§3.3)
        "no_restart_embargo",  # votes right after a restart (§3.6)
        "no_drift_margin",  # L_kill = E, ignoring clock-rate drift (§4.2)
        "late_stepdown",  # master starts stopping its script only at the kill deadline (§4.3)
        "lease_from_ack_time",  # lease counted from the ack's arrival, not the round's send (§4.2)
        "resign_before_stop",  # resigns before the script is reaped (§3.7)
        "no_quorum_check",  # master never steps down without acks (§4.3)
        "resign_any_role",  # resign() on any role, dropping the stickiness to the master it follows (§3.7)
        "embargo_ignores_promise",  # restart embargo E of this run only, not the last run's E + D (§3.6)
        "amnesia_votes",  # a node that lost its state votes at once, as if brand new (§3.9)
        "no_demotion",  # a master that lost its lease proposes first again next time (§3.3)
    }
)

# protocol.md §3.3: a master that stepped down because it lost its lease proposes last for this many
# election timeouts: a node that can send but hardly receive would otherwise win every election (it
# proposes first) and lose every lease. Ten E: long past the election that follows, short enough that a
# node whose network was repaired soon ranks by its address again.
DEMOTION_E = 10.0


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
        broken: frozenset[str] = frozenset(),
    ) -> None:
        if me not in members:
            raise LocalProtocolError(f"{me} is not among the members {list(members)}")
        if len(set(members)) != len(members):
            raise LocalProtocolError(f"duplicate members in {list(members)}")
        unknown = broken - BROKEN_VARIANTS
        if unknown:
            raise LocalProtocolError(f"unknown broken variants {sorted(unknown)}")
        self.me = me
        self.members = frozenset(members)
        self.order = sort_nodes(self.members)  # protocol.md §3.3: lowest address proposes first
        self.peers = [m for m in self.order if m != me]
        self.quorum = quorum_size(len(self.members))
        self.timing = timing
        self.rng = rng
        self.broken = broken
        hs = hard_state or HardState()
        self.term = hs.term
        self.voted_for = hs.voted_for
        self._hs_dirty = False
        self.role = Role.SLAVE
        self.master: str | None = None
        self.started_at = now
        e, d = timing.election_timeout_s, timing.start_delay_s
        # protocol.md §3.6: the restart embargo covers what the previous run promised (its E + D) as well
        # as this run's E, so that lowering E or D one node at a time cannot shorten a lease's protection.
        previous = 0.0 if "embargo_ignores_promise" in broken else hs.promise_s
        self.embargo_s = max(e, previous - d)
        # Until the embargo has passed, the previous run's promise may still be live: keep it on disk.
        self.promise_s = max(previous, e + d)
        self._promise_settled = False
        self._hs_dirty = self.promise_s != hs.promise_s
        # protocol.md §3.9: a node that lost its state heard nothing yet; it needs every member's term.
        self.recovering = hs.recovering and "amnesia_votes" not in broken
        self.heard_terms: dict[str, int] = {}
        self.demoted_until = now
        self.last_heard: dict[str, float] = {}
        # protocol.md §3.3: the last time we accepted a live master's heartbeat (or sent one as master)
        self.last_master_heard: float | None = None
        self.last_ack_sent = -1e18  # when we last acknowledged our master's round
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
        """Handle one message from ``sender`` (an authenticated member id). Then call ``ready()``.

        protocol.md §3.1: the term is compared before anything else.
        """
        if self.finished or sender not in self.members or sender == self.me:
            return
        self.last_heard[sender] = now
        if self.recovering:
            self._learn_term(sender, msg, now)
        if isinstance(msg, PreVoteRequest):
            self._on_prevote_request(sender, msg, now)
            return
        if isinstance(msg, PreVoteResponse):
            if msg.voter_term > self.term and not msg.granted:
                self._become_slave(now, msg.voter_term, f"higher term from {sender}")
            elif self.role is Role.PRECANDIDATE and msg.term == self.term + 1 and msg.granted:
                self.grants.add(sender)
                self._maybe_win_prevote(now)
            return
        if isinstance(msg, VoteRequest):
            self._on_vote_request(sender, msg, now)
            return
        if msg.term > self.term:
            self._become_slave(now, msg.term, f"higher term from {sender}")
        if isinstance(msg, Heartbeat):
            self._on_heartbeat(sender, msg, now)
        elif isinstance(msg, HeartbeatResponse):
            self._on_heartbeat_response(sender, msg, now)
        elif isinstance(msg, VoteResponse):
            if self.role is Role.CANDIDATE and msg.term == self.term and msg.granted:
                self.grants.add(sender)
                if len(self.grants) >= self.quorum:
                    self._become_master(now)
        elif isinstance(msg, Resign):
            self._on_resign(sender, msg, now)

    def tick(self, now: float) -> None:
        """Advance timers: heartbeats, elections, the lease. Call at ``next_wakeup()`` or later."""
        if self.finished:
            return
        if not self._promise_settled and now >= self.started_at + self.embargo_s:
            # protocol.md §3.6: what the previous run promised has been waited out
            self._promise_settled = True
            self._set_promise(self.timing.election_timeout_s + self.timing.start_delay_s)
        if self.role is Role.MASTER:
            self._tick_master(now)
        elif self.role in (Role.PRECANDIDATE, Role.CANDIDATE):
            self._tick_candidate(now)
        if self.role is Role.SLAVE and not self.leaving:
            self._tick_slave(now)
        if now >= self.next_heartbeat_at:
            self._send_heartbeats(now)

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
        if self.role is not Role.MASTER and "resign_any_role" not in self.broken:
            return False
        self._leave(now, reason, final=False)
        return True

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
        t = self.next_heartbeat_at
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

    @property
    def hard_state(self) -> HardState:
        return HardState(self.term, self.voted_for, self.promise_s, self.recovering)

    # ------------------------------------------------------------------ helpers

    def _emit(self, text: str) -> None:
        self._ready.events.append(Event(text, self.term))

    def _send(self, to: str, msg: Message) -> None:
        self._ready.messages.append((to, msg))

    def _broadcast(self, msg: Message) -> None:
        for p in self.peers:
            self._send(p, msg)

    def _alive(self, now: float) -> list[str]:
        """Members heard from within E, and ourselves, in protocol order."""
        e = self.timing.election_timeout_s
        return [
            m for m in self.order if m == self.me or (m in self.last_heard and now - self.last_heard[m] < e)
        ]

    def _sticky(self, now: float) -> str | None:
        """Why we refuse any (pre-)vote now, or None. protocol.md §3.3 and §3.6."""
        e = self.timing.election_timeout_s
        if self.leaving:
            return "leaving"
        if self.role is Role.MASTER:
            return "i am master"
        if self.recovering:
            return "recovering"
        if "no_restart_embargo" not in self.broken and now - self.started_at < self.embargo_s:
            return "restart embargo"
        if (
            "no_prevote_stickiness" not in self.broken
            and self.last_master_heard is not None
            and now - self.last_master_heard < e
        ):
            return "live master"
        return None

    def _deadline(self) -> float:
        assert self.lease_start is not None
        if "no_drift_margin" in self.broken:
            return self.lease_start + self.timing.election_timeout_s + self.timing.start_delay_s
        return self.timing.kill_deadline(self.lease_start)

    def _stop_at(self) -> float:
        """When the master must step down and send SIGTERM unless a newer round is acknowledged."""
        start = self.lease_start if self.lease_start is not None else self.became_master_at
        if "no_quorum_check" in self.broken:
            return float("inf")
        if "late_stepdown" in self.broken:
            return start + self.timing.lease_kill_s
        return self.timing.stop_at(start)

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

    def _learn_term(self, sender: str, msg: Message, now: float) -> None:
        """protocol.md §3.9: a recovering node collects every other member's current term; once it has
        them all, no term it may have voted in is above their maximum, so it takes that term with an
        unknown vote (it votes for nobody in it) and is an ordinary member again."""
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
        self._emit(f"recovered term={self.term} heard={len(self.heard_terms)}/{len(self.peers)}")

    def _become_slave(self, now: float, term: int, reason: str) -> None:
        old_role, old_term = self.role, self.term
        self._set_term(term)
        if old_role is Role.MASTER:
            self._stop_script(now, f"stepped down: {reason}")
        if old_role is not Role.SLAVE:
            self._emit(f"became slave term={self.term} was={old_role.value} reason={reason}")
        elif term > old_term:
            self._emit(f"new term term={self.term} reason={reason}")
        self.role = Role.SLAVE
        self.master = None
        self.grants = set()

    def _stop_script(self, now: float, reason: str) -> None:
        if self.script_state is ScriptState.RUNNING and self.kill_deadline is not None:
            self.script_state = ScriptState.STOPPING
            self._ready.script.append(StopScript(self.kill_deadline, reason))

    # ------------------------------------------------------------------ slave

    def _election_due_at(self) -> float:
        """protocol.md §3.3: no election before E after start and after the last live master."""
        e = self.timing.election_timeout_s
        if self.recovering:
            return float("inf")  # protocol.md §3.9: no candidacy before every member's term is known
        due = max(self.started_at + self.embargo_s, self.quiet_until)
        if self.last_master_heard is not None:
            due = max(due, self.last_master_heard + e)
        return due

    def _tick_slave(self, now: float) -> None:
        due = self._election_due_at()
        if now < due:
            self.attempt_at = None
            return
        if self.attempt_at is None:
            # protocol.md §3.3: the k-th lowest live address waits k slots, so the lowest proposes
            # first and a node that cannot win (one-way link) is followed by the next.
            alive = self._alive(now)
            rank = alive.index(self.me)
            if now < self.demoted_until:
                rank = len(alive)  # protocol.md §3.3: after losing its lease, a node proposes last
            self.attempt_at = due + rank * self.timing.slot_s
        if now >= self.attempt_at:
            self._become_precandidate(now)

    def _on_heartbeat(self, sender: str, msg: Heartbeat, now: float) -> None:
        if not msg.master:
            if sender == self.master and msg.term == self.term:
                self.master = None  # it stepped down; stickiness still runs from last_master_heard
            return
        if self.resigned == (sender, msg.term):
            return  # protocol.md §3.7: a heartbeat overtaken by its master's Resign
        if msg.term < self.term:
            # protocol.md §3.5: a stale master learns our term and steps down
            self._send(sender, HeartbeatResponse(self.term, msg.round))
            return
        if self.role is Role.MASTER:
            # Impossible unless a peer is broken or forged (unauthenticated mode): never crash on
            # what a peer says; the simulation's invariants catch a real double master.
            self._emit(f"ignored master heartbeat from={sender} term={msg.term}: i am master")
            return
        if self.role is not Role.SLAVE:
            self._become_slave(now, self.term, f"master {sender} exists")
        if self.master != sender:
            self._emit(f"following master={sender} term={self.term}")
        self.master = sender
        self.attempt_at = None
        # protocol.md §3.5: stickiness is set BEFORE the acknowledgement leaves
        self.last_master_heard = now
        self.last_ack_sent = now
        self._send(sender, HeartbeatResponse(self.term, msg.round))

    def _on_resign(self, sender: str, msg: Resign, now: float) -> None:
        if msg.term != self.term or self.master not in (sender, None):
            return  # a stale or duplicated Resign must not lift the current master's stickiness
        self.master = None
        self.last_master_heard = None
        self.resigned = (sender, msg.term)
        self._emit(f"master resigned master={sender} term={msg.term} successor={msg.successor}")
        if self.role is Role.SLAVE and not self.leaving:
            alive = [m for m in self._alive(now) if m != sender]
            rank = 0 if msg.successor == self.me else alive.index(self.me)
            self.attempt_at = max(now, self._election_due_at()) + rank * self.timing.slot_s

    # ------------------------------------------------------------------ votes

    def _on_prevote_request(self, sender: str, msg: PreVoteRequest, now: float) -> None:
        # protocol.md §3.3: a pre-vote changes no state; it is granted only for a higher term, when
        # we hear no live master, and not during the restart embargo.
        granted = msg.term > self.term and self._sticky(now) is None
        self._send(sender, PreVoteResponse(msg.term, granted, self.term))

    def _on_vote_request(self, sender: str, msg: VoteRequest, now: float) -> None:
        why = self._sticky(now)
        if msg.term < self.term or why is not None:
            # protocol.md §3.3: while sticky, a higher term does not even change ours
            self._send(sender, VoteResponse(self.term, False))
            return
        if msg.term > self.term:
            self._become_slave(now, msg.term, f"vote request from {sender}")
        if self.voted_for in (None, sender) or "double_vote" in self.broken:
            if self.voted_for != sender:
                self.voted_for = sender
                self._hs_dirty = True
                self._emit(f"voted for={sender} term={self.term}")
            # a granted vote defers our own candidacy: the candidate should get its chance
            self.attempt_at = max(self.attempt_at or now, now + 2 * self.timing.slot_s)
            self._send(sender, VoteResponse(self.term, True))
        else:
            self._send(sender, VoteResponse(self.term, False))

    # ------------------------------------------------------------------ candidate

    def _become_precandidate(self, now: float) -> None:
        self.role = Role.PRECANDIDATE
        self.grants = {self.me}
        self.campaign_ends_at = now + self.timing.slot_s
        self.attempt_at = None
        self._emit(f"election started term={self.term + 1} alive={len(self._alive(now))}/{len(self.members)}")
        self._maybe_win_prevote(now)
        if self.role is Role.PRECANDIDATE:
            self._send_requests(now)

    def _maybe_win_prevote(self, now: float) -> None:
        if len(self.grants) < self.quorum:
            return
        self.role = Role.CANDIDATE
        self._set_term(self.term + 1)
        self.voted_for = self.me
        self._hs_dirty = True
        self.grants = {self.me}
        if len(self.grants) >= self.quorum:
            self._become_master(now)
        else:
            self._send_requests(now)

    def _send_requests(self, now: float) -> None:
        for p in self.peers:
            if p in self.grants:
                continue
            if self.role is Role.PRECANDIDATE:
                self._send(p, PreVoteRequest(self.term + 1))
            else:
                self._send(p, VoteRequest(self.term))
        self.next_request_at = now + self.timing.retry_interval_s

    def _tick_candidate(self, now: float) -> None:
        if now >= self.campaign_ends_at:
            got, role = len(self.grants), self.role
            self.role = Role.SLAVE
            self.grants = set()
            alive = self._alive(now)
            # protocol.md §3.3: after a failed attempt, wait for the others' slots, plus jitter
            self.attempt_at = (
                now + (len(alive) - 1) * self.timing.slot_s + self.rng.uniform(0, self.timing.slot_s)
            )
            kind = "pre-votes" if role is Role.PRECANDIDATE else "votes"
            self._emit(
                f"election failed term={self.term} {kind}={got}/{len(self.members)} "
                f"needed={self.quorum} retry_in={self.attempt_at - now:.3f}s"
            )
            return
        if now >= self.next_request_at:
            self._send_requests(now)

    # ------------------------------------------------------------------ master

    def _become_master(self, now: float) -> None:
        if self.role is Role.MASTER:
            raise LocalProtocolError("already master")
        votes = len(self.grants)
        self.role = Role.MASTER
        self.master = self.me
        self.became_master_at = now
        self.rounds = {}
        self.lease_start = None
        self.script_not_before = now + self.timing.start_delay_s
        self.attempt_at = None
        self._emit(f"became master term={self.term} votes={votes}/{len(self.members)}")
        self.next_heartbeat_at = now  # the first round establishes the lease at once

    def _send_heartbeats(self, now: float) -> None:
        h = self.timing.heartbeat_interval_s
        self.next_heartbeat_at = now + h
        if self.role is not Role.MASTER:
            # protocol.md §3.2: an acknowledgement sent to the master within h proves we are alive;
            # a plain heartbeat to it would only cost CPU on both sides.
            skip = self.master if now - self.last_ack_sent < h else None
            for p in self.peers:
                if p != skip:
                    self._send(p, Heartbeat(self.term, False, 0))
            return
        self.round += 1
        self.rounds[self.round] = _Round(now, {self.me})
        self.last_master_heard = now  # protocol.md §3.5: the master is sticky to itself
        self._broadcast(Heartbeat(self.term, True, self.round))
        self._check_acks(self.round, now)

    def _on_heartbeat_response(self, sender: str, msg: HeartbeatResponse, now: float) -> None:
        if self.role is not Role.MASTER or msg.term != self.term:
            return
        rnd = self.rounds.get(msg.round)
        if rnd is None:
            return
        rnd.acks.add(sender)
        self._check_acks(msg.round, now)

    def _check_acks(self, number: int, now: float) -> None:
        rnd = self.rounds[number]
        if len(rnd.acks) < self.quorum:
            return
        # protocol.md §4.2: the lease runs from the SEND time of the newest acknowledged round
        start = now if "lease_from_ack_time" in self.broken else rnd.sent_at
        first = self.lease_start is None
        if self.lease_start is None or start > self.lease_start:
            self.lease_start = start
            if self.script_state is ScriptState.RUNNING:
                self.kill_deadline = self._deadline()
                self._ready.kill_deadline = self.kill_deadline
        if first:
            self._emit(f"lease established term={self.term} acked={len(rnd.acks)}/{len(self.members)}")
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
        self._emit(
            f"starting script term={self.term} token={self.term} deadline_in={self.kill_deadline - now:.3f}s"
        )

    def _tick_master(self, now: float) -> None:
        if now >= self._stop_at():
            acked = max((len(r.acks) for r in self.rounds.values()), default=1)
            reason = f"lost quorum acked={acked}/{len(self.members)} needed={self.quorum}"
            if self.script_state is ScriptState.RUNNING and self.kill_deadline is not None:
                reason += f" stopping script deadline_in={self.kill_deadline - now:.3f}s"
            if "no_demotion" not in self.broken:
                self.demoted_until = now + DEMOTION_E * self.timing.election_timeout_s
            self._become_slave(now, self.term, reason)
            return
        self._maybe_start_script(now)

    # ------------------------------------------------------------------ leaving

    def _leave(self, now: float, reason: str, *, final: bool) -> None:
        if self.finished:
            return
        self.final = self.final or final
        if self.leaving:
            return
        self.leaving = True
        self._emit(f"resigning term={self.term} role={self.role.value} reason={reason}")
        if "resign_before_stop" in self.broken and self.role is Role.MASTER:
            self._send_resign(now)
        self._stop_script(now, reason)
        if self.script_state is ScriptState.IDLE:
            self._finish_leaving(now)

    def _send_resign(self, now: float) -> None:
        alive = [m for m in self._alive(now) if m != self.me]
        successor = alive[0] if alive else ""
        self._broadcast(Resign(self.term, successor))

    def _finish_leaving(self, now: float) -> None:
        # protocol.md §3.7: Resign only after the script is reaped, so lifting the peers'
        # stickiness cannot let a new master start while our script lives.
        was_master = self.role is Role.MASTER
        if was_master:
            if "resign_before_stop" not in self.broken:
                self._send_resign(now)
            self._become_slave(now, self.term, "resigned")
        if self.final:
            self.finished = True
            self._emit(f"stopped term={self.term}")
        else:
            self.leaving = False
            # do not campaign again at once: give the others two election timeouts
            self.quiet_until = now + 2 * self.timing.election_timeout_s
            if was_master or "resign_any_role" in self.broken:
                # our own rounds made us sticky to ourselves; a master we now follow (we were deposed
                # while waiting for the script) keeps the stickiness its lease counts on (§3.7)
                self.last_master_heard = None
