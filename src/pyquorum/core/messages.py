"""The protocol's messages: what one node says to another.

Every message is a frozen, slotted dataclass. The sender's identity is NOT a field: it travels in the
authenticated envelope (see ``pyquorum.wire.codec``) and is handed to ``Node.step`` separately, so a message
can never claim to come from someone else than the envelope that carried it.

Every message carries ``term``: the sender's current term (protocol.md §2). ``Node.step`` compares it
with the receiver's term before anything else (protocol.md §3.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A keep-alive (protocol.md §3.2): the master's, each ``heartbeat_interval``, to every peer; a plain
    one from a node that follows no live master, to the first live proposers ranked before it (and
    in answer to a peer that keeps it alive).

    ``master`` is true when the sender is the master of ``term``; then ``round`` numbers the
    heartbeat round, every node that accepts the master answers with a ``HeartbeatResponse`` for that
    round, and ``live`` lists the members the master heard from within E (its followers' liveness,
    which they no longer tell each other). A plain heartbeat only proves that its sender is alive
    (``round`` 0, ``live`` empty).
    """

    term: int
    master: bool
    round: int = 0
    live: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class HeartbeatResponse:
    """A follower's acknowledgement of the master's heartbeat ``round`` (protocol.md §3.5).

    ``term`` is the responder's term: equal to the master's term for an acknowledgement, higher when
    the responder has moved on (then the master steps down).
    """

    term: int
    round: int


@dataclass(frozen=True, slots=True)
class PreVoteRequest:
    """Would you vote for me in ``term`` (= my term + 1)? Changes no state anywhere (protocol.md §3.3)."""

    term: int


@dataclass(frozen=True, slots=True)
class PreVoteResponse:
    """Answer to ``PreVoteRequest``: ``term`` echoes the requested term; ``voter_term`` is the
    voter's own current term."""

    term: int
    granted: bool
    voter_term: int


@dataclass(frozen=True, slots=True)
class VoteRequest:
    """Vote for me as master of ``term`` (protocol.md §3.4)."""

    term: int


@dataclass(frozen=True, slots=True)
class VoteResponse:
    """Answer to ``VoteRequest``. A grant is sent only after the vote has been persisted."""

    term: int
    granted: bool


@dataclass(frozen=True, slots=True)
class Resign:
    """The master of ``term`` gives up its role after its script has been reaped (protocol.md §3.7).

    ``successor`` is the node it suggests should campaign at once (empty string: none).
    """

    term: int
    successor: str = ""


# Why a master refuses (or accepts) a step-down request (protocol.md §3.10); on the wire as a code.
STEP_DOWN_REASONS: tuple[str, ...] = (
    "accepted",  # it is stopping its script, and resigns naming the successor
    "not-master",  # the request reached a node that is not master (the requester's view is stale)
    "no-majority",  # the master has no acknowledged round: it holds no lease to hand over
    "leaving",  # it is already resigning or shutting down
    "is-master",  # the requested successor is the master itself
    "witness",  # the requested successor is a witness, which never becomes master
    "not-live",  # the requested successor was not heard within the election timeout
    "not-preferred",  # a pre-emption by a node whose priority is not above the master's
    "not-connected",  # a pre-emption by a node not connected long enough (--preempt-after)
)


@dataclass(frozen=True, slots=True)
class StepDown:
    """A member asks the master of ``term`` to hand over (protocol.md §3.10): to ``to`` (a member) if
    given, else to the next node in the proposal order. ``preempt``: a preferred node asks for itself
    (``to`` is then the sender). Changes nothing unless the master accepts; nothing stays afterwards."""

    term: int
    to: str = ""
    preempt: bool = False


@dataclass(frozen=True, slots=True)
class StepDownResponse:
    """The master's answer to ``StepDown``: ``reason`` is one of ``STEP_DOWN_REASONS``."""

    term: int
    accepted: bool
    reason: str


Message = (
    Heartbeat
    | HeartbeatResponse
    | PreVoteRequest
    | PreVoteResponse
    | VoteRequest
    | VoteResponse
    | Resign
    | StepDown
    | StepDownResponse
)

# The one list of the core's message types, each with the name it has in counters and metrics
# (docs/operations.md: ``counters.datagrams_sent``). Whoever needs a table over every message type
# (runtime/status.py's counters) derives it from here; the wire's msg_type numbers are written out in
# wire/codec.py, because they are the wire format.
MESSAGE_NAMES: Final[dict[type[Message], str]] = {
    Heartbeat: "heartbeat",
    HeartbeatResponse: "heartbeat_response",
    PreVoteRequest: "prevote_request",
    PreVoteResponse: "prevote_response",
    VoteRequest: "vote_request",
    VoteResponse: "vote_response",
    Resign: "resign",
    StepDown: "step_down",
    StepDownResponse: "step_down_response",
}
MESSAGE_TYPES: Final[tuple[type[Message], ...]] = tuple(MESSAGE_NAMES)
