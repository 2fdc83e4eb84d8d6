"""A small real pyquorum cluster on loopback for tests/runtime/test_hostile.py.

Deliberately self-contained (tests/runtime/cluster.py is the general harness, written at the same
time): no script, no workload, only what the hostile-traffic tests need. Every node is a
``python -m pyquorum`` subprocess bound to its own 127.0.0.x address (every address of 127.0.0.0/8 is
local on Linux) and one UDP port free on all of them, in a session of its own, with a state dir and a
log file (stdout and stderr) under the test's temporary directory. Only loopback is ever used.

    with HostileCluster(tmp_path, key_files=[k, k, k]) as c:
        c.start()
        master, term = c.wait_for_master()
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import pyquorum

T = TypeVar("T")

# The timing every test here uses: a 0.5 s election timeout keeps failovers and starts short.
FAST_TIMING = ("--heartbeat-interval", "0.05", "--election-timeout", "0.5", "--stop-timeout", "0.2")


def wait_for(probe: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.02) -> T:
    """Poll ``probe`` until it returns something other than None; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.1f}s waiting for {what}")
        time.sleep(interval_s)


def loopback_addresses(count: int) -> tuple[list[str], int]:
    """``count`` consecutive 127.0.0.x addresses (x chosen at random, so that parallel tests rarely
    share one) and a UDP port that is free on every one of them."""
    rng = random.Random()
    for _ in range(50):
        base = rng.randrange(10, 250 - count)
        ips = [f"127.0.0.{base + i}" for i in range(count)]
        with contextlib.ExitStack() as stack:
            first = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            first.bind((ips[0], 0))
            port: int = first.getsockname()[1]
            try:
                for ip in ips[1:]:
                    stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)).bind((ip, port))
            except OSError:
                continue
            return ips, port
    raise AssertionError("no UDP port free on a run of loopback addresses")


@dataclass
class Node:
    ip: str
    port: int
    directory: Path
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def addr(self) -> tuple[str, int]:
        return (self.ip, self.port)

    @property
    def state_dir(self) -> Path:
        return self.directory / "state"

    @property
    def log_path(self) -> Path:
        return self.directory / "daemon.log"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is already running"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.env,
                cwd=self.directory,
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict[str, Any] | None:
        """The status.json of the running daemon (None before it wrote one, or if it is not ours)."""
        try:
            data = json.loads((self.state_dir / "status.json").read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if not isinstance(data, dict) or self.proc is None or data.get("pid") != self.proc.pid:
            return None
        return data

    def persisted(self) -> dict[str, Any]:
        """state.json: term, vote and boot_epoch."""
        data: dict[str, Any] = json.loads((self.state_dir / "state.json").read_text(encoding="utf-8"))
        return data

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 5.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL our own daemon (by its pid) if it still runs; used in clean-up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5.0)


class HostileCluster:
    """``size`` daemons on loopback. ``key_files``: one path (or None) per node, or one for all."""

    def __init__(
        self,
        tmp: Path,
        size: int = 3,
        key_files: Sequence[Path | None] | Path | None = None,
        *,
        verbose: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.ips, self.port = loopback_addresses(size)
        names = [f"{ip}:{self.port}" for ip in self.ips]
        if key_files is None or isinstance(key_files, Path):
            key_files = [key_files] * size
        package_parent = str(Path(pyquorum.__file__).resolve().parent.parent)
        path = os.environ.get("PYTHONPATH")
        env = dict(os.environ, PYTHONPATH=package_parent + (os.pathsep + path if path else ""))
        env["PYTHONUNBUFFERED"] = "1"
        self.nodes: list[Node] = []
        for i, ip in enumerate(self.ips):
            directory = tmp / f"node{i}"
            directory.mkdir(parents=True, exist_ok=True)
            argv = [sys.executable, "-m", "pyquorum", *(["-v"] if verbose else [])]
            argv += ["-b", ip, "-p", str(self.port), "--state-dir", str(directory / "state")]
            key = key_files[i]
            if key is not None:
                argv += ["--key-file", str(key)]
            argv += [*FAST_TIMING, *extra_args, *(n for n in names if n != names[i])]
            self.nodes.append(Node(ip, self.port, directory, argv, env))

    @property
    def members(self) -> list[str]:
        return [n.name for n in self.nodes]

    def __enter__(self) -> HostileCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for node in self.nodes:
            if node.running():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.stop(3.0)
            node.kill()

    def start(self, nodes: Sequence[Node] | None = None) -> None:
        for node in self.nodes if nodes is None else nodes:
            node.start()

    def statuses(self) -> list[dict[str, Any] | None]:
        return [n.status() for n in self.nodes]

    def agreed_master(self, among: Sequence[Node] | None = None) -> tuple[Node, int] | None:
        """The master every running node of ``among`` follows, in one term, if they all agree."""
        nodes = [n for n in (self.nodes if among is None else among) if n.running()]
        statuses = [n.status() for n in nodes]
        if not nodes or any(s is None for s in statuses):
            return None
        masters = {(s["master"], s["term"]) for s in statuses if s is not None}
        if len(masters) != 1:
            return None
        name, term = masters.pop()
        master = next((n for n in nodes if n.name == name), None)
        if master is None:
            return None
        st = master.status()
        if st is None or st["role"] != "master":
            return None
        return master, int(term)

    def wait_for_master(
        self, timeout_s: float = 15.0, among: Sequence[Node] | None = None
    ) -> tuple[Node, int]:
        return wait_for(lambda: self.agreed_master(among), timeout_s, "a master all nodes follow")

    def assert_all_running(self) -> None:
        for node in self.nodes:
            assert node.running(), (
                f"{node.name} exited with {node.proc and node.proc.returncode}:\n" + (node.log_text()[-3000:])
            )
