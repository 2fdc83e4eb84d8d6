"""What a reload may change: reading the configuration again, and the rule of what needs a restart.

What this module owns
---------------------
``read_config``: the configuration as the daemon would read it now, from the command line it was
started with and that line's ``--config`` file, resolved and validated exactly as at start-up (the
same ``cli`` and ``Config.validate`` code), with the key file loaded. It only reads files and asks the
resolver, so the daemon runs it in a thread: a slow DNS answer must not stall the heartbeats.
``needs_restart``: the differences a reload refuses, each with what to do instead. The daemon applies
the rest (runtime/daemon.py ``Daemon.reload``; docs/operations.md §10).

The rule
--------
Live: the key file and its keys, the log level and format, the HTTP listener, the restart policy and
the notify hook (its path and timeout: the next run uses them; removing it lets what waits run and
gives it nothing new; adding it tells it where the node stands). Refused, changing nothing: the
members and this node's address (they make the cluster: protocol.md §1, §8), the timing (every node
must have the same, and the lease arithmetic of a sitting master rests on it), the state dir (the
lock, the term and the vote live there), turning authentication on or off (the wire's source check
depends on it), and the script path: the running script would keep running under the old path while
the status named the new one, and from none to some (or back) a sitting master would start or stop a
script in the middle of its term outside the core's rules; a new file at the same path needs no
reload (each start runs the file as it is then).
"""

from __future__ import annotations

from collections.abc import Sequence

from pyquorum.config import Config, check_http
from pyquorum.core.errors import ConfigError
from pyquorum.keyfile import load_keyring
from pyquorum.wire import KeyRing

__all__ = ["needs_restart", "read_config", "restart_settings"]


def read_config(
    argv: Sequence[str] | None, current: Config
) -> tuple[Config | None, KeyRing | None, list[str]]:
    """The configuration ``argv`` gives now, its keyring, and every problem (empty: usable).
    ``argv`` None (a daemon started by code): ``current`` again, with its key file re-read."""
    from pyquorum import cli  # the command line's own parsing: the same rules as at start-up

    if argv is None:
        config: Config | None = current
        problems: list[str] = []
    else:
        try:
            args, file_problems = cli.parse_daemon_args(argv)
        except Exception as exc:  # a --config file that now makes the command line invalid
            return None, None, [f"the command line no longer parses: {exc}"]
        config, problems = cli.resolve_config(args, file_problems)
        if config is not None:
            # the UDP port is ours, and so is the HTTP port if it did not change
            problems += config.validate(check_port=False)
            if config.http is not None and config.http != current.http:
                problems += check_http(config.http)
    keyring = None
    if config is not None and not problems and config.key_file is not None:
        try:
            keyring = load_keyring(config.key_file)
        except ConfigError as exc:
            problems += exc.problems
    return config, keyring, problems


def needs_restart(old: Config, new: Config) -> list[str]:
    """What changed between two configurations that a reload cannot apply, each with why."""
    why: list[str] = []
    if old.members != new.members:
        why.append(
            f"the members changed ({','.join(old.members)} -> {','.join(new.members)}): that needs "
            "the cluster stopped and 'pyquorum accept-members' (docs/protocol.md §8); not reloaded"
        )
    elif old.me != new.me:
        why.append(f"this node's address changed ({old.me} -> {new.me}): restart the node")
    if old.timing != new.timing:
        why.append(
            f"the timing changed ([{old.timing_text}] -> [{new.timing_text}]): every node must use "
            "the same, so change it on all of them with a restart (docs/operations.md §8)"
        )
    if old.state_dir != new.state_dir:
        why.append(f"the state dir changed ({old.state_dir} -> {new.state_dir}): restart the node")
    if old.script != new.script:
        why.append(
            f"the script changed ({old.script or 'none'} -> {new.script or 'none'}): restart the node "
            "(a new script file at the same path needs no restart: it is run at the next start)"
        )
    if (old.key_file is None) != (new.key_file is None):
        why.append("turning authentication on or off needs a restart of every node")
    return why


def restart_settings(config: Config) -> tuple[object, ...]:
    return (
        config.restart,
        config.restart_backoff_s,
        config.restart_backoff_max_s,
        config.max_failures,
        config.failure_window_s,
    )
