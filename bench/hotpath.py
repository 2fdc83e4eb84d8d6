"""The hot path: CPU per datagram received, authenticated, decided and answered.

    python bench/hotpath.py [--datagrams 20000] [--daemon-rate 1000] [--daemon-seconds 10]

It measures and prints, never asserts (target, issue 12: at most 40 µs of CPU per datagram, median).

In process, the wire and the core as the daemon drives them, one datagram at a time (``time.
perf_counter_ns`` around each, which on an otherwise idle interpreter is its CPU time; the median
and the 90th percentile over ``--datagrams``):

- follower: a master's heartbeat through ``Endpoint.receive`` (HMAC-SHA256 with a key, CRC-32
  without), ``Node.step``, ``Node.ready``, ``Endpoint.send`` of the acknowledgement it asks for, and
  ``Node.advance``;
- master: a follower's acknowledgement through the same calls (the master answers nothing);
- and the pieces of the follower's path alone: decode, the replay check, step + ready + advance,
  encode.

A real daemon, the whole path (``--daemon-rate`` datagrams per second for ``--daemon-seconds``): one
``python -m pyquorum`` follower with a key file, the benchmark in the role of its master (the lowest
of three member addresses on loopback; the third never runs). It sends genuine signed heartbeats,
paced, and reads the acknowledgements. The daemon's CPU time (/proc/<pid>/schedstat) over the
flood, minus what it costs when idle over as long, divided by the heartbeats it acknowledged, is
its CPU per datagram: the kernel's receive and send, asyncio, the endpoint, the core, the status
writes and the log, everything.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pyquorum import keyfile
from pyquorum.cli import load_config
from pyquorum.core.lease import Timing
from pyquorum.core.messages import Heartbeat, HeartbeatResponse, Message, PreVoteResponse, VoteResponse
from pyquorum.core.node import HardState, Node
from pyquorum.wire import Deliver, Endpoint, Handshake, KeyRing, Reject, cluster_fingerprint
from tests.harness.procfs import cpu_ns

ROOT = Path(__file__).resolve().parents[1]

TARGET_US = 40.0
TIMING = Timing()
MEMBERS = ["127.0.0.1:7001", "127.0.0.2:7001", "127.0.0.3:7001"]  # in-process only: nothing is bound
MASTER, FOLLOWER, OTHER = MEMBERS
TERM = 5


def pct(values: Sequence[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def report(what: str, ns: Sequence[int]) -> float:
    us = [n / 1000.0 for n in ns]
    med = statistics.median(us)
    print(f"  {what:<46} median {med:6.1f} µs  p90 {pct(us, 90):6.1f} µs  (n={len(us)})")
    return med


# ---- in process ------------------------------------------------------------------------------------


def endpoints(keyring: KeyRing | None) -> tuple[Endpoint, Endpoint]:
    """A master's and a follower's endpoint that have completed their epoch handshake."""
    fp = cluster_fingerprint(MEMBERS, "bench")
    m = Endpoint(local=MASTER, members=MEMBERS, cluster_fp=fp, keyring=keyring, epoch=11)
    f = Endpoint(local=FOLLOWER, members=MEMBERS, cluster_fp=fp, keyring=keyring, epoch=22)
    first = f.receive(m.send(FOLLOWER, Heartbeat(TERM, False)).data, m.address_of(MASTER))
    assert isinstance(first, Reject) and first.reply is not None, first  # "bad-echo", and a Hello
    assert isinstance(m.receive(first.reply.data, f.address_of(FOLLOWER)), Handshake)
    return m, f


def whole_path(endpoint: Endpoint, node: Node, data: bytes, src: tuple[str, int], now: float) -> int:
    """The ns one datagram takes through a daemon's whole path, as Daemon.on_datagram and
    Daemon._process run it: receive, step, ready, send what it asks for, advance."""
    t0 = time.perf_counter_ns()
    result = endpoint.receive(data, src)
    if isinstance(result, Deliver):
        node.step(result.sender, result.message, now)
        rd = node.ready()
        for dest, msg in rd.messages:
            endpoint.send(dest, msg)
        node.advance(rd)
    elapsed = time.perf_counter_ns() - t0
    assert isinstance(result, Deliver), result
    return elapsed


def follower_path(keyring: KeyRing | None, count: int) -> dict[str, list[int]]:
    m, f = endpoints(keyring)
    node = Node(FOLLOWER, MEMBERS, TIMING, now=0.0, rng=random.Random(1), hard_state=HardState(TERM))
    live = frozenset(MEMBERS)
    h = TIMING.heartbeat_interval_s
    src = m.address_of(MASTER)
    rounds = range(1, count + 1)
    datagrams = [m.send(FOLLOWER, Heartbeat(TERM, True, r, live)).data for r in rounds]
    clock = time.perf_counter_ns
    whole = [whole_path(f, node, data, src, 10.0 + i * h) for i, data in enumerate(datagrams)]
    # the pieces, each on fresh datagrams of its own
    m, f = endpoints(keyring)
    datagrams = [m.send(FOLLOWER, Heartbeat(TERM, True, r, live)).data for r in rounds]
    codec, guard = f._codec, f._guard  # the two stages of Endpoint.receive, apart
    decode, replay, core, encode = [], [], [], []
    node = Node(FOLLOWER, MEMBERS, TIMING, now=0.0, rng=random.Random(1), hard_state=HardState(TERM))
    for i, data in enumerate(datagrams):
        now = 10.0 + i * h
        t0 = clock()
        env, decoded = codec.decode(data)
        t1 = clock()
        fresh = guard.check(env)
        t2 = clock()
        assert fresh is None and isinstance(decoded, Heartbeat), fresh
        node.step(env.sender, decoded, now)
        rd = node.ready()
        node.advance(rd)
        t3 = clock()
        f.send(MASTER, HeartbeatResponse(TERM, decoded.round))
        t4 = clock()
        decode.append(t1 - t0)
        replay.append(t2 - t1)
        core.append(t3 - t2)
        encode.append(t4 - t3)
    return {"whole": whole, "decode": decode, "replay": replay, "core": core, "encode": encode}


def master_path(keyring: KeyRing | None, count: int) -> list[int]:
    m, f = endpoints(keyring)
    node = Node(MASTER, MEMBERS, TIMING, now=0.0, rng=random.Random(1), hard_state=HardState(TERM - 1))
    # make it master: it campaigns, and the two peers grant (term TERM)
    t = 1.5
    node.tick(t)
    node.advance(node.ready())
    for peer in (FOLLOWER, OTHER):
        node.step(peer, PreVoteResponse(TERM, True, TERM - 1), t)
    node.advance(node.ready())
    node.step(FOLLOWER, VoteResponse(TERM, True), t)
    node.advance(node.ready())
    assert node.role.value == "master" and node.term == TERM, (node.role, node.term)
    src = f.address_of(FOLLOWER)
    h = TIMING.heartbeat_interval_s
    out: list[int] = []
    for i in range(count):
        now = t + i * h / 2  # two acks per round: the follower's and one more
        if i % 2 == 0:
            node.tick(now)  # a heartbeat round (its sends are not part of the measured path)
            rd = node.ready()
            rnd = next((msg.round for _, msg in rd.messages if isinstance(msg, Heartbeat)), 0)
            node.advance(rd)
        data = f.send(MASTER, HeartbeatResponse(TERM, rnd)).data
        out.append(whole_path(m, node, data, src, now))
    return out


# ---- a real daemon ---------------------------------------------------------------------------------


def user_system_ticks(pid: int) -> tuple[int, int]:
    """utime and stime of ``pid`` (clock ticks): the split of its CPU time between Python and the kernel."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def context_switches(pid: int) -> int:
    """Voluntary context switches of ``pid`` so far: how often it slept (each wake-up costs CPU)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


def free_port(ips: Sequence[str]) -> int:
    for port in random.sample(range(20000, 32000), 200):
        with contextlib.ExitStack() as stack:
            try:
                for ip in ips:
                    s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                    s.bind((ip, port))
            except OSError:
                continue
            return port
    raise OSError("no free port")


def paced(rate: float, seconds: float, send: Callable[[int], None], drain: Callable[[], None]) -> int:
    """Call ``send(i)`` ``rate`` times a second for ``seconds``; ``drain()`` in between. How many sent."""
    start, i = time.monotonic(), 0
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(elapsed * rate)
        while i < due:
            send(i)
            i += 1
        drain()
        time.sleep(0.001)
    return i


def _frame(text: str) -> str:
    # py-spy's "function (path/to/file.py:123)" as "function (file.py)": lines of one function together
    name, _, where = text.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1].rsplit(':', 1)[0].rstrip(')')})" if where else name


def top_frames(raw: Path, count: int = 14) -> None:
    """The top of a py-spy profile (``-f raw``: one ``frame;frame;... samples`` line per stack):
    the functions with the most samples on top of the stack, and in it."""
    own: Counter[str] = Counter()
    inside: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack:
            continue
        frames = [_frame(f) for f in stack.split(";")]
        total += int(samples)
        own[frames[-1]] += int(samples)
        for frame in set(frames):
            inside[frame] += int(samples)
    print(f"  py-spy, {total} samples; on top of the stack:")
    for frame, n in own.most_common(count):
        print(f"    {100 * n / total:5.1f}%  {frame}")
    print("  in the stack (inclusive), below the event loop:")
    below = [(f, n) for f, n in inside.most_common() if n < 0.95 * total]
    for frame, n in below[:count]:
        print(f"    {100 * n / total:5.1f}%  {frame}")


def profiled(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        print("  no py-spy (pip install -e '.[test]'): no profile")
        return None
    argv = [spy, "record", "-p", str(pid), "-d", str(max(1, int(seconds))), "-r", "997", "-f", "raw"]
    return subprocess.Popen([*argv, "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def daemon_path(rate: float, seconds: float, profile: Path | None) -> None:
    base = random.randrange(10, 240)
    ips = [f"127.0.0.{base + k}" for k in range(3)]
    port = free_port(ips)
    members = [f"{ip}:{port}" for ip in ips]
    master, me = members[0], members[1]
    work = Path(tempfile.mkdtemp(prefix="pyquorum-hotpath-"))
    proc: subprocess.Popen[bytes] | None = None
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        key = work / "cluster.key"
        keyfile.keygen(key)
        ring = keyfile.load_keyring(key)
        args = ["-b", ips[1], "-p", str(port), "--state-dir", str(work / "state"), "--key-file", str(key)]
        args += [members[0], members[2]]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        py = [sys.executable, "-m", "pyquorum"]
        subprocess.run([*py, "init", *args], check=True, env=env, capture_output=True)  # not recovering
        config = load_config(args)
        fp = cluster_fingerprint(config.members, config.cluster_text)
        ep = Endpoint(
            local=master, members=members, cluster_fp=fp, keyring=ring, epoch=time.time_ns() // 1000
        )
        sock.bind((ips[0], port))
        sock.setblocking(False)
        with (work / "daemon.log").open("wb") as log:
            proc = subprocess.Popen([*py, *args], env=env, stdout=log, stderr=subprocess.STDOUT)
        dest = ep.address_of(me)
        acks = 0

        def drain() -> None:
            nonlocal acks
            while True:
                try:
                    data, addr = sock.recvfrom(2048)
                except BlockingIOError:
                    return
                result = ep.receive(data, addr)
                if isinstance(result, Deliver) and isinstance(result.message, HeartbeatResponse):
                    acks += 1

        round_ = 0

        def heartbeat(_: int = 0) -> None:
            nonlocal round_
            round_ += 1
            msg: Message = Heartbeat(1, True, round_, frozenset(members[:2]))
            sock.sendto(ep.send(me, msg).data, dest)

        # the handshake, then the daemon follows us as master of term 1 (it persists term 1 once)
        give_up = time.monotonic() + 20.0
        while acks < 20:
            if time.monotonic() > give_up or proc.poll() is not None:
                raise RuntimeError(f"the daemon does not follow:\n{(work / 'daemon.log').read_text()}")
            heartbeat()
            time.sleep(TIMING.heartbeat_interval_s)
            drain()
        # idle: our heartbeats at the default rate, as its master would send them
        c0 = cpu_ns(proc.pid)
        n_idle = paced(1 / TIMING.heartbeat_interval_s, seconds, heartbeat, drain)
        idle_ns = cpu_ns(proc.pid) - c0
        time.sleep(0.2)
        drain()
        spy = profiled(proc.pid, seconds, profile) if profile is not None else None
        acks0, c0 = acks, cpu_ns(proc.pid)
        (u0, s0), w0 = user_system_ticks(proc.pid), context_switches(proc.pid)
        sent = paced(rate, seconds, heartbeat, drain)
        time.sleep(0.3)
        drain()
        flood_ns = cpu_ns(proc.pid) - c0
        (u1, s1), w1 = user_system_ticks(proc.pid), context_switches(proc.pid)
        handled = acks - acks0
        average = flood_ns / 1000.0 / max(1, handled)
        marginal = (flood_ns - idle_ns) / 1000.0 / max(1, handled - n_idle)
        print(
            f"  real daemon (keyed), {rate:g}/s for {seconds:g} s: sent {sent}, acknowledged {handled}; "
            f"CPU {flood_ns / 1e6:.0f} ms (idle at {1 / TIMING.heartbeat_interval_s:g}/s: "
            f"{idle_ns / 1e6:.0f} ms)"
        )
        print(
            f"  real daemon, whole path per datagram: {average:.1f} µs of CPU on average, "
            f"{marginal:.1f} µs beyond the idle cost (target {TARGET_US:g} µs: "
            f"{marginal / TARGET_US:.2f})"
        )
        user, system = u1 - u0, s1 - s0
        print(
            f"  real daemon, during the flood: {100 * user / max(1, user + system):.0f}% of its CPU in user "
            f"space, {100 * system / max(1, user + system):.0f}% in the kernel; "
            f"{(w1 - w0) / max(1, handled):.2f} sleeps (voluntary context switches) per datagram"
        )
        if spy is not None and profile is not None:
            spy.wait(30)
            top_frames(profile)
    finally:
        sock.close()
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datagrams", type=int, default=20000, help="in-process datagrams per path (20000)")
    ap.add_argument("--daemon-rate", type=float, default=1000.0, help="heartbeats/s to the daemon (1000)")
    ap.add_argument("--daemon-seconds", type=float, default=10.0, help="length of the flood (10)")
    ap.add_argument("--profile", type=Path, help="py-spy the daemon during the flood into this raw profile")
    args = ap.parse_args()
    ring = KeyRing(1, {1: os.urandom(32)})
    print(f"pyquorum hot path, Python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.2f}")
    for name, keys in (("keyed (HMAC-SHA256)", ring), ("unkeyed (CRC-32)", None)):
        print(f"in process, {name}:")
        parts = follower_path(keys, args.datagrams)
        med = report("follower: heartbeat in, acknowledgement out", parts["whole"])
        print(f"  {'':<46} median/target {med / TARGET_US:.2f}")
        report("master: acknowledgement in", master_path(keys, args.datagrams))
        for piece in ("decode", "replay", "core", "encode"):
            report(f"  follower, {piece} alone", parts[piece])
    if args.daemon_seconds > 0:
        daemon_path(args.daemon_rate, args.daemon_seconds, args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
