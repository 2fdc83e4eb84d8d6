"""Failover, handover, start-up, idle CPU and memory of a real 3-node cluster on loopback.

    python bench/cluster.py [--trials 30] [--starts 5] [--idle-seconds 10]

Real daemons (``python -m pyquorum``) on three 127.0.0.x addresses, run by the test harness
(tests/harness: ``Cluster(3, Loopback())``), with its recording workload as the script. It measures,
and prints, never asserts (speed is shown by measurements, never by timed tests):

- start-up: from spawning the daemons (and from the moment all of them had written status.json) to the
  first master's script writing its ``start`` line, over ``--starts`` fresh clusters;
- crash failover: the master's daemon, guard and script are frozen and SIGKILLed at a random moment;
  time until the new master's script writes its ``start`` line; the killed node is restarted and left
  to rejoin for E before the next trial. ``--trials`` trials, default and tuned timing;
- planned handover: SIGTERM to the master's daemon; the workload exits at once on SIGTERM; time from
  the old script's ``exit`` line to the new script's ``start`` line (and from the SIGTERM);
- idle CPU (% of one core, from /proc/<pid>/stat utime + stime over ``--idle-seconds``) and RSS (VmRSS)
  of each daemon, and of the master's guard, with default timing.

A script's ``start`` line comes after the workload's Python interpreter has started (the guard's was
started ahead of time, in standby, unless it was not ready yet: see pyquorum.supervisor): every
"until the script runs" figure includes it, as an operator would see it. The last line says whether
the workload's records show any two runs overlapping (they must not).
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyquorum.core.lease import Timing
from tests.harness.cluster import Cluster, Loopback, Node
from tests.harness.procfs import cpu_seconds, descendants, rss_mb
from tests.timing import DEFAULT, TUNED

WORKLOAD = {"tick_s": 0.01}
NODES = 3


def p99(values: Sequence[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def line(what: str, values: Sequence[float], target: float | None = None, unit: str = "s") -> str:
    med = statistics.median(values)
    text = (
        f"  {what:<34} median {med:7.3f} {unit}  p99 {p99(values):7.3f} {unit}  max {max(values):7.3f} {unit}"
    )
    text += f"  (n={len(values)})"
    if target is not None:
        text += f"  median/target {med / target:.2f}"
    return text


def interpreter_start_s(samples: int = 15) -> list[float]:
    """How long ``python -I -S -c pass`` takes here: the share of every "script start" figure that is
    the workload's own interpreter (the guard costs about twice that, plus its imports)."""
    took = []
    for _ in range(samples):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True)
        took.append(time.monotonic() - t0)
    return took


def follows(c: Cluster, node: Node, master: Node) -> bool:
    st = c.status(node)
    return st is not None and st["role"] == "slave" and st["master"] == master.name


def rejoin(c: Cluster, node: Node, master: Node) -> None:
    """Restart ``node``, wait until it follows ``master`` and its restart embargo (E) is over."""
    c.restart(node)
    c.wait_for(lambda: follows(c, node, master), 30.0, f"{node} to rejoin")
    time.sleep(c.timing.election_timeout_s * 1.2)


def startup(timing: Timing, starts: int) -> tuple[list[float], list[float]]:
    from_spawn, from_ready = [], []
    for _ in range(starts):
        with Cluster(NODES, Loopback(), timing=timing, workload=WORKLOAD, check_on_exit=False) as c:
            run = c.wait_for_run()
            assert c.started_at is not None and c.ready_at is not None
            from_spawn.append(run.start - c.started_at)
            from_ready.append(run.start - c.ready_at)
            check(c)
    return from_spawn, from_ready


def crash_failover(timing: Timing, trials: int) -> list[float]:
    took = []
    with Cluster(NODES, Loopback(), timing=timing, workload=WORKLOAD, check_on_exit=False) as c:
        master = c.wait_for_master()
        time.sleep(timing.election_timeout_s * 1.2)
        for _ in range(trials):
            time.sleep(random.uniform(0, 2 * timing.heartbeat_interval_s))
            t_kill = c.crash(master, host=True)
            run = c.wait_for_run(after=t_kill)
            took.append(run.start - t_kill)
            new = c.node(run.node)
            rejoin(c, master, new)
            master = new
        check(c)
    return took


