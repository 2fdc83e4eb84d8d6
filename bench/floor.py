"""The asyncio floor under the idle-cost targets: what the traffic of an idle 3-node cluster costs a
Python process that does nothing else.

    python bench/floor.py [--windows 3] [--window-s 20] [--interval 0.1]

Three processes on 127.0.0.x, each with the daemon's I/O shape and none of its work: asyncio without
its TLS support (as the daemon imports it), the UDP socket as the event loop's reader, every waiting
datagram read at each wake-up (runtime/udp.py). The "master" sends a datagram to each of the two others
every ``--interval`` seconds from one loop timer; each "follower" answers every datagram it gets at
once. That is the steady traffic of a 3-node pyquorum cluster at the default timing (protocol.md §3.2:
a follower of a live master sends only its acknowledgements): 20 datagrams a second out of the master
and 20 in, 10 each way at a follower. No authentication, no decoding, no core, no guard, no status.

It prints each role's CPU (% of one core, from /proc/<pid>/schedstat, the median of the windows) and
RSS, measured exactly as bench/cost.py measures the daemons, so the two can be put side by side: run
both back to back on the same host and compare ratios, not absolute figures. On the shared 2-core
machines here the same code has measured from 0.53% to 1.12% of a core for a master on different days;
the floor moves with it. It measures and prints, never asserts.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

# Only what a process of the floor needs is imported at the top: the parent's tools (statistics
# brings decimal and fractions) would be counted in the floor's memory.

DATAGRAM_BYTES = 96  # about a keyed heartbeat or acknowledgement of pyquorum's wire format
TARGET_MASTER_CPU = 0.5  # % of one core, issue 12 (as bench/cost.py)
TARGET_FOLLOWER_CPU = 0.3


def serve(
    role: str, me: tuple[str, int], peers: list[tuple[str, int]], interval_s: float, runtime: str
) -> None:
    """One process of the floor cluster; runs until it is killed."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(me)
    sock.setblocking(False)
    payload = os.urandom(DATAGRAM_BYTES)
    buffer = bytearray(65536)

    def readable() -> None:
        while True:
            try:
                _, source = sock.recvfrom_into(buffer)
            except BlockingIOError:
                return
            if role == "follower":
                sock.sendto(payload, source)

    def send_round() -> None:
        for peer in peers:
            sock.sendto(payload, peer)

    if runtime == "poll":
        # No event loop: one poll() on the socket with the next round as its timeout.
        import select

        poller = select.poll()
        poller.register(sock, select.POLLIN)
        due = time.monotonic()
        while True:
            if role == "master" and time.monotonic() >= due:
                send_round()
                due += interval_s
            timeout_ms = max(0.0, due - time.monotonic()) * 1000.0 if role == "master" else None
            if poller.poll(timeout_ms):
                readable()
    sys.modules["ssl"] = None  # type: ignore[assignment]  # asyncio without TLS, as the daemon (cli.py)
    import asyncio

    del sys.modules["ssl"]
    loop = asyncio.new_event_loop()

    def heartbeat_round(due: float) -> None:
        send_round()
        loop.call_at(due + interval_s, heartbeat_round, due + interval_s)

    loop.add_reader(sock.fileno(), readable)
    if role == "master":
        loop.call_soon(heartbeat_round, loop.time())
    loop.run_forever()


def measure(windows: int, window_s: float, interval_s: float, runtime: str) -> dict[str, tuple[float, float]]:
    """Start the three processes, let them settle, and return role -> (median CPU %, RSS MB)."""
    import random
    import statistics
    import subprocess

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.harness.procfs import cpu_ns, rss_mb

    base = random.randrange(10, 240)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((f"127.0.0.{base}", 0))
        port = int(probe.getsockname()[1])
    addresses = [(f"127.0.0.{base + i}", port) for i in range(3)]
    roles = ["master", "follower", "follower"]
    procs = []
    try:
        for i, role in enumerate(roles):
            peers = [f"{ip}:{p}" for j, (ip, p) in enumerate(addresses) if j != i]
            me = f"{addresses[i][0]}:{port}"
            argv = [sys.executable, __file__, "--serve", role, me, *peers, "--interval", repr(interval_s)]
            argv += ["--runtime", runtime]
            procs.append(subprocess.Popen(argv))
        time.sleep(2.0)  # started, imported, in their steady state
        per_role: dict[int, list[float]] = {p.pid: [] for p in procs}
        before = {p.pid: cpu_ns(p.pid) for p in procs}
        for _ in range(windows):
            t_a = time.monotonic()
            time.sleep(window_s)
            after = {p.pid: cpu_ns(p.pid) for p in procs}
            elapsed = time.monotonic() - t_a
            for pid in per_role:
                per_role[pid].append((after[pid] - before[pid]) / 1e9 / elapsed * 100.0)
            before = after
        rss = {p.pid: rss_mb(p.pid) for p in procs}
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"a floor process exited with {p.returncode}")
        master, *followers = procs
        follower_cpu = statistics.median(statistics.median(per_role[f.pid]) for f in followers)
        return {
            "master": (statistics.median(per_role[master.pid]), rss[master.pid]),
            "follower": (follower_cpu, statistics.median(rss[f.pid] for f in followers)),
        }
    finally:
        for p in procs:
            p.kill()
            p.wait()


def address(text: str) -> tuple[str, int]:
    ip, port = text.rsplit(":", 1)
    return ip, int(port)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=3, help="measurement windows (3)")
    ap.add_argument("--window-s", type=float, default=20.0, help="length of each window, s (20)")
    ap.add_argument("--interval", type=float, default=0.1, help="the master's round, s (0.1: the default h)")
    ap.add_argument(
        "--runtime",
        choices=("asyncio", "poll"),
        default="asyncio",
        help="asyncio (as the daemon: the socket as the loop's reader, a loop timer) or poll (no event "
        "loop: one poll() with the next round as its timeout); default asyncio",
    )
    ap.add_argument("--serve", nargs="+", metavar="ARG", help=argparse.SUPPRESS)  # ROLE ME PEER...
    args = ap.parse_args()
    if args.serve:
        role, me, *peers = args.serve
        serve(role, address(me), [address(p) for p in peers], args.interval, args.runtime)
        return 0
    print(
        f"{args.runtime} floor of an idle 3-node cluster's traffic (round {args.interval} s), "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    found = measure(args.windows, args.window_s, args.interval, args.runtime)
    for role, target in (("master", TARGET_MASTER_CPU), ("follower", TARGET_FOLLOWER_CPU)):
        cpu, rss = found[role]
        print(
            f"  floor {role:8s}: {cpu:5.2f}% of a core (issue 12's target for a pyquorum {role}: "
            f"{target}%, {target / cpu:.2f} x this floor), RSS {rss:.1f} MB"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
