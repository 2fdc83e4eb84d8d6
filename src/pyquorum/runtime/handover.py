"""Moving the role on demand and measuring it: step-down answers, the timeline, a drill's silence.

What this module owns
---------------------
The daemon's side of ``pyquorum step-down`` and ``pyquorum drill`` (the control socket's commands
``step-down``, ``timeline`` and ``silence``, registered in runtime/daemon.py):

* ``TransitionLog``: the last ``MAX_ENTRIES`` transitions of this node on its own monotonic clock
  (became master, script started, script stopped, resigned, stepped down, a drill's silence), each
  with the term it belongs to. The daemon records them where they happen; they cost a deque append.
* ``Handover``: waits for the master's answer to a step-down request (the core forwards it,
  protocol.md §3.10); asks a member for its timeline over the wire (``wire.operate.Timeline``) and
  answers such requests; carries out a drill's silence (``wire.operate.Silence``) on the UDP layer.

What it must not know or do
---------------------------
Any protocol rule: the core decides a step-down (``Node.request_step_down``), the lease rules stop a
silent master's script. The silence is the runtime's: the UDP layer drops what it would send and
receive (runtime/udp.py), for a bounded time, and nothing else changes; the core, the guard and
the script go on exactly as they would behind a dead network interface.

Measuring across hosts
----------------------
Monotonic clocks of two hosts have unrelated origins, so a member answers with AGES: how long ago,
on its clock, each transition happened. The asker notes when it sent the request (``t0``) and when
the answer came (``t1``), both on its own clock. The member computed its ages at some moment of
``[t0, t1]``, so a transition ``age`` ago happened in ``[t0 - age, t1 - age]`` of the asker's clock:
the asker takes the middle, ``(t0 + t1) / 2 - age``, with an error of at most half the round trip
(``± (t1 - t0) / 2``). The two clocks' rates also differ, by at most ``RATE_ERROR`` (an
NTP-disciplined clock slews at most 500 ppm): that adds ``age × RATE_ERROR`` (0.5 ms for an age of
1 s). A transition of this node itself has no error. Both terms are in every converted entry's
``uncertainty_s``; a difference of two entries is uncertain by the sum of theirs.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from pyquorum.core.lease import Timing
from pyquorum.core.node import Event, EventKind
from pyquorum.runtime.control import CommandFailed
from pyquorum.runtime.logs import log_event
from pyquorum.wire.operate import (
    MAX_ENTRIES,
    MAX_SILENCE_MS,
    OperateMessage,
    Silence,
    SilenceResponse,
    Timeline,
    TimelineResponse,
)

__all__ = ["RATE_ERROR", "Handover", "Transition", "TransitionLog"]

log = logging.getLogger("pyquorum.handover")

# The largest rate difference assumed between two hosts' monotonic clocks when converting an age:
# NTP slews a clock by at most 500 ppm; an undisciplined quartz is within 100 ppm.
RATE_ERROR: Final = 5e-4
# A timeline request is re-sent this often, this many times, before the member counts as silent.
TIMELINE_TRY_S: Final = 0.3
TIMELINE_TRIES: Final = 3
# How long to wait for a member's answer to a silence request.
SILENCE_ANSWER_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class Transition:
    """One transition of this node: ``kind`` (``wire.operate.TRANSITION_KINDS``), its ``term``, and
    ``at``, this host's ``time.monotonic()``."""

    kind: str
    term: int
    at: float


class TransitionLog:
    """The last ``MAX_ENTRIES`` transitions of this node, oldest first."""

    def __init__(self) -> None:
        self._entries: collections.deque[Transition] = collections.deque(maxlen=MAX_ENTRIES)

    def record(self, kind: str, term: int, at: float) -> None:
        self._entries.append(Transition(kind, term, at))

    def entries(self) -> list[Transition]:
        return list(self._entries)

    def ages_us(self, now: float) -> tuple[tuple[str, int, int], ...]:
        """The entries as the wire carries them: ``(kind, term, microseconds ago)``."""
        return tuple((t.kind, t.term, max(0, round((now - t.at) * 1e6))) for t in self._entries)


Send = Callable[[str, OperateMessage], None]
RoleNow = Callable[[], tuple[str, int]]
SilenceSwitch = Callable[[float], None]


