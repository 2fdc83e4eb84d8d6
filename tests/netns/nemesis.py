"""The randomized nemesis on real hosts: a seeded random fault every few seconds (after Jepsen).

Each round: pick a fault from ``FAULTS`` and a target (the master's host most of the time, any host
otherwise), inject it, hold it 0.5-3 s, heal everything, wait until a script runs again (the checker
asserts that this takes at most the liveness bound, protocol.md §5.2), then wait 1.5-2.5 s so that
restart embargoes and stickiness have ended before the next fault (that is what makes the failover
bound of §5.1 apply again). Safety (overlaps, fencing, minority deadlines) is checked over the whole
history by the same checker as every scenario.

The seed is in the report and in the scenario's meta.json; ``PYQUORUM_NEMESIS_SEED`` replays the same
choices (the timing of a real machine still differs from run to run).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tests.harness.cluster import Node
from tests.netns.scenarios import Harness, NotInjected, bridge_sides, names_of, oneway_cuts, ring_cuts

FAULTS = (
    "kill-host",
    "kill-daemon",
    "kill-script",
    "stop-daemon",
    "pause-host",
    "isolate",
    "split",
    "bridge",
    "ring",
    "oneway-mute",
    "oneway-deaf",
    "loss",
    "flap",
    "partition-kill",
    "pause-partition",
    "planned-restart",
)


def _target(h: Harness, kind: str) -> tuple[Node, bool]:
    running = h.c.running()
    if kind == "kill-script":  # only the master has a script to kill
        if running is None:
            raise NotInjected("no script running to kill")
        return running, True
    x = running if running is not None and h.rng.random() < 0.7 else h.rng.choice(h.c.nodes)
    return x, x is running


def _one(h: Harness, kind: str, hold: float) -> None:
    x, is_master = _target(h, kind)
    role = " (master)" if is_master else ""
    crash = h.crash_bound if is_master else None
    c = h.c
    if kind == "kill-host":
        f = h.fault(f"kill -9 host {x}{role}", lambda: c.crash(x, host=True), hosts=[x], failover_bound=crash)
        h.sleep(hold)
        h.heal(f, lambda: c.restart(x, wait=False))
    elif kind == "kill-daemon":
        f = h.fault(
            f"kill -9 daemon {x}{role}", lambda: c.crash(x), hosts=[x], minority=[x], failover_bound=crash
        )
        h.sleep(hold)
        h.heal(f, lambda: c.restart(x, wait=False))
    elif kind == "kill-script":
        # restarts back off (1 s, doubling) and repeated failures make the master resign: report only
        f = h.fault(f"kill -9 script on {x}{role}", lambda: c.kill_script(x), hosts=[x], failover=True)
        h.sleep(hold)
        h.heal(f)
    elif kind == "stop-daemon":
        f = h.fault(
            f"SIGSTOP daemon {x}{role}", lambda: c.pause(x), hosts=[x], minority=[x], failover_bound=crash
        )
        h.sleep(hold)
        h.heal(f, lambda: c.resume(x))
    elif kind == "pause-host":
        f = h.fault(
            f"SIGSTOP host {x}{role} (VM pause)",
            lambda: c.pause(x, host=True),
            hosts=[x],
            failover_bound=crash,
            whole_host_pause=True,
        )
        h.sleep(hold)
        h.heal(f, lambda: c.resume(x))
    elif kind == "isolate":
        f = h.net_fault(
            f"isolate {x}{role}", lambda: c.isolate(x), hosts=[x], minority=[x], failover_bound=crash
        )
        h.sleep(hold)
        h.heal(f, c.heal)
    elif kind == "split":
        minority = [x, *h.rng.sample(h.others(x), c.size // 2 - 1)]
        majority = h.others(*minority)
        f = h.net_fault(
            f"split {names_of(minority)}|{names_of(majority)}",
            lambda: c.partition(minority, majority),
            hosts=minority,
            minority=minority,
            failover_bound=crash,
        )
        h.sleep(hold)
        h.heal(f, c.heal)
    elif kind == "bridge":
        a, mid, b = bridge_sides(h, x, master=c.running())
        f = h.net_fault(
            f"bridge {names_of(a)}|{names_of(b)} via {mid}", lambda: c.partition(a, b), hosts=[*a, *b]
        )
        h.sleep(hold)
        h.heal(f, c.heal)
    elif kind == "ring":
        order = list(c.nodes)
        h.rng.shuffle(order)
        f = h.net_fault(f"majorities ring {names_of(order)}", ring_cuts(h, order), hosts=order)
        h.sleep(hold)
        h.heal(f, c.heal)
    elif kind in ("oneway-mute", "oneway-deaf"):
        mute = kind == "oneway-mute"
        what = f"nobody hears {x}{role}" if mute else f"{x}{role} hears nobody"
        bound = crash if mute or crash is None else h.deaf_bound
        f = h.net_fault(
            f"one-way: {what}", oneway_cuts(h, x, mute=mute), hosts=[x], minority=[x], failover_bound=bound
        )
        h.sleep(hold)
        h.heal(f, c.heal)
    elif kind == "loss":
        p = h.rng.choice((5, 20, 40))
        f = h.net_fault(f"random loss {p}%", lambda: c.loss(p), hosts=list(c.nodes))
        h.sleep(hold)
        h.heal(f, c.heal)
    elif kind == "flap":
        f = h.net_fault(f"flapping links of {x}{role}", lambda: c.isolate(x), hosts=[x])
        give_up, cut = time.monotonic() + hold, True
        while time.monotonic() < give_up:
            h.sleep(h.rng.uniform(0.1, 0.6))
            with c.network():
                c.heal()
                if not cut:
                    c.isolate(x)
            cut = not cut
        h.heal(f, c.heal)
    elif kind == "partition-kill":
        f1 = h.net_fault(
            f"isolate {x}{role}", lambda: c.isolate(x), hosts=[x], minority=[x], failover_bound=crash
        )
        y = h.wait_running(h.crash_bound + 1.0, exclude=[x]) if is_master else c.running()
        if y is not None and y is not x:
            f2 = h.fault(
                f"kill -9 host {y} (master)",
                lambda: c.crash(y, host=True),
                hosts=[y],
                failover_bound=h.crash_bound,
            )
            h.sleep(hold)
            h.heal(f2, lambda: c.restart(y, wait=False))
        else:
            h.sleep(hold)
        h.heal(f1, c.heal)
    elif kind == "pause-partition":
        f1 = h.fault(
            f"SIGSTOP daemon {x}{role}", lambda: c.pause(x), hosts=[x], minority=[x], failover_bound=crash
        )
        h.sleep(0.2)
        f2 = h.net_fault(f"isolate {x} (stopped)", lambda: c.isolate(x), hosts=[x], minority=[x])
        h.sleep(hold)
        h.heal(f1, lambda: c.resume(x))
        h.sleep(h.rng.uniform(0.2, 1.0))
        h.heal(f2, c.heal)
    elif kind == "planned-restart":
        f = h.fault(
            f"planned restart of {x}{role}", lambda: h.planned_stop(x), hosts=[x], failover_bound=crash
        )
        h.heal(f, lambda: c.restart(x, wait=False))
    else:  # pragma: no cover - FAULTS and this function are written together
        raise AssertionError(kind)


def nemesis(seconds: float) -> Callable[[Harness], None]:
    """Scenario steps: random faults for ``seconds`` (the fault being held when time is up is healed)."""

    def steps(h: Harness) -> None:
        end = time.monotonic() + seconds
        rounds = 0
        while time.monotonic() < end:
            rounds += 1
            kind = h.rng.choice(FAULTS)
            try:
                _one(h, kind, h.rng.uniform(0.5, 3.0))
            except NotInjected as exc:
                h.c.note("note", text=f"round {rounds} {kind}: {exc}")
            h.heal_everything()
            h.wait_running(h.liveness_bound + 1.5)
            h.sleep(h.rng.uniform(1.5, 2.5))

    return steps
