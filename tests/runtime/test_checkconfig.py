"""``pyquorum check-config``: one test per class of mistake, exit codes, and agreement with the daemon.

Loopback only. A foreign bind address is simulated (every 127/8 address is local).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pyquorum import checkconfig, cli, configfile
from pyquorum.core.lease import Timing
from tests.harness.cluster import Cluster, Loopback

from .test_cli import FakeDaemon, daemon, free_port, refuse_every_bind  # noqa: F401  (daemon is a fixture)


@pytest.fixture
def base(tmp_path: Path) -> list[str]:
    """A valid 3-node configuration for 127.0.0.1:<free port>, with a key file."""
    key = tmp_path / "cluster.key"
    assert cli.main(["keygen", str(key)]) == 0
    port = free_port()
    return [
        "-b",
        "127.0.0.1",
        "-p",
        str(port),
        "--state-dir",
        str(tmp_path / "state"),
        "--key-file",
        str(key),
    ]


PEERS = ["127.0.0.2", "127.0.0.3"]


def check(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, list[str], list[str]]:
    """Run check-config: (exit code, the report, the error lines, the warning lines)."""
    capsys.readouterr()
    code = cli.main(["check-config", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    errors = [line.removeprefix("pyquorum: error: ") for line in err.splitlines() if "error: " in line]
    warnings = [line.removeprefix("pyquorum: warning: ") for line in err.splitlines() if "warning: " in line]
    assert len(errors) + len(warnings) == len(err.splitlines()), err
    return code, out, errors, warnings


def test_checkconfig_clean_configuration(capsys: pytest.CaptureFixture[str], base: list[str]) -> None:
    code, out, errors, warnings = check(capsys, [*base, *PEERS])
    assert (code, errors, warnings) == (0, [], [])
    assert "members   3 (127.0.0.1:" in out
    assert "a majority is 2, so 1 may fail" in out
    assert "E >= 5h: 1s >= 0.5s  ok" in out
    assert "L_kill - G - K >= 3h: 0.98s - 0.5s - 0.025s = 0.455s >= 0.3s  ok" in out
    assert "failover  about 1.1s after a master crash (E + h + D), at most 1.911s" in out
    assert "(key ids 1; signs with 1)" in out
    assert out.rstrip().endswith("ok: the daemon would start")


def test_checkconfig_failover_figures_follow_the_timing(
    capsys: pytest.CaptureFixture[str], base: list[str]
) -> None:
    tuned = ["--heartbeat-interval", "0.02", "--election-timeout", "0.2", "--stop-timeout", "0.1"]
    code, out, _, _ = check(capsys, [*base, *tuned, *PEERS])
    assert code == 0
    timing = Timing(heartbeat_interval_s=0.02, election_timeout_s=0.2, stop_timeout_s=0.1)
    bound = f"{timing.failover_bound_s():.3f}".rstrip("0")
    assert f"about 0.22s after a master crash (E + h + D), at most {bound}s" in out
    assert checkconfig.typical_failover_s(timing) == pytest.approx(0.22)


def test_checkconfig_unsafe_timing_with_numbers_and_a_fix(
    capsys: pytest.CaptureFixture[str], base: list[str]
) -> None:
    code, out, errors, _ = check(capsys, [*base, "--stop-timeout", "5", *PEERS])
    assert code == 2
    assert "L_kill - G - K >= 3h: 0.98s - 5s - 0.025s = -4.045s >= 0.3s  FAILS" in out
    assert "failover  not computed" in out
    (error,) = errors
    assert "Use --stop-timeout 0.655 or less, or --election-timeout 5.433 or more" in error
    assert out.rstrip().endswith("1 error: the daemon would refuse to start")


def test_checkconfig_election_timeout_too_short(capsys: pytest.CaptureFixture[str], base: list[str]) -> None:
    code, out, errors, _ = check(capsys, [*base, "--election-timeout", "0.45", "--stop-timeout", "0", *PEERS])
    assert code == 2
    assert "E >= 5h: 0.45s >= 0.5s  FAILS" in out
    assert any("must be at least 5 x --heartbeat-interval" in e for e in errors)


@pytest.mark.parametrize("what", ["missing", "malformed", "readable-by-others"])
def test_checkconfig_key_file(capsys: pytest.CaptureFixture[str], base: list[str], what: str) -> None:
    key = Path(base[base.index("--key-file") + 1])
    needle = {
        "missing": "does not exist",
        "malformed": "line 1",
        "readable-by-others": "readable by others (mode 0644): run chmod 600",
    }[what]
    if what == "missing":
        key.unlink()
    elif what == "malformed":
        key.write_text("1 not-base64\n")
    else:
        key.chmod(0o644)
    code, out, errors, _ = check(capsys, [*base, *PEERS])
    assert code == 2
    assert f"keys      {key}: cannot be used (see the errors)" in out
    assert any(needle in e for e in errors), errors


def test_checkconfig_bind_address_not_local(
    capsys: pytest.CaptureFixture[str], base: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    refuse_every_bind(monkeypatch)
    code, _, errors, _ = check(capsys, [*base, *PEERS])
    assert code == 2
    assert errors == [
        "-b/--bind 127.0.0.1 is not an address of this host: give one of its own addresses "
        "(see 'ip -brief address')"
    ]


def test_checkconfig_port_in_use(capsys: pytest.CaptureFixture[str], base: list[str]) -> None:
    port = int(base[base.index("-p") + 1])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", port))
        code, _, errors, _ = check(capsys, [*base, *PEERS])
    assert code == 2
    assert len(errors) == 1 and f"UDP port {port} on 127.0.0.1 is in use" in errors[0]


@pytest.mark.parametrize("what", ["missing", "not-executable"])
def test_checkconfig_script(
    capsys: pytest.CaptureFixture[str], base: list[str], tmp_path: Path, what: str
) -> None:
    script = tmp_path / "job"
    expected = {
        "missing": f"script {script} does not exist: check the -s/--script path",
        "not-executable": f"script {script} is not executable: run 'chmod +x {script}'",
    }[what]
    if what == "not-executable":
        script.write_text("#!/bin/sh\n")
        script.chmod(0o644)
    code, _, errors, _ = check(capsys, [*base, "-s", str(script), *PEERS])
    assert (code, errors) == (2, [expected])


@pytest.mark.parametrize(
    ("peers", "needle"),
    [(["127.0.0.2", "127.0.0.3", "127.0.0.4"], "4 servers"), (["127.0.0.2"], "2 servers")],
)
def test_checkconfig_even_cluster_size_is_a_warning(
    capsys: pytest.CaptureFixture[str], base: list[str], peers: list[str], needle: str
) -> None:
    code, out, errors, warnings = check(capsys, [*base, *peers])
    assert (code, errors) == (0, [])
    (warning,) = warnings
    assert warning.startswith(needle)
    assert out.rstrip().endswith("ok, with 1 warning: the daemon would start")


def test_checkconfig_no_key_is_a_warning(capsys: pytest.CaptureFixture[str], base: list[str]) -> None:
    i = base.index("--key-file")
    code, out, errors, warnings = check(capsys, [*base[:i], *base[i + 2 :], *PEERS])
    assert (code, errors) == (0, [])
    assert "keys      none: cluster traffic is unauthenticated" in out
    assert len(warnings) == 1 and warnings[0].startswith("cluster traffic is unauthenticated")


def test_checkconfig_mistakes_in_the_file(
    capsys: pytest.CaptureFixture[str], base: list[str], tmp_path: Path
) -> None:
    path = tmp_path / "node.toml"
    path.write_text('peers = ["127.0.0.2", "127.0.0.3"]\nport = "x"\ncolour = "blue"\n')
    code, out, errors, _ = check(capsys, ["--config", str(path), *base])
    assert code == 2
    assert out.startswith(f"pyquorum check-config: config file {path}\n")
    assert errors == [
        f"""config file {path}: key 'port' must be an integer from 1 to 65535, not "x" (a string)""",
        f"config file {path}: unknown key 'colour'; the keys are "
        + ", ".join(key.name for key in configfile.KEYS),
    ]


def test_checkconfig_every_problem_at_once_even_without_an_address(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, errors, _ = check(
        capsys,
        [
            "-b",
            "localhost",
            "-s",
            str(tmp_path / "job"),
            "--key-file",
            str(tmp_path / "key"),
            "--election-timeout",
            "0.2",
            "127.0.0.2",
        ],
    )
    assert code == 2
    text = "\n".join(errors)
    for needle in ("-b/--bind must be an IP address", "does not exist", "key file", "at least 5 x"):
        assert needle in text
    assert "E >= 5h: 0.2s >= 0.5s  FAILS" in out  # the timing is reported without a Config too


def test_checkconfig_says_what_the_daemon_says(
    capsys: pytest.CaptureFixture[str],
    base: list[str],
    tmp_path: Path,
    daemon: FakeDaemon,  # noqa: F811
) -> None:
    argv = [*base, "-s", str(tmp_path / "job"), "--stop-timeout", "5", "127.0.0.1:1", *PEERS]
    _, _, errors, _ = check(capsys, argv)
    assert cli.main(argv) == 2
    from_daemon = capsys.readouterr().err.splitlines()
    assert [f"pyquorum: error: {e}" for e in errors] == from_daemon
    assert daemon.configs == []
    assert len(errors) == 2


def test_checkconfig_next_to_the_running_daemon(capsys: pytest.CaptureFixture[str]) -> None:
    # checking a changed configuration before a restart: the port is the running daemon's
    with Cluster(2, Loopback(), script=None, keys=True) as cluster:
        node = cluster.nodes[0]
        argv = node.argv[node.argv.index("pyquorum") + 1 :]  # without "[setpriv ...] python -m pyquorum"
        code, out, errors, warnings = check(capsys, argv)
        status = cluster.status(node)
        assert status is not None
        pid = status["pid"]
    assert (code, errors) == (0, []), errors
    assert f"daemon    running (pid {pid}, in the state dir's lock file)" in out
    assert [w[:9] for w in warnings] == ["2 servers"]


def test_checkconfig_process_exit_codes(tmp_path: Path, base: list[str]) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pyquorum", "check-config", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert run(*base, *PEERS).returncode == 0
    bad = run(*base, "--stop-timeout", "5", *PEERS)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    usage = run("--bogus")
    assert usage.returncode == 2
    assert usage.stderr.startswith("pyquorum: error: unrecognized arguments: --bogus")
    assert "usage: pyquorum check-config" in run("--help").stdout