class Handover:
    """See the module docstring. The daemon builds one at start-up and feeds it the core's events
    (``on_event``), the script's starts and exits (``log.record``) and the wire's runtime-level
    messages (``on_message``); the control commands call ``step_down_answer``, ``timeline`` and
    ``silence``."""

    def __init__(
        self, me: str, timing: Timing, *, send: Send, role_now: RoleNow, silence_switch: SilenceSwitch
    ) -> None:
        self.me = me
        self.timing = timing
        self.log = TransitionLog()
        self._send = send
        self._role_now = role_now
        self._silence_switch = silence_switch
        self._next_id = random.getrandbits(48)
        # request id -> (the member asked, the future its answer resolves with (message, receipt time))
        self._pending: dict[int, tuple[str, asyncio.Future[tuple[OperateMessage, float]]]] = {}
        self._step_down_waiters: list[asyncio.Future[tuple[str, bool, str]]] = []
        self._silence_timer: asyncio.TimerHandle | None = None

    # ---- the core's events --------------------------------------------------------------------

    def on_event(self, ev: Event, now: float) -> None:
        """A core event, as the daemon carries out a Ready: the transitions, and a step-down answer."""
        kind = ev.kind
        if kind is EventKind.BECAME_MASTER:
            self.log.record("became_master", ev.term, now)
        elif kind is EventKind.RESIGNED:
            self.log.record("resigned", ev.term, now)  # in the Ready that carries the Resign
        elif kind is EventKind.STEPPED_DOWN:
            self.log.record("stepped_down", ev.term, now)
        elif kind is EventKind.STEP_DOWN_ANSWERED:
            answer = (str(ev.get("master")), bool(ev.get("accepted")), str(ev.get("reason")))
            waiters, self._step_down_waiters = self._step_down_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(answer)

    # ---- step-down ------------------------------------------------------------------------------

    async def step_down_answer(self, master: str, timeout_s: float) -> tuple[str, bool, str]:
        """Wait for the master's ``StepDownResponse`` (the core's ``step_down_answered`` event):
        ``(master, accepted, reason)``. Call it right after ``Node.request_step_down`` returned None
        and its Ready was carried out. ``CommandFailed`` if none comes within ``timeout_s``: the
        request or its answer was lost (it is not re-sent: a second request to a master that
        accepted the first would be refused as "leaving")."""
        fut: asyncio.Future[tuple[str, bool, str]] = asyncio.get_running_loop().create_future()
        self._step_down_waiters.append(fut)
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            raise CommandFailed(
                f"no answer from the master {master} within {timeout_s:g} s (the request or its answer "
                "was lost, or the master is gone): see 'pyquorum status'"
            ) from None
        finally:
            if fut in self._step_down_waiters:
                self._step_down_waiters.remove(fut)

    # ---- the timeline ---------------------------------------------------------------------------

    def local_timeline(self, now: float) -> dict[str, Any]:
        role, term = self._role_now()
        entries = [
            {"kind": t.kind, "term": t.term, "at": t.at, "ago_s": now - t.at, "uncertainty_s": 0.0}
            for t in self.log.entries()
        ]
        return {"node": self.me, "role": role, "term": term, "rtt_s": 0.0, "entries": entries, "at": now}

    async def timeline(self, node: str) -> dict[str, Any]:
        """``node``'s role, term and transitions, each ``at`` a ``time.monotonic()`` of THIS host
        (the module docstring says how, and ``uncertainty_s`` how well). ``CommandFailed`` if the
        member does not answer (down, cut off, silent, or we are silent)."""
        if node == self.me:
            return self.local_timeline(time.monotonic())
        for _ in range(TIMELINE_TRIES):
            sent_at = time.monotonic()
            answer = await self._ask(node, lambda rid: Timeline(rid), TIMELINE_TRY_S)
            if answer is None:
                continue
            msg, received_at = answer
            assert isinstance(msg, TimelineResponse)
            rtt = received_at - sent_at
            middle = (sent_at + received_at) / 2
            entries = []
            for kind, term, age_us in msg.entries:
                age = age_us / 1e6
                entries.append(
                    {
                        "kind": kind,
                        "term": term,
                        "at": middle - age,
                        "ago_s": received_at - (middle - age),
                        "uncertainty_s": rtt / 2 + age * RATE_ERROR,
                    }
                )
            return {
                "node": node,
                "role": msg.role,
                "term": msg.term,
                "rtt_s": rtt,
                "entries": entries,
                "at": received_at,
            }
        raise CommandFailed(
            f"{node} did not answer a timeline request ({TIMELINE_TRIES} tries, {TIMELINE_TRY_S:g} s "
            "apart): it is down, cut off, or silent (a drill), or this node is"
        )

    # ---- a drill's silence ----------------------------------------------------------------------

    async def silence(self, node: str, duration_s: float) -> dict[str, Any]:
        """Make ``node`` (this one, or a member over the wire) drop every datagram for
        ``duration_s``: as if it had died (``pyquorum drill --crash``)."""
        duration_ms = round(duration_s * 1000)
        if not 1 <= duration_ms <= MAX_SILENCE_MS:
            raise CommandFailed(f"a silence lasts 0.001 to {MAX_SILENCE_MS // 1000} s, not {duration_s:g}")
        if node == self.me:
            began = self.begin_silence(duration_ms / 1000, "control socket")
            return {"node": node, "accepted": True, "duration_s": duration_ms / 1000, "began_at": began}
        answer = await self._ask(node, lambda rid: Silence(rid, duration_ms), SILENCE_ANSWER_S)
        if answer is None:
            raise CommandFailed(f"{node} did not answer the silence request within {SILENCE_ANSWER_S:g} s")
        msg, received_at = answer
        assert isinstance(msg, SilenceResponse)
        if not msg.accepted:
            raise CommandFailed(f"{node} refused to go silent for {duration_s:g} s")
        return {"node": node, "accepted": True, "duration_s": duration_ms / 1000, "answered_at": received_at}

    def begin_silence(self, duration_s: float, source: str) -> float:
        """Go silent now for ``duration_s`` (not longer than a silence already running); returns when."""
        now = time.monotonic()
        if self._silence_timer is not None:
            return now  # one at a time: nothing reaches a silent node anyway
        role, term = self._role_now()
        self.log.record("silence_began", term, now)
        log_event(
            log,
            logging.WARNING,
            "silence_began",
            term=term,
            role=role,
            duration_s=round(duration_s, 3),
            source=source,
            hint="a drill: dropping every datagram in and out, as if this node had died",
        )
        self._silence_switch(now + duration_s)
        self._silence_timer = asyncio.get_running_loop().call_later(duration_s, self._end_silence)
        return now

    def _end_silence(self) -> None:
        self._silence_timer = None
        self._silence_switch(0.0)
        role, term = self._role_now()
        self.log.record("silence_ended", term, time.monotonic())
        log_event(log, logging.WARNING, "silence_ended", term=term, role=role)

    def close(self) -> None:
        if self._silence_timer is not None:
            self._silence_timer.cancel()
            self._silence_timer = None
        for _, fut in self._pending.values():
            fut.cancel()
        for waiter in self._step_down_waiters:
            waiter.cancel()

    # ---- the wire ------------------------------------------------------------------------------

    def on_message(self, sender: str, msg: OperateMessage, now: float) -> None:
        """A runtime-level message from a member (runtime/udp.py, through ``Endpoint``: authenticated
        and fresh). Answers requests; resolves the pending request an answer is for, if it came from
        the member that was asked; anything else is dropped."""
        if isinstance(msg, Timeline):
            role, term = self._role_now()
            self._send(sender, TimelineResponse(msg.request_id, role, term, self.log.ages_us(now)))
        elif isinstance(msg, Silence):
            accepted = msg.duration_ms <= MAX_SILENCE_MS
            self._send(sender, SilenceResponse(msg.request_id, accepted))  # before the silence
            if accepted:
                self.begin_silence(msg.duration_ms / 1000, f"request from {sender}")
        else:
            pending = self._pending.get(msg.request_id)
            if pending is not None and pending[0] == sender and not pending[1].done():
                pending[1].set_result((msg, now))

    async def _ask(
        self, node: str, make: Callable[[int], OperateMessage], timeout_s: float
    ) -> tuple[OperateMessage, float] | None:
        # one request with a fresh id; its answer, or None after timeout_s
        self._next_id = (self._next_id + 1) % (1 << 64)
        rid = self._next_id
        fut: asyncio.Future[tuple[OperateMessage, float]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (node, fut)
        try:
            self._send(node, make(rid))
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            return None
        finally:
            self._pending.pop(rid, None)
