"""How fast the supervisor starts a script, and how punctually its guard kills one.

    python bench/supervisor.py [--starts 30] [--kills 30] [--load N]

Real processes, one host, no cluster. It measures and prints, never asserts:

- start latency: ``await ScriptSupervisor.start()`` until it returns (the script has been exec'd),
  with a fresh guard per start ("cold": a Python interpreter's start-up on the way) and with a ready
  standby guard ("standby": a fork and an exec), ``--starts`` of each, alternating;
- kill punctuality (protocol.md §4.3, §4.4): a script that ignores SIGTERM, started with a kill
  deadline ``D`` 0.4 s away and never renewed, so that the guard sends SIGTERM at ``D - G - K`` and
  SIGKILL at ``D - K`` on its own. For each of ``--kills`` runs: ``slack`` = ``D`` minus the moment
  the process group was reaped (negative: the kill deadline was missed), and, where the guard reports
  it, ``late`` = how long after its planned moment the SIGKILL went out.

``--load N`` runs N busy processes (one Python loop each, at the default nice value) for the whole
run, to show what an overloaded host does to both figures; at more busy processes than cores the
guard competes for the CPU unless it obtained a real-time priority (see the ``guard_hardened`` log
line, printed at the start).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pyquorum.supervisor import ScriptExit, ScriptSupervisor

G = 0.1  # the tuned profile's stop timeout
K = 0.025  # the default kill margin
LIFETIME_S = 0.4
IGNORES_TERM = ["sh", "-c", "trap '' TERM; exec sleep 100"]
BUSY = "while True: pass"


def p90(values: Sequence[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[8]


def summary(what: str, values_ms: Sequence[float]) -> str:
    return (
        f"{what:<34} median {statistics.median(values_ms):7.2f} ms  p90 {p90(values_ms):7.2f}  "
        f"min {min(values_ms):7.2f}  max {max(values_ms):7.2f}  (n={len(values_ms)})"
    )


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[None]:
    procs = [subprocess.Popen([sys.executable, "-c", BUSY], start_new_session=True) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


class Runner:
    def __init__(self, argv: list[str]) -> None:
        self.exits: asyncio.Queue[ScriptExit] = asyncio.Queue()
        self.sup = ScriptSupervisor(
            argv,
            stop_timeout_s=G,
            kill_margin_s=K,
            on_exit=self.exits.put_nowait,
            logger=logging.getLogger("bench"),
        )
        self.env = dict(os.environ)

    async def standby_ready(self, timeout_s: float = 5.0) -> None:
        give_up = time.monotonic() + timeout_s
        while self.sup.standby_pid is None:
            if time.monotonic() > give_up:
                raise RuntimeError("no standby guard became ready")
            await asyncio.sleep(0.005)


async def start_latency(starts: int) -> tuple[list[float], list[float]]:
    cold: list[float] = []
    warm: list[float] = []
    for _ in range(starts):
        for standby in (False, True):
            runner = Runner(["sleep", "100"])
            if standby:
                await runner.sup.prepare()
                await runner.standby_ready()
            began = time.perf_counter()
            await runner.sup.start(time.monotonic() + 5.0, runner.env)
            (warm if standby else cold).append((time.perf_counter() - began) * 1000.0)
            await runner.sup.aclose(timeout=2.0)
    return cold, warm


async def kill_punctuality(kills: int) -> tuple[list[float], list[float]]:
    slack: list[float] = []
    late: list[float] = []
    runner = Runner(IGNORES_TERM)
    await runner.sup.prepare()
    try:
        for _ in range(kills):
            await runner.standby_ready()
            deadline = time.monotonic() + LIFETIME_S
            await runner.sup.start(deadline, runner.env)
            ended = await asyncio.wait_for(runner.exits.get(), LIFETIME_S + 5.0)
            slack.append((deadline - ended.reaped_at) * 1000.0)
            kill_late_s = getattr(ended, "kill_late_s", None)  # reported by the guard
            if kill_late_s is not None:
                late.append(kill_late_s * 1000.0)
    finally:
        await runner.sup.aclose(timeout=2.0)
    return slack, late


async def main_async(args: argparse.Namespace) -> None:
    cold, warm = await start_latency(args.starts)
    print(summary("start(), cold guard", cold))
    print(summary("start(), standby guard", warm))
    slack, late = await kill_punctuality(args.kills)
    print(summary("reaped before the deadline (slack)", slack))
    missed = sum(1 for s in slack if s < 0)
    print(f"{'kill deadline missed':<34} {missed} of {len(slack)} runs")
    if late:
        print(summary("SIGKILL after its planned moment", late))
    else:
        print(f"{'SIGKILL after its planned moment':<34} not reported by this guard")


_hardening: list[str] = []


def _first_hardening(record: logging.LogRecord) -> bool:
    if "event=guard_hardened" in record.getMessage():
        if _hardening:
            return False
        _hardening.append(record.getMessage())
        return True
    return record.levelno >= logging.WARNING


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--starts", type=int, default=30, help="starts of each kind (default: 30)")
    p.add_argument("--kills", type=int, default=30, help="unrenewed runs killed by the guard (default: 30)")
    p.add_argument("--load", type=int, default=0, metavar="N", help="busy processes meanwhile (default: 0)")
    args = p.parse_args()
    # The supervisor logs a line or two per run: keep warnings, and what the first guard obtained.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("bench").setLevel(logging.INFO)
    logging.getLogger("bench").addFilter(_first_hardening)
    print(f"G={G}s K={K}s, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, {args.load} busy processes")
    with busy_processes(args.load):
        asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise SystemExit(main())
