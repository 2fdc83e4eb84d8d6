"""Operating a live loopback cluster: status, the control socket, HTTP (metrics, leader, health), reload,
and what systemd is told. Real daemons (tests/harness ``Cluster(n, Loopback())``), real sockets.

Reference: docs/operations.md §5 (seeing it), §6 (reload), §5.1 of the systemd section.
Run with ``-s`` to see the ``pyquorum status`` screens.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyquorum import keyfile
from pyquorum.runtime.control import MAX_REQUEST_BYTES
from pyquorum.wire import REASONS
from tests.harness.cluster import Cluster, Loopback, Node
from tests.runtime.test_sdnotify import FakeSystemd
from tests.timing import TEST_TIMING

slow = pytest.mark.slow
E = TEST_TIMING.election_timeout_s
WAIT_S = 20.0


def cli(c: Cluster, node: Node, command: str, *extra: str) -> tuple[int, str, str]:
    """``pyquorum COMMAND`` with the node's own daemon arguments, as an operator would run it."""
    own = node.argv[node.argv.index("pyquorum") + 1 :]
    proc = subprocess.run(
        [sys.executable, "-m", "pyquorum", command, *own, *extra],
        capture_output=True,
        text=True,
        env=c.node_env(node),
        timeout=120,  # step-down --wait and drill (tests/runtime/test_handover.py) take the longest
    )
    return proc.returncode, proc.stdout, proc.stderr


def status_json(c: Cluster, node: Node) -> tuple[int, dict[str, Any]]:
    code, out, err = cli(c, node, "status", "--json")
    assert out, f"no status from {node}: {err}"
    return code, json.loads(out)


def wait_code(c: Cluster, node: Node, code: int, **want: Any) -> dict[str, Any]:
    """Ask the node (over its control socket) until ``pyquorum status`` would exit ``code`` and the
    cluster line has the ``want``ed values; the document."""
    from pyquorum.runtime.status import exit_code

    def probe() -> dict[str, Any] | None:
        doc = c.query(node)
        ok = exit_code(doc) == code and all(doc["cluster"][k] == v for k, v in want.items())
        return doc if ok else None

    return c.wait_for(probe, WAIT_S, f"{node} status exit code {code} with {want}")


def member(doc: dict[str, Any], node: Node) -> dict[str, Any]:
    return next(m for m in doc["members"] if m["id"] == node.name)


