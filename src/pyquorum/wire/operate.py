"""Runtime-level messages for operating a live cluster: a member's timeline, and the drill's silence.

What this module owns
---------------------
Four messages that daemons exchange for ``pyquorum step-down --wait`` and ``pyquorum drill`` and
that never reach the core (``Endpoint.receive`` answers them as ``Operate``, not ``Deliver``):

* ``Timeline(request_id)``: "send me your recent transitions"; answered by
* ``TimelineResponse(request_id, role, term, entries)``: the answering daemon's role and term now,
  and its last transitions (``TRANSITION_KINDS``: became master, script started, script stopped,
  resigned, ...), each as ``(kind, term, age_us)``: how many microseconds AGO it happened on the
  answering node's monotonic clock. Ages, not timestamps: monotonic clocks of two hosts have
  unrelated origins, but an age converts to the asker's clock at receipt, with an error of at most
  the one-way delay (which the asker bounds by the round trip it measured: docs/operations.md,
  "Moving the role");
* ``Silence(request_id, duration_ms)``: "act as if you had died, for this long" (``pyquorum drill
  --crash``): the receiver answers, then drops every datagram it would send or receive until the
  time is up, so its lease lapses by the ordinary rules and the others fail over; nothing is killed;
* ``SilenceResponse(request_id, accepted)``: sent just before the silence begins (or a refusal: a
  duration above ``MAX_SILENCE_MS``).

They travel like every datagram: signed (with a key), replay-checked, only from and to members'
configured addresses; a forged or replayed one is refused and counted like any other, and changes
nothing. Without a key, as for every message, anyone who can send UDP to a member can send them.

Payloads (all integers big-endian; message types 66-69, docs/security.md §4)::

    Timeline           request_id u64
    TimelineResponse   request_id u64, role u8 (index into ROLE_NAMES), term u64,
                       count u8 (<= MAX_ENTRIES), count x (kind u8, term u64, age_us u64)
    Silence            request_id u64, duration_ms u32 (1..MAX_SILENCE_MS)
    SilenceResponse    request_id u64, accepted u8 (0/1)

What it must not know: clocks, sockets, or what the daemon does with them (runtime/handover.py).
The codes of ``TRANSITION_KINDS`` and ``ROLE_NAMES`` are part of the wire format: only append.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_ENTRIES",
    "MAX_SILENCE_MS",
    "ROLE_NAMES",
    "TRANSITION_KINDS",
    "OperateMessage",
    "Silence",
    "SilenceResponse",
    "Timeline",
    "TimelineResponse",
]

# A daemon keeps this many recent transitions (runtime/handover.py); 32 x 17 bytes fits any datagram.
MAX_ENTRIES: Final = 32
# A drill's silence is a failover or two; a minute is far above any (the daemon refuses more).
MAX_SILENCE_MS: Final = 60_000

# Wire codes: the index in these tuples. Never reorder, only append.
TRANSITION_KINDS: Final[tuple[str, ...]] = (
    "became_master",  # the core's became_master event
    "script_started",  # the script was exec'd (its guard said so), or would have been (no script)
    "script_stopped",  # the script's process group was dead and reaped (ScriptExit.reaped_at)
    "resigned",  # the Resign went out (protocol.md §3.7): after the reaping
    "stepped_down",  # lost its lease or saw a higher term
    "silence_began",  # a drill's silence: from here it drops every datagram
    "silence_ended",
)
ROLE_NAMES: Final[tuple[str, ...]] = ("slave", "precandidate", "candidate", "master")


@dataclass(frozen=True, slots=True)
class Timeline:
    """Ask a member for its recent transitions; ``request_id`` comes back in the answer."""

    request_id: int


@dataclass(frozen=True, slots=True)
class TimelineResponse:
    """A member's role and term now, and its recent transitions ``(kind, term, age_us)``, oldest
    first; ``kind`` is one of ``TRANSITION_KINDS``, ``role`` one of ``ROLE_NAMES``."""

    request_id: int
    role: str
    term: int
    entries: tuple[tuple[str, int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Silence:
    """Ask a member to drop everything it sends and receives for ``duration_ms`` (a drill)."""

    request_id: int
    duration_ms: int


@dataclass(frozen=True, slots=True)
class SilenceResponse:
    """The answer to ``Silence``, sent before the silence begins."""

    request_id: int
    accepted: bool


OperateMessage = Timeline | TimelineResponse | Silence | SilenceResponse
OPERATE_TYPES: Final = (Timeline, TimelineResponse, Silence, SilenceResponse)
