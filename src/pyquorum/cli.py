"""The ``pyquorum`` command: parse, resolve, validate everything at once, then run the daemon.

Bad input never produces a traceback: every problem found is printed as one ``pyquorum: error: ...``
line on stderr and the exit code is 2 (argparse's convention). Warnings are ``pyquorum: warning: ...``
lines, and the daemon still starts. Exit codes: 0 clean stop, 1 the daemon or a subcommand failed at
run time, 2 bad input.

The daemon's options come from the command line and, with ``--config``, from a TOML file whose values
become the parser's defaults (``parse_daemon_args``; the keys are in configfile.py), so the command
line overrides the file and one ``build_config`` makes the ``Config`` from both. ``check-config``
(checkconfig.py) runs the same parsing and checks without starting anything.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import math
import os
import re
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import NoReturn, cast

from pyquorum import __version__, configfile
from pyquorum.config import (
    DEFAULT_NOTIFY_TIMEOUT_S,
    DEFAULT_RESTART,
    LOG_FORMATS,
    LOG_LEVELS,
    RESTART_POLICIES,
    Config,
    LogFormat,
    RestartPolicy,
    check_key_file,
    check_notify,
    check_script,
    check_state_dir,
)
from pyquorum.core.address import DEFAULT_PORT, IPAddress, NodeAddress, split_host_port
from pyquorum.core.errors import ConfigError
from pyquorum.core.lease import Timing
from pyquorum.runtime.logs import configure_logging

PROG = "pyquorum"

USAGE = f"""\
{PROG} [-h] [--version] [-b BIND] [-p PORT] [-s SCRIPT] [-v] [-vv] [options] SERVER [SERVER ...]
       {PROG} --config FILE [options] [SERVER ...]
       {PROG} check-config [the daemon's options and SERVERs, or --config FILE]
       {PROG} keygen [--add] PATH
       {PROG} demo [--rounds N] [--interval SECONDS] [-p PORT]
       {PROG} status [the daemon's options, or --config FILE] [--json] [--watch]
       {PROG} reload [the daemon's options, or --config FILE]
       {PROG} step-down [the daemon's options, or --config FILE] [--to NODE] [--wait]
       {PROG} drill [the daemon's options, or --config FILE] [--crash] [--rounds N] [--json]
       {PROG} init [daemon options] SERVER [SERVER ...]
       {PROG} accept-members [daemon options] SERVER [SERVER ...]"""

DESCRIPTION = """\
Quorum-based leader election: the servers elect one master, and the master runs SCRIPT. Give this
node's address with -b/-p and list the OTHER servers; every server must be given the same cluster
and the same timing options. Every option can also be given in a TOML file (--config); an option on
the command line overrides the file."""

CHECK_USAGE = f"""\
{PROG} check-config [-h] [--config FILE] [-b BIND] [-p PORT] [-s SCRIPT] [options] [SERVER ...]"""

CHECK_DESCRIPTION = """\
Check the daemon's configuration without starting it: give it the daemon's own arguments, or its
--config file. It prints what the node would be, the timing rules with their numbers and the
failover those settings give, then every problem at once, as the daemon would: errors (the daemon
would refuse to start) and warnings (it would start, but probably not as meant, e.g. an even number
of servers). Exit code 0 without errors, 2 with any."""

EPILOG = f"""\
SERVER is an IPv4 or IPv6 address or a host name, with an optional port (default: -p):
  10.0.0.2  10.0.0.2:6000  fd00::2  [fd00::2]:6000  db2  db2:6000
Host names are resolved once, at start-up, preferring the bind address's family. A server whose
name is also a subcommand (check-config, keygen, demo, status, reload, step-down, drill, init,
accept-members) must be written with its port.

The default --state-dir is /var/lib/pyquorum/<ip>_<port> when running as root, otherwise
$XDG_STATE_HOME/pyquorum/<ip>_<port> (~/.local/state/pyquorum/<ip>_<port>), so that several nodes
on one host never share a state dir (a lock refuses a second daemon on the same one).

subcommands:
  check-config          check the daemon's arguments or --config file without starting: every
                        problem at once, and the failover time the timing gives
  keygen [--add] PATH   create a key file (mode 0600) for --key-file; --add adds a key to an
                        existing file, for rotation. Copy it to every server.
  demo                  a local 3-node cluster on 127.0.0.1 that fails over every few seconds
  status                show a running node, its cluster and its script, asking its daemon
                        (exit 0 ok, 1 a member unreachable, 2 no majority or no master, 3 no
                        daemon); --json, --watch
  reload                make the running daemon re-read its configuration, without failover
  step-down             hand the master's role over (--to NODE), at once; --wait prints the gap
  drill                 test failover live: planned handovers, or --crash (the master goes
                        silent, nothing is killed); measured gaps against the predicted bounds
  init                  mark this never-run node as new, so it votes at once (docs/protocol.md §8)
  accept-members        record a new member list, after stopping the cluster (docs/protocol.md §8)

exit codes: 0 stopped cleanly, 1 failed while running, 2 bad input. See 'pyquorum SUBCOMMAND -h'.
Version {__version__}."""


class UsageError(Exception):
    """Bad command line; the message is one line for ``pyquorum: error: ...``."""


class NoNodeError(ConfigError):
    """A command that asks a running daemon (status, reload, step-down, drill) cannot tell which
    node it is: ``main`` prints ``problems`` and exits 3, those commands' code for "no daemon"."""


class _ParserExit(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage and calls sys.exit(); main() must return an int instead, with one
    # line of error, so both paths raise and main() decides what to print.
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _ParserExit(status)

    # argparse makes a formatter at every add_argument() (to check the metavar), and a formatter
    # without a width asks shutil for the terminal's, so building the parser imported shutil, and
    # with it zlib, bz2 and lzma: 0.8 MB resident in every daemon (issue 12). Only text written for
    # people needs the width; every other formatter gets a fixed one.
    _writing_text = False

    def _get_formatter(self) -> argparse.HelpFormatter:
        if self._writing_text:
            return super()._get_formatter()
        make = cast(Callable[..., argparse.HelpFormatter], self.formatter_class)
        return make(prog=self.prog, width=80)

    def format_help(self) -> str:
        return self._text(super().format_help)

    def format_usage(self) -> str:
        return self._text(super().format_usage)

    def _text(self, format_: Callable[[], str]) -> str:
        self._writing_text = True
        try:
            return format_()
        finally:
            self._writing_text = False


def main(argv: list[str] | None = None) -> int:
    """Run the ``pyquorum`` command line and return its exit code (``__main__`` exits with it)."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if args and args[0] in _SUBCOMMANDS:
            return _SUBCOMMANDS[args[0]](args[1:])
        return _daemon(args)
    except NoNodeError as exc:
        _print_errors(exc.problems)
        return 3
    except UsageError as exc:
        _print_errors([str(exc)])
        return 2
    except ConfigError as exc:
        _print_errors(exc.problems)
        return 2
    except _ParserExit as exc:
        return exc.status
    except KeyboardInterrupt:
        return 130  # Ctrl-C that reached us (before the daemon handles signals): no traceback


def _daemon(argv: list[str]) -> int:
    # SIGHUP reloads the key file once the daemon runs; until then its default action (exit 129)
    # would kill a node that an operator reloads while it starts (a rotation step, docs/security.md
    # §6). Ignored until the daemon installs its handler: the keys are read after this point anyway.
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        config = load_config(argv)
        for warning in config.warnings():
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        configure_logging(config.log_level, config.node_id, config.log_format)
        # Imported here so that the command line (and its tests) work without the runtime loaded.
        _import_asyncio_without_tls()
        from pyquorum.runtime.daemon import run

        return run(config, argv)
    finally:
        signal.signal(signal.SIGHUP, previous)


def _import_asyncio_without_tls() -> None:
    """Import asyncio with the ``ssl`` module hidden, so that it runs without its TLS support.

    asyncio imports ``ssl`` for TLS transports, which the daemon never opens, and ``ssl`` loads
    OpenSSL's libssl and libcrypto: 4 MB resident in every daemon, a sixth of its memory. asyncio is
    written to run without it (``ssl = None`` when the import fails). ``ssl`` stays importable for
    anyone else afterwards; where asyncio or ssl is loaded already (a test process), nothing changes.
    """
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return
    sys.modules["ssl"] = None  # type: ignore[assignment]  # what makes "import ssl" raise ImportError
    try:
        import asyncio  # noqa: F401
    finally:
        del sys.modules["ssl"]


def load_config(argv: Sequence[str], prog: str = PROG, description: str | None = None) -> Config:
    """The daemon's command line (and its --config file) as a validated ``Config``; raises
    ``ConfigError`` listing every problem, ``UsageError`` for a malformed command line."""
    args, file_problems = parse_daemon_args(argv, prog, description)
    return build_config(args, file_problems)


def parse_daemon_args(
    argv: Sequence[str],
    prog: str = PROG,
    description: str | None = None,
    options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[argparse.Namespace, list[str]]:
    """Parse the daemon's arguments, with the values of the --config file as defaults, so that the
    command line overrides the file. Returns the arguments and the file's problems (unknown keys,
    wrong types, unreadable file): pass both to ``build_config``, which reports them with the rest.
    """
    parser = _daemon_parser(prog, description)
    if options is not None:
        options(parser)  # a subcommand's own options (status, reload)
    args = parser.parse_args(list(argv))
    if args.config is None:
        return args, []
    values, problems = configfile.load(args.config.expanduser())
    parser.set_defaults(**values)
    return parser.parse_args(list(argv)), problems


def _daemon_parser(prog: str = PROG, description: str | None = None) -> _Parser:
    # the daemon's options, for the daemon itself or for a subcommand that takes them (check-config,
    # init, accept-members: ``description`` says what that one does)
    checking = prog != PROG
    p = _Parser(
        prog=prog,
        usage=(CHECK_USAGE.replace("check-config", prog.split()[-1]) if checking else USAGE),
        description=description or (CHECK_DESCRIPTION if checking else DESCRIPTION),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="read options from this TOML file (see docs/operations.md for the keys); options "
        "given on the command line override it, and SERVERs may come from its 'peers' key",
    )
    p.add_argument(
        "-b",
        "--bind",
        metavar="BIND",
        help="this node's IP address (never a host name): the address it binds and its identity "
        "in the cluster (default: the primary IP address of this host, the source address of "
        "its default route)",
    )
    p.add_argument(
        "-p",
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help=f"UDP port of this node, and of every SERVER given without one (default: {DEFAULT_PORT})",
    )
    p.add_argument(
        "-s",
        "--script",
        metavar="SCRIPT",
        help="executable run on the master, without a shell, with PYQUORUM_TERM (the fencing "
        "token), PYQUORUM_NODE and PYQUORUM_CLUSTER in its environment (default: none, only elect)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (--log-level info)")
    p.add_argument(
        "-vv", "--very-verbose", action="store_true", help="log at DEBUG level (--log-level debug)"
    )
    t = Timing()
    timing = p.add_argument_group(
        "timing (every server must use the same values; unsafe combinations are refused)"
    )
    for flag, default, text in (
        ("--heartbeat-interval", t.heartbeat_interval_s, "how often each node tells the others it is alive"),
        (
            "--election-timeout",
            t.election_timeout_s,
            "silence from the master after which the others elect a new one; at least 5 heartbeat intervals",
        ),
        (
            "--stop-timeout",
            t.stop_timeout_s,
            "grace between SIGTERM and SIGKILL when the script is stopped",
        ),
        (
            "--start-delay",
            t.start_delay_s,
            "extra wait before a new master starts the script, which leaves more room for --stop-timeout",
        ),
        (
            "--kill-margin",
            t.kill_margin_s,
            "the script's guard sends SIGKILL this long before the kill deadline, for the process "
            "group to die and be reaped; at least 0.005",
        ),
    ):
        timing.add_argument(
            flag, type=_seconds, default=default, metavar="SECONDS", help=f"{text} (default: {default:g})"
        )
    other = p.add_argument_group("other options")
    other.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="where this node keeps its term, vote and status.json (default: see below; it is "
        "per address and port, so several nodes on one host do not clash)",
    )
    other.add_argument(
        "--key-file",
        type=Path,
        metavar="PATH",
        help="shared keyring authenticating cluster traffic (create it with 'pyquorum keygen "
        "PATH'; default: none, traffic is unauthenticated)",
    )
    other.add_argument(
        "--restart",
        choices=RESTART_POLICIES,
        default=DEFAULT_RESTART,
        help="when the script exits on its own while this node is master: restart it after a "
        "failure, after any exit, or never; restarts back off from 1 s doubling to 30 s, and after "
        f"5 failures within 60 s this node resigns so another can try (default: {DEFAULT_RESTART})",
    )
    roles = p.add_argument_group("who may be master (every server must be given the same)")
    roles.add_argument(
        "--priority",
        action="append",
        default=[],
        metavar="[NODE=]N",
        help="the priority of NODE (this node if NODE is left out): among the live members a higher "
        "priority proposes first (default: 0 for all); repeat for each node",
    )
    roles.add_argument(
        "--witness",
        action="append",
        nargs="?",
        const="",
        default=[],
        metavar="NODE",
        help="NODE (this node if left out) is a witness: it votes and acknowledges but never becomes "
        "master nor runs the script; repeat for each witness",
    )
    roles.add_argument(
        "--preempt-after",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="a node of higher priority than the master that has been connected this long takes "
        "the role by a clean handover (default: never; a healthy master keeps its role)",
    )
    other.add_argument(
        "--notify",
        type=Path,
        metavar="PATH",
        help="executable told of each role change of this node, one call at a time and in order, "
        "as 'PATH EVENT TERM MASTER' (EVENT: master, slave, no-quorum, stopping); advisory: the "
        "election never waits for it (see docs/operations.md; default: none)",
    )
    other.add_argument(
        "--notify-timeout",
        type=_seconds,
        default=DEFAULT_NOTIFY_TIMEOUT_S,
        metavar="SECONDS",
        help="a --notify hook still running after this long is killed with its process group "
        f"(default: {DEFAULT_NOTIFY_TIMEOUT_S:g})",
    )
    logs = p.add_argument_group("logs")
    logs.add_argument(
        "--log-level",
        choices=tuple(LOG_LEVELS),
        default="warning",
        help="the least severe messages logged; -v and -vv win over it (default: warning)",
    )
    logs.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="text: one line per event for people, without timestamps under journald; json: one "
        "object per line with the same fields (default: text)",
    )
    other.add_argument(
        "--http",
        metavar="ADDRESS:PORT",
        help="serve /metrics (Prometheus), /status (JSON), /leader (200 on the master, 503 "
        "elsewhere) and /health over HTTP there, e.g. 127.0.0.1:9621 (default: off); see "
        "docs/operations.md",
    )
    # "*", not "+": with --config the SERVERs may come from the file; build_config requires some.
    p.add_argument("servers", nargs="*", metavar="SERVER", help="the other servers")
    return p


def build_config(args: argparse.Namespace, file_problems: Sequence[str] = ()) -> Config:
    """Turn parsed arguments into a validated ``Config``; raise ``ConfigError`` listing every
    problem found (the file's, addresses, names, script, state dir, timing, key file)."""
    config, problems = resolve_config(args, file_problems)
    if config is not None:
        problems += config.validate()
    if problems or config is None:
        raise ConfigError(problems)
    return config


def resolve_config(
    args: argparse.Namespace, file_problems: Sequence[str] = ()
) -> tuple[Config | None, list[str]]:
    """Resolve parsed arguments into a ``Config`` without validating it (``Config.validate``
    does that): addresses parsed, host names resolved, defaults filled in. Returns the ``Config``,
    or None if this node's address or state dir cannot be found, and every problem met on the way;
    without a ``Config``, the checks that need no address (timing, script, key file) are done here.
    """
    problems: list[str] = list(file_problems)
    timing = timing_from_args(args)
    try:
        ip = parse_bind(args.bind) if args.bind is not None else default_bind_address()
    except ConfigError as exc:
        problems += exc.problems
        ip = None
    family = socket.AF_INET6 if ip is not None and ip.version == 6 else socket.AF_INET
    peers: list[NodeAddress] = []
    names: list[str] = []
    for text in args.servers:
        try:
            peers.append(resolve_server(text, args.port, family))
            names.append(text)
        except ValueError as exc:
            problems.append(f"SERVER {exc}")
    if not args.servers:
        problems.append(
            "no SERVER given: list the other servers on the command line or as peers = [...] in "
            "the --config file (a cluster of one cannot fail over)"
        )
    script = resolve_script(args.script) if args.script is not None else None
    key_file = args.key_file.expanduser().absolute() if args.key_file is not None else None
    notify = str(args.notify.expanduser().absolute()) if args.notify is not None else None
    state_dir: Path | None = None
    if args.state_dir is not None:
        state_dir = args.state_dir.expanduser().absolute()
    elif ip is not None:
        try:
            state_dir = default_state_dir(NodeAddress(ip, args.port)).absolute()
        except ConfigError as exc:
            problems += exc.problems
    if ip is None or state_dir is None:
        # No Config without this node's address or state dir; check what needs neither.
        problems += check_script(script)
        if state_dir is not None:
            problems += check_state_dir(state_dir)
        problems += timing.validate()
        problems += check_key_file(key_file)
        problems += check_notify(notify, args.notify_timeout)
        return None, problems
    me = NodeAddress(ip, args.port)
    members = {str(me), *(str(p) for p in peers)}

    def member(text: str) -> str | None:
        # a --priority or --witness NODE, as a SERVER is written; this node when left out
        if not text:
            return str(me)
        try:
            node = str(resolve_server(text, args.port, family))
        except ValueError as exc:
            problems.append(f"{exc}")
            return None
        if node not in members:
            problems.append(f"{text!r} ({node}) is not a member: --priority and --witness name members")
            return None
        return node

    priorities: dict[str, int] = {}
    for entry in args.priority:
        node_text, _, value = entry.rpartition("=")
        node = member(node_text)
        if not value.lstrip("-").isdigit():
            problems.append(f"--priority {entry!r}: want [NODE=]N with N a whole number")
        elif node is not None:
            priorities[node] = int(value)
    witnesses = tuple(sorted({w for w in map(member, args.witness) if w is not None}))
    restart: RestartPolicy = args.restart
    level = LOG_LEVELS[args.log_level]
    if args.very_verbose:
        level = logging.DEBUG
    elif args.verbose:
        level = logging.INFO
    log_format: LogFormat = args.log_format
    http: NodeAddress | None = None
    if args.http is not None:
        try:
            http = parse_http(args.http)
        except ValueError as exc:
            problems.append(str(exc))
    config = Config(
        me=me,
        peers=tuple(peers),
        peer_names=tuple(names),
        state_dir=state_dir,
        script=script,
        timing=timing,
        key_file=key_file,
        restart=restart,
        log_level=level,
        log_format=log_format,
        http=http,
        priorities=tuple(sorted(priorities.items())),
        witnesses=witnesses,
        preempt_after_s=args.preempt_after,
        notify=notify,
        notify_timeout_s=args.notify_timeout,
    )
    return config, problems


def timing_from_args(args: argparse.Namespace) -> Timing:
    """The ``Timing`` of the parsed arguments, unchecked (``Timing.validate`` checks it)."""
    return Timing(
        heartbeat_interval_s=args.heartbeat_interval,
        election_timeout_s=args.election_timeout,
        stop_timeout_s=args.stop_timeout,
        start_delay_s=args.start_delay,
        kill_margin_s=args.kill_margin,
    )


def parse_http(text: str) -> NodeAddress:
    """The ``--http`` value: an IP address and a port, ``127.0.0.1:9621`` or ``[::1]:9621``."""
    try:
        host, port = split_host_port(text, 0)
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"--http {text!r} must be ADDRESS:PORT with an IP address, e.g. 127.0.0.1:9621"
        ) from None
    if port == 0:
        raise ValueError(f"--http {text!r} needs a port: ADDRESS:PORT, e.g. {host}:9621")
    return NodeAddress(ip, port)


def parse_bind(text: str) -> IPAddress:
    """The ``-b`` value: an IP address, optionally in brackets; never a host name or a port."""
    raw = text.strip()
    if raw.startswith("[") and raw.endswith("]"):
        raw = raw[1:-1]
    try:
        return ipaddress.ip_address(raw)
    except ValueError:
        pass
    try:
        host, _ = split_host_port(text)
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            [
                f"-b/--bind must be an IP address, not {text!r}: give this node's own address "
                "(host names are not accepted, so that the node's identity cannot change)"
            ]
        ) from None
    raise ConfigError([f"-b/--bind takes an address without a port ({text!r}): use -p/--port"])


def default_bind_address() -> IPAddress:
    """The primary IP address of this host: the source address the kernel picks for its default
    route. Found with connect() on a UDP socket, which only chooses a route and sends nothing."""
    # TEST-NET-1 and the IPv6 documentation prefix (RFC 5737, RFC 3849): never real hosts.
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.connect((probe, 9))
                ip = ipaddress.ip_address(sock.getsockname()[0])
        except (OSError, ValueError):
            continue
        if not ip.is_unspecified:
            return ip
    raise ConfigError(
        [
            "cannot find this host's primary IP address (it has no default route): give this "
            "node's address with -b/--bind"
        ]
    )


_IPV4ISH = re.compile(r"[0-9.]+")
_HOST_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_-]+)*\.?")


def resolve_server(text: str, default_port: int, family: int = socket.AF_INET) -> NodeAddress:
    """Parse one SERVER argument and resolve a host name with getaddrinfo, preferring ``family``.
    Raise ``ValueError`` with a message that starts with the argument as given."""
    try:
        host, port = split_host_port(text, default_port)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a valid address: {exc}") from None
    try:
        return NodeAddress(ipaddress.ip_address(host), port)
    except ValueError:
        pass
    # Reject what cannot be a name before asking the resolver, which may wait on DNS to say so.
    if _IPV4ISH.fullmatch(host) or ":" in host:
        raise ValueError(f"{text!r}: {host!r} is not a valid IP address")
    if not _HOST_NAME.fullmatch(host):
        raise ValueError(f"{text!r}: {host!r} is neither an IP address nor a host name")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise ValueError(f"{text!r}: cannot resolve host name {host!r} ({reason})") from None
    ips = [
        ipaddress.ip_address(str(info[4][0]))
        for info in infos
        if info[0] in (socket.AF_INET, socket.AF_INET6)
    ]
    if not ips:
        raise ValueError(f"{text!r}: host name {host!r} has no IPv4 or IPv6 address")
    want = 6 if family == socket.AF_INET6 else 4
    preferred = [ip for ip in ips if ip.version == want]
    return NodeAddress((preferred or ips)[0], port)


def resolve_script(text: str) -> str:
    """The absolute path of ``-s``: a path as given, or a bare name found on $PATH."""
    path = os.path.expanduser(text)
    if os.sep not in path and not os.path.exists(path):
        import shutil  # only for a bare name: shutil loads zlib, bz2 and lzma (0.8 MB resident)

        found = shutil.which(path)
        if found is not None:
            return os.path.abspath(found)
    return os.path.abspath(path)


def default_state_dir(me: NodeAddress) -> Path:
    """Per-node default: /var/lib/pyquorum/<ip>_<port> as root (when /var/lib is writable), else
    ${XDG_STATE_HOME:-~/.local/state}/pyquorum/<ip>_<port>."""
    name = f"{me.ip}_{me.port}"
    if os.geteuid() == 0 and os.access("/var/lib", os.W_OK):
        return Path("/var/lib/pyquorum") / name
    xdg = os.environ.get("XDG_STATE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec: a relative value is invalid and must be ignored
        return Path(xdg) / "pyquorum" / name
    try:
        home = Path.home()
    except RuntimeError:
        raise ConfigError(
            ["cannot find the home directory for the default state dir: give --state-dir"]
        ) from None
    return home / ".local" / "state" / "pyquorum" / name


def _keygen(argv: list[str]) -> int:
    p = _Parser(
        prog=f"{PROG} keygen",
        description="Create a key file for --key-file (mode 0600, never overwritten) and copy it "
        "to every server. --add appends a new key to an existing file: every node accepts it, but "
        "it signs only once moved to the first line (key rotation, see docs/security.md).",
    )
    p.add_argument("--add", action="store_true", help="append a new key to an existing key file")
    p.add_argument("path", type=Path, metavar="PATH")
    args = p.parse_args(argv)
    from pyquorum import keyfile

    path: Path = args.path.expanduser()
    try:
        key_id = keyfile.keygen(path, add=args.add)
        mode = path.stat().st_mode
    except OSError as exc:
        _print_errors([f"{path}: {exc.strerror or exc}"])
        return 1
    print(f"{path} (mode {stat.filemode(mode)}, {stat.S_IMODE(mode):04o}) key id {key_id}")
    return 0


def _demo(argv: list[str]) -> int:
    p = _Parser(
        prog=f"{PROG} demo",
        description="Run a local demo cluster: 3 nodes on 127.0.0.1 running a sample script. The "
        "master's daemon is killed with SIGKILL every few seconds; the demo shows who takes over "
        "and how long it took. Ctrl-C stops everything it started.",
    )
    p.add_argument(
        "--rounds",
        type=_count,
        default=0,
        metavar="N",
        help="stop by itself after N failovers (default: 0, run until Ctrl-C)",
    )
    p.add_argument(
        "--interval",
        type=_seconds,
        default=8.0,
        metavar="SECONDS",
        help="time between two kills of the master (default: 8)",
    )
    p.add_argument(
        "-p",
        "--port",
        type=_count,
        default=DEFAULT_PORT,
        help=f"first of the three UDP ports; taken ports or 0 mean any free ones (default: {DEFAULT_PORT})",
    )
    args = p.parse_args(argv)
    from pyquorum import demo

    return demo.run(rounds=args.rounds, interval_s=args.interval, own_process=True, port=args.port)


def _init(argv: list[str]) -> int:
    config = load_config(
        argv,
        f"{PROG} init",
        "Mark a node that has never run as new: it then votes at once, instead of waiting to hear "
        "every member as a node without a state file does (it may have lost its state). Use it to "
        "start a brand-new cluster while some of its servers are not running yet. Give the "
        "daemon's own options. Never use it on a node that has run before: it could vote twice in "
        "a term (docs/protocol.md §3.9, §8).",
    )
    from pyquorum.runtime.storage import PersistedState, StateStore

    with StateStore(config.state_dir) as store:
        if store.state_file.exists():
            raise ConfigError(
                [
                    f"{store.state_file} exists: this node has run before, and 'init' is only for a "
                    "node that never has; just start it"
                ]
            )
        store.save(PersistedState(members=config.members))
    print(f"{config.state_dir}: new node {config.node_id}, members {','.join(config.members)}")
    return 0


def _accept_members(argv: list[str]) -> int:
    config = load_config(
        argv,
        f"{PROG} accept-members",
        "Record a new member list in this node's state directory, so that the daemon starts with "
        "it. Only after stopping pyquorum on enough servers that neither the old nor the new list "
        "has a running majority, and waiting the election timeout plus the start delay "
        "(docs/protocol.md §8). Give the daemon's own options with the NEW list.",
    )
    from pyquorum.runtime.storage import StateStore

    with StateStore(config.state_dir) as store:  # refuses while this node's daemon runs
        state = store.load()
        if not store.state_file.exists():
            raise ConfigError([f"{store.state_file} does not exist: nothing to change; just start the node"])
        if state.members == config.members:
            print(f"{config.state_dir}: members already {','.join(config.members)}")
            return 0
        store.save(replace(state, members=config.members))
    old = ",".join(state.members) if state.members else "(not recorded)"
    print(
        f"{config.state_dir}: members {old} -> {','.join(config.members)}; start every server with "
        "the new list"
    )
    return 0


def _check_config(argv: list[str]) -> int:
    from pyquorum import checkconfig

    return checkconfig.run(argv)


STATUS_DESCRIPTION = """\
Show a running node as its daemon sees it: the cluster (members, quorum, master, term,
authentication), one row per member (its role as this node sees it, whether it is reachable and how
that is known, when it was last heard, the round trip from the master, its term and key id), this
node's lease and kill deadline, and the script. Give the daemon's own arguments or its --config file,
so that it finds the node exactly as the daemon does; it asks the daemon over the control socket in
the node's state dir. Exit codes (the monitoring-plugin convention): 0 a master is known and this
node reaches a majority, 1 a warning (a member is unreachable), 2 critical (no majority or no
master), 3 the daemon cannot be reached (or the arguments do not name a node)."""

RELOAD_DESCRIPTION = """\
Make the running daemon read its configuration again (the command line it was started with and its
--config file) and apply what can change without a restart: the keys, the log level and format, the
HTTP listener, the restart policy. A change that needs a restart (members, timing, this node's
address or port, the state dir, the script) is refused and nothing changes; the master stays master
either way. Waits for the result and prints it. Give the daemon's own arguments or its --config file
(they only locate the node). Exit codes: 0 applied, 1 refused, 3 the daemon cannot be reached."""


def running_node(
    argv: Sequence[str],
    prog: str,
    description: str,
    options: Callable[[argparse.ArgumentParser], None],
) -> tuple[argparse.Namespace, Config]:
    """Parse a command that addresses a running daemon: the daemon's arguments (or --config) plus
    its own ``options``, resolved as the daemon resolves them. The ``Config`` is not validated:
    only the node's identity and state dir matter. Raises ``NoNodeError`` when the arguments name
    no node (``main`` then exits 3)."""
    try:
        args, file_problems = parse_daemon_args(argv, prog, description, options)
    except UsageError as exc:
        raise NoNodeError([str(exc)]) from None
    config, problems = resolve_config(args, file_problems)
    if config is None:
        raise NoNodeError(problems)
    return args, config


def _status(argv: list[str]) -> int:
    def options(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("status")
        g.add_argument("--json", action="store_true", help="print the status document (api_version 1)")
        g.add_argument("--watch", action="store_true", help="redraw until Ctrl-C")
        g.add_argument(
            "--interval", type=_seconds, default=1.0, metavar="SECONDS", help="--watch period (default: 1)"
        )
        g.add_argument(
            "--timeout", type=_seconds, default=5.0, metavar="SECONDS", help="how long to wait for the daemon"
        )

    args, config = running_node(argv, f"{PROG} status", STATUS_DESCRIPTION, options)
    from pyquorum.runtime import control, status

    def show(client: control.Client) -> int:
        try:
            doc = client.request("status")
        except (control.Unreachable, control.CommandFailed) as exc:
            _print_errors([f"cannot get the status of {config.node_id}: {exc}"])
            return 3
        if not isinstance(doc, dict) or doc.get("api_version") != status.API_VERSION:
            _print_errors([f"the daemon of {config.node_id} speaks another status version: {doc!r:.80}"])
            return 3
        print(json.dumps(doc, indent=2) if args.json else status.render_text(doc), flush=True)
        return status.exit_code(doc)

    with control.Client(config.state_dir, args.timeout) as client:
        if not args.watch:
            return show(client)
        code = 3
        clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
        try:
            while True:
                print(clear + time.strftime("%Y-%m-%d %H:%M:%S"), flush=True)
                code = show(client)
                if not clear:
                    print(flush=True)
                time.sleep(args.interval)
        except KeyboardInterrupt:
            return code


def _reload(argv: list[str]) -> int:
    def options(p: argparse.ArgumentParser) -> None:
        p.add_argument_group("reload").add_argument(
            "--timeout", type=_seconds, default=60.0, metavar="SECONDS", help="how long to wait (default: 60)"
        )

    args, config = running_node(argv, f"{PROG} reload", RELOAD_DESCRIPTION, options)
    from pyquorum.runtime import control

    try:
        result = control.request(config.state_dir, "reload", timeout_s=args.timeout)
    except control.Unreachable as exc:
        _print_errors([f"cannot reach the daemon of {config.node_id}: {exc}"])
        return 3
    except control.CommandFailed as exc:
        _print_errors([f"the daemon of {config.node_id} refused: {exc}"])
        return 1
    if result.get("applied"):
        changes = result.get("changes") or []
        print(f"{config.node_id}: reloaded: " + ("; ".join(changes) if changes else "nothing changed"))
        return 0
    for problem in result.get("problems") or ["refused"]:
        print(f"{PROG}: error: {config.node_id}: reload refused: {problem}", file=sys.stderr)
    print(f"{config.node_id}: reload refused, nothing changed")
    return 1


def pid_alive(pid: object) -> bool:
    """The one meaning of alive (pyquorum._localcluster): /proc/<pid>/stat exists and the process is
    not a zombie, which ``os.kill(pid, 0)`` would still find (a daemon whose parent has not reaped it
    holds no lock and answers nothing). Readable for any user's process, a root daemon's too."""
    from pyquorum._localcluster import alive

    return alive(pid)


def _print_errors(problems: Sequence[str]) -> None:
    for problem in problems:
        print(f"{PROG}: error: {problem}", file=sys.stderr)


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"port must be a number from 1 to 65535, not {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, not {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds, not {text!r}")
    return value


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}")
    return int(text)


def _step_down(argv: list[str]) -> int:
    from pyquorum import drill

    return drill.step_down_main(argv)


def _drill(argv: list[str]) -> int:
    from pyquorum import drill

    return drill.drill_main(argv)


_SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {
    "check-config": _check_config,
    "keygen": _keygen,
    "demo": _demo,
    "status": _status,
    "reload": _reload,
    "step-down": _step_down,
    "drill": _drill,
    "init": _init,
    "accept-members": _accept_members,
}
