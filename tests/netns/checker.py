"""The checker: what happened in one scenario, from its files alone, and whether it was allowed.

Inputs, all in the scenario's directory (tests/harness and scenarios.py write them): ``meta.json``
(nodes, timing), ``workload.log`` (every line every script wrote), ``exits.log`` (when each script
process was gone), ``register.log`` (every write the fencing register saw, in lock order),
``faults.jsonl`` (every step the harness took, with the network and process state after it; nodes
by name) and ``h<i>.log`` (the daemons' logs). ``check(dir)`` returns a ``Report``; nothing here touches a
process or the network, so the checker is tested on made-up histories (test_checker.py) and a failed
scenario can be checked again from its saved directory: ``python -m tests.netns.checker DIR``.

What a run is (tests/harness/runs.py, which also has the overlap and fencing rules the loopback tests
use). A script run starts at its first line (before that it has done nothing) and ends when its
process has exited, as seen by the harness's pidfd monitor: never earlier than the true exit, so
overlaps can be over-reported (by the monitor's latency) but not missed.

The properties (protocol.md §6), each a line in ``Report.problems`` when violated:

- **no overlap** (P4): no two runs, of any hosts, overlap in time. One exception, reported but not a
  problem: protocol.md §4.5, a whole-host pause. A run whose host was paused as a whole (every
  process SIGSTOPped) after it started and before the other run started is excused if it ended within
  ``G + K + HOST_RESUME_SLACK_S`` after the host resumed; there only fencing protects the resource;
- **fencing** (P5, §3.8): from one run to the next (by start) the token increases, or stays equal for
  a restart on the same host after the earlier run ended; a token is never used by two hosts (P1);
  the register never accepts a token lower than one it accepted before (nor refuses a current one);
  ``stale_rejected`` counts the writes it refused; every run has its start line;
- **minority** (P6, §4.2): a host that cannot renew a lease from ``t`` on (cut off from a majority,
  or its daemon frozen or killed; ``t`` is the harness time after the fault was in force) writes no
  line after ``t + L_kill`` until the heal began, and its run has ended by then (plus
  ``MONITOR_SLACK_S`` for the monitor's latency): no round sent after ``t`` can be acknowledged by a
  majority, so its kill deadline is at most ``t + L_kill``;
- **failover** (§5.1): after each fault that should cause one, the first run that starts after the
  fault (measured from the moment before the fault, so never too short) starts within its bound;
- **recovery** (§5.2): after each complete heal, a script runs within ``Timing.liveness_bound_s`` plus
  allowances;
- **stable**: in a scenario marked stable (no faults, 5% loss), no run starts or ends between the
  "steady" mark and the shutdown, and there was exactly one election;
- **logs**: no ``Traceback``, ``event=internal_error`` or ``event=fatal`` in any daemon log, and every
  planned stop (SIGTERM) exited 0.

Availability is reported, not asserted (except in stable scenarios): the fraction of the time from
the first run to the shutdown, among the moments when a majority was healthy (some running,
unpaused daemon heard both ways by enough running, unpaused daemons to make a majority), during which
a script ran.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyquorum.core.lease import Timing
from pyquorum.core.quorum import quorum_size
from tests.harness.runs import Entry, Run, overlaps, read_register, read_runs, run_problems

# The monitor sees an exit within a few ms (its poll wakes at once); allow for a loaded machine.
MONITOR_SLACK_S = 0.1
# After SIGCONT of a paused host, its guard needs at most G + K to kill the script; plus scheduling.
HOST_RESUME_SLACK_S = 0.5
# The script's own start-up: the guard (python -I -S) and the workload interpreter. Not part of the
# protocol's bounds, which end when the daemon starts the guard; measured at 30-110 ms on a loaded VM.
SPAWN_ALLOWANCE_S = 0.3
# A daemon restarted by a heal first has to start: an interpreter importing pyquorum, 0.1-0.5 s loaded.
DAEMON_START_ALLOWANCE_S = 1.0
_LOG_ALARMS = ("Traceback", "event=internal_error", "event=fatal")


@dataclass
class Report:
    scenario: str
    n: int
    injected: bool = True
    evidence: list[str] = field(default_factory=list)
    faults: int = 0
    failover_ms: list[float | None] = field(default_factory=list)
    failover_bound_ms: list[float | None] = field(default_factory=list)
    overlaps: int = 0
    excused_overlaps: int = 0
    availability: float | None = None
    elections: int = 0
    runs: int = 0
    stale_rejected: int = 0
    minority_checks: int = 0
    # how long before its deadline the latest minority run was gone (smallest over the checks)
    minority_margin_ms: float | None = None
    recovery_ms: float | None = None
    monitor_lag_ms: float | None = None
    duration_s: float = 0.0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def result(self) -> str:
        if not self.injected:
            return "NOT INJECTED"
        return "FAIL" if self.problems else "PASS"

    @property
    def passed(self) -> bool:
        return self.result == "PASS"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["result"] = self.result
        return d


def timing_of(meta: dict[str, Any]) -> Timing:
    return Timing(
        heartbeat_interval_s=meta["heartbeat_interval_s"],
        election_timeout_s=meta["election_timeout_s"],
        stop_timeout_s=meta["stop_timeout_s"],
        start_delay_s=meta.get("start_delay_s", 0.0),
    )


# ---- reading ------------------------------------------------------------------------------------


def read_faults(directory: Path) -> list[dict[str, Any]]:
    path = directory / "faults.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- the checks ---------------------------------------------------------------------------------


def check(directory: Path) -> Report:
    """Check one scenario's directory; see the module docstring for what is checked."""
    meta = json.loads((directory / "meta.json").read_text())
    timing = timing_of(meta)
    n = int(meta["n"])
    report = Report(scenario=str(meta.get("scenario", directory.name)), n=n)
    runs = read_runs(directory)
    register = read_register(directory)
    steps = read_faults(directory)
    report.runs = len(runs)
    if steps:
        report.duration_s = round(steps[-1]["t"] - steps[0]["t"], 1)
    _check_injection(report, steps)
    _check_overlap(report, runs, steps, timing)
    _check_fencing(report, runs, register)
    _check_minority(report, runs, steps, timing)
    _check_failover(report, runs, steps)
    _check_recovery(report, runs, steps, timing, n)
    _availability(report, runs, steps, n)
    _check_logs(report, directory, steps)
    _check_stable(report, runs, steps, meta)
    _monitor_lag(report, runs)
    return report