def handover(timing: Timing, trials: int) -> tuple[list[float], list[float]]:
    from_exit, from_signal = [], []
    with Cluster(NODES, Loopback(), timing=timing, workload=WORKLOAD, check_on_exit=False) as c:
        master = c.wait_for_master()
        time.sleep(timing.election_timeout_s * 1.2)
        for _ in range(trials):
            status = c.status(master)
            assert status is not None
            pid = status["script_pid"]
            t_term = c.shutdown(master)
            run = c.wait_for_run(after=t_term)
            c.wait_exit(master)
            old = next(r for r in c.runs() if r.pid == pid)
            assert old.exit_at is not None
            from_exit.append(run.start - old.exit_at)
            from_signal.append(run.start - t_term)
            new = c.node(run.node)
            rejoin(c, master, new)
            master = new
        check(c)
    return from_exit, from_signal


def idle(timing: Timing, seconds: float) -> list[tuple[str, str, float, float]]:
    rows = []
    with Cluster(NODES, Loopback(), timing=timing, workload={"tick_s": 0.1}, check_on_exit=False) as c:
        master = c.wait_for_master()
        time.sleep(timing.election_timeout_s * 2)
        pids: list[tuple[str, str, int]] = [(n.name, "daemon", n.pid) for n in c.nodes]
        guard = descendants(master.pid)[0]
        pids.append((master.name, "guard", guard))
        before = {pid: cpu_seconds(pid) for _, _, pid in pids}
        t0 = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - t0
        for name, what, pid in pids:
            cpu = (cpu_seconds(pid) - before[pid]) / elapsed * 100.0
            rows.append(
                (
                    name + (" (master)" if name == master.name and what == "daemon" else ""),
                    what,
                    cpu,
                    rss_mb(pid),
                )
            )
        check(c)
    return rows


problems: list[str] = []


def check(c: Cluster) -> None:
    try:
        c.check()
    except AssertionError as exc:
        problems.append(str(exc))


def timed(what: str, fn: Callable[[], None]) -> None:
    t0 = time.monotonic()
    fn()
    print(f"  ({what}: {time.monotonic() - t0:.0f} s of benchmarking)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=30, help="crash failovers and handovers per timing (30)")
    ap.add_argument("--starts", type=int, default=5, help="fresh cluster start-ups per timing (5)")
    ap.add_argument("--idle-seconds", type=float, default=10.0, help="idle CPU measurement window (10)")
    args = ap.parse_args()
    print(f"pyquorum {NODES}-node cluster on loopback, real processes; failover targets: median 2 s, p99 3 s")
    print(line("python -I -S start-up (reference)", interpreter_start_s()))
    for name, timing in (("default", DEFAULT), ("tuned", TUNED)):
        t = timing
        print(
            f"\n{name} timing: --heartbeat-interval {t.heartbeat_interval_s:g} --election-timeout "
            f"{t.election_timeout_s:g} --stop-timeout {t.stop_timeout_s:g} "
            f"(failover bound {t.failover_bound_s():.3f} s + script start)",
            flush=True,
        )

        def start_up(timing: Timing = timing) -> None:
            spawn, ready = startup(timing, args.starts)
            print(line("start to first script (spawn)", spawn), flush=True)
            print(line("start to first script (ready)", ready), flush=True)

        def crash(timing: Timing = timing, name: str = name) -> None:
            took = crash_failover(timing, args.trials)
            print(line("crash failover", took, 2.0 if name == "default" else 0.5), flush=True)
            if name == "default":
                print(f"  {'':<34} p99/target(3 s) {p99(took) / 3.0:.2f}")

        def hand(timing: Timing = timing) -> None:
            from_exit, from_signal = handover(timing, args.trials)
            print(line("handover (script exit -> start)", from_exit, 0.1), flush=True)
            print(line("handover (SIGTERM -> start)", from_signal), flush=True)

        timed("start-up", start_up)
        timed("crash", crash)
        timed("handover", hand)
    print(f"\nidle, default timing, over {args.idle_seconds:g} s (targets: CPU < 1% of a core, RSS < 40 MB)")
    for node, what, cpu, rss in idle(DEFAULT, args.idle_seconds):
        ratios = f"ratio {cpu / 1.0:.2f}   RSS {rss:5.1f} MB  ratio {rss / 40:.2f}"
        print(f"  {node:<28} {what:<7} CPU {cpu:5.2f} %  {ratios}")
    print()
    if problems:
        print("CHECKER FOUND PROBLEMS:\n" + "\n".join(problems))
        return 1
    print(
        "checker: no two script runs overlapped, tokens increased, the register held, no Traceback in a log"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
