"""A notify hook that records its calls, for the tests that run real daemons with ``--notify``
(tests/runtime/test_hooks_daemon.py, the netns suite's hooks scenario), and the checks of its record.

The hook (``HOOK``, a shell script) appends to ``<records>/<node>.log`` one ``start`` line when it
begins and one ``end`` line when it ends, with its SEQ, its arguments, the daemon's pid and the wall
clock; ``HOOK_MODE`` in its environment makes it slow (0.3 s), hang on ``slave`` (``hang``) or on
everything (``hangall``), with a ``pids`` line naming itself and its child, or fail (exit 3).
``HOOK_DIR`` names the records' directory.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from pyquorum._localcluster import Node

__all__ = ["HOOK", "Call", "calls", "check_order", "install", "last_call"]

HOOK = """#!/bin/sh
rec="$HOOK_DIR/$PYQUORUM_NODE.log"
now() { date +%s.%N; }
echo "start $PYQUORUM_SEQ $1 $2 $3 $PPID $(now)" >> "$rec"
case "$HOOK_MODE:$1" in
    slow:*) sleep 0.3 ;;
    hang:slave|hangall:*) sleep 60 & echo "pids $PYQUORUM_SEQ $$ $!" >> "$rec"; wait ;;
    fail:*) echo "failing on purpose" >&2; echo "end $PYQUORUM_SEQ $PPID $(now)" >> "$rec"; exit 3 ;;
esac
echo "end $PYQUORUM_SEQ $PPID $(now)" >> "$rec"
"""


@dataclass
class Call:
    seq: int
    event: str
    term: int
    master: str
    daemon: int
    start: float
    end: float | None = None
    pids: tuple[int, ...] = ()


def install(tmp_path: Path) -> tuple[Path, Path]:
    hook, records = tmp_path / "notify-hook", tmp_path / "records"
    tmp_path.mkdir(parents=True, exist_ok=True)
    hook.write_text(HOOK, encoding="utf-8")
    hook.chmod(0o755)
    records.mkdir()
    return hook, records


def calls(records: Path, node: Node) -> list[Call]:
    """The node's hook calls, in the order they began."""
    path = records / f"{node.name}.log"
    out: list[Call] = []
    by_key: dict[tuple[int, int], Call] = {}
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        f = line.split()
        if f[0] == "start" and len(f) == 7:
            call = Call(int(f[1]), f[2], int(f[3]), f[4], int(f[5]), float(f[6]))
            out.append(call)
            by_key[(call.daemon, call.seq)] = call
        elif f[0] == "end" and len(f) == 4:
            by_key[(int(f[2]), int(f[1]))].end = float(f[3])
        elif f[0] == "pids" and len(f) == 4:
            out[-1].pids = (int(f[2]), int(f[3]))
    return out


def last_call(records: Path, node: Node) -> tuple[str, str] | None:
    got = calls(records, node)
    return (got[-1].event, got[-1].master) if got else None


def check_order(records: Path, node: Node, *, stopped: bool = True) -> list[Call]:
    """Per daemon life: SEQ 1, 2, 3... with nothing dropped, one run at a time, never the same event
    twice in a row, and (``stopped``: the daemons have exited) ``stopping`` the last. The node's
    calls."""
    got = calls(records, node)
    lives: dict[int, list[Call]] = {}
    for call in got:
        lives.setdefault(call.daemon, []).append(call)
    for daemon, life in lives.items():
        assert [c.seq for c in life] == list(range(1, len(life) + 1)), (node, daemon, life)
        for before, after in itertools.pairwise(life):
            assert before.end is not None and before.end <= after.start, f"two at once: {before} {after}"
            assert (before.event, before.term, before.master) != (after.event, after.term, after.master)
        assert all(c.event != "stopping" for c in life[:-1]), life
        if stopped:
            assert life[-1].event == "stopping", life
            assert life[-1].end is not None, f"the last hook did not end: {life[-1]}"
    return got
