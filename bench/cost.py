"""The cost of idling: CPU, memory and datagrams per node of real daemons at the default timing, against N.

    python bench/cost.py [--sizes 3,5,7,15,25,51,101] [--windows 3] [--window-s 20] [--plot docs/cost.png]
    python bench/cost.py --scale [--sizes 25,51,101] [--minutes 10] [--crashes 3]

Real daemons (``python -m pyquorum``) on 127.0.0.x, run by the test harness (tests/harness:
``Cluster(n, Loopback())``) at the daemon's default timing (h = 0.1 s, E = 1 s), each with a script
(the harness's recording workload, ticking once a second), so that every follower keeps its standby
guard and the master its script's guard, as in production. It measures and prints, never asserts.

Cost mode, for each N: start the daemons a batch at a time (101 Python start-ups at once would take
the two cores for a minute: see ``start_staggered``), wait until one master runs its script and
every other node follows it, then measure ``--windows`` windows of ``--window-s`` seconds each:

- CPU per node: the daemon's and its guards' on-CPU time over the window, from
  ``/proc/<pid>/schedstat`` (nanoseconds; utime + stime of ``/proc/<pid>/stat`` are the same kernel
  sum split into user and system and rounded to 10 ms ticks, too coarse for 0.3% of a 20 s window:
  the whole measurement's utime + stime is printed beside it as a cross-check);
- datagrams per second per node, sent and received (accepted or refused), from each daemon's
  counters, asked over its control socket (``pyquorum status --json``'s document, whose
  ``uptime_s`` times them);
- memory per node: VmRSS of the daemon plus that of its guard (the standby guard on a follower, the
  script's guard on the master), at the end of the windows; PSS (shared pages divided among the
  processes that map them, from ``/proc/<pid>/smaps_rollup``) beside it, for information.

The figures are medians over the windows, for the master and for the followers (median of the
followers' medians, and the highest follower). The table gives the ratios to the targets (3 nodes:
a follower at most 0.3% of a core, the master 0.5%; daemon plus guard at most 30 MB RSS) and the
growth with N (a follower's datagrams per second should not depend on N, the master's grow as N - 1).
``--plot`` writes CPU per node and datagrams per second against N, master and followers apart
(matplotlib: ``pip install -e '.[bench]'``).

Scale mode, for each N: the cluster runs ``--minutes`` minutes, its statuses sampled every few
seconds; it reports every election started, every term change and every change of master in that
time (there should be none), and the CPU and datagrams per node over the whole run. Then, on the
largest N, ``--crashes`` times: the master's host is crashed (daemon, guard and script frozen and
SIGKILLed at one moment) and the time until the new master's script writes its ``start`` line is
reported against the failover bound of protocol.md §5.1 for that N; the killed node is restarted and
rejoins before the next crash. The harness's checker then confirms that no two script runs overlapped.

Everything a cluster starts is killed and its directory (logs, state dirs) removed when its ``with``
block ends, even after a failure. The source tree's modules are compiled to bytecode first, as an
installed package's are, so that 101 daemons do not each compile them (PYTHONDONTWRITEBYTECODE).
"""

from __future__ import annotations

import argparse
import compileall
import dataclasses
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import pyquorum
from pyquorum.core.lease import Timing
from pyquorum.runtime.storage import PersistedState, StateStore
from tests.harness.cluster import Cluster, ClusterError, Loopback, Node
from tests.harness.procfs import cmdline, cpu_ns, descendants, rss_mb, stat
from tests.timing import DEFAULT

SIZES = (3, 5, 7, 15, 25, 51, 101)
SCALE_SIZES = (25, 51, 101)
WORKLOAD = {"tick_s": 1.0}
START_BATCH = 8  # daemons started at once: each batch has written its status before the next starts
TARGET_FOLLOWER_CPU = 0.3  # % of one core, 3 nodes (issue 12)
TARGET_MASTER_CPU = 0.5
TARGET_RSS_MB = 30.0  # daemon + guard, per node
SAMPLE_S = 5.0  # scale mode: how often the statuses are read


