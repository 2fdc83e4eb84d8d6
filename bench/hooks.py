"""What a notify hook costs the daemon, and how fast hooks follow each other.

    python bench/hooks.py [--events 200] [--notifies 100000]

Real processes, one host, no cluster. It measures and prints, never asserts:

- ``notify()``: the time the event loop spends in one call (it only queues), over ``--notifies``
  calls into a queue large enough to drop nothing, logging at the default WARNING level (they are
  then dropped, and not run, by ``aclose(0)``);
- one hook's round trip: from ``notify()`` to the end of its run (the hook's main process reaped
  and its process group checked empty), for ``/bin/true``, one event at a time;
- a burst: ``--events`` events queued at once, delivered one after another: events per second.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pyquorum.runtime.hooks import HookEvent, NotifyHooks
from pyquorum.runtime.logs import EVENT_ATTR, FIELDS_ATTR

NODE = "127.0.0.1:51621"


def p90(values: Sequence[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[8]


def summary(what: str, values: Sequence[float], unit: str) -> str:
    return (
        f"{what:<30} median {statistics.median(values):8.2f} {unit}  p90 {p90(values):8.2f}  "
        f"min {min(values):8.2f}  max {max(values):8.2f}  (n={len(values)})"
    )


class Finished(logging.Handler):
    """Sets ``event`` when the hook of SEQ ``wanted`` has finished, and notes the monotonic time."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.wanted = 0
        self.at = 0.0
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, FIELDS_ATTR, None)
        if getattr(record, EVENT_ATTR, None) != "hook_finished" or not isinstance(fields, dict):
            return
        if fields.get("seq") == self.wanted:
            self.at = time.monotonic()
            self.event.set()


async def measure(events: int, notifies: int) -> None:
    logger = logging.getLogger("bench.hooks")
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    logger.addHandler(logging.NullHandler())  # the drops at aclose(0) are not the measurement
    # notify(): the loop does not run between the calls, so no hook starts and each call only queues
    hanging = NotifyHooks("/bin/true", NODE, 30.0, notifies + 1, logger)
    costs_us = []
    for i in range(notifies):
        began = time.perf_counter()
        hanging.notify(HookEvent.SLAVE, i, NODE)
        costs_us.append((time.perf_counter() - began) * 1e6)
    await hanging.aclose(0.0)
    print(summary("notify() (only queues)", costs_us, "us"))

    finished = Finished()
    timed = logging.getLogger("bench.hooks.timed")
    timed.setLevel(logging.INFO)
    timed.propagate = False
    timed.addHandler(finished)
    hooks = NotifyHooks("/bin/true", NODE, 30.0, events + 1, timed)
    round_trip_ms = []
    for i in range(min(events, 100)):
        finished.wanted, finished.event = i + 1, asyncio.Event()
        began = time.monotonic()
        hooks.notify(HookEvent.MASTER, i, NODE)
        await finished.event.wait()
        round_trip_ms.append((finished.at - began) * 1000.0)
    print(summary("one hook, notify to reaped", round_trip_ms, "ms"))

    finished.wanted, finished.event = hooks.seq + events, asyncio.Event()
    began = time.monotonic()
    for i in range(events):
        hooks.notify(HookEvent.SLAVE if i % 2 else HookEvent.MASTER, i, NODE)
    await finished.event.wait()
    spent = finished.at - began
    print(f"{'burst of ' + str(events) + ' events':<30} {events / spent:8.1f} events/s ({spent:.2f} s)")
    await hooks.aclose(5.0)
    print(f"counters: {hooks.counters()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--notifies", type=int, default=100_000)
    args = parser.parse_args()
    asyncio.run(measure(args.events, args.notifies))


if __name__ == "__main__":
    main()
