"""Notify hooks (runtime/hooks.py): when each event fires, and real hook processes run in order.

The first tests check ``hook_event_for`` rule by rule on hand-made core outputs (the simulation,
tests/sim/test_hook_events.py, drives it with the real core). The rest run real hook programs (shell
scripts in the test's directory) through ``NotifyHooks``: one at a time and in order under bursts and
flapping, SEQ strictly increasing, a hook that hangs, fails, double-forks or escapes its group, the
queue's bound, output limits, and shutdown with ``aclose``.

Every hook process carries a tag in its environment; the ``tag`` fixture SIGKILLs whatever still
carries it when the test ends, pass or fail.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyquorum.core.node import Event, EventKind, Role, ScriptState, Status
from pyquorum.runtime.hooks import (
    DEFAULT_QUEUE_MAX,
    MAX_LINE_BYTES,
    MAX_OUTPUT_LINES,
    Announcement,
    HookEvent,
    NotifyHooks,
    hook_event_for,
    queue_bound,
)
from pyquorum.runtime.logs import EVENT_ATTR, FIELDS_ATTR
from tests.harness.procfs import TAG_VAR, alive, sweep, tagged_pids

ME, OTHER = "10.0.0.1:51621", "10.0.0.2:51621"
MASTER, SLAVE, NO_QUORUM, STOPPING = (
    HookEvent.MASTER,
    HookEvent.SLAVE,
    HookEvent.NO_QUORUM,
    HookEvent.STOPPING,
)


# -- when each event fires ------------------------------------------------------------------------


def status(role: Role, term: int, master: str | None) -> Status:
    return Status(ME, role, term, master, ScriptState.IDLE, None)


def ev(kind: EventKind, term: int = 3, **fields: object) -> Event:
    return Event(kind, term, tuple(fields.items()))


def ann(event: HookEvent, term: int, master: str | None) -> Announcement:
    return Announcement(event, term, master)


def test_hook_event_for_became_master() -> None:
    got = hook_event_for(None, status(Role.MASTER, 3, ME), [ev(EventKind.BECAME_MASTER)])
    assert got == ann(MASTER, 3, ME)
    # still master, later events (the lease, the script): nothing new
    assert hook_event_for(got, status(Role.MASTER, 3, ME), [ev(EventKind.LEASE_ESTABLISHED)]) is None


def test_hook_event_for_follows_a_master() -> None:
    got = hook_event_for(None, status(Role.SLAVE, 3, OTHER), [ev(EventKind.FOLLOWING, master=OTHER)])
    assert got == ann(SLAVE, 3, OTHER)
    assert hook_event_for(got, status(Role.SLAVE, 3, OTHER), [ev(EventKind.VOTED)]) is None
    # the same master re-elected in a later term is news (a new fencing token)
    assert hook_event_for(got, status(Role.SLAVE, 4, OTHER), []) == ann(SLAVE, 4, OTHER)


def test_hook_event_for_is_silent_at_start_and_during_an_election() -> None:
    assert hook_event_for(None, status(Role.SLAVE, 0, None), []) is None
    started = [ev(EventKind.ELECTION_STARTED)]
    assert hook_event_for(None, status(Role.PRECANDIDATE, 0, None), started) is None
    # a candidate still names the previous term's master in its Status: never announced
    last = ann(SLAVE, 3, OTHER)
    assert hook_event_for(last, status(Role.CANDIDATE, 4, OTHER), [ev(EventKind.BECAME_CANDIDATE)]) is None
    # a vote-phase failure is contention, not a lost majority
    failed = [ev(EventKind.ELECTION_FAILED, phase="vote", got=1, needed=2)]
    assert hook_event_for(last, status(Role.SLAVE, 4, None), failed) is None


def test_hook_event_for_lost_quorum_as_master() -> None:
    last = ann(MASTER, 3, ME)
    stepped = [ev(EventKind.STEPPED_DOWN, reason="lost_quorum", acked=1, needed=2)]
    assert hook_event_for(last, status(Role.SLAVE, 3, None), stepped) == ann(NO_QUORUM, 3, None)


def test_hook_event_for_no_master_and_cannot_elect() -> None:
    failed = [ev(EventKind.ELECTION_FAILED, phase="pre-vote", got=1, needed=2)]
    got = hook_event_for(ann(SLAVE, 3, OTHER), status(Role.SLAVE, 3, None), failed)
    assert got == ann(NO_QUORUM, 3, None)
    # failing again, even in a higher term it learned meanwhile: not news
    assert hook_event_for(got, status(Role.SLAVE, 5, None), failed) is None
    # and then a master again
    assert hook_event_for(got, status(Role.SLAVE, 6, OTHER), []) == ann(SLAVE, 6, OTHER)


def test_hook_event_for_a_master_deposed_or_resigned_says_slave_at_once() -> None:
    last = ann(MASTER, 3, ME)
    deposed = [ev(EventKind.STEPPED_DOWN, 5, reason="higher_term")]
    got = hook_event_for(last, status(Role.SLAVE, 5, None), deposed)
    assert got == ann(SLAVE, 5, None)
    assert hook_event_for(got, status(Role.SLAVE, 5, OTHER), []) == ann(SLAVE, 5, OTHER)
    resigned = [ev(EventKind.RESIGNED, successor=OTHER)]
    assert hook_event_for(last, status(Role.SLAVE, 3, None), resigned) == ann(SLAVE, 3, None)
    # deposed by a heartbeat of the new master: straight to following it
    assert hook_event_for(last, status(Role.SLAVE, 5, OTHER), deposed) == ann(SLAVE, 5, OTHER)


def test_hook_event_for_shutdown_is_stopping_and_the_last() -> None:
    resigning = [ev(EventKind.RESIGNING, role="master", reason="shutdown")]
    got = hook_event_for(ann(MASTER, 3, ME), status(Role.MASTER, 3, ME), resigning)
    assert got == ann(STOPPING, 3, ME)
    assert hook_event_for(got, status(Role.SLAVE, 3, None), [ev(EventKind.RESIGNED)]) is None
    assert hook_event_for(got, status(Role.SLAVE, 4, OTHER), []) is None
    # a candidate's Status still names the previous term's master: not passed on
    leaving = [ev(EventKind.RESIGNING, role="candidate", reason="shutdown")]
    got = hook_event_for(ann(SLAVE, 3, OTHER), status(Role.CANDIDATE, 4, OTHER), leaving)
    assert got == ann(STOPPING, 4, None)
    # a resignation on request (not a shutdown) is no stop
    asked = [ev(EventKind.RESIGNING, role="master", reason="script_failures")]
    assert hook_event_for(ann(MASTER, 3, ME), status(Role.MASTER, 3, ME), asked) is None


def test_queue_bound_holds_two_events_per_election_timeout() -> None:
    assert queue_bound(30.0, 1.0) == DEFAULT_QUEUE_MAX  # 60 events, and the floor is 64
    assert queue_bound(30.0, 0.2) == 300
    assert queue_bound(5.0, 1.0) == DEFAULT_QUEUE_MAX
    assert queue_bound(float("inf"), 1.0) == DEFAULT_QUEUE_MAX


# -- real hook processes --------------------------------------------------------------------------


def tagged(tag: str) -> list[int]:
    """Live processes that carry ``tag`` in their environment."""
    return sorted(tagged_pids(tag))


@pytest.fixture
def tag() -> Iterator[str]:
    value = uuid.uuid4().hex
    yield value
    sweep(value)


class Records(logging.Handler):
    """The log events of one test: (level, event, fields)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[tuple[int, str, dict[str, Any]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, EVENT_ATTR, None)
        fields = getattr(record, FIELDS_ATTR, None)
        if isinstance(event, str) and isinstance(fields, dict):
            self.events.append((record.levelno, event, fields))
        else:
            self.events.append((record.levelno, "-", {"message": record.getMessage()}))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [fields for _, name, fields in self.events if name == event]


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger(f"test_hooks.{uuid.uuid4().hex}")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    handler.logger = logger  # type: ignore[attr-defined]
    yield handler
    logger.removeHandler(handler)


class Hooks:
    """Writes hook scripts and builds NotifyHooks for them, tagged, logging into ``records``."""

    def __init__(self, tmp: Path, tag: str, records: Records) -> None:
        self.tmp = tmp
        self.tag = tag
        self.records = records
        self.log = tmp / "calls.log"

    def script(self, body: str, name: str = "hook.sh") -> Path:
        path = self.tmp / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
        return path

    def make(self, path: Path, *, timeout_s: float = 10.0, queue_max: int = DEFAULT_QUEUE_MAX) -> NotifyHooks:
        env = {"PATH": os.environ["PATH"], TAG_VAR: self.tag, "CALLS": str(self.log), "DIR": str(self.tmp)}
        logger: logging.Logger = self.records.logger  # type: ignore[attr-defined]
        return NotifyHooks(str(path), ME, timeout_s, queue_max, logger, environ=env)

    def run_once(self, body: str) -> NotifyHooks:
        """A hook running ``body``, called once (MASTER), waited for, then closed with a 1 s grace."""
        h = self.make(self.script(body))

        async def main() -> None:
            h.notify(MASTER, 1, ME)
            await until(lambda: h.delivered == 1)
            await h.aclose(1.0)

        run(main)
        return h

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [line.split() for line in self.log.read_text().splitlines()]


@pytest.fixture
def hooks(tmp_path: Path, tag: str, records: Records) -> Hooks:
    return Hooks(tmp_path, tag, records)


# Generous: a shared CI machine can be very loaded, and no test here is about speed.
def run(coro: Callable[[], Coroutine[Any, Any, None]], limit_s: float = 120.0) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro(), limit_s)

    asyncio.run(bounded())