def pss_mb(pid: int) -> float:
    """Proportional set size of ``pid`` in MB (shared pages divided among their users)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024.0
    raise ProcessLookupError(pid)


def ticks(pid: int) -> int:
    """utime + stime of ``pid`` so far, in clock ticks."""
    fields = stat(pid)
    if fields is None:
        raise ProcessLookupError(pid)
    return int(fields[11]) + int(fields[12])


def guards(node: Node) -> list[int]:
    """The node's guard processes (a standby guard, or the script's), by guard.py in their command line."""
    return [pid for pid in descendants(node.pid) if b"guard.py" in cmdline(pid)]


@dataclasses.dataclass
class Sample:
    """One reading of a node: its processes' CPU and its status counters."""

    cpu_ns: int
    ticks: int
    sent: int
    received: int
    status_at: float


def sample(c: Cluster, node: Node) -> Sample:
    # the counters are the control socket's (status.json holds only the role, term and master);
    # the CPU is read before the request: each window carries the cost of the one that opens it
    pids = [node.pid, *guards(node)]
    cpu, tck = sum(cpu_ns(p) for p in pids), sum(ticks(p) for p in pids)
    doc = c.query(node)
    counters = doc["counters"]
    return Sample(
        cpu,
        tck,
        sum(counters["datagrams_sent"].values()),
        sum(counters["datagrams_received"].values()) + sum(counters["datagrams_rejected"].values()),
        float(doc["uptime_s"]),
    )


@dataclasses.dataclass
class Rates:
    cpu_pct: float
    sent_s: float
    received_s: float


def rates(a: Sample, b: Sample, elapsed_s: float) -> Rates:
    span = b.status_at - a.status_at
    return Rates(
        (b.cpu_ns - a.cpu_ns) / 1e9 / elapsed_s * 100.0,
        (b.sent - a.sent) / span if span > 0 else math.nan,
        (b.received - a.received) / span if span > 0 else math.nan,
    )


# ---- clusters --------------------------------------------------------------------------------------


def compile_sources() -> None:
    """Bytecode for every module of this source tree, as pip writes it for an installed package."""
    compileall.compile_dir(Path(pyquorum.__file__).parent, quiet=1)


def start_staggered(c: Cluster, batch: int = START_BATCH) -> None:
    """Start every daemon, ``batch`` at a time, each initialised as ``pyquorum init`` does. They come
    up together: without a master a node keeps alive only the first live proposers before it
    (protocol.md §3.2), a few datagrams per h, so even 101 of them start on two cores (before that
    rule every node kept every peer alive, about 100,000 datagrams/s at 101 nodes, and 101 started
    together elected no master in 300 s)."""
    # what `pyquorum init` does on a brand-new cluster: else every node recovers (protocol.md §3.9),
    # campaigning only once it has heard every member
    for node in c.nodes:
        with StateStore(node.state_dir) as store:
            store.save(PersistedState(members=tuple(c.members)))
    nodes = list(c.nodes)
    for i in range(0, len(nodes), batch):
        c.start(nodes[i : i + batch])


def agreed_master(c: Cluster) -> Node | None:
    """The master, once it runs its script and every other node's status says it follows it."""
    m = c.master()
    if m is None:
        return None
    for node in c.nodes:
        st = c.status(node)
        if node is not m and (st is None or st["role"] != "slave" or st["master"] != m.name):
            return None
    return m


def settle(c: Cluster, timeout_s: float = 300.0) -> Node:
    m = c.wait_for(lambda: agreed_master(c), timeout_s, "a master that every node follows", interval_s=0.2)
    time.sleep(2 * c.timing.election_timeout_s)  # embargoes over, standby guards started
    return m


@dataclasses.dataclass
class SizeResult:
    n: int
    master: Rates
    followers: list[Rates]  # one per follower: its medians over the windows
    master_rss: float
    follower_rss: list[float]
    master_pss: float
    follower_pss: list[float]
    ticks_cpu_pct: float  # cross-check: all nodes' utime + stime over the whole measurement, per node
    start_s: float

    @property
    def follower_cpu(self) -> float:
        return statistics.median(r.cpu_pct for r in self.followers)

    @property
    def follower_sent(self) -> float:
        return statistics.median(r.sent_s for r in self.followers)

    @property
    def follower_received(self) -> float:
        return statistics.median(r.received_s for r in self.followers)


def median_rates(windows: Sequence[Rates]) -> Rates:
    return Rates(
        statistics.median(w.cpu_pct for w in windows),
        statistics.median(w.sent_s for w in windows),
        statistics.median(w.received_s for w in windows),
    )


def node_memory(node: Node) -> tuple[float, float]:
    pids = [node.pid, *guards(node)]
    return sum(rss_mb(p) for p in pids), sum(pss_mb(p) for p in pids)


