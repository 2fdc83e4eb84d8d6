"""``pyquorum step-down`` and ``pyquorum drill``: move the role on purpose, and measure how long it took.

What this module owns
---------------------
The two commands that move the role on a running cluster, run on any member, and what they
measure. Both talk only to the local daemon, over its control socket (runtime/control.py), which
asks the other members over the authenticated wire when it must (runtime/handover.py):

* ``step-down [--to NODE] [--wait]``: the local daemon asks the master to hand over (protocol.md
  §3.10) and prints its answer; refused, it says why and exits 1. With ``--wait`` it then waits
  until the new master's script runs and prints the gap;
* ``drill [--crash] [--rounds N] [--json]``: per round a planned handover (a step-down), or with
  ``--crash`` a failover: the master is asked to go silent (it drops every datagram in and out for
  a bounded time, runtime/udp.py), so its lease lapses by the ordinary rules, its script is stopped,
  the others elect a new master and it rejoins as a follower once the silence ends. Nothing is
  killed. Each round reports the measured figures, the bound the settings predict and whether the
  round kept within it; the exit code is 1 if any did not.

How a gap is measured
---------------------
"The gap" is from the old master's script being reaped (its ``script_stopped``) to the new master's
script having been started (``script_started``: its guard reported the exec; the script's own
start-up, e.g. a Python interpreter, comes after), each read from the daemon that saw it, on that
daemon's monotonic clock, and carried here as an age that the local daemon converts to this host's
clock with an uncertainty of half the round trip it measured (runtime/handover.py). The figure is
printed as ``gap ± uncertainty``, the sum of both entries' uncertainties; a round whose gap is below
``-uncertainty`` would be two scripts at once, and fails whatever the bound.

The bounds (docs/protocol.md §5): a planned round's gap against ``Timing.handover_bound_s`` (§5.3);
a crash round's failover, from the moment the master went silent to the new script's start, against
``Timing.failover_bound_s`` (§5.1; the gap is part of it: the old script is stopped after the
silence began).
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

from pyquorum.config import Config
from pyquorum.core.lease import Timing

__all__ = ["REASON_TEXT", "Round", "drill_main", "step_down_main"]

# What each answer of a master to a step-down means for the operator (core/messages.py).
REASON_TEXT: Final = {
    "accepted": "it stops its script, waits until it is reaped, and resigns naming the successor",
    "not-master": "the node asked is not master (or no master is known): see 'pyquorum status'",
    "no-majority": "no majority of the members is reachable: nobody could take over",
    "leaving": "the master is already resigning or shutting down",
    "is-master": "the node named by --to is the master itself",
    "witness": "the node named by --to is a witness, which never becomes master",
    "not-live": "the node named by --to was not heard within the election timeout (down or cut off)",
    "not-preferred": "a pre-emption by a node whose priority is not above the master's",
    "not-connected": "a pre-emption by a node not connected for --preempt-after",
}
# Poll the local daemon this often while waiting for a new master's script.
POLL_S: Final = 0.02


class DrillError(Exception):
    """A round could not be carried out or measured; the message says why."""


@dataclass
class Round:
    """One measured handover (all times in seconds; ``None`` where not known)."""

    kind: str  # "planned" or "crash"
    old: str
    old_term: int
    new: str
    new_term: int
    gap_s: float | None  # old script reaped -> new script started
    uncertainty_s: float
    bound_s: float
    measured_s: float | None  # what the bound applies to: the gap, or the failover (crash)
    within: bool
    resign_to_start_s: float | None = None  # planned: the Resign sent -> new script started
    stop_s: float | None = None  # planned: the master's answer received -> old script reaped
    failover_s: float | None = None  # crash: silence began -> new script started
    rejoined: bool | None = None  # crash: the old master follows the new one again
    note: str = ""


class _Daemon:
    """The local daemon, through its control socket: the requests the two commands make."""

    def __init__(self, config: Config, timeout_s: float) -> None:
        from pyquorum.runtime import control

        self.config = config
        self.control = control
        # a timeline request waits up to ~1 s for a silent member: leave room for it
        self.client = control.Client(config.state_dir, max(5.0, timeout_s))

    def request(self, command: str, args: dict[str, Any] | None = None) -> Any:
        return self.client.request(command, args)

    def status(self) -> dict[str, Any]:
        """The ``cluster`` part of the status document: master, term, has_quorum, members."""
        doc = self.request("status")
        if not isinstance(doc, dict) or not isinstance(doc.get("cluster"), dict):
            raise DrillError(f"the daemon answered a status of {doc!r:.80}")
        cluster: dict[str, Any] = doc["cluster"]
        return cluster

    def timeline(self, node: str) -> dict[str, Any] | None:
        """``node``'s timeline, or None if it does not answer (down, cut off, silent)."""
        try:
            doc = self.request("timeline", {"node": node})
        except self.control.CommandFailed:
            return None
        return doc if isinstance(doc, dict) else None

    def close(self) -> None:
        self.client.close()


