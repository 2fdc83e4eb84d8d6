"""The one snapshot and what reads it, without processes: a core Node driven by hand, seen through
``Daemon.snapshot()``; the counters; the exit codes and the text screen; what a reload refuses; how a
core event becomes a log line. Reference: runtime/status.py, docs/operations.md §9."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from pyquorum.config import Config
from pyquorum.core.address import NodeAddress
from pyquorum.core.lease import Timing
from pyquorum.core.messages import (
    MESSAGE_TYPES,
    Heartbeat,
    HeartbeatResponse,
    PreVoteResponse,
    VoteResponse,
)
from pyquorum.core.node import Event, EventKind, Node, Ready
from pyquorum.runtime.daemon import Daemon, log_core_event, status_file_doc
from pyquorum.runtime.logs import configure_logging
from pyquorum.runtime.reload import needs_restart
from pyquorum.runtime.status import (
    DATAGRAM_TYPES,
    ELECTION_BUCKETS_S,
    Counters,
    exit_code,
    render_text,
)
from pyquorum.runtime.storage import STATUS_KEYS
from pyquorum.wire.codec import Hello
from tests.core.cluster_of_three import A, B, C, E, T, node


def config(me: str, tmp_path: Path) -> Config:
    others = [NodeAddress.parse(m) for m in (A, B, C) if m != me]
    return Config(me=NodeAddress.parse(me), peers=tuple(others), state_dir=tmp_path)


def drain(n: Node, counters: Counters, now: float) -> Ready:
    rd = n.ready()
    for _, msg in rd.messages:
        counters.on_send(msg, now)
    for ev in rd.events:
        counters.on_event(ev, now)
    n.advance(rd)
    return rd


def daemon_with(me: str, tmp_path: Path) -> tuple[Daemon, Node]:
    d = Daemon(config(me, tmp_path))
    d.node = node(me)
    d.started_at = 0.0
    return d, d.node


def test_status_of_a_master_that_hears_one_of_two(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d, n = daemon_with(A, tmp_path)
    now = E
    n.tick(now)
    drain(n, d.counters, now)
    n.step(B, PreVoteResponse(1, True, 0), now)
    drain(n, d.counters, now)
    n.step(B, VoteResponse(1, True), now)
    drain(n, d.counters, now)
    n.tick(now + 0.001)
    drain(n, d.counters, now + 0.001)  # the first round of heartbeats
    d.counters.on_deliver(B, HeartbeatResponse(1, n.round), 0, now + 0.003)
    n.step(B, HeartbeatResponse(1, n.round), now + 0.003)
    drain(n, d.counters, now + 0.003)
    monkeypatch.setattr("time.monotonic", lambda: now + 0.01)
    doc = d.snapshot().to_json()
    assert doc["api_version"] == 1 and doc["self"]["role"] == "master"
    assert doc["cluster"] == {
        "members": [A, B, C],
        "size": 3,
        "quorum": 2,
        "has_quorum": True,
        "master": A,
        "term": 1,
        "authenticated": False,
        "send_key_id": None,
        "key_ids": [],
    }
    rows = {m["id"]: m for m in doc["members"]}
    assert rows[A]["known_by"] == "self" and rows[A]["role"] == "master"
    assert (
        rows[B]["known_by"] == "heard" and rows[B]["term"] == 1 and rows[B]["rtt_s"] == pytest.approx(0.002)
    )
    assert rows[C] | {"last_heard_s": None} == {
        "id": C,
        "self": False,
        "role": "unknown",
        "reachable": False,
        "known_by": "none",
        "last_heard_s": None,
        "rtt_s": None,
        "term": None,
        "key_id": None,
    }
    assert 0 < doc["self"]["lease_remaining_s"] < T.lease_kill_s
    assert exit_code(doc) == 1  # a master and a majority, but C is unreachable
    text = render_text(doc)
    assert text.startswith(f"WARNING: cluster of 3, quorum yes (2 of 3 reachable, 2 needed), master {A}")
    assert "Script: none configured" in text
    assert doc["counters"]["role_changes"] == {"slave": 0, "precandidate": 1, "candidate": 1, "master": 1}
    assert doc["counters"]["elections"] == {"won": 1, "failed": 0, "yielded": 0}
    assert doc["counters"]["datagrams_received"]["heartbeat_response"] == 1
    # the first duty greets B and C (protocol.md §3.2), then one round
    assert doc["counters"]["datagrams_sent"]["heartbeat"] == 4
    assert doc["election_durations"]["count"] == 1 and doc["election_durations"]["buckets"][-1] == ["+Inf", 1]
    assert set(status_file_doc(d.snapshot())) == set(STATUS_KEYS)


def test_a_follower_knows_the_other_follower_by_the_masters_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reference: protocol.md §3.2: followers of a live master do not hear each other."""
    d, n = daemon_with(B, tmp_path)
    n.step(A, Heartbeat(1, True, 1, frozenset({B, C})), 5.0)
    drain(n, d.counters, 5.0)
    monkeypatch.setattr("time.monotonic", lambda: 5.1)
    doc = d.snapshot().to_json()
    rows = {m["id"]: m for m in doc["members"]}
    assert doc["cluster"]["master"] == A and rows[A]["role"] == "master" and rows[A]["known_by"] == "heard"
    assert rows[C]["known_by"] == "master_report" and rows[C]["reachable"] and rows[C]["role"] == "slave"
    assert rows[C]["last_heard_s"] is None and rows[C]["term"] is None
    assert rows[A]["rtt_s"] is None  # the round trip is the master's to measure
    assert exit_code(doc) == 0 and render_text(doc).startswith("OK: ")
    monkeypatch.setattr("time.monotonic", lambda: 5.0 + E + 0.01)  # the master fell silent
    doc = d.snapshot().to_json()
    assert doc["cluster"]["master"] is None and not doc["cluster"]["has_quorum"]
    assert exit_code(doc) == 2 and "master NONE" in render_text(doc)