def measure_size(n: int, timing: Timing, windows: int, window_s: float) -> SizeResult:
    with Cluster(n, Loopback(), timing=timing, workload=WORKLOAD, launch=False, check_on_exit=False) as c:
        t0 = time.monotonic()
        start_staggered(c)
        m = settle(c)
        start_s = time.monotonic() - t0
        # The harness's run monitor polls every 2 ms: not needed here, and it would compete with the
        # daemons for the two cores.
        c.monitor.stop()
        per_node: dict[str, list[Rates]] = {node.name: [] for node in c.nodes}
        first = {node.name: sample(c, node) for node in c.nodes}
        first_at = time.monotonic()
        before = first
        for _ in range(windows):
            t_a = time.monotonic()
            time.sleep(window_s)
            after = {node.name: sample(c, node) for node in c.nodes}
            elapsed = time.monotonic() - t_a
            for node in c.nodes:
                per_node[node.name].append(rates(before[node.name], after[node.name], elapsed))
            before = after
        total_s = time.monotonic() - first_at
        if agreed_master(c) is not m:
            print(f"  N={n}: the master changed during the measurement", flush=True)
        clk = os.sysconf("SC_CLK_TCK")
        ticks_pct = statistics.mean(
            (before[k].ticks - first[k].ticks) / clk / total_s * 100.0 for k in per_node
        )
        memory = {node.name: node_memory(node) for node in c.nodes}
        followers = [node for node in c.nodes if node is not m]
        return SizeResult(
            n=n,
            master=median_rates(per_node[m.name]),
            followers=[median_rates(per_node[f.name]) for f in followers],
            master_rss=memory[m.name][0],
            follower_rss=[memory[f.name][0] for f in followers],
            master_pss=memory[m.name][1],
            follower_pss=[memory[f.name][1] for f in followers],
            ticks_cpu_pct=ticks_pct,
            start_s=start_s,
        )


def print_table(results: Sequence[SizeResult]) -> None:
    print(
        "\n   N | CPU % of a core        | datagrams/s sent / received       | RSS MB daemon+guard | PSS MB"
        "\n     | master follower (max)  | master          follower          | master follower     | m / f"
    )
    for r in results:
        fmax = max(f.cpu_pct for f in r.followers)
        print(
            f"{r.n:4d} | {r.master.cpu_pct:6.2f} {r.follower_cpu:6.2f} ({fmax:5.2f}) "
            f"| {r.master.sent_s:7.1f} / {r.master.received_s:7.1f} {r.follower_sent:6.1f} / "
            f"{r.follower_received:6.1f}  | {r.master_rss:6.1f} "
            f"{statistics.median(r.follower_rss):6.1f}      "
            f"| {r.master_pss:4.1f} / {statistics.median(r.follower_pss):4.1f}"
        )
    print("\n   N | master sent/s per peer | follower sent/s vs N=3 | utime+stime cross-check | start-up")
    base = results[0].follower_sent
    for r in results:
        print(
            f"{r.n:4d} | {r.master.sent_s / (r.n - 1):8.2f}               | {r.follower_sent / base:8.2f}"
            f"               | {r.ticks_cpu_pct:6.2f} % per node        | {r.start_s:5.1f} s"
        )
    for r in results:
        if r.n == 3:
            rss = max(r.master_rss, *r.follower_rss)
            print(
                f"\ntargets at N=3: follower CPU {r.follower_cpu:.2f}% / {TARGET_FOLLOWER_CPU}% = "
                f"{r.follower_cpu / TARGET_FOLLOWER_CPU:.2f}; master CPU {r.master.cpu_pct:.2f}% / "
                f"{TARGET_MASTER_CPU}% = {r.master.cpu_pct / TARGET_MASTER_CPU:.2f}; highest RSS per node "
                f"{rss:.1f} MB / {TARGET_RSS_MB:g} MB = {rss / TARGET_RSS_MB:.2f}"
            )