def _last(
    timeline: dict[str, Any], kind: str, term: int | None = None, above: int = -1
) -> dict[str, Any] | None:
    found = None
    for entry in timeline["entries"]:
        if entry["kind"] == kind and (entry["term"] == term if term is not None else entry["term"] > above):
            found = entry
    return found


def _wait_new_script(d: _Daemon, old_term: int, give_up_at: float) -> tuple[str, int, dict[str, Any]]:
    """Wait until a master of a term above ``old_term`` has started its script: (master, term, entry)."""
    while True:
        st = d.status()
        master, term = st.get("master"), int(st.get("term") or 0)
        if master and term > old_term:
            tl = d.timeline(master)
            if tl is not None and (entry := _last(tl, "script_started", above=old_term)) is not None:
                return master, int(entry["term"]), entry
        if time.monotonic() > give_up_at:
            raise DrillError(
                f"no new master ran its script within the time allowed (last status: {master=} {term=})"
            )
        time.sleep(POLL_S)


def _wait_timeline(d: _Daemon, node: str, give_up_at: float, min_term: int = 0) -> dict[str, Any]:
    """``node``'s timeline once it answers with a term of at least ``min_term``."""
    while True:
        tl = d.timeline(node)
        if tl is not None and int(tl["term"]) >= min_term:
            return tl
        if time.monotonic() > give_up_at:
            raise DrillError(f"{node} did not answer with a term of at least {min_term} in time")
        time.sleep(POLL_S)


def _gap(exit_: dict[str, Any] | None, start: dict[str, Any]) -> tuple[float | None, float]:
    if exit_ is None:
        return None, float(start["uncertainty_s"])
    return start["at"] - exit_["at"], float(exit_["uncertainty_s"] + start["uncertainty_s"])


def planned_round(
    d: _Daemon, timing: Timing, to: str, timeout_s: float, accepted: dict[str, Any] | None = None
) -> Round:
    """A step-down (or the answer to one already made, ``accepted``) and its measurement."""
    if accepted is None:
        accepted = d.request("step-down", {"to": to, "timeout_s": min(timeout_s, 10.0)})
    if not accepted["accepted"]:
        raise DrillError(
            f"the step-down was refused: {accepted['reason']} ({REASON_TEXT.get(accepted['reason'], '')})"
        )
    old, old_term = str(accepted["master"]), int(accepted["term"])
    give_up_at = time.monotonic() + timeout_s
    new, new_term, start = _wait_new_script(d, old_term, give_up_at)
    old_tl = _wait_timeline(d, old, give_up_at)
    exit_ = _last(old_tl, "script_stopped", old_term)
    resigned = _last(old_tl, "resigned", old_term)
    gap, unc = _gap(exit_, start)
    bound = timing.handover_bound_s()
    answered_at = accepted.get("answered_at")
    return Round(
        kind="planned",
        old=old,
        old_term=old_term,
        new=new,
        new_term=new_term,
        gap_s=gap,
        uncertainty_s=unc,
        bound_s=bound,
        measured_s=gap,
        within=gap is not None and -unc <= gap <= bound,
        resign_to_start_s=None if resigned is None else start["at"] - resigned["at"],
        stop_s=None if exit_ is None or answered_at is None else exit_["at"] - answered_at,
        note="" if exit_ is not None else "the old master ran no script in its term: no gap to measure",
    )


def crash_round(d: _Daemon, timing: Timing, timeout_s: float) -> Round:
    """The master goes silent (as if it had died), the others fail over, it rejoins; measured."""
    st = d.status()
    old, old_term = st.get("master"), int(st.get("term") or 0)
    if not old:
        raise DrillError("no master is known here: nothing to fail over (see 'pyquorum status')")
    # long enough for the lease to lapse and the others to elect (§5.1), then it comes back
    duration_s = timing.failover_bound_s() + 2 * timing.election_timeout_s
    d.request("silence", {"node": old, "duration_s": round(duration_s, 3)})
    give_up_at = time.monotonic() + duration_s + timeout_s
    new, new_term, start = _wait_new_script(d, old_term, give_up_at)
    # after the silence: the old master answers again, and follows a term at least the new one's
    old_tl = _wait_timeline(d, old, give_up_at, min_term=new_term)
    exit_ = _last(old_tl, "script_stopped", old_term)
    silenced = _last(old_tl, "silence_began", old_term)
    gap, unc = _gap(exit_, start)
    failover = None if silenced is None else start["at"] - silenced["at"]
    unc_failover = unc if silenced is None else float(silenced["uncertainty_s"] + start["uncertainty_s"])
    bound = timing.failover_bound_s()
    safe = gap is None or gap >= -unc
    return Round(
        kind="crash",
        old=str(old),
        old_term=old_term,
        new=new,
        new_term=new_term,
        gap_s=gap,
        uncertainty_s=max(unc, unc_failover),
        bound_s=bound,
        measured_s=failover,
        within=failover is not None and safe and failover <= bound,
        failover_s=failover,
        rejoined=old_tl["role"] == "slave",
        note="" if exit_ is not None else "the old master ran no script in its term: no gap to measure",
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f} ms"


