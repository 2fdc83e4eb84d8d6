"""``pyquorum demo``: its sample script, its ports, and that it always cleans up after itself."""

from __future__ import annotations

import importlib.util
import io
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pyquorum import demo


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_demo_sample_script_prints_token_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    script = tmp_path / "sample"
    script.write_text(demo.SAMPLE_SCRIPT)
    env = dict(os.environ, PYQUORUM_NODE="127.0.0.1:51621", PYQUORUM_TERM="7")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "[127.0.0.1:51621] working as master, fencing token 7\n"
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert rest.splitlines()[-1] == ("[127.0.0.1:51621] got SIGTERM, stopping cleanly (fencing token 7)")


def test_demo_free_udp_ports_are_distinct_and_free() -> None:
    ports = demo.free_udp_ports(3)
    assert len(set(ports)) == 3
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", port))


def test_demo_free_udp_ports_any_when_asked() -> None:
    assert len(set(demo.free_udp_ports(3, preferred=0))) == 3


def test_demo_free_udp_ports_avoid_a_busy_preferred_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        taken = busy.getsockname()[1]
        assert taken not in demo.free_udp_ports(3, preferred=taken)


def test_demo_fails_clearly_and_cleans_up_when_a_daemon_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    original_setup = demo._Demo._setup

    def setup_with_dying_daemons(self: demo._Demo) -> None:
        original_setup(self)
        for node in self.cluster.nodes:
            node.argv = [sys.executable, "-c", "print('daemon exploded'); raise SystemExit(3)"]

    monkeypatch.setattr(demo._Demo, "_setup", setup_with_dying_daemons)
    out = io.StringIO()
    assert demo.run(rounds=1, interval_s=1.0, out=out) == 1
    text = out.getvalue()
    assert "DEMO FAILED: the daemon of 127.0.0.1:" in text
    assert "exited with code 3" in text
    assert "daemon exploded" in text  # the log tail is shown
    assert list(tmp_path.iterdir()) == []  # the temp dir is gone


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("pyquorum.runtime.daemon") is None, reason="needs the daemon")
def test_demo_fails_over_and_leaves_nothing_behind(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "pyquorum", "demo", "--rounds", "2", "--interval", "3", "-p", "0"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    took = re.findall(r"took over after (\d+\.\d+) s", result.stdout)
    assert len(took) == 2, result.stdout
    assert "PROBLEM" not in result.stdout
    assert "stopped every process the demo started" in result.stdout
    assert list(tmp_path.iterdir()) == []
    assert _processes_mentioning(str(tmp_path)) == []


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("pyquorum.runtime.daemon") is None, reason="needs the daemon")
def test_demo_ctrl_c_leaves_nothing_behind(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyquorum", "demo", "--interval", "2", "-p", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            if "took over after" in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "stopped every process the demo started" in rest
    assert list(tmp_path.iterdir()) == []
    assert _processes_mentioning(str(tmp_path)) == []