def test_counters_time_elections_and_count_results() -> None:
    c = Counters([B, C])
    c.on_event(Event(EventKind.ELECTION_STARTED, 0), 10.0)
    c.on_event(Event(EventKind.ELECTION_FAILED, 0), 10.3)
    c.on_event(Event(EventKind.ELECTION_STARTED, 0), 11.0)
    c.on_event(Event(EventKind.BECAME_SLAVE, 1, (("was", "candidate"),)), 11.002)
    c.on_event(Event(EventKind.BECAME_SLAVE, 1), 12.0)  # no election under way: not an election result
    assert c.elections == {"won": 0, "failed": 1, "yielded": 1}
    assert c.role_changes == {"slave": 3, "precandidate": 2, "candidate": 0, "master": 0}
    hist = dict(c.election_histogram())
    assert hist[0.0025] == 1 and hist[0.25] == 1 and hist[0.5] == 2 and hist[float("inf")] == 2
    assert c.election_sum_s == pytest.approx(0.302)
    assert len(c.election_histogram()) == len(ELECTION_BUCKETS_S) + 1


def test_reload_refuses_what_needs_a_restart(tmp_path: Path) -> None:
    old = config(A, tmp_path)
    assert needs_restart(old, replace(old, log_level=logging.DEBUG, log_format="json")) == []
    assert needs_restart(old, replace(old, key_file=None)) == []
    changed = replace(
        old,
        peers=old.peers[:1],
        timing=Timing(election_timeout_s=2.0),
        state_dir=tmp_path / "x",
        script="/bin/true",
        key_file=tmp_path / "key",
    )
    why = needs_restart(old, changed)
    assert [w.split(" ")[1] for w in why] == ["members", "timing", "state", "script", "authentication"]
    assert "accept-members" in why[0] and "no restart" in why[3]


def test_core_events_are_logged_with_typed_fields() -> None:
    out = io.StringIO()
    configure_logging(logging.INFO, A, "json", stream=out, environ={})
    try:
        logger = logging.getLogger("pyquorum.test_status")
        ev = Event(
            EventKind.STEPPED_DOWN, 7, (("reason", "lost_quorum"), ("deadline_in_s", 0.12345), ("node", "x"))
        )
        log_core_event(logger, ev)
    finally:
        configure_logging(logging.WARNING, A, "text", stream=io.StringIO(), environ={})
    line = json.loads(out.getvalue())
    assert line["event"] == "stepped_down" and line["level"] == "WARNING" and line["term"] == 7
    assert line["deadline_in_s"] == 0.123 and line["reason"] == "lost_quorum"
    assert line["node_"] == "x" and line["node"] == A  # a reserved name never crashes the daemon


def test_every_message_type_is_counted() -> None:
    # A message type the wire carries but the counters do not name would be a KeyError on the send
    # path (it happened: StepDown was added to the core after the counters were written).
    assert set(MESSAGE_TYPES) | {Hello} <= set(DATAGRAM_TYPES)
    counters = Counters([B, C])
    for cls in MESSAGE_TYPES:
        assert counters.sent[cls] == 0 and counters.received[cls] == 0


def test_a_bug_in_the_hook_rule_is_logged_and_reaches_no_further(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Hooks are advisory (docs/operations.md §13): an exception in choosing the hook's event must not
    reach _process, which would take it for a broken core and stop the daemon."""
    import pyquorum.runtime.daemon as daemon_module

    d, _ = daemon_with(A, tmp_path)
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\n", encoding="utf-8")
    hook.chmod(0o755)

    def broken(*args: object) -> None:
        raise RuntimeError("a bug in the rule")

    monkeypatch.setattr(daemon_module, "hook_event_for", broken)
    d._configure_hooks(replace(d.config, notify=str(hook)))
    with caplog.at_level(logging.ERROR):
        d._announce([Event(EventKind.BECAME_MASTER, 1, ())])
    assert "event=hook_internal_error" in caplog.text and "a bug in the rule" in caplog.text
    assert d.hooks is not None and d.hooks.seq == 0  # nothing was queued