def _faults(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s for s in steps if s["kind"] == "fault"]


def _heal_of(steps: list[dict[str, Any]], fault_id: int) -> dict[str, Any] | None:
    for s in steps:
        if s["kind"] == "heal" and s.get("fault") == fault_id:
            return s
    return None


def _check_injection(report: Report, steps: list[dict[str, Any]]) -> None:
    faults = _faults(steps)
    report.faults = len(faults)
    for f in faults:
        ok = bool(f.get("injected"))
        evidence = str(f.get("evidence", ""))
        if f.get("network"):
            heal = _heal_of(steps, f["id"])
            dropped = heal.get("dropped") if heal else None
            if not isinstance(dropped, int) or dropped <= 0:
                ok = False
                evidence += f"; nft rules dropped {dropped} packets"
            else:
                evidence += f"; nft dropped {dropped} packets"
        if not ok:
            report.injected = False
            report.evidence.append(f"NOT injected: {f['name']}: {evidence}")
        elif evidence:
            report.evidence.append(f"{f['name']}: {evidence}")


def _host_pauses(steps: list[dict[str, Any]], node: str) -> list[tuple[float, float]]:
    """Intervals during which ``node`` was paused as a whole host (protocol.md §4.5)."""
    spans = []
    for f in _faults(steps):
        if f.get("whole_host_pause") and f["hosts"][0] == node:
            heal = _heal_of(steps, f["id"])
            spans.append((f["t_before"], heal["t"] if heal else math.inf))
    return spans


def _check_overlap(report: Report, runs: list[Run], steps: list[dict[str, Any]], timing: Timing) -> None:
    excuse_s = timing.stop_timeout_s + timing.kill_margin_s + HOST_RESUME_SLACK_S
    report.problems += [
        f"run {r.node}/{r.pid} token {r.token}: no exit was ever seen" for r in runs if r.alive
    ]
    for a, b in overlaps(runs):
        overlap_ms = (min(a.end_or_inf, b.end_or_inf) - b.start) * 1000
        what = (
            f"overlap {overlap_ms:.1f} ms: {a.node}/{a.pid} token {a.token} "
            f"[{a.start:.3f}, {a.end_or_inf:.3f}] and {b.node}/{b.pid} token {b.token} "
            f"[{b.start:.3f}, {b.end_or_inf:.3f}]"
        )
        excused = any(
            a.start < p0 < b.start and a.end_or_inf <= p1 + excuse_s for p0, p1 in _host_pauses(steps, a.node)
        )
        if excused:
            report.excused_overlaps += 1
            report.notes.append(f"{what}: {a.node} was paused as a whole (protocol.md §4.5, fencing only)")
        else:
            report.overlaps += 1
            report.problems.append(what)