async def until(predicate: Callable[[], bool], timeout_s: float = 60.0) -> None:
    give_up = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < give_up, "condition not reached in time"
        await asyncio.sleep(0.005)


# Records each call as "SEQ EVENT TERM MASTER", and OVERLAP if another call is running: mkdir is
# atomic, so two hooks at once cannot both create the directory.
RECORDER = """
mkdir "$DIR/running" 2>/dev/null || echo OVERLAP >> "$CALLS"
echo "$PYQUORUM_SEQ $1 $2 $3" >> "$CALLS"
[ "$PYQUORUM_EVENT $PYQUORUM_TERM $PYQUORUM_MASTER" = "$1 $2 $3" ] || echo ENV_MISMATCH >> "$CALLS"
sleep "${HOOK_SLEEP:-0}"
rmdir "$DIR/running"
"""


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polled"])
def test_hooks_run_in_order_one_at_a_time_under_a_burst(
    hooks: Hooks, pidfd: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not pidfd:  # a kernel before 5.3: the exit is polled
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    h = hooks.make(hooks.script(RECORDER))
    sent = [(list(HookEvent)[i % 3], 1 + i // 2, OTHER if i % 3 == 1 else None) for i in range(40)]

    async def main() -> None:
        for event, term, master in sent:
            h.notify(event, term, master)
        assert h.pending >= 39  # all queued at once: notify() did not wait for a hook
        await until(lambda: h.delivered == 40)
        await h.aclose(5.0)

    run(main)
    calls = hooks.calls()
    assert ["OVERLAP"] not in calls and ["ENV_MISMATCH"] not in calls
    assert calls == [
        [str(i + 1), event.value, str(term), master or "-"] for i, (event, term, master) in enumerate(sent)
    ]
    assert (h.delivered, h.failed, h.dropped) == (40, 0, 0)


def test_hooks_keep_order_while_flapping(hooks: Hooks) -> None:
    """master/slave/master... faster than the hook runs: every event, in order, never two at once."""
    h = hooks.make(hooks.script("HOOK_SLEEP=0.02\n" + RECORDER))

    async def main() -> None:
        for term in range(1, 31):
            h.notify(MASTER if term % 2 else SLAVE, term, ME if term % 2 else OTHER)
            await asyncio.sleep(0.005)  # events come faster than the hooks end
        await until(lambda: h.delivered == 30)
        await h.aclose(5.0)

    run(main)
    calls = hooks.calls()
    assert ["OVERLAP"] not in calls
    seqs = [int(call[0]) for call in calls]
    assert seqs == list(range(1, 31))
    assert [call[1] for call in calls] == ["master", "slave"] * 15
    assert [int(call[2]) for call in calls] == list(range(1, 31))


def test_hooks_environment(hooks: Hooks) -> None:
    h = hooks.make(hooks.script('env | grep ^PYQUORUM_ | sort > "$DIR/env.$PYQUORUM_SEQ"\n'))
    before = datetime.datetime.now(datetime.timezone.utc)

    async def main() -> None:
        h.notify(NO_QUORUM, 7, None)
        await until(lambda: h.delivered == 1)
        await h.aclose(1.0)

    run(main)
    env = dict(line.split("=", 1) for line in (hooks.tmp / "env.1").read_text().splitlines())
    stamp = env.pop("PYQUORUM_TIMESTAMP")
    assert env.pop(TAG_VAR) == hooks.tag  # the daemon's environment is passed on
    assert env == {
        "PYQUORUM_EVENT": "no-quorum",
        "PYQUORUM_TERM": "7",
        "PYQUORUM_MASTER": "-",
        "PYQUORUM_NODE": ME,
        "PYQUORUM_SEQ": "1",
    }
    assert stamp.endswith("Z")
    moment = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
    assert before - datetime.timedelta(seconds=1) <= moment <= datetime.datetime.now(datetime.timezone.utc)


def test_hooks_a_hung_hook_is_killed_with_its_group_and_the_next_runs(hooks: Hooks) -> None:
    body = """
if [ "$1" = master ]; then
    sleep 1000 & echo $! > "$DIR/grandchild"
    echo $$ > "$DIR/hook"
    wait
fi
echo "$PYQUORUM_SEQ $1" >> "$CALLS"
"""
    h = hooks.make(hooks.script(body), timeout_s=0.5)
    pids: list[int] = []

    async def main() -> None:
        h.notify(MASTER, 1, ME)
        h.notify(SLAVE, 2, OTHER)
        await until(lambda: (hooks.tmp / "hook").exists() and (hooks.tmp / "grandchild").exists())
        pids.extend(int((hooks.tmp / name).read_text()) for name in ("hook", "grandchild"))
        assert all(alive(pid) for pid in pids)
        await until(lambda: h.delivered == 1)
        await h.aclose(1.0)

    run(main)
    assert not any(alive(pid) for pid in pids), "the hung hook or its child survived"
    assert hooks.calls() == [["2", "slave"]]
    assert (h.timed_out, h.delivered, h.failed) == (1, 1, 0)
    (killed,) = hooks.records.named("hook_killed")
    assert killed["seq"] == 1 and killed["reason"] == "timeout" and killed["after_s"] >= 0.5
    finished = hooks.records.named("hook_finished")
    assert [(f["seq"], f["result"], f["status"]) for f in finished] == [
        (1, "timeout", -signal.SIGKILL),
        (2, "ok", 0),
    ]


def test_hooks_a_failing_hook_is_logged_and_the_next_runs(hooks: Hooks) -> None:
    body = """
echo "$PYQUORUM_SEQ $1" >> "$CALLS"
[ "$1" = slave ] && { echo "cannot reconfigure" >&2; exit 3; }
exit 0
"""
    h = hooks.make(hooks.script(body))

    async def main() -> None:
        h.notify(SLAVE, 1, OTHER)
        h.notify(MASTER, 2, ME)
        await until(lambda: h.delivered + h.failed == 2)
        await h.aclose(1.0)

    run(main)
    assert hooks.calls() == [["1", "slave"], ["2", "master"]]
    assert (h.failed, h.delivered) == (1, 1)
    levels = {
        (f["seq"], f["result"], f["status"]): level
        for level, name, f in hooks.records.events
        if name == "hook_finished"
    }
    assert levels == {(1, "failed", 3): logging.WARNING, (2, "ok", 0): logging.INFO}
    output = hooks.records.named("hook_output")
    assert {"seq": 1, "stream": "stderr", "line": "cannot reconfigure"} in output


def test_hooks_what_a_hook_leaves_in_its_group_is_killed(hooks: Hooks) -> None:
    """A double fork (the grandchild is reparented, still in the hook's group) dies with the hook."""
    body = """
sh -c 'sleep 1000 > /dev/null 2>&1 & echo $! > "$DIR/orphan"'
exit 0
"""
    hooks.run_once(body)
    orphan = int((hooks.tmp / "orphan").read_text())
    assert not alive(orphan)
    (left,) = hooks.records.named("hook_left_processes")
    assert str(orphan) in left["pids"].split(",")
    assert hooks.records.named("hook_group_alive") == []  # killed at once, not by the slow path


def test_hooks_a_process_that_escapes_the_group_is_reported(hooks: Hooks) -> None:
    """setsid leaves the group: not killed (an honest limit), but seen holding the hook's output."""
    # Exit only once the child has left our group: until its setsid() it is a member, and at our
    # exit the runner SIGKILLs what is left in the group (hook_left_processes), as it should.
    body = """
setsid sleep 1000 &
echo $! > "$DIR/escaped"
while [ "$(cut -d' ' -f5 /proc/$!/stat)" = "$(cut -d' ' -f5 /proc/$$/stat)" ]; do sleep 0.01; done
exit 0
"""
    hooks.run_once(body)
    escaped = int((hooks.tmp / "escaped").read_text())
    assert alive(escaped)  # the tag fixture kills it
    assert {f["stream"] for f in hooks.records.named("hook_escaped")} == {"stdout", "stderr"}


def test_hooks_overflow_drops_the_oldest_and_counts(hooks: Hooks) -> None:
    body = """
echo "$PYQUORUM_SEQ" >> "$CALLS"
if [ "$PYQUORUM_SEQ" = 1 ]; then
    : > "$DIR/first"
    while [ ! -e "$DIR/release" ]; do sleep 0.01; done
fi
"""
    h = hooks.make(hooks.script(body), queue_max=4)

    async def main() -> None:
        h.notify(MASTER, 1, ME)
        await until(lambda: (hooks.tmp / "first").exists())  # seq 1 runs
        for term in range(2, 12):  # seq 2..11: 10 more into a queue of 4
            h.notify(SLAVE, term, OTHER)
        assert (h.pending, h.dropped) == (4, 6)
        (hooks.tmp / "release").touch()
        await until(lambda: h.delivered == 5)
        await h.aclose(1.0)

    run(main)
    assert [int(call[0]) for call in hooks.calls()] == [1, 8, 9, 10, 11]
    dropped = hooks.records.named("hook_dropped")
    assert [(f["seq"], f["reason"]) for f in dropped] == [(seq, "queue_full") for seq in range(2, 8)]
    assert [f["dropped"] for f in dropped] == list(range(1, 7))


def test_hooks_notify_returns_at_once_while_a_hook_hangs(hooks: Hooks) -> None:
    """notify() is a plain function that only queues: it cannot wait for a hook, and the event
    loop keeps running while one hangs."""
    h = hooks.make(hooks.script(': > "$DIR/hanging"\nexec sleep 1000\n'), queue_max=10_000)

    async def main() -> None:
        h.notify(MASTER, 1, ME)
        await until(lambda: (hooks.tmp / "hanging").exists())
        began = time.monotonic()
        for term in range(2, 1002):
            h.notify(SLAVE, term, OTHER)
        spent = time.monotonic() - began
        asked = time.monotonic()
        await asyncio.sleep(0.05)
        late = time.monotonic() - asked - 0.05
        print(f"1000 notify() took {spent * 1000:.1f} ms while a hook hung; loop {late * 1000:.1f} ms late")
        assert spent < 5.0 and late < 5.0  # the hook hangs for 1000 s: anything that waited would not end
        assert h.pending == 1000 and h.running_pid is not None
        await h.aclose(0.0)

    run(main)
    assert h.dropped == 1000  # the pending ones, at shutdown


def test_hooks_output_is_bounded(hooks: Hooks) -> None:
    body = f"""
i=0
while [ $i -lt 300 ]; do echo "line $i"; i=$((i+1)); done
printf 'x%.0s' $(seq 1 {3 * MAX_LINE_BYTES}) >&2
printf '\\n' >&2
printf 'bad \\377 byte\\n'
"""
    hooks.run_once(body)
    lines = hooks.records.named("hook_output")
    assert len(lines) == MAX_OUTPUT_LINES
    stdout = [f["line"] for f in lines if f["stream"] == "stdout"]
    assert stdout[:3] == ["line 0", "line 1", "line 2"]
    long_lines = [f for f in lines if f["stream"] == "stderr"]
    if long_lines:  # stderr may come after the line budget is spent
        assert len(long_lines[0]["line"]) == MAX_LINE_BYTES and long_lines[0]["cut"] is True
    (truncated,) = hooks.records.named("hook_output_truncated")
    assert truncated["lines_dropped"] == 301 + 1 - MAX_OUTPUT_LINES  # 300 + the long line + the bad one


def test_hooks_output_is_logged_as_text_even_when_invalid(hooks: Hooks) -> None:
    hooks.run_once("printf 'bad \\377 byte\\nno newline at the end'\n")
    lines = [f["line"] for f in hooks.records.named("hook_output")]
    assert lines == ["bad \ufffd byte", "no newline at the end"]


def test_hooks_a_hook_that_cannot_start_is_logged_and_the_next_runs(hooks: Hooks) -> None:
    path = hooks.script('echo "$PYQUORUM_SEQ" >> "$CALLS"\n')
    h = hooks.make(path)

    async def main() -> None:
        path.chmod(0o644)
        h.notify(MASTER, 1, ME)
        await until(lambda: h.failed == 1)
        path.chmod(0o755)
        h.notify(SLAVE, 2, OTHER)
        await until(lambda: h.delivered == 1)
        await h.aclose(1.0)

    run(main)
    assert hooks.calls() == [["2"]]
    (failed,) = hooks.records.named("hook_start_failed")
    assert failed["seq"] == 1 and "Permission denied" in failed["error"]


def test_hooks_stopping_supersedes_what_waits_and_is_delivered_at_close(hooks: Hooks) -> None:
    body = """
echo "$PYQUORUM_SEQ $1" >> "$CALLS"
[ "$1" = master ] && { : > "$DIR/first"; sleep 0.3; }
exit 0
"""
    h = hooks.make(hooks.script(body))

    async def main() -> None:
        h.notify(MASTER, 1, ME)  # runs for 0.3 s
        await until(lambda: (hooks.tmp / "first").exists())
        h.notify(SLAVE, 2, OTHER)
        h.notify(NO_QUORUM, 2, None)
        h.notify(STOPPING, 2, None)  # seq 4: drops 2 and 3
        h.notify(STOPPING, 2, None)  # ignored: takes no SEQ
        h.notify(SLAVE, 3, OTHER)  # seq 5: after stopping, dropped
        await h.aclose(5.0)
        h.notify(MASTER, 4, ME)  # seq 6: after close, dropped

    run(main)
    assert hooks.calls() == [["1", "master"], ["4", "stopping"]]
    dropped = [(f["seq"], f["reason"]) for f in hooks.records.named("hook_dropped")]
    assert dropped == [(2, "superseded"), (3, "superseded"), (5, "after_stopping"), (6, "closed")]
    assert (h.delivered, h.dropped, h.seq) == (2, 4, 6)


def test_hooks_close_kills_a_running_hook_when_the_budget_ends(hooks: Hooks) -> None:
    """A hook still running when the stop budget ends is killed and reaped; stopping, which no
    longer fits, is dropped and counted."""
    body = """
if [ "$1" = slave ]; then echo $$ > "$DIR/hook"; sleep 1000 & echo $! > "$DIR/child"; wait; fi
echo "$PYQUORUM_SEQ $1" >> "$CALLS"
"""
    h = hooks.make(hooks.script(body), timeout_s=30.0)
    pids: list[int] = []

    async def main() -> None:
        h.notify(SLAVE, 1, OTHER)
        await until(lambda: (hooks.tmp / "child").exists())
        pids.extend(int((hooks.tmp / name).read_text()) for name in ("hook", "child"))
        h.notify(STOPPING, 1, OTHER)
        began = time.monotonic()
        await h.aclose(0.3)
        took = time.monotonic() - began
        print(f"aclose(0.3) returned after {took * 1000:.0f} ms")
        # the budget, then the kill and reap: aclose gives up after 1 s more (0.5 s: scheduling)
        assert 0.3 <= took < 0.3 + 1.0 + 0.5

    run(main)
    assert not any(alive(pid) for pid in pids)
    assert hooks.calls() == []
    (killed,) = hooks.records.named("hook_killed")
    assert (killed["seq"], killed["reason"]) == (1, "shutdown")
    assert [(f["seq"], f["reason"]) for f in hooks.records.named("hook_dropped")] == [(2, "shutdown")]
    assert (h.failed, h.dropped, h.running_pid) == (1, 1, None)


def test_hooks_close_with_nothing_to_do_returns_at_once(hooks: Hooks) -> None:
    h = hooks.make(hooks.script("exit 0\n"))

    async def main() -> None:
        began = time.monotonic()
        await h.aclose(10.0)
        assert time.monotonic() - began < 1.0
        await h.aclose(10.0)  # again: nothing happens
        await h.aclose(float("nan"))

    run(main)
    assert h.counters() == {"seq": 0, "pending": 0, "delivered": 0, "failed": 0, "timed_out": 0, "dropped": 0}


def test_hooks_close_without_a_limit_waits_for_the_hooks(hooks: Hooks) -> None:
    h = hooks.make(hooks.script('sleep 0.2; echo "$PYQUORUM_SEQ" >> "$CALLS"\n'))

    async def main() -> None:
        h.notify(MASTER, 1, ME)
        h.notify(SLAVE, 2, OTHER)
        await h.aclose(float("inf"))

    run(main)
    assert hooks.calls() == [["1"], ["2"]]


def test_hooks_notify_never_raises(hooks: Hooks) -> None:
    h = hooks.make(hooks.script("exit 0\n"))
    h.notify("bogus", 1, None)  # type: ignore[arg-type]
    h.notify(MASTER, 1, ME)  # no event loop: dropped, logged, no exception
    assert h.dropped == 1
    assert any(level == logging.ERROR for level, _, _ in hooks.records.events)
    assert hooks.records.named("hook_dropped")[0]["reason"] == "no_event_loop"


def test_hooks_constructor_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="absolute"):
        NotifyHooks("hook.sh", ME, 1.0)
    with pytest.raises(ValueError, match="positive"):
        NotifyHooks("/bin/true", ME, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        NotifyHooks("/bin/true", ME, 1.0, 0)
