"""pyquorum side by side with what operators would run instead, on the same hosts, faults and run.

    python bench/compare.py [--seed 1] [--trials 30] [--out reports/compare]   # the full benchmark
    python bench/compare.py --smoke --out DIR       # one trial per fault and system, under 90 s
    python bench/compare.py --report DIR            # the tables and plots again from DIR/results.json

Needs root, iproute2 and nftables (network namespaces, as tests/netns); installs etcd-server,
etcd-client and keepalived from Debian when they are missing; plots need matplotlib
(``pip install .[bench]``). Method, configuration and results: docs/benchmarks.md.

What it does. For each system (pyquorum at the default and the tuned timing on 3 and 5 hosts,
``etcdctl lock`` at TTL 10 and at the smallest TTL etcd grants, keepalived), on the same namespace
hosts (tests/netns/hosts.py), it starts the system with several lanes (compare_systems.py), then runs
rounds until every fault has ``--trials`` trials. A round: wait until every lane's script runs on
one host and nothing else runs; sleep a seeded random fraction of the system's renewal period; inject
one fault into the host that runs the most lanes; wait until every affected lane has a successor (or
the system's timeout); watch ``OBSERVE_S`` more; undo the fault (heal the network, SIGCONT); give the
system ``SETTLE_S`` to end duplicate scripts by itself; then end whatever it did not (the benchmark's
own intervention, marked as such: "censored"), restart what is down and wait until every lane is
back to one script. compare_report.py turns each round into one trial per affected lane.

The faults, on the host whose script runs:

- ``host-crash``: every process of the host (daemon, script, and the etcd member) SIGSTOPped, then
  SIGKILLed, at one moment; brought back by starting its processes again;
- ``daemon-crash``: the daemon alone (pyquorum, etcdctl, every keepalived process) the same way;
- ``isolate``: nftables drops everything to and from the host (tests/netns/hosts.py ``isolate``);
- ``freeze``: SIGSTOP of the daemon alone, SIGCONT once the successor ran for ``OBSERVE_S``;
- ``planned-stop``: each system's own clean stop: SIGTERM to pyquorum and to keepalived, SIGTERM to
  etcdctl's process group (what systemd does; etcdctl ignores a SIGTERM sent to it alone).

Clean-up. Every namespace, nft rule (they live in the namespaces) and process it made is removed at
the end, on an exception, on SIGINT and on SIGTERM (turned into KeyboardInterrupt, which unwinds
through every ``finally``); processes die with it if it is SIGKILLed (PDEATHSIG), and the next run
(or the netns test suite) sweeps what a killed run left, by the dead pid in its names. Host usage
takes the netns suite's lock (one system at a time), so the benchmark and the suite never share
the CPU while measuring.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import shutil
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import compare_report as report
from compare_report import FAULTS, Round, Trial
from compare_systems import (
    FAILURES,
    BenchError,
    EtcdLock,
    Keepalived,
    Lab,
    Pyquorum,
    System,
    alive,
    exclusive,
    install_packages,
    signal_all,
    unavailable,
    versions,
    wait_for,
)

from tests.timing import DEFAULT, TUNED

# After every lane has its successor: how long to watch for the old script to stop by itself.
OBSERVE_S = 1.0
# After the fault is undone: how long the system gets to end a duplicate script by itself (three
# keepalived adverts; pyquorum never has one to end).
SETTLE_S = 3.0
# The smoke mode exercises the same code with shorter watches (its overlaps are more often censored).
SMOKE_OBSERVE_S = 0.5
SMOKE_SETTLE_S = 1.5
REFERENCE = "pyquorum-default-3"
ETCD_TTL_DEFAULT_S = 10


def log(text: str) -> None:
    print(text, flush=True)


# ---- one round ----------------------------------------------------------------------------------


@dataclass
class Plan:
    """The systems and how many trials; ``fail_after`` raises after that many rounds (tests the
    clean-up on an exception)."""

    systems: list[str]
    faults: list[str]
    trials: int
    lanes: dict[str, int]
    smoke: bool
    observe_s: float = OBSERVE_S
    settle_s: float = SETTLE_S
    fail_after: int | None = None


def holders(system: System) -> dict[int, int]:
    return {lane: hs[0] for lane, hs in system.live().items() if len(hs) == 1}


def inject(system: System, fault: str, target: int) -> str:
    if fault == "host-crash":
        return system.crash_host(target)
    if fault == "daemon-crash":
        return system.crash_daemon(target)
    if fault == "freeze":
        return system.freeze(target)
    if fault == "planned-stop":
        return system.planned_stop(target)
    if fault == "isolate":
        system.net.isolate(target)
        system.net.apply()
        return f"nft: h{target} isolated"
    raise ValueError(f"unknown fault {fault!r}")


def undo(system: System, fault: str, target: int, dropped_before: int) -> str:
    """Undo ``fault`` where undoing is not a restart (SIGCONT, heal); returns evidence."""
    if fault == "freeze":
        system.thaw(target)
        return "SIGCONT"
    if fault == "isolate":
        net = system.net
        dropped = net.dropped() - dropped_before
        net.heal()
        net.apply()
        if dropped <= 0:
            raise BenchError(f"isolation of h{target} dropped no packet: not injected")
        return f"healed; nft dropped {dropped} packets"
    return ""


def kill_extras(system: System) -> list[int]:
    """In each lane, SIGKILL every script but the lock holder's (``System.extras``): what the system
    itself did not end."""
    victims = []
    for lane, runs in system.live_pids().items():
        if len(runs) > 1:
            victims += system.extras(lane, runs)
    signal_all(victims, signal.SIGKILL)
    wait_for("the extra scripts to be gone", lambda: not any(alive(p) for p in victims), 10.0)
    return victims


def run_round(
    system: System, fault: str, index: int, rng: random.Random, plan: Plan
) -> tuple[Round, list[Trial]]:
    held = holders(system)
    target = collections.Counter(held.values()).most_common(1)[0][0]
    lanes = sorted(lane for lane, h in held.items() if h == target)
    time.sleep(rng.uniform(0, system.period_s()))
    agents_before = system.agents(target)
    dropped_before = system.net.dropped() if fault == "isolate" else 0
    context = system.context()
    t_before = time.monotonic()
    evidence = inject(system, fault, target)
    t_after = time.monotonic()
    rnd = Round(system.name, fault, index, target, lanes, t_before, t_after, evidence=evidence)
    if context:
        rnd.evidence = f"{context}; {evidence}"
    if fault == "daemon-crash":
        rnd.agent_gone = t_after
    give_up = t_before + system.successor_timeout_s()

    def all_succeeded() -> bool:
        runs = system.runs()
        return all(
            any(r.lane == lane and r.host != target and r.start > t_before for r in runs) for lane in lanes
        )

    while time.monotonic() < give_up:
        if fault == "planned-stop" and rnd.agent_gone is None and not any(alive(p) for p in agents_before):
            rnd.agent_gone = time.monotonic()
        if all_succeeded() and (fault != "planned-stop" or rnd.agent_gone is not None):
            break
        time.sleep(0.005)
    time.sleep(plan.observe_s)
    rnd.t_heal = time.monotonic()
    note = undo(system, fault, target, dropped_before)
    if note:
        rnd.evidence += "; " + note
    settle_until = time.monotonic() + plan.settle_s
    while time.monotonic() < settle_until and any(len(r) > 1 for r in system.live_pids().values()):
        time.sleep(0.01)
    rnd.t_end = time.monotonic()
    killed = kill_extras(system)
    if killed:
        rnd.evidence += f"; the benchmark ended {len(killed)} script(s) the system left running"
    return rnd, [report.measure(rnd, system.runs(), lane) for lane in lanes]


def recover(system: System, rnd: Round) -> None:
    """Bring ``system`` back to full strength after ``rnd``: every lane one script, every host ready."""
    system.restore(rnd.target, rnd.fault)
    wait_for(f"{system.name}: one script per lane again", system.steady, 30.0)


def run_system(system: System, plan: Plan, rng: random.Random, out: dict[str, Any]) -> None:
    """Start ``system``, run rounds until every fault has ``plan.trials`` trials. Rounds and trials
    go into ``out`` as they happen, so a system that fails half-way keeps what it measured."""
    started = time.monotonic()
    entry = {**system.config(), "load_before": [round(x, 2) for x in os.getloadavg()]}
    out["systems"].append(entry)
    try:
        _rounds(system, plan, rng, out, entry)
    finally:
        entry.update(
            seconds=round(time.monotonic() - started, 1),
            load_after=[round(x, 2) for x in os.getloadavg()],
            monitor_max_gap_ms=round(system.monitor_max_gap_s() * 1000, 1),
            problems=system.problems(),
        )


def _rounds(
    system: System, plan: Plan, rng: random.Random, out: dict[str, Any], entry: dict[str, Any]
) -> None:
    started = time.monotonic()
    system.start()
    entry.update(system.config())
    if isinstance(system, EtcdLock) and system.ttl_probe:
        log(f"[{system.name}] etcdctl lease grant 1..5 s -> granted {system.ttl_probe}: TTL {system.ttl_s} s")
    log(f"[{system.name}] up in {time.monotonic() - started:.1f} s; lanes {system.lanes}")
    wait_for(f"{system.name}: one script per lane", system.steady, 30.0)
    if isinstance(system, EtcdLock):
        probe_steady(system, 2.0 if plan.smoke else 10.0, out)
    need = {f: plan.trials for f in plan.faults}
    per_fault = math.ceil(plan.trials / system.lanes)
    queue = [f for f in plan.faults for _ in range(per_fault)]
    rng.shuffle(queue)
    max_rounds = 3 * len(queue) + 3
    index = 0
    while any(v > 0 for v in need.values()):
        if not queue:
            queue = [f for f, v in need.items() if v > 0]
            rng.shuffle(queue)
        fault = queue.pop()
        if need[fault] <= 0:
            continue
        if index >= max_rounds:
            raise BenchError(f"{system.name}: {max_rounds} rounds and still short of trials: {need}")
        if plan.fail_after is not None and out["rounds_done"] >= plan.fail_after:
            raise RuntimeError(f"--fail-after {plan.fail_after}: raising to test the clean-up")
        rnd, new = run_round(system, fault, index, rng, plan)
        index += 1
        out["rounds_done"] += 1
        out["rounds"].append(asdict(rnd))
        out["trials"] += [t.as_dict() for t in new]
        need[fault] -= len(new)
        recover(system, rnd)
        takeovers = [t.takeover_s for t in new if t.takeover_s is not None]
        log(
            f"[{system.name}] round {index} {fault} h{rnd.target}: {len(new)} trials, "
            f"successor after {statistics.median(takeovers) if takeovers else math.nan:.3f} s (median), "
            f"overlapped {sum(t.overlap_s > 0 for t in new)}/{len(new)}"
        )


def probe_steady(system: EtcdLock, seconds: float, out: dict[str, Any]) -> None:
    """At this TTL, does the lock hold with no fault at all? Every lane must keep its one script."""
    before = {lane: hs for lane, hs in system.live().items()}
    pids_before = {r.pid for r in system.runs()}
    time.sleep(seconds)
    changed = {r.pid for r in system.runs()} - pids_before
    steady = not changed and system.live() == before
    out.setdefault("etcd_steady_probe", {})[system.name] = {
        "seconds": seconds,
        "lanes": system.lanes,
        "new_runs": len(changed),
        "steady": steady,
    }
    log(f"[{system.name}] {seconds:.0f} s with no fault: {len(changed)} new runs, steady={steady}")
    if not steady:
        raise BenchError(f"{system.name}: the lock moved with no fault (TTL {system.ttl_s} s unreliable)")


# ---- the whole run ------------------------------------------------------------------------------


def build(name: str, lab: Lab, lanes: int, out: dict[str, Any]) -> System:
    workdir = lab.tmp / name
    if name.startswith("pyquorum-"):
        _, profile, n = name.split("-")
        timing = DEFAULT if profile == "default" else TUNED
        return Pyquorum(name, lab.network(int(n)), workdir, lanes, timing, lab.key_file)
    if name.startswith("etcd-"):
        return EtcdLock(
            name, lab.network(3), workdir, lanes, None if name == "etcd-min-3" else ETCD_TTL_DEFAULT_S
        )
    if name == "keepalived-3":
        return Keepalived(name, lab.network(3), workdir, lanes)
    raise ValueError(name)


def write_results(out_dir: Path, out: dict[str, Any]) -> None:
    (out_dir / "results.json").write_text(json.dumps(out, indent=1) + "\n")


def render(out_dir: Path, out: dict[str, Any]) -> str:
    """summary.md and the PNGs from ``out``; returns the summary text."""
    trials = [Trial(**t) for t in out["trials"]]
    systems = [s["system"] for s in out["systems"]]
    reference = REFERENCE if REFERENCE in systems else (systems[0] if systems else None)
    rows = report.summarize(trials, reference)
    text = [f"Seed {out['seed']}, {out['trials_per_fault']} trials per fault and system; {out['machine']}.\n"]
    text.append(report.markdown(rows, reference))
    text.append(report.documented_table(rows, out["systems"]))
    try:
        paths = report.plot(trials, out_dir, systems) if trials else []
        text.append("Plots: " + ", ".join(p.name for p in paths))
    except ImportError:
        text.append("Plots skipped: matplotlib is not installed (pip install '.[bench]').")
    summary = "\n".join(text) + "\n"
    (out_dir / "summary.md").write_text(summary)
    return summary


def machine() -> str:
    return f"{os.cpu_count()} CPUs, load {', '.join(f'{x:.2f}' for x in os.getloadavg())} at the start"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    p.add_argument("--seed", type=int, default=1, help="seeds the fault order and phases (default 1)")
    p.add_argument("--trials", type=int, default=30, help="trials per fault and system (default 30)")
    p.add_argument("--smoke", action="store_true", help="one trial per fault and system, 3 systems")
    p.add_argument("--out", type=Path, default=Path("reports/compare"), help="results directory")
    p.add_argument("--systems", help="comma-separated subset of the systems (see --list)")
    p.add_argument("--faults", help=f"comma-separated subset of {','.join(FAULTS)}")
    p.add_argument("--list", action="store_true", help="print the systems and exit")
    p.add_argument("--report", type=Path, metavar="DIR", help="only re-render DIR/results.json")
    p.add_argument("--fail-after", type=int, metavar="N", help=argparse.SUPPRESS)
    return p.parse_args(argv)


FULL = [
    "pyquorum-default-3",
    "pyquorum-tuned-3",
    "pyquorum-default-5",
    "pyquorum-tuned-5",
    "etcd-ttl10-3",
    "etcd-min-3",
    "keepalived-3",
]
SMOKE = ["pyquorum-tuned-3", "etcd-min-3", "keepalived-3"]
# Lanes per system kind: etcd and keepalived cost almost no CPU per lane; pyquorum daemons do, and
# the tuned ones send 50 heartbeat rounds a second, so fewer lanes (more rounds) keep the hosts quiet.
LANES = {"pyquorum": 3, "etcd": 6, "keepalived": 6}


def make_plan(args: argparse.Namespace) -> Plan:
    systems = SMOKE if args.smoke else FULL
    if args.systems:
        systems = [s.strip() for s in args.systems.split(",") if s.strip()]
        unknown = [s for s in systems if s not in FULL]
        if unknown:
            raise SystemExit(f"compare.py: unknown system(s) {unknown}; known: {', '.join(FULL)}")
    faults = list(FAULTS)
    if args.faults:
        faults = [f.strip() for f in args.faults.split(",") if f.strip()]
        unknown = [f for f in faults if f not in FAULTS]
        if unknown:
            raise SystemExit(f"compare.py: unknown fault(s) {unknown}; known: {', '.join(FAULTS)}")
    trials = 1 if args.smoke else args.trials
    if trials < 1:
        raise SystemExit("compare.py: --trials must be at least 1")
    lanes = {k: 1 for k in LANES} if args.smoke else dict(LANES)
    if args.smoke:
        return Plan(systems, faults, trials, lanes, True, SMOKE_OBSERVE_S, SMOKE_SETTLE_S, args.fail_after)
    return Plan(systems, faults, trials, lanes, False, fail_after=args.fail_after)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(FULL))
        return 0
    if args.report is not None:
        print(render(args.report, json.loads((args.report / "results.json").read_text())))
        return 0
    plan = make_plan(args)
    reason = unavailable()
    if reason is not None:
        print(f"compare.py: cannot run: {reason}", file=sys.stderr)
        return 2
    if any(s.startswith(("etcd", "keepalived")) for s in plan.systems):
        try:
            install_packages(log)
        except BenchError as exc:
            print(f"compare.py: {exc}", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    out: dict[str, Any] = {
        "seed": args.seed,
        "trials_per_fault": plan.trials,
        "smoke": plan.smoke,
        "machine": machine(),
        "versions": versions(),
        "observe_s": plan.observe_s,
        "settle_s": plan.settle_s,
        "command": "python bench/compare.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "systems": [],
        "rounds": [],
        "trials": [],
        "rounds_done": 0,
        "errors": [],
    }
    previous = signal.getsignal(signal.SIGTERM)
    previous_int = signal.getsignal(signal.SIGINT)

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through every finally: systems, then the lab

    signal.signal(signal.SIGTERM, on_sigterm)
    # Python leaves SIGINT ignored when it starts with it ignored (a background job, a pytest-xdist
    # worker's child): Ctrl-C or kill -INT must clean up all the same.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    lab: Lab | None = None
    try:
        lab = Lab()
        log(f"run {lab.run}: {', '.join(plan.systems)}; {plan.trials} trials per fault; seed {args.seed}")
        for name in plan.systems:
            waiting = time.monotonic()
            with exclusive():  # the netns suite's lock (tests/netns/hosts.py): one user of the hosts
                waited_s = time.monotonic() - waiting
                if waited_s > 1.0:
                    log(f"[{name}] waited {waited_s:.0f} s for the netns hosts' lock")
                out["lock_wait_s"] = round(out.get("lock_wait_s", 0.0) + waited_s, 1)
                system = build(name, lab, plan.lanes[_kind(name)], out)
                try:
                    run_system(system, plan, rng, out)
                except FAILURES as exc:
                    out["errors"].append(f"{system.name}: {exc}")
                    log(f"[{system.name}] FAILED: {exc}")
                    failed = True
                else:
                    failed = False
                finally:
                    system.close()
                if failed:
                    kept = args.out / f"failed-{system.name}"
                    shutil.rmtree(kept, ignore_errors=True)
                    ignore = shutil.ignore_patterns("state", "etcd-data-*", "*.key", "workload")
                    shutil.copytree(system.workdir, kept, ignore=ignore)
                    log(f"[{system.name}] its files are kept in {kept}")
            write_results(args.out, out)
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        if lab is not None:
            log(lab.close())
    out["seconds"] = round(time.monotonic() - started, 1)
    out["machine_after"] = f"load {', '.join(f'{x:.2f}' for x in os.getloadavg())} at the end"
    write_results(args.out, out)
    print(render(args.out, out))
    log(f"done in {out['seconds']:.0f} s; results in {args.out}")
    return 1 if out["errors"] else 0


def _kind(name: str) -> str:
    return name.split("-", 1)[0]


if __name__ == "__main__":
    raise SystemExit(main())
