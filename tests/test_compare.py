"""bench/compare.py: its measures on made-up histories (everywhere), its smoke mode and its clean-up
on real namespace hosts (root, ip, nft, and the Debian packages etcd-server, etcd-client, keepalived).

The smoke run is the benchmark's own command (``python bench/compare.py --smoke``), so the per-commit
test run keeps the whole path alive: installing nothing, starting each system, every fault, the
tables and the PNGs. Its assertions are the benchmark's own findings that cannot depend on load:
pyquorum never ran two scripts at once, and after a kill -9 of etcdctl and of keepalived the old
script ran on (both leave it running: if the benchmark did not see that overlap, its measure is broken).
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from compare_report import Round, Run, Trial, markdown, measure, percentile, summarize  # noqa: E402

# ---- the measures (no root needed) ---------------------------------------------------------------


def _round(fault: str = "host-crash", **kw: float) -> Round:
    rnd = Round("sys", fault, 0, target=1, lanes=[0], t_before=10.0, t_after=10.01)
    rnd.t_heal = kw.get("t_heal", 20.0)
    rnd.t_end = kw.get("t_end", 22.0)
    agent_gone = kw.get("agent_gone")
    rnd.agent_gone = None if agent_gone is None else agent_gone
    return rnd


def test_measure_failover_is_old_last_line_to_new_first_line() -> None:
    runs = [Run(1, 0, 100, 1.0, 10.004, 10.02), Run(2, 0, 200, 11.0, 21.9, None)]
    t = measure(_round(), runs, 0)
    assert t.failover_s == pytest.approx(11.0 - 10.004)
    assert t.takeover_s == pytest.approx(1.0)
    assert t.overlap_s == 0.0
    assert not t.overlap_at_heal
    assert not t.overlap_censored
    assert t.new_host == 2
    assert t.successors == 1
    assert t.problems == []


def test_measure_no_gap_when_the_old_script_ran_on() -> None:
    # the old script never stopped: no failover gap, overlap from the new start to t_end, censored
    runs = [Run(1, 0, 100, 1.0, 21.99, None), Run(2, 0, 200, 12.0, 21.99, None)]
    t = measure(_round(), runs, 0)
    assert t.failover_s is None
    assert t.takeover_s == pytest.approx(2.0)
    assert t.overlap_s == pytest.approx(22.0 - 12.0)
    assert t.overlap_at_heal
    assert t.overlap_censored


def test_measure_overlap_ended_by_the_system_after_the_heal_is_not_censored() -> None:
    runs = [Run(1, 0, 100, 1.0, 20.4, 20.5), Run(2, 0, 200, 12.0, 21.99, None)]
    t = measure(_round("isolate"), runs, 0)
    assert t.overlap_s == pytest.approx(20.5 - 12.0)
    assert t.overlap_at_heal
    assert not t.overlap_censored
    # the isolated host's script ran from the isolation to the heal, beside the majority's
    assert t.minority_s == pytest.approx(20.0 - 10.01)
    assert t.minority_ran is True


def test_measure_minority_stopped_before_the_majority_started() -> None:
    runs = [Run(1, 0, 100, 1.0, 10.2, 10.21), Run(2, 0, 200, 10.5, 21.9, None)]
    t = measure(_round("isolate"), runs, 0)
    assert t.minority_s == pytest.approx(10.21 - 10.01)
    assert t.minority_ran is False
    assert t.failover_s == pytest.approx(10.5 - 10.2)


def test_measure_outlived_daemon() -> None:
    ran_on = [Run(1, 0, 100, 1.0, 21.99, None), Run(2, 0, 200, 13.0, 21.99, None)]
    t = measure(_round("daemon-crash", agent_gone=10.01), ran_on, 0)
    assert t.outlived is True
    assert t.outlived_s == pytest.approx(22.0 - 10.01)
    stopped = [Run(1, 0, 100, 1.0, 10.02, 10.03), Run(2, 0, 200, 11.0, 21.99, None)]
    t = measure(_round("daemon-crash", agent_gone=10.01), stopped, 0)
    assert t.outlived is False
    assert t.outlived_s == pytest.approx(0.02)


def test_measure_counts_a_lock_given_twice() -> None:
    runs = [
        Run(1, 0, 100, 1.0, 10.0, 10.01),
        Run(3, 0, 300, 12.0, 21.99, None),
        Run(2, 0, 200, 15.0, 21.99, None),
    ]
    t = measure(_round(), runs, 0)
    assert t.successors == 2
    assert t.new_host == 3
    assert t.overlap_s == pytest.approx(22.0 - 15.0)
    assert t.overlap_censored


def test_measure_only_its_own_lane_and_says_when_nothing_ran() -> None:
    other_lane = [Run(1, 1, 100, 1.0, 10.0, 10.01), Run(2, 1, 200, 11.0, 21.0, None)]
    t = measure(_round(), other_lane, 0)
    assert t.problems and t.failover_s is None
    no_successor = [Run(1, 0, 100, 1.0, 10.0, 10.01)]
    t = measure(_round(), no_successor, 0)
    assert t.takeover_s is None
    assert any("no successor" in p for p in t.problems)


def test_percentile_and_summary_ratios() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([1.0, 2.0], 90) == pytest.approx(1.9)
    assert math.isnan(percentile([], 50))
    trials = [
        Trial("ref", "host-crash", i, 0, 1, failover_s=1.0 + i / 10, takeover_s=1.0, successors=1)
        for i in range(3)
    ] + [
        Trial("other", "host-crash", i, 0, 1, failover_s=None, takeover_s=4.0, overlap_s=2.0, successors=2)
        for i in range(3)
    ]
    rows = summarize(trials, "ref")
    ref, other = rows
    assert ref.failover_median_s == pytest.approx(1.1)
    assert ref.vs_reference == pytest.approx(1.0)
    assert other.with_gap == 0 and other.vs_reference is None
    assert other.overlapped == 3 and other.two_successors == 3
    table = markdown(rows, "ref")
    assert "| other | 3 | — (0 with a gap)" in table
    assert "3/3" in table


# ---- the benchmark on real hosts ----------------------------------------------------------------

NETNS = pytest.mark.netns
COMMAND = [sys.executable, str(ROOT / "bench" / "compare.py")]


def _why_not() -> str | None:
    from compare_systems import unavailable

    reason = unavailable()
    if reason is not None:
        return reason
    missing = [cmd for cmd in ("etcd", "etcdctl", "keepalived") if shutil.which(cmd) is None]
    if missing:
        return f"no {', '.join(missing)} (apt-get install -y etcd-server etcd-client keepalived)"
    return None


@pytest.fixture(scope="module")
def hosts_ok() -> None:
    reason = _why_not()
    if reason is not None:
        pytest.skip(f"compare.py smoke test skipped: {reason}")


def _leftovers(pid: int) -> tuple[list[str], list[str], list[Path]]:
    """Namespaces, tagged processes and temp dirs of the run whose benchmark process was ``pid``."""
    from compare_systems import PREFIX, namespaces, tagged_pids

    prefix = f"{PREFIX}{pid}x"
    names = [ns for ns in namespaces() if ns.startswith(prefix)]
    procs = [f"{p} {tag}" for p, tag in tagged_pids(prefix).items()]
    dirs = list(Path("/tmp").glob(f"{prefix}*"))
    return names, procs, dirs


@NETNS
@pytest.mark.xdist_group("netns")
@pytest.mark.usefixtures("hosts_ok")
def test_compare_smoke(tmp_path: Path) -> None:
    """One trial per fault for pyquorum (tuned), etcdctl lock (smallest TTL) and keepalived."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [*COMMAND, "--smoke", "--out", str(out)], capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _leftovers(proc_pid_of(proc.stdout)) == ([], [], [])
    results = json.loads((out / "results.json").read_text())
    trials = results["trials"]
    systems = {s["system"] for s in results["systems"]}
    assert systems == {"pyquorum-tuned-3", "etcd-ttl2-3", "keepalived-3"}, systems
    for system in systems:
        for fault in ("host-crash", "daemon-crash", "isolate", "freeze", "planned-stop"):
            mine = [t for t in trials if t["system"] == system and t["fault"] == fault]
            assert len(mine) == 1, (system, fault, mine)
            assert mine[0]["takeover_s"] is not None, mine[0]
    pq = [t for t in trials if t["system"] == "pyquorum-tuned-3"]
    assert all(t["overlap_s"] == 0 for t in pq), pq
    assert all(t["failover_s"] is not None for t in pq), pq
    for system in ("etcd-ttl2-3", "keepalived-3"):
        crash = next(t for t in trials if t["system"] == system and t["fault"] == "daemon-crash")
        assert crash["outlived"] is True and crash["overlap_s"] > 0, crash
    summary = (out / "summary.md").read_text()
    assert "master daemon crash" in summary and "| pyquorum-tuned-3 |" in summary
    for png in ("failover.png", "overlap.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def proc_pid_of(stdout: str) -> int:
    # "run <pid>x<hex>: ..." is the benchmark's first line
    first = next(line for line in stdout.splitlines() if line.startswith("run "))
    return int(first.split()[1].split("x", 1)[0])


def _interrupt(tmp_path: Path, args: list[str], after: str, sig: signal.Signals | None) -> tuple[int, str]:
    """Run the benchmark, wait for a line containing ``after``, send ``sig`` (None: wait for it to
    fail by itself); return its exit code and output."""
    lines = []
    with subprocess.Popen(
        [*COMMAND, *args, "--out", str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            give_up = time.monotonic() + 300
            for line in proc.stdout:
                lines.append(line)
                if after in line and sig is not None:
                    proc.send_signal(sig)
                    break
                if time.monotonic() > give_up:
                    break
            code = proc.wait(120)
            lines += proc.stdout.readlines()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return code, "".join(lines)


@NETNS
@pytest.mark.xdist_group("netns")
@pytest.mark.usefixtures("hosts_ok")
@pytest.mark.parametrize(
    ("sig", "args", "after"),
    [
        (signal.SIGTERM, ["--systems", "etcd-min-3", "--smoke"], "round 1 "),
        (signal.SIGINT, ["--systems", "keepalived-3", "--smoke"], "up in"),
        (None, ["--systems", "pyquorum-tuned-3", "--smoke", "--fail-after", "1"], ""),
    ],
    ids=["sigterm", "sigint", "exception"],
)
def test_compare_cleans_up_when_interrupted(
    tmp_path: Path, sig: signal.Signals | None, args: list[str], after: str
) -> None:
    """Every namespace, rule (they live in the namespaces), process and temp dir goes, whether the
    benchmark is stopped by SIGTERM, by SIGINT or by an exception of its own."""
    code, output = _interrupt(tmp_path, args, after, sig)
    if sig is None:
        assert code == 1 and "--fail-after 1" in output, output[-3000:]
    else:
        assert code == 130 and "interrupted: cleaning up" in output, output[-3000:]
    assert "clean-up: 0 processes and 0 namespaces" in output, output[-3000:]
    pid = proc_pid_of(output)
    assert _leftovers(pid) == ([], [], []), output[-3000:]
