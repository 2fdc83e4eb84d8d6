"""Print the netns scenario table at the end of a pytest run that ran any of them."""

from __future__ import annotations

import time

import pytest

from tests.netns.report import COMBINED, session_rows, table

_STARTED = time.time()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    rows = [r for r in session_rows() if r.get("written_at", 0) >= _STARTED]
    if not rows:
        return
    terminalreporter.section("netns fault-injection scenarios")
    for line in table(rows).splitlines():
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"(also written to {COMBINED})")
