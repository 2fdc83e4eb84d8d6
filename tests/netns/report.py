"""The per-scenario report: one JSON row per scenario, a combined ``reports/netns.json`` and a table.

Each scenario test writes ``reports/netns/<scenario>.json`` (with the test session's id) and then
rewrites ``reports/netns.json`` from every row of its session, so the combined file is complete
whichever pytest-xdist worker ran which scenario. ``python -m tests.netns.report`` prints the table
of the newest session again.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
REPORTS = ROOT / "reports"
ROWS = REPORTS / "netns"
COMBINED = REPORTS / "netns.json"

COLUMNS = (
    "scenario",
    "injected",
    "failover ms (bound)",
    "overlaps",
    "avail",
    "elections",
    "stale refused",
    "result",
)


def write_row(row: dict[str, Any], session: str) -> None:
    ROWS.mkdir(parents=True, exist_ok=True)
    row = {**row, "session": session, "written_at": time.time()}
    (ROWS / f"{row['scenario']}.json").write_text(json.dumps(row, indent=2) + "\n")
    rows = session_rows(session)
    COMBINED.write_text(json.dumps({"session": session, "scenarios": rows}, indent=2) + "\n")


def session_rows(session: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(ROWS.glob("*.json")) if ROWS.exists() else []:
        try:
            row = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        rows.append(row)
    if session is None and rows:
        session = max(rows, key=lambda r: r.get("written_at", 0)).get("session")
    return sorted((r for r in rows if r.get("session") == session), key=lambda r: (r["n"], r["scenario"]))


def _failover(row: dict[str, Any]) -> str:
    values = row.get("failover_ms", [])
    if len(values) > 3:  # the nemesis: a summary
        measured = [v for v in values if v is not None]
        within = sum(
            1
            for v, b in zip(values, row.get("failover_bound_ms", []), strict=False)
            if v is not None and (b is None or v <= b)
        )
        worst = f"max {max(measured):.0f}" if measured else "none"
        return f"{len(values)} failovers, {worst}, {within} in bound"
    parts = []
    for ms, bound in zip(row.get("failover_ms", []), row.get("failover_bound_ms", []), strict=False):
        value = "none" if ms is None else f"{ms:.0f}"
        parts.append(value if bound is None else f"{value} ({bound})")
    return ", ".join(parts) or "-"


def table(rows: list[dict[str, Any]]) -> str:
    cells = []
    for r in rows:
        avail = r.get("availability")
        overlaps = str(r["overlaps"]) + (
            f" (+{r['excused_overlaps']} §4.5)" if r.get("excused_overlaps") else ""
        )
        cells.append(
            (
                r["scenario"],
                "yes" if r["injected"] else "NO",
                _failover(r),
                overlaps,
                "-" if avail is None else f"{avail:.3f}",
                str(r["elections"]),
                str(r["stale_rejected"]),
                r["result"],
            )
        )
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]

    def line(values: tuple[str, ...]) -> str:
        return " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    out = [line(COLUMNS), "-+-".join("-" * w for w in widths)]
    out += [line(c) for c in cells]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    rows = session_rows(argv[0] if argv else None)
    if not rows:
        print(f"no scenario rows in {ROWS}")
        return 1
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