def plot(results: Sequence[SizeResult], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no plot: matplotlib is missing (pip install -e '.[bench]'); {path} not written")
        return
    ns = [r.n for r in results]
    fig, (cpu, dgrams) = plt.subplots(1, 2, figsize=(8.0, 3.2), dpi=100)
    cpu.plot(ns, [r.master.cpu_pct for r in results], "o-", label="master")
    cpu.plot(ns, [r.follower_cpu for r in results], "s-", label="follower (median)")
    cpu.axhline(TARGET_MASTER_CPU, color="C0", linestyle=":", linewidth=1)
    cpu.axhline(TARGET_FOLLOWER_CPU, color="C1", linestyle=":", linewidth=1)
    cpu.set(xscale="log", yscale="log", xlabel="N (nodes)", ylabel="CPU, % of one core")
    cpu.set_title("idle CPU per node (dotted: 3-node targets)", fontsize=9)
    dgrams.plot(ns, [r.master.sent_s + r.master.received_s for r in results], "o-", label="master")
    dgrams.plot(ns, [r.follower_sent + r.follower_received for r in results], "s-", label="follower")
    dgrams.set(xscale="log", yscale="log", xlabel="N (nodes)", ylabel="datagrams/s, sent + received")
    dgrams.set_title("datagrams per node", fontsize=9)
    for ax in (cpu, dgrams):
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.grid(True, which="major", linewidth=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot written to {path}")


# ---- scale mode ------------------------------------------------------------------------------------

ELECTION_EVENTS = (
    "event=election_started",
    "event=became_candidate",
    "event=became_master",
    "event=new_term",
)


def log_sizes(c: Cluster) -> dict[str, int]:
    return {node.name: node.log_path.stat().st_size for node in c.nodes}


def log_events(c: Cluster, since: dict[str, int]) -> dict[str, int]:
    counts = dict.fromkeys(ELECTION_EVENTS, 0)
    for node in c.nodes:
        with node.log_path.open("rb") as f:
            f.seek(since.get(node.name, 0))
            text = f.read().decode(errors="replace")
        for event in ELECTION_EVENTS:
            counts[event] += text.count(event + " ")
    return counts


def watch(c: Cluster, master: Node, seconds: float) -> Iterator[str]:
    """Sample every status each ``SAMPLE_S`` for ``seconds``; yield a line for every change seen."""
    terms = {node.name: int(st["term"]) for node in c.nodes if (st := c.status(node)) is not None}
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(SAMPLE_S, left))
        for node in c.nodes:
            st = c.status(node)
            if st is None:
                yield f"{node} has no status"
                continue
            if int(st["term"]) != terms.get(node.name):
                yield f"{node} term {terms.get(node.name)} -> {st['term']}"
                terms[node.name] = int(st["term"])
            want = ("master", master.name) if node is master else ("slave", master.name)
            if (st["role"], st["master"]) != want:
                yield f"{node} role={st['role']} master={st['master']}"


def failover_bound_s(timing: Timing, n: int) -> float:
    """protocol.md §5.1's bound for ``n`` nodes, if it has one that depends on N; else the plain one."""
    bound: Callable[..., float] = timing.failover_bound_s
    try:
        return bound(n)
    except TypeError:
        return bound()


def crash_trials(c: Cluster, master: Node, crashes: int) -> list[tuple[float, float]]:
    """(failover, until every node follows the new master) for each crash of the master's host."""
    out = []
    for _ in range(crashes):
        t_kill = c.crash(master, host=True)
        run = c.wait_for_run(after=t_kill, timeout_s=120.0)
        new = c.node(run.node)
        c.restart(master)

        def all_follow(new: Node = new) -> Node | None:
            return new if agreed_master(c) is new else None

        c.wait_for(all_follow, 120.0, "every node to follow the new master", interval_s=0.2)
        rejoined = time.monotonic() - t_kill
        out.append((run.start - t_kill, rejoined))
        print(
            f"    crash of {master}: new master {new} runs its script {run.start - t_kill:.3f} s after "
            f"the crash; all {c.size} nodes follow it (the killed one restarted) after {rejoined:.1f} s",
            flush=True,
        )
        time.sleep(3 * c.timing.election_timeout_s)  # the restarted node's embargo, and calm
        master = new
    return out


def scale(n: int, timing: Timing, minutes: float, crashes: int) -> list[str]:
    problems: list[str] = []
    with Cluster(n, Loopback(), timing=timing, workload=WORKLOAD, launch=False, check_on_exit=False) as c:
        t0 = time.monotonic()
        start_staggered(c)
        m = settle(c)
        print(
            f"  N={n}: started in {time.monotonic() - t0:.1f} s, master {m}; watching {minutes:g} min",
            flush=True,
        )
        since = log_sizes(c)
        first = {node.name: sample(c, node) for node in c.nodes}
        t_a = time.monotonic()
        changes = list(watch(c, m, minutes * 60.0))
        elapsed = time.monotonic() - t_a
        last = {node.name: sample(c, node) for node in c.nodes}
        events = log_events(c, since)
        rows = {name: rates(first[name], last[name], elapsed) for name in first}
        followers = [rows[node.name] for node in c.nodes if node is not m]
        print(
            f"  N={n}: {elapsed / 60:.1f} min: elections started {events['event=election_started']}, "
            f"candidates {events['event=became_candidate']}, masters {events['event=became_master']}, "
            f"new terms {events['event=new_term']}; status changes seen: {len(changes)}"
        )
        for line in changes[:20]:
            print(f"    {line}")
        fcpu = [f.cpu_pct for f in followers]
        print(
            f"  N={n}: CPU master {rows[m.name].cpu_pct:.2f}%, followers median "
            f"{statistics.median(fcpu):.2f}% (max {max(fcpu):.2f}%), all {n} daemons "
            f"{sum(r.cpu_pct for r in rows.values()):.1f}% of a core; "
            f"datagrams/s master {rows[m.name].sent_s:.0f} sent {rows[m.name].received_s:.0f} received, "
            f"follower {statistics.median(f.sent_s for f in followers):.1f} / "
            f"{statistics.median(f.received_s for f in followers):.1f}",
            flush=True,
        )
        if changes or any(events.values()):
            problems.append(f"N={n}: {len(changes)} status changes, log events {events}")
        if crashes:
            bound = failover_bound_s(timing, n)
            took = crash_trials(c, m, crashes)
            fail = [t for t, _ in took]
            print(
                f"  N={n}: crash failover median {statistics.median(fail):.3f} s, max {max(fail):.3f} s "
                f"(n={len(fail)}); protocol.md §5.1 bound {bound:.3f} s: max/bound {max(fail) / bound:.2f}; "
                f"every node following again: median {statistics.median(a for _, a in took):.1f} s",
                flush=True,
            )
            if max(fail) > bound:
                problems.append(f"N={n}: a failover took {max(fail):.3f} s, above the bound {bound:.3f} s")
        try:
            c.check()
        except AssertionError as exc:
            problems.append(f"N={n}: checker: {exc}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--sizes", help="comma-separated cluster sizes (cost: 3,5,7,15,25,51,101; scale: 25,51,101)"
    )
    ap.add_argument("--windows", type=int, default=3, help="measurement windows per size (3)")
    ap.add_argument("--window-s", type=float, default=20.0, help="length of each window, s (20)")
    ap.add_argument("--plot", type=Path, default=Path("docs/cost.png"), help="PNG to write (docs/cost.png)")
    ap.add_argument("--scale", action="store_true", help="run the scale mode instead")
    ap.add_argument("--minutes", type=float, default=10.0, help="scale mode: minutes per size (10)")
    ap.add_argument("--crashes", type=int, default=3, help="scale mode: master crashes at the largest N (3)")
    args = ap.parse_args()
    sizes = (
        [int(s) for s in args.sizes.split(",")] if args.sizes else list(SCALE_SIZES if args.scale else SIZES)
    )
    compile_sources()
    timing = DEFAULT
    print(
        f"pyquorum idle cost, real daemons on loopback, default timing ({timing.describe()}), "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    if args.scale:
        problems = []
        for n in sizes:
            problems += scale(n, timing, args.minutes, args.crashes if n == max(sizes) else 0)
        print("\n" + ("PROBLEMS:\n" + "\n".join(problems) if problems else "scale: no problem found"))
        return 1 if problems else 0
    results = []
    for n in sizes:
        load = os.getloadavg()[0]
        try:
            r = measure_size(n, timing, args.windows, args.window_s)
        except ClusterError as exc:  # reported, and the other sizes still measured
            print(
                f"  N={n}: NOT MEASURED (load average {load:.1f} -> {os.getloadavg()[0]:.1f}): "
                f"{str(exc).splitlines()[0]}",
                flush=True,
            )
            continue
        results.append(r)
        print(
            f"  N={n}: master {r.master.cpu_pct:.2f}% follower {r.follower_cpu:.2f}% of a core, "
            f"{r.master.sent_s:.1f} / {r.follower_sent:.1f} datagrams/s sent, RSS {r.master_rss:.1f} / "
            f"{statistics.median(r.follower_rss):.1f} MB (started and settled in {r.start_s:.1f} s)",
            flush=True,
        )
    if not results:
        return 1
    print_table(results)
    if args.plot and len(results) > 1:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
