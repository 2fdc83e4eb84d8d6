"""``pyquorum check-config``: what the daemon would say about its configuration, without starting it.

What it checks
--------------
Exactly what the daemon checks at start-up, with the same code: the command line and the --config
file (``cli.parse_daemon_args``: unknown keys, wrong types, an unreadable file or bad TOML), the
addresses and host names (``cli.resolve_config``), then ``Config.validate()``: the timing rules of
protocol.md §4.3 with the numbers plugged in and the values that would work (``Timing.validate``),
the key file (missing, malformed, readable by others), the bind address (not an address of this
host), the port (in use), the script (missing, not a file, not executable), the state dir. The two
cannot disagree, because there is one implementation.

Errors and warnings
-------------------
An **error** is what makes the daemon refuse to start: every problem of ``Config.validate()`` and of
the file. A **warning** is what the daemon accepts but is probably not meant, its
``Config.warnings()``: an even number of servers (a majority of 4 is 3, so 4 survive no more failures
than 3), two servers (both must be up), one server, no key file. Errors and warnings are printed
like the daemon's (``pyquorum: error: ...`` on stderr). Exit code 0 when there is no error (warnings
or not), 2 when there is one.

One check differs on purpose: when this node's own daemon is running (the lock file of its state dir
names a live process), its UDP port is in use by that daemon; checking a changed file before a
restart is what check-config is for, so the port is then not checked and the report says so.

The failover figures
--------------------
The bound is ``Timing.failover_bound_s()`` (protocol.md §5.1). The typical failover after a master
crash is about ``E + h + D``: the others' election timeout runs from the last heartbeat they heard,
which came on average half a heartbeat before the crash; they notice the timeout at their next tick,
on average another half heartbeat later (the daemon ticks at least every ``h``); the election and the
first acknowledged round then take a few round trips and two fsyncs, a few milliseconds on a LAN;
then the new master waits ``D``. With the defaults that is 1.1 s; the real daemons on loopback
measured a median of 1.12 s (protocol.md §5.1).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pyquorum import cli, keyfile
from pyquorum.config import LOG_LEVELS, Config
from pyquorum.core.errors import ConfigError
from pyquorum.core.lease import MIN_ROUNDS_BEFORE_STOP, Timing
from pyquorum.core.quorum import quorum_size
from pyquorum.runtime.storage import LOCK_FILE_NAME

PROG = f"{cli.PROG} check-config"


def typical_failover_s(timing: Timing) -> float:
    """About how long a failover after a master crash takes: ``E + h + D`` (see the docstring)."""
    return timing.election_timeout_s + timing.heartbeat_interval_s + timing.start_delay_s


def run(argv: Sequence[str]) -> int:
    """Check the daemon's arguments (or --config file), print the report and every problem;
    return 0 (no error), or 2 (an error). A malformed command line raises ``UsageError``."""
    args, file_problems = cli.parse_daemon_args(argv, PROG)
    config, errors = cli.resolve_config(args, file_problems)
    warnings: list[str] = []
    running: int | None = None
    if config is not None:
        running = running_daemon_pid(config.state_dir)
        errors += config.validate(check_port=running is None)
        warnings = config.warnings()
    source = f"config file {args.config}" if args.config is not None else "command line"
    lines = [f"{PROG}: {source}"]
    if config is not None:
        lines += _describe(config, running)
    lines += timing_report(config.timing if config is not None else cli.timing_from_args(args))
    print("\n".join(lines), flush=True)
    for error in errors:
        print(f"{cli.PROG}: error: {error}", file=sys.stderr)
    for warning in warnings:
        print(f"{cli.PROG}: warning: {warning}", file=sys.stderr)
    sys.stderr.flush()
    counted = _count(len(warnings), "warning")
    if errors:
        print(
            f"{_count(len(errors), 'error')}{', ' + counted if warnings else ''}: the daemon would "
            "refuse to start"
        )
        return 2
    print(f"ok{', with ' + counted if warnings else ''}: the daemon would start")
    return 0


def timing_report(timing: Timing) -> list[str]:
    """The timing, its two rules with the numbers plugged in, and the failover it gives."""
    h, e, g, d = (
        timing.heartbeat_interval_s,
        timing.election_timeout_s,
        timing.stop_timeout_s,
        timing.start_delay_s,
    )
    k = timing.kill_margin_s
    lines = [_row("timing", f"h={_s(h)} E={_s(e)} G={_s(g)} D={_s(d)} K={_s(k)} rho={timing.drift_bound:g}")]
    if h <= 0 or e <= 0 or g < 0 or d < 0:
        return lines  # Timing.validate() says what is wrong; no arithmetic on such values
    rounds = MIN_ROUNDS_BEFORE_STOP
    lines.append(_row("", f"E >= 5h: {_s(e)} >= {_s(5 * h)}  {_verdict(e >= 5 * h)}"))
    lines.append(_row("", f"L_kill = (1-rho)(E+D)/(1+rho) = {_s(timing.lease_kill_s)} (protocol.md §4.2)"))
    lines.append(
        _row(
            "",
            f"L_kill - G - K >= {rounds}h: {_s(timing.lease_kill_s)} - {_s(g)} - {_s(k)} = "
            f"{_s(timing.stop_begin_s)} >= {_s(rounds * h)}  {_verdict(timing.stop_begin_s >= rounds * h)}",
        )
    )
    if timing.validate():
        lines.append(_row("failover", "not computed: these settings are refused (see the errors)"))
    else:
        lines.append(
            _row(
                "failover",
                f"about {_s(typical_failover_s(timing))} after a master crash (E + h + D), at most "
                f"{_s(timing.failover_bound_s())} (protocol.md §5.1)",
            )
        )
    return lines


def running_daemon_pid(state_dir: Path) -> int | None:
    """The pid in the state dir's lock file if that process is alive, else None."""
    try:
        text = (state_dir / LOCK_FILE_NAME).read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    if not text.isdigit():
        return None
    pid = int(text)
    return pid if pid != os.getpid() and cli.pid_alive(pid) else None


