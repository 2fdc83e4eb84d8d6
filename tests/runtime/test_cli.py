"""The command line: every bad input is one clear line per problem and exit code 2, never a traceback.

Only loopback addresses appear here; nothing is ever sent (the checks only bind and close sockets).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import stat
import subprocess
import sys
import time
import types
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import pyquorum
from pyquorum import cli
from pyquorum.config import Config
from pyquorum.core.address import NodeAddress
from pyquorum.core.errors import ConfigError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FakeDaemon:
    """Stands in for pyquorum.runtime.daemon so these tests never start a daemon."""

    def __init__(self) -> None:
        self.configs: list[Config] = []
        self.exit_code = 0
        self.error: ConfigError | None = None

    def run(self, config: Config, argv: Sequence[str] | None = None) -> int:
        self.configs.append(config)
        self.argv = argv
        if self.error is not None:
            raise self.error
        return self.exit_code


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDaemon]:
    fake = FakeDaemon()
    module = types.ModuleType("pyquorum.runtime.daemon")
    module.run = fake.run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pyquorum.runtime.daemon", module)
    logger = logging.getLogger("pyquorum")
    handlers, level = list(logger.handlers), logger.level
    yield fake
    logger.handlers[:] = handlers
    logger.setLevel(level)


def refuse_every_bind(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on every bind fails as for an address that is not this host's: every loopback address
    is local, so the kernel's answer for a foreign address is simulated."""

    def not_here(self: socket.socket, address: object) -> None:
        raise OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")

    monkeypatch.setattr(socket.socket, "bind", not_here)


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def base(tmp_path: Path, port: int) -> list[str]:
    """Options for a valid node 127.0.0.1:<port> with its own state dir."""
    return ["-b", "127.0.0.1", "-p", str(port), "--state-dir", str(tmp_path / "state")]


def run_cli(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def errors_of(err: str) -> list[str]:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if not line.startswith("pyquorum: warning: ")]
    assert lines, "expected at least one error line"
    assert all(line.startswith("pyquorum: error: ") for line in lines), lines
    return [line.removeprefix("pyquorum: error: ") for line in lines]


def assert_bad_input(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> list[str]:
    code, out, err = run_cli(capsys, argv)
    assert code == 2, err
    assert out == ""
    problems = errors_of(err)
    text = "\n".join(problems)
    for needle in needles:
        assert needle in text, f"{needle!r} not in:\n{text}"
    return problems


# -- argparse-level mistakes -------------------------------------------------------------------


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, ["--version"])
    assert code == 0
    assert out.strip() == f"pyquorum {pyquorum.__version__}"


def test_cli_help_explains_state_dir_default(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, ["--help"])
    assert code == 0
    assert "usage: pyquorum [-h] [--version] [-b BIND] [-p PORT] [-s SCRIPT] [-v] [-vv]" in out
    for option in (
        "--heartbeat-interval",
        "--election-timeout",
        "--stop-timeout",
        "--start-delay",
        "--kill-margin",
    ):
        assert option in out
    assert "<ip>_<port>" in out
    assert "several nodes" in out


def test_cli_unknown_option_is_one_line(capsys: pytest.CaptureFixture[str], base: list[str]) -> None:
    (problem,) = assert_bad_input(capsys, [*base, "--bogus", "127.0.0.2"], "--bogus")
    assert "pyquorum --help" in problem


def test_cli_missing_server(capsys: pytest.CaptureFixture[str], base: list[str]) -> None:
    assert_bad_input(capsys, base, "SERVER")


@pytest.mark.parametrize("value", ["0", "65536", "abc", "-1"])
def test_cli_bad_port(capsys: pytest.CaptureFixture[str], value: str) -> None:
    assert_bad_input(capsys, ["-p", value, "127.0.0.2"], "-p/--port", value)


@pytest.mark.parametrize("value", ["abc", "nan", "inf", ""])
def test_cli_bad_seconds(capsys: pytest.CaptureFixture[str], base: list[str], value: str) -> None:
    assert_bad_input(capsys, [*base, "--heartbeat-interval", value, "127.0.0.2"], "--heartbeat-interval")


