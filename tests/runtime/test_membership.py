"""A node never silently changes its member list, and a node's state is known-new only when the
operator says so. Reference: protocol.md §1 (two lists, two majorities), §3.9 (a lost state), §8
(the procedures). Only loopback addresses; nothing is sent.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pyquorum import cli
from pyquorum.runtime.storage import PersistedState, StateStore


def _ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def node(tmp_path: Path) -> tuple[list[str], Path, list[str]]:
    """(the daemon's options for 127.0.0.1:<p0>, its state dir, its 3-member peer list)."""
    ports = _ports(5)
    state = tmp_path / "state"
    return (
        ["-b", "127.0.0.1", "-p", str(ports[0]), "--state-dir", str(state)],
        state,
        [f"127.0.0.1:{p}" for p in ports[1:]],
    )


def test_daemon_refuses_another_member_list_and_says_what_to_do(
    node: tuple[list[str], Path, list[str]],
) -> None:
    """Reference: protocol.md §1, §8."""
    base, state, peers = node
    me = f"127.0.0.1:{base[3]}"
    with StateStore(state) as store:
        store.save(PersistedState(term=3, members=tuple(sorted([me, *peers[:2]]))))
    proc = subprocess.run(
        [sys.executable, "-m", "pyquorum", *base, *peers],  # 5 members now
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "last ran with the members" in proc.stderr and "accept-members" in proc.stderr
    assert f"+{peers[2]}" in proc.stderr and f"+{peers[3]}" in proc.stderr
    with StateStore(state) as store:
        assert store.load().members == tuple(sorted([me, *peers[:2]]))  # nothing changed


def test_accept_members_records_the_new_list(
    capsys: pytest.CaptureFixture[str], node: tuple[list[str], Path, list[str]]
) -> None:
    base, state, peers = node
    assert cli.main(["accept-members", *base, *peers[:2]]) == 2  # no state yet: nothing to accept
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["init", *base, *peers[:2]]) == 0
    with StateStore(state) as store:
        old = store.load()
    assert not old.recovering and old.members is not None and len(old.members) == 3
    assert cli.main(["accept-members", *base, *peers]) == 0
    assert "start every server with the new list" in capsys.readouterr().out
    with StateStore(state) as store:
        new = store.load()
    assert new.members is not None and len(new.members) == 5 and new.term == old.term


def test_accept_members_refuses_while_the_daemon_runs(
    capsys: pytest.CaptureFixture[str], node: tuple[list[str], Path, list[str]]
) -> None:
    base, state, peers = node
    assert cli.main(["init", *base, *peers[:2]]) == 0
    with StateStore(state):  # the running daemon holds the lock
        assert cli.main(["accept-members", *base, *peers]) == 2
    assert "in use by" in capsys.readouterr().err


def test_init_marks_a_new_node_and_refuses_one_that_has_run(
    capsys: pytest.CaptureFixture[str], node: tuple[list[str], Path, list[str]]
) -> None:
    """Reference: protocol.md §3.9: without init a missing state file means a possibly lost one."""
    base, state, peers = node
    assert cli.main(["init", *base, *peers[:2]]) == 0
    with StateStore(state) as store:
        assert store.load() == PersistedState(members=store.load().members)
    assert cli.main(["init", *base, *peers[:2]]) == 2
    assert "has run before" in capsys.readouterr().err