def describe(r: Round) -> list[str]:
    """A round in words, for the terminal."""
    verdict = "ok" if r.within else "BROKE ITS BOUND"
    lines = [f"{r.kind} handover {r.old} (term {r.old_term}) -> {r.new} (term {r.new_term}): {verdict}"]
    gap = f"{_ms(r.gap_s)} ± {_ms(r.uncertainty_s)}" if r.gap_s is not None else "unknown"
    if r.kind == "planned":
        lines.append(f"  old script reaped -> new script started: {gap} (bound {_ms(r.bound_s)})")
        lines.append(f"  master's answer -> old script reaped: {_ms(r.stop_s)}")
        lines.append(f"  resignation sent -> new script started: {_ms(r.resign_to_start_s)}")
    else:
        lines.append(f"  master silenced -> new script started: {_ms(r.failover_s)} (bound {_ms(r.bound_s)})")
        lines.append(f"  old script reaped -> new script started: {gap}")
        lines.append(f"  old master rejoined as a follower: {'yes' if r.rejoined else 'NO'}")
    if r.note:
        lines.append(f"  note: {r.note}")
    return lines


# ---- the commands ---------------------------------------------------------------------------------

STEP_DOWN_DESCRIPTION = """\
Ask the master to hand over its role, on any member: the request goes to the master over the
authenticated cluster channel; the master stops its script, waits until it is reaped, and resigns
naming the successor (--to NODE, or the first in the proposal order), which takes over at once.
One-shot: nothing stays behind. Prints the master's answer; a refusal says why. With --wait, waits
until the new master's script runs and prints the gap (old script reaped -> new script started)
with its uncertainty. Give the daemon's own arguments or its --config file. Exit codes: 0 accepted
(and with --wait the new script runs), 1 refused or not completed in time, 3 the daemon cannot be
reached."""

DRILL_DESCRIPTION = """\
Test failover on the live cluster, from any member. Each round is a planned handover (a step-down,
then the new master's script), or with --crash a real failover: the master is asked to act as if it
had died (it drops every datagram in and out for a while, nothing is killed), its lease lapses and
its script is stopped by the ordinary rules, the others elect a new master, and it rejoins as a
follower. Every round reports the measured gap from the daemons' own monotonic clocks, the bound
the timing settings predict (docs/protocol.md §5) and whether it kept within it. Exit codes: 0
every round within its bound, 1 a round broke its bound or could not be done, 3 the daemon cannot
be reached."""


def _locate(
    argv: Sequence[str], prog: str, description: str, options: Callable[[argparse.ArgumentParser], None]
) -> tuple[argparse.Namespace, Config]:
    # cli.running_node, imported late (cli imports this module's commands); NoNodeError: exit 3
    from pyquorum.cli import running_node

    return running_node(argv, prog, description, options)


def _member(config: Config, text: str) -> str:
    from pyquorum.cli import NoNodeError, resolve_server

    family = socket.AF_INET6 if config.me.ip.version == 6 else socket.AF_INET
    try:
        node = str(resolve_server(text, config.me.port, family))
    except ValueError as exc:
        raise NoNodeError([f"--to {exc}"]) from None
    if node not in config.members:
        raise NoNodeError(
            [f"--to {text} ({node}) is not a member: the members are {', '.join(config.members)}"]
        )
    return node


