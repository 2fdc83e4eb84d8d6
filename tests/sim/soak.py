"""Soak mode: many randomized schedules in parallel, far more than the per-commit run.

    python -m tests.sim.soak --schedules 100000 --workers 2 [--first-seed 1000000] [--duration 60]
    python -m tests.sim.soak --node-counts 25,51,101 --schedules 300   # large clusters only
    python -m tests.sim.soak --seed 342 --nodes 1        # reproduce one failing schedule, with trace

Not run by CI. Prints progress, the simulated cluster-hours (simulated seconds x nodes, and plain
simulated time), and every violation with its seed; exits 1 if any schedule failed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections.abc import Iterator

from tests.sim.nemesis import NODE_COUNTS, run_schedule
from tests.sim.sim import Violation


def _one(job: tuple[int, int, float]) -> tuple[int, int, float, int, str | None]:
    seed, n, duration = job
    try:
        r = run_schedule(seed, n, duration=duration)
    except Violation as exc:
        return seed, n, 0.0, 0, str(exc)
    return seed, n, r.simulated_s, r.faults, None


def _jobs(
    first: int, count: int, duration: float, sizes: tuple[int, ...]
) -> Iterator[tuple[int, int, float]]:
    for i in range(count):
        seed = first + i
        yield seed, sizes[seed % len(sizes)], duration


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schedules", type=int, default=100_000)
    ap.add_argument("--first-seed", type=int, default=1_000_000)
    ap.add_argument("--duration", type=float, default=60.0, help="simulated seconds per schedule")
    ap.add_argument("--workers", type=int, default=multiprocessing.cpu_count())
    ap.add_argument("--seed", type=int, help="run only this seed, printing its violation in full")
    ap.add_argument("--nodes", type=int, help="with --seed: the node count")
    ap.add_argument(
        "--node-counts",
        default=",".join(map(str, NODE_COUNTS)),
        help=f"comma-separated cluster sizes, one per seed in turn ({','.join(map(str, NODE_COUNTS))}); "
        "25,51,101 soaks the large clusters (10-15 s of CPU per schedule at 101 nodes)",
    )
    args = ap.parse_args(argv)
    sizes = tuple(int(n) for n in args.node_counts.split(","))
    if args.seed is not None:
        n = args.nodes or NODE_COUNTS[args.seed % len(NODE_COUNTS)]
        try:
            r = run_schedule(args.seed, n, duration=args.duration)
        except Violation as exc:
            print(exc)
            return 1
        print(f"seed {args.seed} n={n}: ok, {r.simulated_s:.1f}s simulated, {r.faults} faults")
        return 0
    started = time.monotonic()
    done = failed = faults = 0
    cluster_s = node_s = 0.0
    with multiprocessing.Pool(args.workers) as pool:
        for seed, n, simulated, nfaults, error in pool.imap_unordered(
            _one, _jobs(args.first_seed, args.schedules, args.duration, sizes), chunksize=20
        ):
            done += 1
            if error is not None:
                failed += 1
                print(f"VIOLATION seed={seed} n={n}: {error.splitlines()[0]}", flush=True)
            cluster_s += simulated
            node_s += simulated * n
            faults += nfaults
            if done % (5000 if max(sizes) < 25 else 50) == 0 or done == args.schedules:
                wall = time.monotonic() - started
                print(
                    f"{done} schedules, {failed} failed, {faults} faults, {cluster_s / 3600:.1f} simulated "
                    f"cluster-hours ({node_s / 3600:.1f} node-hours), {wall:.0f}s wall",
                    flush=True,
                )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