@slow
def test_status_before_and_after_a_failover_and_with_nodes_down() -> None:
    """Reference: docs/operations.md "Reading status": exit codes 0 (master, majority), 1 (a member
    unreachable), 2 (no majority), 3 (no daemon); how each member's facts are known."""
    with Cluster(3, Loopback(), keys=True) as c:
        master = c.wait_for_master()
        docs = {n.name: wait_code(c, n, 0, master=master.name) for n in c.nodes}
        term = docs[master.name]["cluster"]["term"]
        followers = [n for n in c.nodes if n is not master]
        for n in c.nodes:
            code, doc = status_json(c, n)
            assert code == 0 and doc["api_version"] == 1 and doc["node"] == n.name
            assert doc["cluster"] | {"members": None} == doc["cluster"] | {
                "members": None,
                "size": 3,
                "quorum": 2,
                "has_quorum": True,
                "master": master.name,
                "term": term,
                "authenticated": True,
                "send_key_id": 1,
                "key_ids": [1],
            }
            assert member(doc, master)["role"] == "master"
        m_doc = status_json(c, master)[1]
        assert m_doc["self"]["lease_remaining_s"] > 0 and m_doc["script"]["running"]
        assert m_doc["self"]["kill_deadline_remaining_s"] > m_doc["self"]["lease_remaining_s"]
        for f in followers:
            row = member(m_doc, f)
            # the master hears every follower (their acknowledgements), and times its rounds
            assert row["known_by"] == "heard" and row["rtt_s"] is not None and 0 < row["rtt_s"] < E
            assert row["term"] == term and row["key_id"] == 1 and row["role"] == "slave"
            f_doc = status_json(c, f)[1]
            other = next(n for n in followers if n is not f)
            assert member(f_doc, master)["known_by"] == "heard"
            # protocol.md §3.2: followers do not hear each other; the master's report says it is live
            assert member(f_doc, other)["known_by"] in ("master_report", "heard")
            assert member(f_doc, other)["reachable"] and f_doc["self"]["lease_remaining_s"] is None
        code, text, _ = cli(c, master, "status")
        print(f"\n--- {master} before the failover:\n{text}")
        assert code == 0 and text.startswith("OK: cluster of 3, quorum yes")
        assert f"master {master.name}, term {term}" in text.splitlines()[0]
        assert all(n.name in text for n in c.nodes) and "running, pid" in text

        # A failover: the old master's host crashes, another takes over; then it comes back.
        c.crash(master, host=True)
        new = c.wait_for_master(newer_than=term, exclude=[master])
        c.restart(master)
        docs = {n.name: wait_code(c, n, 0, master=new.name) for n in c.nodes}
        new_term = docs[new.name]["cluster"]["term"]
        assert new_term > term and all(d["cluster"]["term"] == new_term for d in docs.values())
        code, text, _ = cli(c, new, "status")
        print(f"\n--- {new} after the failover:\n{text}")
        assert code == 0 and f"master {new.name}, term {new_term}" in text
        assert docs[new.name]["counters"]["role_changes"]["master"] == 1

        # One node down: a warning everywhere the cluster still runs, unknown where it does not.
        down = next(n for n in c.nodes if n is not new)
        up = next(n for n in c.nodes if n not in (new, down))
        c.shutdown(down)
        assert c.wait_exit(down) == 0
        for n in (new, up):
            doc = wait_code(c, n, 1, master=new.name, has_quorum=True)
            assert not member(doc, down)["reachable"] and member(doc, down)["known_by"] == "none"
        code, text, _ = cli(c, up, "status")
        print(f"\n--- {up} with {down} down:\n{text}")
        assert code == 1 and text.startswith("WARNING: cluster of 3, quorum yes (2 of 3 reachable")
        code, _, err = cli(c, down, "status")
        assert (code == 3 and "nothing listens on" in err) or "no control socket" in err

        # Two down: no majority, critical.
        c.shutdown(up)
        assert c.wait_exit(up) == 0
        doc = wait_code(c, new, 2, has_quorum=False)
        code, text, _ = cli(c, new, "status")
        print(f"\n--- {new} alone:\n{text}")
        assert code == 2 and text.startswith("CRITICAL:") and doc["self"]["role"] != "master"


def get(node: Node, port: int, path: str, method: str = "GET") -> tuple[int, str]:
    conn = http.client.HTTPConnection(node.ip, port, timeout=10)
    try:
        conn.request(method, path)
        answer = conn.getresponse()
        return answer.status, answer.read().decode()
    finally:
        conn.close()


