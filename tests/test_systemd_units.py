"""contrib/systemd: the units pass systemd-analyze verify and keep the settings the daemon relies on.

``systemd-analyze verify`` runs without a running systemd: it loads the units from a scratch root
(``--root``) holding a copy of this host's system units, for the targets they refer to, and a stand-in
``/usr/local/bin/pyquorum``, since systemd resolves ``ExecStart=pyquorum`` on its own fixed search path,
not $PATH. It reports problems as lines (and an exit status of 0 for many of them), so any output fails.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pyquorum.core.lease import Timing
from pyquorum.runtime import daemon

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "contrib" / "systemd"
PLAIN = UNITS / "pyquorum.service"
TEMPLATE = UNITS / "pyquorum@.service"
SYSTEM_UNITS = next(
    (p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()), None
)


def settings(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> values, in order (a key may repeat), comments and blank lines skipped."""
    found: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return found


def one(unit: dict[str, list[str]], key: str) -> str:
    (value,) = unit[key]
    return value


def seconds(span: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(s|min)?", span)
    assert match, f"unexpected time span {span!r}"
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


def verify(root: Path, *units: str) -> str:
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", *units],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return (result.stdout + result.stderr).strip() + (
        "" if result.returncode == 0 else f"\nexit {result.returncode}"
    )


@pytest.fixture
def scratch_root(tmp_path: Path) -> Path:
    if shutil.which("systemd-analyze") is None or SYSTEM_UNITS is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    stand_in = root / "usr" / "local" / "bin" / "pyquorum"
    stand_in.parent.mkdir(parents=True)
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    return root


def test_systemd_units_pass_systemd_analyze_verify(scratch_root: Path) -> None:
    target = scratch_root / "etc" / "systemd" / "system"
    for unit in (PLAIN, TEMPLATE):
        shutil.copy(unit, target / unit.name)
    assert verify(scratch_root, "pyquorum.service", "pyquorum@main.service") == ""
    # and the check can fail: a misspelt value is reported
    broken = PLAIN.read_text().replace("KillMode=mixed", "KillMode=mixd")
    (target / "pyquorum.service").write_text(broken)
    assert "kill mode" in verify(scratch_root, "pyquorum.service")


def test_systemd_units_settings_the_daemon_relies_on() -> None:
    unit = settings(PLAIN)
    assert one(unit, "Service.Type") == "notify"
    assert one(unit, "Service.ExecStart") == "pyquorum --config /etc/pyquorum/pyquorum.toml"
    assert one(unit, "Service.ExecReload") == "pyquorum reload --config /etc/pyquorum/pyquorum.toml"
    assert one(unit, "Service.KillMode") == "mixed"
    assert one(unit, "Service.Restart") == "on-failure"
    assert one(unit, "Service.StateDirectory") == "pyquorum"
    assert one(unit, "Install.WantedBy") == "multi-user.target"
    # the watchdog: pinged every half period from a ticker that runs at least every heartbeat
    assert seconds(one(unit, "Service.WatchdogSec")) / 2 >= 10 * Timing().heartbeat_interval_s


def test_systemd_units_stop_timeout_above_the_daemons_stop_bound() -> None:
    # docs/operations.md §5.2: after SIGTERM the daemon gives the script G + K + SHUTDOWN_SLACK_S,
    # then waits up to h + 1 s for its ticker and G + 1 s for the supervisor to close.
    t = Timing()
    worst_s = (
        (t.stop_timeout_s + t.kill_margin_s + daemon.SHUTDOWN_SLACK_S)
        + (t.heartbeat_interval_s + 1.0)
        + (t.stop_timeout_s + 1.0)
    )
    assert worst_s == pytest.approx(5.125)
    assert seconds(one(settings(PLAIN), "Service.TimeoutStopSec")) >= 1.5 * worst_s


def test_systemd_units_leave_the_script_free() -> None:
    # Settings that would break ordinary scripts or the guard must not creep in (docs §5.4).
    unit = settings(PLAIN)
    for key in (
        "RestrictRealtime",  # the guard raises its own scheduling priority
        "MemoryDenyWriteExecute",  # scripts in Java or Node.js JIT-compile
        "PrivateDevices",
        "PrivateNetwork",
        "CapabilityBoundingSet",  # a script may need CAP_NET_ADMIN to move an address
        "SystemCallFilter",
        "RestrictAddressFamilies",  # arping needs packet sockets, ip needs netlink
        "DynamicUser",
    ):
        assert f"Service.{key}" not in unit, key
    for key in ("NoNewPrivileges", "PrivateTmp", "LockPersonality", "RestrictSUIDSGID"):
        assert one(unit, f"Service.{key}") == "yes"
    assert one(unit, "Service.ProtectSystem") == "full"
    assert one(unit, "Service.ProtectHome") == "read-only"


def test_systemd_template_is_the_plain_unit_per_configuration_file() -> None:
    plain, template = settings(PLAIN), settings(TEMPLATE)
    assert one(template, "Service.ExecStart") == "pyquorum --config /etc/pyquorum/%i.toml"
    assert one(template, "Service.ExecReload") == "pyquorum reload --config /etc/pyquorum/%i.toml"
    differ = {key for key in plain.keys() | template.keys() if plain.get(key) != template.get(key)}
    assert differ == {"Unit.Description", "Service.ExecStart", "Service.ExecReload"}
