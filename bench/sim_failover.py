"""Failover and handover times in SIMULATED time (deterministic), for docs/protocol.md §5.

    python bench/sim_failover.py [--trials 200]

Prints median, 99th percentile and maximum for a crash of the master's host (daemon and script)
with the default and the tuned timing, and for a planned handover. See bench/cluster.py for the
same measured on real processes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.sim.measure import crash_failover, handover
from tests.timing import DEFAULT, TUNED


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--nodes", type=int, default=3)
    args = ap.parse_args()
    print(f"simulated, {args.nodes} nodes, {args.trials} trials each, one-way delay 0.2-2 ms, drift <= 1%")
    print(f"{'profile':<10} {'what':<10} {'bound':>8} {'median':>8} {'p99':>8} {'max':>8}")
    for name, timing in (("default", DEFAULT), ("tuned", TUNED)):
        crash = crash_failover(timing, args.nodes, trials=args.trials)
        hand = handover(timing, args.nodes, trials=max(10, args.trials // 2))
        bound = timing.failover_bound_s()
        for what, b, st in (("crash", f"{bound:8.3f}", crash), ("handover", " " * 8, hand)):
            print(f"{name:<10} {what:<10} {b} {st.median_s:8.3f} {st.p99_s:8.3f} {st.max_s:8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