def test_cli_bad_restart_policy(capsys: pytest.CaptureFixture[str], base: list[str]) -> None:
    assert_bad_input(capsys, [*base, "--restart", "sometimes", "127.0.0.2"], "--restart", "on-failure")


# -- addresses ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "needle"),
    [
        ("127.0.0.2:99999", "out of range"),
        ("127.0.0.2:abc", "not a number"),
        ("[::1", "missing ']'"),
        ("[::1]x", "expected ':port'"),
        ("300.1.1.1", "not a valid IP address"),
        ("1:2:3", "not a valid IP address"),
        ("bad host!", "neither an IP address nor a host name"),
        (":6000", "empty host"),
    ],
)
def test_cli_bad_server_address(
    capsys: pytest.CaptureFixture[str], base: list[str], server: str, needle: str
) -> None:
    (problem,) = assert_bad_input(capsys, [*base, server, "127.0.0.3"], needle)
    assert problem.startswith(f"SERVER {server!r}")


def test_cli_unresolvable_name(
    capsys: pytest.CaptureFixture[str], base: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_such_name(*args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    assert_bad_input(
        capsys,
        [*base, "db9.invalid", "127.0.0.2"],
        "'db9.invalid': cannot resolve host name 'db9.invalid' (Name or service not known)",
    )


@pytest.mark.parametrize(
    ("bind", "needle"),
    [
        ("db1", "-b/--bind must be an IP address, not 'db1'"),
        ("localhost", "-b/--bind must be an IP address"),
        ("127.0.0.1:6000", "without a port"),
        ("[::1]:6000", "without a port"),
        ("0.0.0.0", "not a unicast address"),
        ("::", "not a unicast address"),
        ("224.0.0.1", "not a unicast address"),
    ],
)
def test_cli_bad_bind(capsys: pytest.CaptureFixture[str], tmp_path: Path, bind: str, needle: str) -> None:
    assert_bad_input(capsys, ["-b", bind, "--state-dir", str(tmp_path), "127.0.0.2"], needle)


def test_cli_bind_not_local(
    capsys: pytest.CaptureFixture[str], base: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    refuse_every_bind(monkeypatch)
    assert_bad_input(capsys, [*base, "127.0.0.2"], "-b/--bind 127.0.0.1 is not an address of this host")


def test_cli_port_in_use(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        assert_bad_input(
            capsys,
            ["-b", "127.0.0.1", "-p", str(port), "--state-dir", str(tmp_path), "127.0.0.2"],
            f"UDP port {port} on 127.0.0.1 is in use",
        )


def test_cli_self_among_peers(capsys: pytest.CaptureFixture[str], base: list[str], port: int) -> None:
    assert_bad_input(
        capsys,
        [*base, f"127.0.0.1:{port}", "127.0.0.2"],
        f"this node (127.0.0.1:{port}) is listed among its own peers",
    )


def test_cli_self_among_peers_by_default_port_and_name(
    capsys: pytest.CaptureFixture[str], base: list[str], port: int
) -> None:
    assert_bad_input(capsys, [*base, "localhost", "127.0.0.2"], "listed among its own peers as localhost")


def test_cli_duplicate_peers_after_resolution(
    capsys: pytest.CaptureFixture[str], base: list[str], port: int
) -> None:
    problems = assert_bad_input(
        capsys,
        [*base, "127.0.0.2", f"127.0.0.2:{port}", "localhost:6000", "127.0.0.1:6000"],
        f"peer 127.0.0.2:{port} is listed 2 times",
        "peer 127.0.0.1:6000 is listed 2 times (localhost:6000 (127.0.0.1:6000), 127.0.0.1:6000)",
    )
    assert len(problems) == 2


def test_cli_mixed_address_families(capsys: pytest.CaptureFixture[str], base: list[str]) -> None:
    assert_bad_input(
        capsys, [*base, "[::1]:6000", "127.0.0.2"], "is IPv6 but the bind address 127.0.0.1 is IPv4"
    )


def test_cli_script_missing(capsys: pytest.CaptureFixture[str], base: list[str], tmp_path: Path) -> None:
    missing = tmp_path / "nope.sh"
    assert_bad_input(capsys, [*base, "-s", str(missing), "127.0.0.2"], f"script {missing} does not exist")


def test_cli_script_not_executable(
    capsys: pytest.CaptureFixture[str], base: list[str], tmp_path: Path
) -> None:
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    if os.access(script, os.X_OK):
        pytest.skip("this user may execute any file")
    assert_bad_input(capsys, [*base, "-s", str(script), "127.0.0.2"], f"chmod +x {script}")


def test_cli_script_is_a_directory(
    capsys: pytest.CaptureFixture[str], base: list[str], tmp_path: Path
) -> None:
    assert_bad_input(capsys, [*base, "-s", str(tmp_path), "127.0.0.2"], "not a regular file")


def test_cli_relative_script_made_absolute(
    capsys: pytest.CaptureFixture[str],
    base: list[str],
    tmp_path: Path,
    daemon: FakeDaemon,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, [*base, "-s", "./job.sh", "127.0.0.2", "127.0.0.3"])[0] == 0
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.chdir("/")
    assert run_cli(capsys, [*base, "-s", "job.sh", "127.0.0.2", "127.0.0.3"])[0] == 0
    assert [c.script for c in daemon.configs] == [str(script), str(script)]


def test_cli_unsafe_timing_says_what_works(capsys: pytest.CaptureFixture[str], base: list[str]) -> None:
    assert_bad_input(
        capsys,
        [*base, "--election-timeout", "0.3", "127.0.0.2"],
        "--election-timeout (0.3s) must be at least 5 x --heartbeat-interval",
        "use --election-timeout 0.5 or more",
        "unsafe timing",
    )


def test_cli_kill_margin_too_small_says_what_works(
    capsys: pytest.CaptureFixture[str], base: list[str]
) -> None:
    assert_bad_input(
        capsys,
        [*base, "--kill-margin", "0.001", "127.0.0.2"],
        "--kill-margin (0.001s) must be at least 0.005s",
        "use --kill-margin 0.025 (the default) or more",
    )


def test_cli_negative_timing(capsys: pytest.CaptureFixture[str], base: list[str]) -> None:
    assert_bad_input(
        capsys, [*base, "--stop-timeout", "-1", "127.0.0.2"], "--stop-timeout must not be negative"
    )


def test_cli_missing_key_file(capsys: pytest.CaptureFixture[str], base: list[str], tmp_path: Path) -> None:
    assert_bad_input(
        capsys, [*base, "--key-file", str(tmp_path / "k"), "127.0.0.2"], "does not exist", "pyquorum keygen"
    )


def test_cli_state_dir_not_creatable(capsys: pytest.CaptureFixture[str], port: int, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_bad_input(
        capsys,
        ["-b", "127.0.0.1", "-p", str(port), "--state-dir", str(blocker / "state"), "127.0.0.2"],
        "cannot be created",
    )
    assert_bad_input(
        capsys,
        ["-b", "127.0.0.1", "-p", str(port), "--state-dir", str(blocker), "127.0.0.2"],
        "is not a directory",
    )


def test_cli_reports_every_problem_at_once(
    capsys: pytest.CaptureFixture[str], base: list[str], port: int
) -> None:
    problems = assert_bad_input(
        capsys,
        [
            *base,
            "-s",
            "/nonexistent/job",
            "--election-timeout",
            "0.2",
            f"127.0.0.1:{port}",
            "127.0.0.2:99999",
        ],
        "out of range",
        "listed among its own peers",
        "does not exist",
        "at least 5 x --heartbeat-interval",
    )
    assert len(problems) >= 4


# -- the good path -----------------------------------------------------------------------------


def test_cli_valid_config_runs_daemon(
    capsys: pytest.CaptureFixture[str], base: list[str], port: int, tmp_path: Path, daemon: FakeDaemon
) -> None:
    daemon.exit_code = 0
    code, _, err = run_cli(
        capsys,
        [
            *base,
            "--heartbeat-interval",
            "0.05",
            "--election-timeout",
            "0.5",
            "--stop-timeout",
            "0.1",
            "--kill-margin",
            "0.04",
            "--restart",
            "never",
            "127.0.0.3",
            "localhost:7000",
        ],
    )
    assert code == 0, err
    (config,) = daemon.configs
    assert config.me == NodeAddress(ipaddress.ip_address("127.0.0.1"), port)
    assert [str(p) for p in config.peers] == [f"127.0.0.3:{port}", "127.0.0.1:7000"]
    assert config.peer_names == ("127.0.0.3", "localhost:7000")
    assert config.members == ("127.0.0.1:7000", f"127.0.0.1:{port}", f"127.0.0.3:{port}")
    assert config.timing.heartbeat_interval_s == 0.05
    assert config.timing.election_timeout_s == 0.5
    assert config.timing.stop_timeout_s == 0.1
    assert config.timing.kill_margin_s == 0.04
    assert config.restart == "never"
    assert config.state_dir == tmp_path / "state"
    assert config.log_level == logging.WARNING
    assert "members=127.0.0.1:7000,127.0.0.1:" in config.cluster_text
    # Three servers: no even-number warning; no key file: the unauthenticated warning.
    assert err.splitlines() == [
        f"pyquorum: warning: cluster traffic is unauthenticated: anyone who can send UDP to port {port} "
        "can disrupt elections; use --key-file (create one with 'pyquorum keygen PATH' and copy it to "
        "every server)"
    ]


def test_cli_returns_daemon_exit_code(
    capsys: pytest.CaptureFixture[str], base: list[str], daemon: FakeDaemon
) -> None:
    daemon.exit_code = 1
    assert run_cli(capsys, [*base, "127.0.0.2", "127.0.0.3"])[0] == 1


def test_cli_config_error_from_daemon_is_bad_input(
    capsys: pytest.CaptureFixture[str], base: list[str], daemon: FakeDaemon
) -> None:
    daemon.error = ConfigError(["state dir /x is in use by pid 42"])
    assert assert_bad_input(capsys, [*base, "127.0.0.2", "127.0.0.3"]) == ["state dir /x is in use by pid 42"]


@pytest.mark.parametrize(
    ("flag", "level"), [([], logging.WARNING), (["-v"], logging.INFO), (["-vv"], logging.DEBUG)]
)
def test_cli_verbosity_configures_logging(
    capsys: pytest.CaptureFixture[str],
    base: list[str],
    port: int,
    daemon: FakeDaemon,
    flag: list[str],
    level: int,
) -> None:
    assert run_cli(capsys, [*base, *flag, "127.0.0.2", "127.0.0.3"])[0] == 0
    assert daemon.configs[0].log_level == level
    logger = logging.getLogger("pyquorum")
    assert logger.level == level
    logging.getLogger("pyquorum.test").warning("event=test")
    err = capsys.readouterr().err
    assert f" WARNING node=127.0.0.1:{port} event=test" in err


def test_cli_two_servers_and_even_count_warn(
    capsys: pytest.CaptureFixture[str], base: list[str], daemon: FakeDaemon
) -> None:
    _, _, err = run_cli(capsys, [*base, "127.0.0.2"])
    assert "pyquorum: warning: 2 servers" in err
    assert "no high availability" in err
    _, _, err = run_cli(capsys, [*base, "127.0.0.2", "127.0.0.3", "127.0.0.4"])
    assert "pyquorum: warning: 4 servers" in err
    assert "use an odd number" in err


def test_cli_key_file_silences_warning(
    capsys: pytest.CaptureFixture[str], base: list[str], tmp_path: Path, daemon: FakeDaemon
) -> None:
    key = tmp_path / "cluster.key"
    assert run_cli(capsys, ["keygen", str(key)])[0] == 0
    code, _, err = run_cli(capsys, [*base, "--key-file", str(key), "127.0.0.2", "127.0.0.3"])
    assert code == 0
    assert err == ""
    assert daemon.configs[0].key_file == key


# -- address parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.2", "127.0.0.2:51621"),
        ("127.0.0.2:6000", "127.0.0.2:6000"),
        ("::1", "[::1]:51621"),
        ("[::1]", "[::1]:51621"),
        ("[::1]:6000", "[::1]:6000"),
        ("[0:0:0:0:0:0:0:1]:6000", "[::1]:6000"),
        ("localhost:6000", "127.0.0.1:6000"),
        ("LOCALHOST", "127.0.0.1:51621"),
    ],
)
def test_cli_resolve_server(text: str, expected: str) -> None:
    assert str(cli.resolve_server(text, 51621, socket.AF_INET)) == expected


def test_cli_resolve_server_prefers_bind_family() -> None:
    try:
        infos = socket.getaddrinfo("localhost", 1, type=socket.SOCK_DGRAM)
    except socket.gaierror:
        pytest.skip("localhost does not resolve here")
    families = {info[0] for info in infos}
    v6 = cli.resolve_server("localhost", 6000, socket.AF_INET6)
    assert v6.ip.version == (6 if socket.AF_INET6 in families else 4)
    assert cli.resolve_server("localhost", 6000, socket.AF_INET).ip.version == 4


@pytest.mark.parametrize(("text", "expected"), [("127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("[::1]", "::1")])
def test_cli_parse_bind(text: str, expected: str) -> None:
    assert str(cli.parse_bind(text)) == expected


def test_cli_default_bind_address_is_a_unicast_ip() -> None:
    try:
        ip = cli.default_bind_address()
    except ConfigError:
        pytest.skip("this host has no default route")
    assert not ip.is_unspecified
    assert not ip.is_multicast


def test_cli_default_bind_address_without_route(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(self: socket.socket, address: object) -> None:
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(socket.socket, "connect", unreachable)
    with pytest.raises(ConfigError, match="give this node's address with -b/--bind"):
        cli.default_bind_address()


def test_cli_no_default_route_is_bad_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable(self: socket.socket, address: object) -> None:
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(socket.socket, "connect", unreachable)
    assert_bad_input(
        capsys, ["--state-dir", str(tmp_path), "127.0.0.2"], "cannot find this host's primary IP"
    )


# -- default state dir -------------------------------------------------------------------------


def node(text: str) -> NodeAddress:
    return NodeAddress.parse(text)


def test_cli_default_state_dir_differs_per_node(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    dirs = {cli.default_state_dir(node(a)) for a in ("127.0.0.1:51621", "127.0.0.1:51622", "[::1]:51621")}
    assert dirs == {
        tmp_path / "pyquorum" / "127.0.0.1_51621",
        tmp_path / "pyquorum" / "127.0.0.1_51622",
        tmp_path / "pyquorum" / "::1_51621",
    }


def test_cli_default_state_dir_without_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", str(tmp_path))
    for xdg in ("", "relative/ignored"):
        monkeypatch.setenv("XDG_STATE_HOME", xdg)
        assert cli.default_state_dir(node("127.0.0.1:6000")) == (
            tmp_path / ".local" / "state" / "pyquorum" / "127.0.0.1_6000"
        )


def test_cli_default_state_dir_as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(os, "access", lambda path, mode: path == "/var/lib")
    assert cli.default_state_dir(node("127.0.0.1:6000")) == Path("/var/lib/pyquorum/127.0.0.1_6000")


def test_cli_default_state_dir_used(
    capsys: pytest.CaptureFixture[str],
    port: int,
    tmp_path: Path,
    daemon: FakeDaemon,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert run_cli(capsys, ["-b", "127.0.0.1", "-p", str(port), "127.0.0.2", "127.0.0.3"])[0] == 0
    assert daemon.configs[0].state_dir == tmp_path / "pyquorum" / f"127.0.0.1_{port}"


# -- subcommands -------------------------------------------------------------------------------


def test_cli_keygen_creates_private_key_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    key = tmp_path / "cluster.key"
    code, out, err = run_cli(capsys, ["keygen", str(key)])
    assert code == 0, err
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert out.strip() == f"{key} (mode -rw-------, 0600) key id 1"
    code, out, _ = run_cli(capsys, ["keygen", "--add", str(key)])
    assert code == 0
    assert out.strip().endswith("key id 2")


def test_cli_keygen_refuses_to_overwrite(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    key = tmp_path / "cluster.key"
    assert run_cli(capsys, ["keygen", str(key)])[0] == 0
    before = key.read_text()
    assert_bad_input(capsys, ["keygen", str(key)], "already exists")
    assert key.read_text() == before


def test_cli_subcommand_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert_bad_input(capsys, ["keygen"], "PATH")
    assert_bad_input(capsys, ["demo", "--rounds", "x"], "--rounds")


def test_cli_status_without_daemon_is_unknown(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, ["status", "--state-dir", str(tmp_path), "-b", "127.0.0.1", "127.0.0.2"])
    assert code == 3  # the monitoring-plugin UNKNOWN: no daemon answers
    (error,) = errors_of(err)
    assert f"no control socket {tmp_path / 'control.sock'}" in error


def test_cli_status_finds_the_state_dir_as_the_daemon_does(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    config = tmp_path / "node.toml"
    config.write_text('bind = "127.0.0.1"\nport = 6000\npeers = ["127.0.0.2"]\n')
    for argv in (["-b", "127.0.0.1", "-p", "6000", "127.0.0.2"], ["--config", str(config)]):
        code, _, err = run_cli(capsys, ["status", *argv])
        assert code == 3
        assert str(tmp_path / "pyquorum" / "127.0.0.1_6000" / "control.sock") in errors_of(err)[0]


def test_cli_status_and_reload_bad_arguments_are_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, ["status", "-b", "no-such-host.invalid"])[0] == 3
    assert run_cli(capsys, ["status", "--interval", "x"])[0] == 3
    code, _, err = run_cli(capsys, ["reload", "-b", "not an ip"])
    assert code == 3 and "-b/--bind must be an IP address" in errors_of(err)[0]


# -- the real command, as a process ------------------------------------------------------------


def run_module(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyquorum", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_cli_process_version(tmp_path: Path) -> None:
    result = run_module("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"pyquorum {pyquorum.__version__}"


def test_cli_process_unknown_option(tmp_path: Path) -> None:
    result = run_module("--bogus", "127.0.0.2", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "pyquorum: error: unrecognized arguments: --bogus (see 'pyquorum --help')"
    ]


def test_cli_process_bad_input_no_traceback(tmp_path: Path, port: int) -> None:
    result = run_module(
        "-b",
        "127.0.0.1",
        "-p",
        str(port),
        "--state-dir",
        str(tmp_path / "s"),
        "-s",
        str(tmp_path / "missing"),
        f"127.0.0.1:{port}",
        "127.0.0.2",
        "127.0.0.2",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    errors = errors_of(result.stderr)
    assert len(errors) == 3
    assert "listed among its own peers" in errors[0]
    assert "listed 2 times" in errors[1]
    assert "does not exist" in errors[2]


def test_cli_process_bad_bind(tmp_path: Path) -> None:
    result = run_module("-b", "localhost", "--state-dir", str(tmp_path), "127.0.0.2", cwd=tmp_path)
    assert result.returncode == 2
    assert errors_of(result.stderr) == [
        "-b/--bind must be an IP address, not 'localhost': give this node's own address (host names "
        "are not accepted, so that the node's identity cannot change)"
    ]


def test_pid_alive_counts_a_zombie_as_gone() -> None:
    """A daemon that exited and was not yet reaped holds no lock and answers nothing: check-config
    must not call it running, although os.kill(pid, 0) still finds it."""
    proc = subprocess.Popen(["true"])
    try:
        assert cli.pid_alive(os.getpid())
        deadline = time.monotonic() + 10.0
        while cli.pid_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, 0)  # the zombie is still there: it has not been reaped
        assert not cli.pid_alive(proc.pid)
        assert not cli.pid_alive(0) and not cli.pid_alive(True) and not cli.pid_alive("1")
    finally:
        proc.wait()
    assert not cli.pid_alive(proc.pid)