def _check_fencing(report: Report, runs: list[Run], register: list[Entry]) -> None:
    report.problems += run_problems(runs, register)
    report.stale_rejected = sum(1 for *_, verdict in register if verdict != "accept")


def _check_minority(report: Report, runs: list[Run], steps: list[dict[str, Any]], timing: Timing) -> None:
    for f in _faults(steps):
        minority = f.get("minority", [])
        if not minority:
            continue
        deadline = f["t"] + timing.lease_kill_s
        heal = _heal_of(steps, f["id"])
        until = heal["t_before"] if heal else math.inf
        if until <= deadline:
            report.notes.append(f"minority: {f['name']} healed before the deadline; nothing to check")
            continue
        report.minority_checks += 1
        for r in runs:
            if r.node not in minority or r.start >= until or r.end_or_inf < f["t_before"]:
                continue
            if r.last > deadline:
                report.problems.append(
                    f"minority: {r.node}/{r.pid} (token {r.token}) wrote at {r.last:.3f}, after its "
                    f"deadline {deadline:.3f} ({f['name']} at {f['t']:.3f}, healed at {until:.3f})"
                )
            elif r.end_or_inf > deadline + MONITOR_SLACK_S:
                report.problems.append(
                    f"minority: {r.node}/{r.pid} (token {r.token}) still alive at {r.end_or_inf:.3f}, "
                    f"after its deadline {deadline:.3f} ({f['name']})"
                )
            else:
                margin_ms = round((deadline - r.end_or_inf) * 1000, 1)
                if report.minority_margin_ms is None or margin_ms < report.minority_margin_ms:
                    report.minority_margin_ms = margin_ms


def _check_failover(report: Report, runs: list[Run], steps: list[dict[str, Any]]) -> None:
    for f in _faults(steps):
        if not f.get("expect_failover"):
            continue
        t0 = f["t_before"]
        later = [r for r in runs if r.start > t0]
        bound = f.get("failover_bound_s")
        if not later:
            report.failover_ms.append(None)
            report.failover_bound_ms.append(None if bound is None else round(bound * 1000))
            report.problems.append(f"failover: no script ran after {f['name']}")
            continue
        took = later[0].start - t0
        report.failover_ms.append(round(took * 1000, 1))
        report.failover_bound_ms.append(None if bound is None else round(bound * 1000))
        if bound is not None and took > bound:
            report.problems.append(
                f"failover after {f['name']}: {took * 1000:.0f} ms > bound {bound * 1000:.0f} ms "
                f"(first run: {later[0].node} token {later[0].token})"
            )


def _check_recovery(
    report: Report, runs: list[Run], steps: list[dict[str, Any]], timing: Timing, n: int
) -> None:
    """After each "healed_all" step a script runs within the liveness bound (protocol.md §5.2), plus
    the script's start-up, plus the daemons' own start-up when some were restarted by the heal."""
    worst: float | None = None
    for s in (s for s in steps if s["kind"] == "healed_all"):
        t = s["t"]
        bound = timing.liveness_bound_s(n) + SPAWN_ALLOWANCE_S
        if s.get("restarted"):
            bound += DAEMON_START_ALLOWANCE_S
        if any(r.start <= t < r.end_or_inf and r.last >= t - 0.1 for r in runs):
            took = 0.0
        else:
            later = [r for r in runs if r.start > t]
            if not later:
                report.problems.append(f"recovery: no script ran after the heal at {t:.3f}")
                continue
            took = later[0].start - t
            if took > bound:
                report.problems.append(
                    f"recovery after the heal at {t:.3f}: {took * 1000:.0f} ms > {bound * 1000:.0f} ms"
                )
        worst = took if worst is None else max(worst, took)
    report.recovery_ms = None if worst is None else round(worst * 1000, 1)


def _healthy(step: dict[str, Any], n: int) -> bool:
    """Some running, unpaused daemon hears and is heard by enough others to make a majority."""
    up = set(step["up"]) - set(step["paused"])
    cuts = {tuple(c) for c in step["cuts"]}
    q = quorum_size(n)
    for x in up:
        peers = [y for y in up if y != x and (x, y) not in cuts and (y, x) not in cuts]
        if len(peers) + 1 >= q:
            return True
    return False


