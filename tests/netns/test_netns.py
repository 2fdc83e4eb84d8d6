"""Fault injection on real hosts: pyquorum daemons in network namespaces, broken by nftables and signals.

Reference: protocol.md §4.2-§4.5 (lease, step-down, guard, host pause), §5 (bounds), §6 (P1, P4-P6);
docs/design-notes.md, "Testing like Jepsen" (Jepsen's nemeses). How to run, the long mode and what
each check means: tests/netns/README.md; the checks themselves: checker.py.

Needs root, iproute2 and nftables; elsewhere this module is skipped with one line that says why.
Scenarios run one at a time (a file lock), also across pytest-xdist workers and concurrent runs, so
that two clusters never compete for the CPU and turn timing into noise.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import hosts

REASON = hosts.why_unavailable()
if REASON is not None:
    pytest.skip(f"netns fault-injection suite skipped: {REASON}", allow_module_level=True)

from pyquorum import keyfile  # noqa: E402
from tests.harness.procfs import alive, sweep, sweep_stale  # noqa: E402
from tests.netns.checker import Report, check  # noqa: E402
from tests.netns.nemesis import nemesis  # noqa: E402
from tests.netns.report import ROWS, table, write_row  # noqa: E402
from tests.netns.scenarios import (  # noqa: E402
    SCENARIOS_3,
    SCENARIOS_5,
    SCENARIOS_7,
    Scenario,
    isolate_master,
    run_scenario,
)

# One xdist worker for all of them when run with --dist loadgroup (the lock serializes them anyway).
pytestmark = [pytest.mark.netns, pytest.mark.xdist_group("netns")]

LONG = os.environ.get("PYQUORUM_NETNS_LONG", "") not in ("", "0")
NEMESIS_SECONDS = float(os.environ.get("PYQUORUM_NEMESIS_SECONDS", "1800" if LONG else "60"))
NEMESIS_NODES = int(os.environ.get("PYQUORUM_NEMESIS_NODES", "7" if LONG else "5"))
NEMESIS_SEED = int(os.environ.get("PYQUORUM_NEMESIS_SEED", str(random.SystemRandom().randrange(1 << 32))))
KEEP = os.environ.get("PYQUORUM_NETNS_KEEP", "") not in ("", "0")  # keep every scenario's files
SESSION = os.environ.get("PYTEST_XDIST_TESTRUNUID") or uuid.uuid4().hex


class Lab:
    """The run's networks, temp dir and key; everything it made goes away in ``close()``."""

    def __init__(self) -> None:
        sweep_stale(hosts.PREFIX)
        hosts.sweep()
        _sweep_temp_dirs()
        self.run = hosts.run_id()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{hosts.PREFIX}{self.run}-"))
        self.key_file = self.tmp / "cluster.key"
        keyfile.keygen(self.key_file)
        self.networks: dict[int, hosts.Network] = {}
        self.closed = False

    def network(self, n: int) -> hosts.Network:
        if n not in self.networks:
            net = hosts.Network(self.run, n)
            net.create()
            self.networks[n] = net
        return self.networks[n]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        sweep(f"{hosts.PREFIX}{self.run}-")
        for net in self.networks.values():
            net.destroy()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def run_and_check(self, scenario: Scenario, seed: int, *, broken: str = "") -> tuple[Report, Path | None]:
        workdir = self.tmp / scenario.name
        shutil.rmtree(workdir, ignore_errors=True)
        with hosts.exclusive():
            run_scenario(scenario, self.network(scenario.n), workdir, self.key_file, seed=seed, broken=broken)
        report = check(workdir)
        report.notes.insert(0, f"seed {seed}")
        row = {**report.as_dict(), "seed": seed}
        if broken:  # testing the tester: finding problems is the pass
            row["result"] = "CAUGHT" if report.injected and report.problems else "MISSED"
        write_row(row, SESSION)
        saved = None
        if (not report.passed and not broken) or KEEP:
            saved = ROWS / scenario.name
            shutil.rmtree(saved, ignore_errors=True)
            shutil.copytree(workdir, saved, ignore=shutil.ignore_patterns("state", "*.key", "workload"))
        shutil.rmtree(workdir, ignore_errors=True)
        return report, saved


def _sweep_temp_dirs() -> None:
    for path in Path(tempfile.gettempdir()).glob(f"{hosts.PREFIX}*"):
        owner = path.name[len(hosts.PREFIX) :].split("x", 1)[0]
        if owner.isdigit() and not alive(int(owner)):
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    the_lab = Lab()
    atexit.register(the_lab.close)
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through every finally: clusters, then the lab

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield the_lab
    finally:
        signal.signal(signal.SIGTERM, previous)
        the_lab.close()


def _verdict(report: Report, saved: Path | None) -> None:
    where = f"; files kept in {saved}" if saved else ""
    if not report.injected:
        pytest.fail(f"{report.scenario}: fault NOT injected, not a pass: {report.evidence}{where}")
    if report.problems:
        pytest.fail(f"{report.scenario}: " + "\n  ".join(report.problems) + where)


SCENARIOS = [*SCENARIOS_3, *SCENARIOS_5, *(SCENARIOS_7 if LONG else [])]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario(scenario: Scenario, lab: Lab) -> None:
    seed = int(os.environ.get("PYQUORUM_NETNS_SEED", "1"))
    report, saved = lab.run_and_check(scenario, seed)
    print(table([{**report.as_dict()}]))
    _verdict(report, saved)


def test_nemesis(lab: Lab) -> None:
    """Seeded random faults for PYQUORUM_NEMESIS_SECONDS (60 s here; 1800 s and 7 nodes in long mode)."""
    name = f"nemesis-{NEMESIS_NODES}-{int(NEMESIS_SECONDS)}s"
    scenario = Scenario(name, NEMESIS_NODES, nemesis(NEMESIS_SECONDS), doc=f"seed {NEMESIS_SEED}")
    started = time.monotonic()
    report, saved = lab.run_and_check(scenario, NEMESIS_SEED)
    print(f"nemesis seed {NEMESIS_SEED}: {report.faults} faults in {time.monotonic() - started:.0f} s")
    print(table([{**report.as_dict()}]))
    _verdict(report, saved)


def test_checker_catches_a_broken_daemon(lab: Lab) -> None:
    """Test the tester on real hosts: a master that never steps down (``no_quorum_check``) and a guard
    given deadlines an hour late keep the isolated master's script running beside the new master's.
    The checker must see the overlap and the missed minority deadline; fencing still holds."""
    scenario = Scenario("broken-daemon-isolate-3", 3, isolate_master, doc="no_quorum_check,no_guard_deadline")
    report, _ = lab.run_and_check(scenario, 1, broken="no_quorum_check,no_guard_deadline")
    assert report.injected, report.evidence
    assert report.overlaps >= 1, report.as_dict()
    assert any(p.startswith("minority:") for p in report.problems), report.problems
    assert report.stale_rejected >= 1, "the register must have refused the old master's writes"
    assert not any(p.startswith(("fencing", "register")) for p in report.problems), report.problems
