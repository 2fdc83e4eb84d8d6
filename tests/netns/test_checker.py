"""The netns checker on made-up histories: each property it asserts is broken once and must be caught.

These need no root and no namespaces; they run everywhere. The made-up nodes are named h1, h2 and h3
(the harness names them by canonical id; the checker needs only names). Reference: checker.py's
docstring, and
protocol.md §3.8 (fencing), §4.2 (minority deadline), §4.5 (host pause), §5 (bounds), §6 (P1, P4-P6).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from tests.harness.cluster import Node
from tests.netns.checker import check, timing_of
from tests.netns.report import table
from tests.netns.scenarios import Harness, bridge_sides

META = {
    "scenario": "made-up",
    "n": 3,
    "nodes": ["h1", "h2", "h3"],
    "heartbeat_interval_s": 0.05,
    "election_timeout_s": 0.5,
    "stop_timeout_s": 0.2,
    "start_delay_s": 0.0,
}
TIMING = timing_of(META)
ALL_UP = {"up": ["h1", "h2", "h3"], "paused": [], "cuts": [], "loss": 0}


@dataclass
class R:
    """A made-up run: lines every 10 ms from start to last; its process gone at end."""

    host: str
    pid: int
    token: int
    start: float
    end: float
    last: float | None = None


def write(
    tmp: Path,
    runs: list[R],
    steps: list[dict[str, Any]] | None = None,
    *,
    register: list[str] | None = None,
    logs: dict[str, str] | None = None,
    **meta: Any,
) -> Path:
    (tmp / "meta.json").write_text(json.dumps({**META, **meta}))
    lines, exits, writes = [], [], []
    for r in runs:
        last = r.end - 0.001 if r.last is None else r.last
        t, event = r.start, "start"
        while t <= last + 1e-9:
            lines.append((t, f"{r.host} {r.pid} {t:.6f} {r.token} {event}"))
            writes.append((t, r))
            t, event = t + 0.01, "tick"
        exits.append(f"{r.pid} {r.end:.6f} pidfd")
    (tmp / "workload.log").write_text("".join(line + "\n" for _, line in sorted(lines)))
    (tmp / "exits.log").write_text("".join(e + "\n" for e in exits))
    if register is None:  # a correct register, fed by every line in time order
        register, highest = [], -1
        for t, r in sorted(writes, key=lambda w: w[0]):
            verdict = "reject" if r.token < highest else "accept"
            highest = max(highest, r.token)
            register.append(f"{t:.6f} {r.host} {r.pid} {r.token} {verdict}")
    (tmp / "register.log").write_text("".join(e + "\n" for e in register))
    if steps is None:
        steps = [{"t": 0.0, "kind": "state", **ALL_UP}]
        end = max((r.end for r in runs), default=1.0)
        steps.append({"t": end + 0.5, "kind": "shutdown", **ALL_UP})
    (tmp / "faults.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    for name, text in (logs or {"h1.log": " event=became_master term=1 votes=2 members=3\n"}).items():
        (tmp / name).write_text(text)
    return tmp


def fault(fid: int, t: float, name: str = "isolate h1", **extra: Any) -> dict[str, Any]:
    state = extra.pop("state", ALL_UP)
    return {
        "t": t,
        "t_before": t - 0.01,
        "kind": "fault",
        "id": fid,
        "name": name,
        "hosts": ["h1"],
        "injected": True,
        "evidence": "done",
        "network": False,
        "minority": [],
        "expect_failover": False,
        "failover_bound_s": None,
        "whole_host_pause": False,
        **state,
        **extra,
    }


def heal(fid: int, t: float, **extra: Any) -> dict[str, Any]:
    return {"t": t, "t_before": t - 0.01, "kind": "heal", "fault": fid, **ALL_UP, **extra}


def steps_with(*middle: dict[str, Any], end: float = 10.0) -> list[dict[str, Any]]:
    return [
        {"t": 0.0, "kind": "state", **ALL_UP},
        *middle,
        {"t": end, "kind": "shutdown", **ALL_UP},
    ]


def test_checker_accepts_a_clean_failover(tmp_path: Path) -> None:
    runs = [R("h1", 10, 1, 1.0, 3.2), R("h2", 20, 2, 3.8, 9.0)]
    steps = steps_with(
        fault(1, 3.0, minority=["h1"], expect_failover=True, failover_bound_s=1.2),
        heal(1, 5.0),
    )
    report = check(write(tmp_path, runs, steps))
    assert report.problems == []
    assert report.passed
    assert report.failover_ms == [pytest.approx(810.0)]
    assert report.minority_checks == 1
    assert report.overlaps == 0


def test_checker_reports_overlapping_runs(tmp_path: Path) -> None:
    report = check(write(tmp_path, [R("h1", 10, 1, 1.0, 3.0), R("h2", 20, 2, 2.5, 4.0)]))
    assert report.overlaps == 1
    assert report.result == "FAIL"
    assert "overlap 500.0 ms" in report.problems[0]


def test_checker_counts_a_run_until_its_process_is_gone_not_its_last_line(tmp_path: Path) -> None:
    # h1 wrote its last line at 2.0 but its process lived until 3.0: h2's start at 2.5 overlaps it
    runs = [R("h1", 10, 1, 1.0, 3.0, last=2.0), R("h2", 20, 2, 2.5, 4.0)]
    assert check(write(tmp_path, runs)).overlaps == 1


def test_checker_reports_a_run_whose_exit_was_never_seen(tmp_path: Path) -> None:
    d = write(tmp_path, [R("h1", 10, 1, 1.0, 3.0)])
    (d / "exits.log").write_text("")
    assert any("no exit was ever seen" in p for p in check(d).problems)


def test_checker_excuses_overlap_only_for_a_whole_host_pause(tmp_path: Path) -> None:
    # protocol.md §4.5: h1 paused as a whole at 2.0, h2 starts at 2.8, h1 resumed at 3.5 and is
    # gone 0.1 s later: reported, excused; fencing still holds
    runs = [R("h1", 10, 1, 1.0, 3.6, last=3.55), R("h2", 20, 2, 2.8, 6.0)]
    paused = {**ALL_UP, "up": ["h2", "h3"], "paused": ["h1"]}
    steps = steps_with(fault(1, 2.0, "SIGSTOP host h1", whole_host_pause=True, state=paused), heal(1, 3.5))
    report = check(write(tmp_path, runs, steps))
    assert report.overlaps == 0
    assert report.excused_overlaps == 1
    assert report.stale_rejected > 0
    assert report.passed, report.problems
    # the same overlap after a pause of the daemon alone is not excused
    steps = steps_with(fault(1, 2.0, "SIGSTOP daemon h1", state=paused), heal(1, 3.5))
    assert check(write(tmp_path, runs, steps)).overlaps == 1


def test_checker_does_not_excuse_a_run_that_outlives_the_resume(tmp_path: Path) -> None:
    runs = [R("h1", 10, 1, 1.0, 5.0), R("h2", 20, 2, 2.8, 6.0)]
    steps = steps_with(fault(1, 2.0, "SIGSTOP host h1", whole_host_pause=True), heal(1, 3.5))
    assert check(write(tmp_path, runs, steps)).overlaps == 1


def test_checker_reports_a_token_that_does_not_increase(tmp_path: Path) -> None:
    report = check(write(tmp_path, [R("h1", 10, 3, 1.0, 2.0), R("h2", 20, 2, 3.0, 4.0)]))
    assert any(p.startswith("fencing:") for p in report.problems)


def test_checker_allows_a_restart_in_the_same_term_on_the_same_host(tmp_path: Path) -> None:
    # protocol.md §3.8: same master, same term, the earlier run reaped first
    report = check(write(tmp_path, [R("h1", 10, 2, 1.0, 2.0), R("h1", 11, 2, 3.0, 4.0)]))
    assert report.problems == []


def test_checker_reports_one_token_on_two_hosts(tmp_path: Path) -> None:
    report = check(write(tmp_path, [R("h1", 10, 2, 1.0, 2.0), R("h2", 20, 2, 3.0, 4.0)]))
    assert any("two masters of term 2" in p for p in report.problems)


def test_checker_reports_a_register_that_accepts_a_stale_token(tmp_path: Path) -> None:
    register = ["1.0 h2 20 5 accept", "1.1 h1 10 4 accept"]
    report = check(write(tmp_path, [R("h1", 10, 4, 0.5, 0.9), R("h2", 20, 5, 1.0, 2.0)], register=register))
    assert any("register accepted token 4" in p for p in report.problems)


def test_checker_reports_a_minority_that_writes_after_its_deadline(tmp_path: Path) -> None:
    # cut at 2.0: the deadline is 2.0 + L_kill (0.49 s); h1 writes until 2.7
    runs = [R("h1", 10, 1, 1.0, 2.71, last=2.7), R("h2", 20, 2, 2.8, 6.0)]
    steps = steps_with(fault(1, 2.0, minority=["h1"]), heal(1, 4.0))
    report = check(write(tmp_path, runs, steps))
    assert any(p.startswith("minority:") and "wrote at" in p for p in report.problems)


def test_checker_reports_a_minority_process_alive_after_its_deadline(tmp_path: Path) -> None:
    # last line in time, but the process only gone at 2.6 > 2.49 + slack
    runs = [R("h1", 10, 1, 1.0, 2.6, last=2.4), R("h2", 20, 2, 2.8, 6.0)]
    steps = steps_with(fault(1, 2.0, minority=["h1"]), heal(1, 4.0))
    report = check(write(tmp_path, runs, steps))
    assert any(p.startswith("minority:") and "still alive" in p for p in report.problems)


def test_checker_reports_a_minority_that_starts_a_script(tmp_path: Path) -> None:
    runs = [R("h2", 20, 2, 1.0, 6.0), R("h1", 10, 3, 3.0, 3.5)]
    steps = steps_with(fault(1, 2.0, minority=["h1"]), heal(1, 4.0))
    report = check(write(tmp_path, runs, steps))
    assert any(p.startswith("minority:") for p in report.problems)


def test_checker_reports_a_failover_over_its_bound(tmp_path: Path) -> None:
    runs = [R("h1", 10, 1, 1.0, 2.0), R("h2", 20, 2, 4.0, 6.0)]
    steps = steps_with(fault(1, 2.0, expect_failover=True, failover_bound_s=1.0), heal(1, 3.0))
    report = check(write(tmp_path, runs, steps))
    assert any(p.startswith("failover after") for p in report.problems)
    assert report.failover_ms == [pytest.approx(2010.0)]


def test_checker_reports_no_failover_at_all(tmp_path: Path) -> None:
    steps = steps_with(fault(1, 2.0, expect_failover=True, failover_bound_s=1.0), heal(1, 3.0))
    report = check(write(tmp_path, [R("h1", 10, 1, 1.0, 2.0)], steps))
    assert any(p.startswith("failover: no script ran") for p in report.problems)


def test_checker_network_fault_without_dropped_packets_is_not_injected(tmp_path: Path) -> None:
    steps = steps_with(fault(1, 2.0, network=True), heal(1, 3.0, dropped=0))
    report = check(write(tmp_path, [R("h1", 10, 1, 1.0, 9.0)], steps))
    assert not report.injected
    assert report.result == "NOT INJECTED"
    assert not report.passed
    steps = steps_with(fault(1, 2.0, network=True), heal(1, 3.0, dropped=12))
    assert check(write(tmp_path, [R("h1", 10, 1, 1.0, 9.0)], steps)).injected


def test_checker_process_fault_that_failed_is_not_injected(tmp_path: Path) -> None:
    steps = steps_with(fault(1, 2.0, injected=False, evidence="no process"), heal(1, 3.0))
    assert check(write(tmp_path, [R("h1", 10, 1, 1.0, 9.0)], steps)).result == "NOT INJECTED"


def test_checker_reports_tracebacks_and_bad_exit_codes(tmp_path: Path) -> None:
    logs = {
        "h1.log": " event=became_master term=1\n",
        "h2.log": "Traceback (most recent call last):\n  boom\n",
    }
    steps = steps_with(
        {"t": 5.0, "kind": "stopped", "host": "h3", "exit_code": 1, **ALL_UP},
        {
            "t": 11.0,
            "kind": "closed",
            "final_exit_codes": [["h1", 0], ["h2", None]],
            "leftovers": [99],
            **ALL_UP,
        },
    )
    report = check(write(tmp_path, [R("h1", 10, 1, 1.0, 9.0)], steps, logs=logs))
    text = "\n".join(report.problems)
    assert "h2.log: 'Traceback'" in text
    assert "h3: a planned stop (SIGTERM) exited 1" in text
    assert "h2: the final SIGTERM exited None" in text
    assert "processes left" in text


def test_checker_stable_scenario_reports_a_new_election(tmp_path: Path) -> None:
    runs = [R("h1", 10, 1, 1.0, 5.0), R("h2", 20, 2, 5.6, 10.5)]
    logs = {"h1.log": " event=became_master term=1\n", "h2.log": " event=became_master term=2\n"}
    steps = steps_with({"t": 1.5, "kind": "steady", **ALL_UP})
    report = check(write(tmp_path, runs, steps, logs=logs, stable=True))
    assert any(p.startswith("spurious election") for p in report.problems)
    # and the quiet version passes
    quiet = tmp_path / "quiet"
    quiet.mkdir()
    runs = [R("h1", 10, 1, 1.0, 10.5)]
    report = check(write(quiet, runs, steps, logs={"h1.log": " event=became_master term=1\n"}, stable=True))
    assert report.problems == []
    assert report.availability == pytest.approx(1.0)


def test_checker_availability_counts_only_time_with_a_healthy_majority(tmp_path: Path) -> None:
    # 1..10 s; no majority from 4 to 6 (two hosts down); a script from 1 to 4 and 7 to 10
    down = {**ALL_UP, "up": ["h1"]}
    steps = steps_with(
        {"t": 4.0, "kind": "fault-state", **down},
        {"t": 6.0, "kind": "state", **ALL_UP},
    )
    runs = [R("h1", 10, 1, 1.0, 4.0), R("h2", 20, 2, 7.0, 11.0)]
    report = check(write(tmp_path, runs, steps))
    assert report.availability == pytest.approx(6.0 / 7.0, abs=0.01)


def test_checker_recovery_after_heal_within_the_liveness_bound(tmp_path: Path) -> None:
    bound = TIMING.liveness_bound_s(3)
    runs = [R("h1", 10, 1, 1.0, 2.0), R("h2", 20, 2, 3.0 + bound + 1.0, 9.0)]
    steps = steps_with({"t": 3.0, "kind": "healed_all", "restarted": [], **ALL_UP})
    report = check(write(tmp_path, runs, steps))
    assert any(p.startswith("recovery after the heal") for p in report.problems)


def test_report_table_has_one_row_per_scenario() -> None:
    rows = [
        {
            "scenario": "isolate-master-3",
            "injected": True,
            "failover_ms": [600.0],
            "failover_bound_ms": [1256],
            "overlaps": 0,
            "excused_overlaps": 0,
            "availability": 0.95,
            "elections": 2,
            "stale_rejected": 0,
            "result": "PASS",
        },
        {
            "scenario": "nemesis-5-75s",
            "injected": False,
            "failover_ms": [600.0, 700.0, None, 800.0],
            "failover_bound_ms": [1256, 1256, 1256, None],
            "overlaps": 0,
            "excused_overlaps": 1,
            "availability": None,
            "elections": 9,
            "stale_rejected": 1,
            "result": "NOT INJECTED",
        },
    ]
    lines = table(rows).splitlines()
    assert len(lines) == 4
    assert "600 (1256)" in lines[2]
    assert "4 failovers, max 800, 3 in bound" in lines[3]
    assert "0 (+1 §4.5)" in lines[3]
    assert "NOT INJECTED" in lines[3]


class _Sides:
    """What ``bridge_sides`` uses of a Harness: the other nodes and the seeded random source."""

    def __init__(self, nodes: list[Node], seed: int) -> None:
        self.nodes = nodes
        self.rng = random.Random(seed)

    def others(self, *nodes: Node) -> list[Node]:
        return [n for n in self.nodes if n not in nodes]


@pytest.mark.parametrize("size", [3, 4, 5, 7])
def test_bridge_never_puts_the_master_in_the_middle(size: int) -> None:
    # With the master as the bridge, the followers send to it alone (protocol.md §3.2): no datagram
    # crosses the cut, nothing is dropped, and the fault is not injected (stop 19's CI failure).
    nodes = [cast(Node, f"n{i}") for i in range(size)]  # bridge_sides only compares and orders them
    middles: set[tuple[Node, Node, Node]] = set()
    for seed in range(200):
        for x in nodes:
            for master in nodes:
                h = cast(Harness, _Sides(nodes, seed))
                a, mid, b = bridge_sides(h, x, master=master)
                assert mid != master
                assert a[0] == x and sorted(map(str, [*a, mid, *b])) == sorted(map(str, nodes))
                assert a and b and not set(a) & set(b)
                middles.add((x, master, mid))
    # Every node other than x and the master is still chosen as the bridge now and then.
    for x in nodes:
        for master in nodes:
            chosen = {mid for (x2, m2, mid) in middles if x2 == x and m2 == master}
            assert chosen == set(nodes) - {x, master}
