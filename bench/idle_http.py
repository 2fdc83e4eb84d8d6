"""Idle CPU of the daemons with the HTTP listener off and on: does serving metrics raise the idle cost?

    python -m bench.idle_http [--trials 3] [--seconds 20] [--scrape 15]

A 3-node loopback cluster with the default timing (h = 0.1 s) and no script runs idle; each daemon's
time on the CPU (/proc/<pid>/schedstat, in nanoseconds) is read at the start and the end of a window,
after a settling period. Trials alternate off and on, so that the load of a shared machine falls on
both alike. With ``--scrape S`` every node's /metrics is fetched every S seconds during the "on" windows,
as a Prometheus would (0: never). Prints each trial's CPU share per daemon (master and followers
apart) and the medians.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import time

from tests.harness.cluster import Cluster, Loopback
from tests.timing import DEFAULT

SETTLE_S = 3.0


def cpu_s(pid: int) -> float:
    # /proc/<pid>/schedstat: nanoseconds on the CPU (utime + stime count 10 ms ticks, too coarse)
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def trial(listen: bool, seconds: float, scrape_s: float) -> dict[str, float]:
    with Cluster(3, Loopback(), timing=DEFAULT, script=None, http=listen, check_on_exit=False) as c:
        master = c.wait_for_master()
        time.sleep(SETTLE_S)
        before = {n.name: cpu_s(n.pid) for n in c.nodes}
        t0 = time.monotonic()
        next_scrape = t0
        while (now := time.monotonic()) < t0 + seconds:
            if listen and scrape_s > 0 and now >= next_scrape:
                for n in c.nodes:
                    conn = http_client(n.ip, c.http_port)
                    conn.request("GET", "/metrics")
                    conn.getresponse().read()
                    conn.close()
                next_scrape += scrape_s
            time.sleep(0.05)
        took = time.monotonic() - t0
        shares = {n.name: (cpu_s(n.pid) - before[n.name]) / took * 100.0 for n in c.nodes}
        return {
            "master": shares[master.name],
            "follower": statistics.mean(v for k, v in shares.items() if k != master.name),
        }


def http_client(host: str, port: int | None) -> http.client.HTTPConnection:
    assert port is not None
    return http.client.HTTPConnection(host, port, timeout=5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--scrape", type=float, default=15.0, help="seconds between scrapes (0: none)")
    args = p.parse_args()
    results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for i in range(args.trials):
        for listen in (False, True):
            r = trial(listen, args.seconds, args.scrape)
            results[listen].append(r)
            print(
                f"trial {i + 1} http={'on ' if listen else 'off'}: master {r['master']:.3f}% "
                f"followers {r['follower']:.3f}% CPU",
                flush=True,
            )
    for role in ("master", "follower"):
        off = statistics.median(r[role] for r in results[False])
        on = statistics.median(r[role] for r in results[True])
        print(f"median {role:8}: http off {off:.3f}%  on {on:.3f}%  ratio on/off {on / off:.2f}")


if __name__ == "__main__":
    main()