def _describe(config: Config, running: int | None) -> list[str]:
    n = len(config.members)
    majority = quorum_size(n)
    lines = [
        _row("node", config.node_id),
        _row(
            "members",
            f"{n} ({', '.join(config.members)}): a majority is {majority}, so {n - majority} may fail",
        ),
        _row("state dir", str(config.state_dir)),
    ]
    if running is not None:
        lines.append(
            _row(
                "daemon",
                f"running (pid {running}, in the state dir's lock file): its port is in use by it "
                "and not checked",
            )
        )
    script = f"{config.script} (restart {config.restart})" if config.script else "none: only elect"
    lines.append(_row("script", script))
    if config.notify:
        lines.append(_row("notify", f"{config.notify} (timeout {_s(config.notify_timeout_s)})"))
    lines.append(_row("keys", _keys(config.key_file)))
    level = next((name for name, value in LOG_LEVELS.items() if value == config.log_level), "?")
    lines.append(_row("logs", f"level {level}, format {config.log_format}"))
    http = f"{config.http} (/metrics, /status, /leader, /health)" if config.http else "off"
    lines.append(_row("http", http))
    return lines


def _keys(key_file: Path | None) -> str:
    if key_file is None:
        return "none: cluster traffic is unauthenticated"
    try:
        ring = keyfile.load_keyring(key_file)
    except (ConfigError, OSError):
        return f"{key_file}: cannot be used (see the errors)"
    ids = ", ".join(str(i) for i in sorted(ring.keys))
    return f"{key_file} (key ids {ids}; signs with {ring.send_key_id})"


def _row(label: str, text: str) -> str:
    return f"  {label:<10}{text}"


def _verdict(ok: bool) -> str:
    return "ok" if ok else "FAILS"


def _s(x: float) -> str:
    return f"{x:.3f}".rstrip("0").rstrip(".") + "s"


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"