def step_down_main(argv: list[str]) -> int:
    """``pyquorum step-down``: see ``STEP_DOWN_DESCRIPTION``. Raises ``cli.NoNodeError`` when the
    arguments name no node or a --to that is not a member (``cli.main`` exits 3)."""
    from pyquorum.cli import PROG, _print_errors, _seconds

    def options(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("step-down")
        g.add_argument(
            "--to", metavar="NODE", help="the member that should take over (default: the next in order)"
        )
        g.add_argument(
            "--wait", action="store_true", help="wait until the new master's script runs; print the gap"
        )
        g.add_argument(
            "--timeout", type=_seconds, default=30.0, metavar="SECONDS", help="how long to wait (default: 30)"
        )

    args, config = _locate(argv, f"{PROG} step-down", STEP_DOWN_DESCRIPTION, options)
    to = _member(config, args.to) if args.to else ""
    d = _Daemon(config, args.timeout)
    try:
        try:
            answer = d.request("step-down", {"to": to, "timeout_s": min(args.timeout, 10.0)})
        except d.control.CommandFailed as exc:
            _print_errors([f"{config.node_id}: step-down failed: {exc}"])
            return 1
        reason = answer["reason"]
        who = answer["master"] or "no master"
        if not answer["accepted"]:
            _print_errors([f"{who} refused the step-down: {reason}: {REASON_TEXT.get(reason, '')}"])
            return 1
        target = f" to {to}" if to else ""
        print(
            f"{who} (term {answer['term']}) accepted the step-down{target}: {REASON_TEXT['accepted']}",
            flush=True,
        )
        if not args.wait:
            return 0
        try:
            r = planned_round(d, config.timing, to, args.timeout, accepted=answer)
        except DrillError as exc:
            _print_errors([str(exc)])
            return 1
        print("\n".join(describe(r)), flush=True)
        return 0
    except d.control.Unreachable as exc:
        _print_errors([f"cannot reach the daemon of {config.node_id}: {exc}"])
        return 3
    finally:
        d.close()


def drill_main(argv: list[str]) -> int:
    """``pyquorum drill``: see ``DRILL_DESCRIPTION``. Raises ``cli.NoNodeError`` when the arguments
    name no node (``cli.main`` exits 3)."""
    from pyquorum.cli import PROG, _count, _print_errors, _seconds

    def options(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("drill")
        g.add_argument(
            "--crash", action="store_true", help="fail over (the master goes silent) instead of a step-down"
        )
        g.add_argument("--rounds", type=_count, default=1, metavar="N", help="how many rounds (default: 1)")
        g.add_argument("--json", action="store_true", help="print a machine-readable report")
        g.add_argument(
            "--timeout",
            type=_seconds,
            default=30.0,
            metavar="SECONDS",
            help="how long one round may take beyond its silence (default: 30)",
        )

    args, config = _locate(argv, f"{PROG} drill", DRILL_DESCRIPTION, options)
    timing = config.timing
    kind = "crash" if args.crash else "planned"
    rounds: list[Round] = []
    failed: str | None = None
    d = _Daemon(config, args.timeout)
    if not args.json:
        print(
            f"drill on {config.node_id}: {args.rounds} {kind} round(s); timing {timing.describe()}",
            flush=True,
        )
    try:
        for i in range(args.rounds):
            try:
                if i:
                    _settle(d, timing, rounds[-1], args.timeout)
                r = (
                    crash_round(d, timing, args.timeout)
                    if args.crash
                    else planned_round(d, timing, "", args.timeout)
                )
            except DrillError as exc:
                failed = f"round {i + 1}: {exc}"
                break
            rounds.append(r)
            if not args.json:
                print(f"round {i + 1}/{args.rounds}: " + "\n".join(describe(r)), flush=True)
    except d.control.Unreachable as exc:
        _print_errors([f"cannot reach the daemon of {config.node_id}: {exc}"])
        return 3
    except d.control.CommandFailed as exc:
        failed = f"round {len(rounds) + 1}: {exc}"
    finally:
        d.close()
    ok = failed is None and all(r.within for r in rounds)
    if args.json:
        report = {
            "node": config.node_id,
            "kind": kind,
            "rounds_asked": args.rounds,
            "timing": {
                "heartbeat_interval_s": timing.heartbeat_interval_s,
                "election_timeout_s": timing.election_timeout_s,
                "stop_timeout_s": timing.stop_timeout_s,
                "start_delay_s": timing.start_delay_s,
                "handover_bound_s": timing.handover_bound_s(),
                "failover_bound_s": timing.failover_bound_s(),
            },
            "rounds": [asdict(r) for r in rounds],
            "error": failed,
            "ok": ok,
        }
        print(json.dumps(report, indent=2), flush=True)
    else:
        if failed is not None:
            _print_errors([failed])
        within = sum(r.within for r in rounds)
        print(f"drill: {within}/{args.rounds} round(s) within their bounds", flush=True)
    return 0 if ok else 1


def _settle(d: _Daemon, timing: Timing, last: Round, timeout_s: float) -> None:
    # Between rounds: a node that resigned stays quiet for 2E (protocol.md §3.7), and a silenced one
    # is demoted for a while (§3.3); the next round should measure a handover, not those rules.
    time.sleep(2 * timing.election_timeout_s * (1 + timing.drift_bound) + timing.heartbeat_interval_s)
    give_up_at = time.monotonic() + timeout_s
    while True:
        st = d.status()
        if st.get("master") == last.new and st.get("has_quorum"):
            return
        if time.monotonic() > give_up_at:
            raise DrillError(f"the cluster did not settle under {last.new} after the round")
        time.sleep(POLL_S)