def _availability(report: Report, runs: list[Run], steps: list[dict[str, Any]], n: int) -> None:
    if not runs:
        return
    t0 = runs[0].start
    ends = [s["t"] for s in steps if s["kind"] == "shutdown"]
    t1 = ends[0] if ends else steps[-1]["t"]
    if t1 <= t0:
        return
    # the healthy intervals, from the state recorded after each step
    healthy: list[tuple[float, float]] = []
    for s, nxt in zip(steps, [*steps[1:], None], strict=True):
        a, b = max(s["t"], t0), min(nxt["t"] if nxt else t1, t1)
        if b > a and _healthy(s, n):
            healthy.append((a, b))
    total = sum(b - a for a, b in healthy)
    if total <= 0:
        return
    spans = sorted((r.start, min(r.end_or_inf, t1)) for r in runs)
    covered = 0.0
    for a, b in healthy:
        for s0, s1 in spans:
            lo, hi = max(a, s0), min(b, s1)
            if hi > lo:
                covered += hi - lo
    report.availability = round(min(1.0, covered / total), 4)


def _check_logs(report: Report, directory: Path, steps: list[dict[str, Any]]) -> None:
    elections = 0
    for log in sorted(directory.glob("h*.log")):
        text = log.read_text(errors="replace")
        elections += len(re.findall(r"event=became_master term=", text))
        for alarm in _LOG_ALARMS:
            if alarm in text:
                line = next(ln for ln in text.splitlines() if alarm in ln)
                report.problems.append(f"{log.name}: {alarm!r}: {line.strip()[:200]}")
    report.elections = elections
    for s in steps:
        if s["kind"] == "startup_failed":
            report.problems.append(f"no script ran within {s.get('waited_s')} s of the cluster's start")
        if s["kind"] == "stopped" and s.get("exit_code") != 0:
            report.problems.append(f"{s['host']}: a planned stop (SIGTERM) exited {s.get('exit_code')}")
    for s in steps:
        if s["kind"] == "closed":
            for host, code in s.get("final_exit_codes", []):
                if code != 0:
                    report.problems.append(f"{host}: the final SIGTERM exited {code}, not 0")
            if s.get("monitor_max_gap_s") is not None:
                report.notes.append(
                    f"run monitor: longest gap between two polls {s['monitor_max_gap_s'] * 1000:.0f} ms"
                )
            if s.get("leftovers"):
                report.problems.append(f"processes left after every daemon stopped: {s['leftovers']}")


def _check_stable(report: Report, runs: list[Run], steps: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    if not meta.get("stable"):
        return
    marks = [s["t"] for s in steps if s["kind"] == "steady"]
    ends = [s["t"] for s in steps if s["kind"] == "shutdown"]
    if not marks or not ends:
        report.problems.append("stable: no steady mark or no shutdown recorded")
        return
    t0, t1 = marks[0], ends[0]
    changed = [r for r in runs if t0 < r.start < t1 or t0 < r.end_or_inf < t1]
    if changed:
        report.problems.append(
            "spurious election: the running script changed between steady and shutdown: "
            + ", ".join(f"{r.node} token {r.token} [{r.start:.3f}, {r.end_or_inf:.3f}]" for r in changed)
        )
    if report.elections != 1:
        report.problems.append(f"spurious election: {report.elections} elections, expected 1")
    if report.availability is not None and report.availability < 0.99:
        report.problems.append(f"availability {report.availability} < 0.99 with a healthy cluster")


def _monitor_lag(report: Report, runs: list[Run]) -> None:
    late = [r for r in runs if r.end_how == "late"]
    if late:
        report.notes.append(
            f"{len(late)} script exit(s) timed late: gone before the monitor saw their pid; their end is "
            "when the monitor found them gone (never early)"
        )
    # For a script that exited by itself after SIGTERM, its last line ("exit") is its last act: the
    # gap to the monitor's exit time bounds the monitor's lateness from above.
    lags = [
        r.end - r.last for r in runs if r.end is not None and r.end_how == "pidfd" and r.exit_at is not None
    ]
    if lags:
        report.monitor_lag_ms = round(max(lags) * 1000, 1)


def main(argv: list[str]) -> int:
    """``python -m tests.netns.checker DIR...``: check saved scenario directories again."""
    worst = 0
    for arg in argv:
        report = check(Path(arg))
        print(json.dumps(report.as_dict(), indent=2))
        worst = max(worst, 0 if report.passed else 1)
    return worst


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