def metrics_of(node: Node, port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(node, port, "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@slow
def test_http_metrics_leader_health_and_status() -> None:
    """/metrics parsed by prometheus_client's own parser carries what the cluster really is; /leader
    answers 200 on exactly one node, the master; /health 200 while on time; bad requests are refused.
    Reference: docs/operations.md "Metrics", "HAProxy"."""
    with Cluster(3, Loopback(), script=None, http=True) as c:
        port = c.http_port
        assert port is not None
        master = c.wait_for_master()
        for n in c.nodes:
            wait_code(c, n, 0, master=master.name)
        leaders = {n.name: get(n, port, "/leader")[0] for n in c.nodes}
        assert sorted(leaders.values()) == [200, 503, 503] and leaders[master.name] == 200
        for n in c.nodes:
            doc = c.query(n)
            m = metrics_of(n, port)
            term = doc["cluster"]["term"]
            assert m[("pyquorum_is_master", ())] == (1.0 if n is master else 0.0)
            assert m[("pyquorum_term", ())] == term
            assert m[("pyquorum_has_quorum", ())] == 1.0
            assert m[("pyquorum_script_running", ())] == 0.0
            info = [k for k in m if k[0] == "pyquorum_build_info"]
            assert info and ("version", doc["version"]) in info[0][1]
            for peer in (p for p in c.nodes if p is not n):
                assert m[("pyquorum_peer_up", (("peer", peer.name),))] == 1.0
            # every reason present from the start; in a cluster nobody attacks, only the first
            # contact's epoch handshake refuses anything (docs/security.md)
            rejected = {r: m[("pyquorum_datagrams_rejected_total", (("reason", r),))] for r in REASONS}
            assert {r for r, v in rejected.items() if v} <= {"bad-echo"}, rejected
            assert rejected == doc["counters"]["datagrams_rejected"]
            assert m[("pyquorum_datagrams_total", (("direction", "received"), ("type", "heartbeat")))] > 0
            sent = m[("pyquorum_datagrams_total", (("direction", "sent"), ("type", "heartbeat_response")))]
            assert (sent == 0) == (n is master)
            for result in ("won", "failed", "yielded"):
                assert ("pyquorum_elections_total", (("result", result),)) in m
            if n is master:
                assert m[("pyquorum_lease_remaining_seconds", ())] > 0
                assert m[("pyquorum_role_changes_total", (("role", "master"),))] == 1.0
                assert m[("pyquorum_elections_total", (("result", "won"),))] >= 1.0
                assert m[("pyquorum_election_duration_seconds_count", ())] >= 1.0
                for peer in (p for p in c.nodes if p is not n):
                    assert 0 < m[("pyquorum_peer_rtt_seconds", (("peer", peer.name),))] < E
            else:
                assert m[("pyquorum_lease_remaining_seconds", ())] == 0.0
                assert not [k for k in m if k[0] == "pyquorum_peer_rtt_seconds"]
            status, body = get(n, port, "/health")
            assert status == 200 and body.startswith("ok")
            status, body = get(n, port, "/status")
            assert status == 200 and json.loads(body)["node"] == n.name
            assert get(n, port, "/leader", "HEAD")[0] == leaders[n.name]
            assert get(n, port, "/leader", "OPTIONS")[0] == leaders[n.name]
            assert get(n, port, "/nothing")[0] == 404
            assert get(n, port, "/metrics", "POST")[0] == 405
        # A hostile client: an endless header, garbage, a silent connection; the daemon serves on.
        with socket.create_connection((master.ip, port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nX: " + b"a" * 20000)
            assert s.recv(100).startswith(b"HTTP/1.1 431")
        with socket.create_connection((master.ip, port), timeout=10) as s:
            s.sendall(b"\x00\xff garbage\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 400")
        silent = socket.create_connection((master.ip, port), timeout=10)
        assert get(master, port, "/leader")[0] == 200
        silent.close()
        assert c.master() is master


@slow
def test_reload_changes_the_key_and_the_log_level_without_a_master_change() -> None:
    """Reference: docs/operations.md "Reload": keys and log level change live, no election."""
    with Cluster(3, Loopback(), keys=True, config_file=True, verbosity=0) as c:
        master = c.wait_for_master()
        for n in c.nodes:
            wait_code(c, n, 0, master=master.name)
        before = {n.name: c.query(n) for n in c.nodes}
        term = before[master.name]["cluster"]["term"]
        key = c.key_files[0]
        assert key is not None and keyfile.keygen(key, add=True) == 2
        for n in c.nodes:
            c.write_config(n, {**c.config_values(n, key), "log_level": "info"})
        code, out, err = cli(c, c.nodes[0], "reload")
        assert code == 0, err
        assert out.startswith(f"{c.nodes[0].name}: reloaded: keys KeyRing(send_key_id=1, key_ids=[1]) ->")
        assert "logs warning/text -> info/text" in out
        os.kill(c.nodes[1].pid, signal.SIGHUP)
        assert cli(c, c.nodes[2], "reload")[0] == 0
        c.wait_for(lambda: "event=reloaded" in c.log(c.nodes[1]) or None, WAIT_S, "the SIGHUP reload")
        for n in c.nodes:
            doc = wait_code(c, n, 0, master=master.name, term=term)
            assert doc["cluster"]["key_ids"] == [1, 2] and doc["cluster"]["send_key_id"] == 1
            assert doc["counters"]["elections"] == before[n.name]["counters"]["elections"]
            assert doc["counters"]["role_changes"] == before[n.name]["counters"]["role_changes"]
            assert "event=reload_started" not in c.log(n), "logged at INFO before the change"
        # the new level is in force: INFO lines now appear (the next reload's own first line)
        code, out, _ = cli(c, master, "reload")
        assert code == 0 and out.strip() == f"{master.name}: reloaded: nothing changed"
        assert 'event=reload_started source="control socket"' in c.log(master)
        assert c.master() is master and c.query(master)["cluster"]["term"] == term


@slow
def test_reload_refuses_a_member_change_and_changes_nothing() -> None:
    """Reference: docs/operations.md "Reload": members, timing and this node's address need a
    restart; the refusal says so and the daemon runs on unchanged."""
    with Cluster(3, Loopback(), script=None, config_file=True) as c:
        master = c.wait_for_master()
        node = next(n for n in c.nodes if n is not master)
        wait_code(c, node, 0, master=master.name)
        term = c.query(node)["cluster"]["term"]
        good = c.config_values(node)
        c.write_config(node, {**good, "peers": [master.name]})  # one member dropped
        code, out, err = cli(c, node, "reload")
        assert code == 1 and "reload refused, nothing changed" in out
        assert "the members changed" in err and "accept-members" in err
        c.write_config(node, {**good, "election_timeout": 0.6, "log_level": "debug"})
        code, out, err = cli(c, node, "reload")
        assert code == 1 and "the timing changed" in err
        assert "event=reload_failed" in c.log(node)
        doc = wait_code(c, node, 0, master=master.name, term=term)
        assert doc["cluster"]["size"] == 3  # unchanged, and still at the old log level:
        assert "level=DEBUG" not in c.log(node) and " DEBUG " not in c.log(node)
        c.write_config(node, good)
        assert cli(c, node, "reload")[:2] == (0, f"{node.name}: reloaded: nothing changed\n")
        assert c.master() is master


@pytest.fixture(params=["path", "abstract"])
def systemd(request: pytest.FixtureRequest) -> Iterator[FakeSystemd]:
    directory = tempfile.mkdtemp(prefix="pq-notify-")
    path = os.path.join(directory, "notify")
    fake = FakeSystemd(path if request.param == "path" else f"@pyquorum-test-{uuid.uuid4().hex}")
    try:
        yield fake
    finally:
        fake.close()
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(directory)


class Listener(threading.Thread):
    """Reads systemd's socket as systemd does, all along (its queue holds only a few datagrams)."""

    def __init__(self, systemd: FakeSystemd) -> None:
        super().__init__(daemon=True)
        self.systemd = systemd
        self.got: list[tuple[int, list[str]]] = []
        self.done = threading.Event()
        systemd.sock.settimeout(0.2)

    def run(self) -> None:
        while not self.done.is_set():
            try:
                assignments, pid = self.systemd.receive()
            except (TimeoutError, OSError):
                continue
            self.got.append((pid, assignments))

    def stop(self) -> list[tuple[int, list[str]]]:
        """Every message so far, in order, with the sender's pid."""
        time.sleep(0.3)
        self.done.set()
        self.join(5.0)
        return self.got


@slow
def test_systemd_is_told_ready_status_reloading_stopping_and_watchdog(systemd: FakeSystemd) -> None:
    """Reference: docs/operations.md §5.1; runtime/sdnotify.py: the messages and their order, from the
    daemons only (the guard and the script never inherit NOTIFY_SOCKET)."""
    env = {"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "200000"}
    listener = Listener(systemd)
    listener.start()
    with Cluster(3, Loopback(), env=env) as c:
        master = c.wait_for_master()
        term = int(c.status(master)["term"])  # type: ignore[index]
        time.sleep(0.5)  # a few watchdog periods (0.1 s)
        os.kill(master.pid, signal.SIGHUP)
        c.wait_for(lambda: "event=reloaded" in c.log(master) or None, WAIT_S, "the reload")
        pid = master.pid
        c.shutdown(master)
        assert c.wait_exit(master) == 0
        got = listener.stop()
    daemons = {n.pid for n in c.nodes}
    assert {p for p, _ in got} <= daemons, "only the daemons talk to systemd"
    mine = [a for p, a in got if p == pid]
    first = mine[0]
    assert first[0] == "READY=1" and first[1].startswith("STATUS=slave term=")
    kinds = [a[0].split("=")[0] for a in mine if a != ["WATCHDOG=1"]]
    statuses = [a[0] for a in mine if a[0].startswith("STATUS=")]
    assert f"STATUS=master term={term}" in statuses
    assert mine.count(["WATCHDOG=1"]) >= 3
    # the order: ready, ..., reloading, ready (reloaded), ..., stopping, and nothing after it
    assert kinds[0] == "READY" and kinds.count("READY") == 2 and kinds.count("RELOADING") == 1
    assert kinds[kinds.index("RELOADING") + 1] == "READY" and kinds[-1] == "STOPPING"
    events = [a for a in mine if a != ["WATCHDOG=1"]]
    r = next(i for i, a in enumerate(events) if a[0] == "RELOADING=1")
    assert events[r][1].startswith("MONOTONIC_USEC=") and events[r][2] == "STATUS=reloading"
    assert events[r + 1] == ["READY=1", f"STATUS=reloaded master term={term}"]
    assert events[-1][0] == "STOPPING=1"
    assert events[-1][1].startswith(f"STATUS=stopping (SIGTERM) master term={term}")


def raw(path: Path, data: bytes) -> list[dict[str, Any]]:
    """Send ``data`` on one connection to the control socket; every answer until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


@slow
def test_control_socket_refuses_bad_requests_and_serves_on() -> None:
    """Reference: runtime/control.py "Protocol": every bad request gets an error answer; the
    connection stays usable, except after an oversized line; the socket is 0600."""
    with Cluster(3, Loopback(), script=None) as c:
        master = c.wait_for_master()
        path = master.state_dir / "control.sock"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        answers = raw(
            path,
            b"not json\n"
            b"[1, 2]\n"
            b'{"api_version": 2, "command": "status"}\n'
            b'{"api_version": 1, "command": "rm -rf"}\n'
            b'{"api_version": 1, "command": "status", "args": []}\n'
            b"\n"
            b'{"api_version": 1, "command": "commands"}\n'
            b'{"api_version": 1, "command": "status"}',  # no newline: incomplete
        )
        errors = [a["error"] for a in answers if not a["ok"]]
        assert [a["api_version"] for a in answers] == [1] * 7
        assert len(errors) == 6, answers
        assert "not a JSON object" in errors[0] and "not a JSON object" in errors[1]
        assert "unsupported api_version 2" in errors[2] and "unknown command 'rm -rf'" in errors[3]
        assert "'args' must be a JSON object" in errors[4] and "end with a newline" in errors[5]
        assert {"status", "reload", "commands"} <= set(answers[5]["result"])
        huge = raw(path, b'{"x": "' + b"a" * (MAX_REQUEST_BYTES + 10) + b'"}\n{"api_version": 1}\n')
        assert len(huge) == 1 and "longer than" in huge[0]["error"]
        assert c.query(master)["self"]["role"] == "master"
        assert c.master() is master
