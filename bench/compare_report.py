"""What one fault did to one lane, from the script records alone; the tables and the plots.

What this owns. ``measure(round, runs, lane)`` turns one round (when the fault went in, on which host,
when it was healed, when the benchmark stopped looking) and one lane's script runs into a ``Trial``;
``summarize`` turns trials into rows of medians, percentiles and ratios; ``markdown`` prints them;
``plot`` draws them. Nothing here touches a process, a namespace or a clock, so every rule below is
tested on made-up histories (tests/test_compare.py) and a run can be re-tabled from its
``results.json`` alone (``python bench/compare.py --report DIR``).

The records. Every script run is the harness's workload (tests/harness/workload.py): it appends
``<node> <pid> <time> <token> <event> [detail]`` lines every 5 ms to its lane's record, with one
CLOCK_MONOTONIC for every namespace of the kernel; the harness's pidfd monitor (tests/harness/runs.py
``RunMonitor``) records when each process is gone. A run lives from its first line to its exit as the
monitor saw it: never early, late by at most the monitor's longest poll gap (reported), so an overlap
can be over-reported by that much, never missed. ``Run`` here is the harness's run placed on its host
and lane (compare_systems.py ``System.runs``): all the measures need.

The measures, per lane and round (fault at ``t_before``, effective at ``t_after``, on host ``target``):

- the **old** run is the one that ran on the target host at ``t_before``; the **new** run is the
  first run that started after ``t_before`` on another host;
- **failover** = new start - old's last line (its last sign of life). If the old run wrote a line
  after the new one started there was no gap: failover is None and the trial counts as overlapped;
- **takeover** = new start - ``t_before``: how long until a successor ran, gap or not;
  ``successors`` counts the runs that started on other hosts before ``t_end``: more than one means
  the lock was handed out twice;
- **overlap** = the time, between ``t_before`` and ``t_end``, during which two runs of the lane were
  alive at once. ``overlap_at_heal``: two were still alive when the benchmark began to undo the fault;
  ``overlap_censored``: two were still alive at ``t_end``, when the benchmark stopped looking and killed
  the extra one (so the real overlap was longer: the system would never have ended it);
- **minority** (isolation only): ``minority_s`` is how long the isolated host's script ran after the
  isolation took effect (until it ended or the heal); ``minority_ran`` says whether it was still alive
  after the majority's successor had started, i.e. whether both sides of the partition ran the script;
- **outlived** (daemon crash and planned stop): ``outlived_s`` = old run's end - the moment the daemon
  was gone; ``outlived`` says whether the script was still running when the fault was undone, i.e.
  whether it ran on with no daemon at all.

Honest limits: the old run's last line is up to one tick (5 ms) before the moment it really stopped
working; p99 of 30 trials is close to the maximum, not a tail estimate.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FAULTS: tuple[str, ...] = ("host-crash", "daemon-crash", "isolate", "freeze", "planned-stop")
FAULT_TITLES = {
    "host-crash": "master host crash (everything on it killed)",
    "daemon-crash": "master daemon crash (kill -9 of the daemon only)",
    "isolate": "master isolated (nftables)",
    "freeze": "master daemon frozen (SIGSTOP, later SIGCONT)",
    "planned-stop": "planned stop of the master",
}
# The faults after which the old script's daemon is gone while it may still run.
OUTLIVE_FAULTS = ("daemon-crash", "planned-stop")


@dataclass(frozen=True)
class Run:
    """One script process: its host and lane, first line, last line and end (None: still alive)."""

    host: int
    lane: int
    pid: int
    start: float
    last: float
    end: float | None = None

    def alive_at(self, t: float) -> bool:
        return self.start <= t and (self.end is None or t < self.end)


@dataclass
class Round:
    """One fault injected into one host, as the runner saw it (monotonic times)."""

    system: str
    fault: str
    index: int
    target: int
    lanes: list[int]
    t_before: float
    t_after: float
    t_heal: float = math.nan
    t_end: float = math.nan
    agent_gone: float | None = None  # when every daemon of the target was gone (crash, planned stop)
    injected: bool = True
    evidence: str = ""


@dataclass
class Trial:
    system: str
    fault: str
    round: int
    lane: int
    target: int
    old_pid: int | None = None
    new_host: int | None = None
    successors: int = 0  # runs that started in the lane after the fault, on other hosts
    failover_s: float | None = None
    takeover_s: float | None = None
    overlap_s: float = 0.0
    overlap_at_heal: bool = False
    overlap_censored: bool = False
    minority_s: float | None = None
    minority_ran: bool | None = None
    outlived_s: float | None = None
    outlived: bool | None = None
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _overlap_s(runs: Sequence[Run], t0: float, t1: float) -> float:
    """Time within [t0, t1] during which at least two of ``runs`` were alive."""
    events: list[tuple[float, int]] = []
    for r in runs:
        a, b = max(r.start, t0), min(t1 if r.end is None else r.end, t1)
        if b > a:
            events += [(a, 1), (b, -1)]
    events.sort(key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    total, alive, since = 0.0, 0, t0
    for t, step in events:
        if alive >= 2:
            total += t - since
        alive += step
        since = t
    return total


def measure(rnd: Round, runs: Iterable[Run], lane: int) -> Trial:
    """The trial of ``lane`` in ``rnd``: see the module docstring for each measure."""
    trial = Trial(rnd.system, rnd.fault, rnd.index, lane, rnd.target)
    mine = sorted((r for r in runs if r.lane == lane), key=lambda r: r.start)
    at_fault = [r for r in mine if r.host == rnd.target and r.alive_at(rnd.t_before)]
    if not at_fault:
        trial.problems.append(f"no script ran on h{rnd.target} in lane {lane} at the fault")
        return trial
    old = at_fault[-1]
    trial.old_pid = old.pid
    later = [r for r in mine if r.start > rnd.t_before and r.host != rnd.target]
    new = later[0] if later else None
    trial.successors = sum(1 for r in later if r.start < rnd.t_end)
    if new is not None:
        trial.new_host = new.host
        trial.takeover_s = new.start - rnd.t_before
        if old.last <= new.start:
            trial.failover_s = new.start - old.last
    else:
        trial.problems.append(f"no successor started in lane {lane} before the heal")
    trial.overlap_s = _overlap_s(mine, rnd.t_before, rnd.t_end)
    trial.overlap_at_heal = sum(r.alive_at(rnd.t_heal) for r in mine) >= 2
    trial.overlap_censored = sum(r.alive_at(rnd.t_end) for r in mine) >= 2
    if rnd.fault == "isolate":
        minority = [
            r
            for r in mine
            if r.host == rnd.target and r.start < rnd.t_heal and (r.end is None or r.end > rnd.t_after)
        ]
        ran = [min(rnd.t_heal, r.end if r.end is not None else math.inf) - rnd.t_after for r in minority]
        trial.minority_s = max(0.0, *ran) if ran else 0.0
        trial.minority_ran = new is not None and any(
            (r.end is None or r.end > new.start) and new.start < rnd.t_heal for r in minority
        )
    if rnd.fault in OUTLIVE_FAULTS and rnd.agent_gone is not None:
        end = old.end if old.end is not None else rnd.t_end
        trial.outlived_s = end - rnd.agent_gone
        trial.outlived = old.alive_at(rnd.t_heal) and rnd.agent_gone <= rnd.t_heal
    return trial


# ---- statistics ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100), linear interpolation between order statistics ("inclusive")."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    k = (len(ordered) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass
class Row:
    """One (system, fault): the statistics of its trials."""

    system: str
    fault: str
    trials: int
    with_gap: int
    failover_median_s: float
    failover_p90_s: float
    failover_p99_s: float
    takeover_median_s: float
    no_successor: int
    overlapped: int
    overlap_median_s: float
    overlap_p99_s: float
    overlap_at_heal: int
    overlap_censored: int
    two_successors: int
    minority_ran: int | None
    minority_median_s: float | None
    outlived: int | None
    problems: int
    vs_reference: float | None = None  # failover median / the reference system's, same fault


def summarize(trials: Sequence[Trial], reference: str | None) -> list[Row]:
    """Rows per (system, fault) in first-seen system order; ratios against ``reference``."""
    systems = list(dict.fromkeys(t.system for t in trials))
    rows: list[Row] = []
    for fault in FAULTS:
        for system in systems:
            ts = [t for t in trials if t.system == system and t.fault == fault]
            if not ts:
                continue
            gaps = [t.failover_s for t in ts if t.failover_s is not None]
            takeovers = [t.takeover_s for t in ts if t.takeover_s is not None]
            overlaps = [t.overlap_s for t in ts]
            minority = [t for t in ts if t.minority_ran is not None]
            outlive = [t for t in ts if t.outlived is not None]
            rows.append(
                Row(
                    system=system,
                    fault=fault,
                    trials=len(ts),
                    with_gap=len(gaps),
                    failover_median_s=statistics.median(gaps) if gaps else math.nan,
                    failover_p90_s=percentile(gaps, 90),
                    failover_p99_s=percentile(gaps, 99),
                    takeover_median_s=statistics.median(takeovers) if takeovers else math.nan,
                    no_successor=len(ts) - len(takeovers),
                    overlapped=sum(1 for t in ts if t.overlap_s > 0),
                    overlap_median_s=statistics.median(overlaps),
                    overlap_p99_s=percentile(overlaps, 99),
                    overlap_at_heal=sum(1 for t in ts if t.overlap_at_heal),
                    overlap_censored=sum(1 for t in ts if t.overlap_censored),
                    two_successors=sum(1 for t in ts if t.successors > 1),
                    minority_ran=sum(1 for t in minority if t.minority_ran) if minority else None,
                    minority_median_s=(
                        statistics.median(t.minority_s for t in minority if t.minority_s is not None)
                        if minority
                        else None
                    ),
                    outlived=sum(1 for t in outlive if t.outlived) if outlive else None,
                    problems=sum(1 for t in ts if t.problems),
                )
            )
    if reference is not None:
        ref = {r.fault: r.failover_median_s for r in rows if r.system == reference}
        for r in rows:
            base = ref.get(r.fault, math.nan)
            if base > 0 and not math.isnan(r.failover_median_s):
                r.vs_reference = r.failover_median_s / base
    return rows


# ---- tables -------------------------------------------------------------------------------------


def _s(value: float | None, censored: bool = False) -> str:
    if value is None or math.isnan(value):
        return "—"
    text = f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    return ("≥ " + text) if censored else text


def _count(n: int | None, of: int) -> str:
    return "—" if n is None else f"{n}/{of}"


def markdown(rows: Sequence[Row], reference: str | None) -> str:
    """One table per fault: failover (gap) statistics next to overlap, minority and outlived counts."""
    ref = f"× {reference}" if reference else "ratio"
    out: list[str] = []
    for fault in FAULTS:
        these = [r for r in rows if r.fault == fault]
        if not these:
            continue
        out.append(f"**{FAULT_TITLES[fault]}**\n")
        out.append(
            f"| system | trials | failover median | p90 | p99 | {ref} | successor after (median) "
            "| overlapped | overlap median | overlap p99 | still two at heal | lock given twice "
            "| minority ran beside majority | script outlived daemon |"
        )
        out.append("|" + "---|" * 14)
        for r in these:
            gap_note = "" if r.with_gap == r.trials else f" ({r.with_gap} with a gap)"
            ratio = "—" if r.vs_reference is None else f"{r.vs_reference:.2f}"
            takeover = _s(r.takeover_median_s)
            if r.no_successor:
                takeover += f" ({r.no_successor} none)"
            censored = r.overlap_censored > 0
            out.append(
                f"| {r.system} | {r.trials} | {_s(r.failover_median_s)}{gap_note} | {_s(r.failover_p90_s)} "
                f"| {_s(r.failover_p99_s)} | {ratio} | {takeover} | {r.overlapped}/{r.trials} "
                f"| {_s(r.overlap_median_s, censored and r.overlap_median_s > 0)} "
                f"| {_s(r.overlap_p99_s, censored)} | {r.overlap_at_heal}/{r.trials} "
                f"| {r.two_successors}/{r.trials} | {_count(r.minority_ran, r.trials)} "
                f"| {_count(r.outlived, r.trials)} |"
            )
        out.append("")
    return "\n".join(out)


def documented_table(rows: Sequence[Row], systems: Sequence[dict[str, Any]]) -> str:
    """Each system's median time to a successor divided by the failover figure its documentation
    gives (the value and its source are in ``systems``, from ``System.config()``)."""
    out = [
        "**time to a successor (median) ÷ the documented failover**\n",
        "| system | documented | source | " + " | ".join(FAULTS) + " |",
        "|" + "---|" * (3 + len(FAULTS)),
    ]
    for s in systems:
        cells = []
        for fault in FAULTS:
            row = next((r for r in rows if r.system == s["system"] and r.fault == fault), None)
            doc = s.get("documented_planned_s") if fault == "planned-stop" else s.get("documented_failover_s")
            if row is None or not doc or math.isnan(row.takeover_median_s):
                cells.append("—")
            else:
                cells.append(f"{row.takeover_median_s / doc:.2f}")
        doc_s = s.get("documented_failover_s")
        what = s.get("documented_as", "")
        out.append(f"| {s['system']} | {_s(doc_s)} | {what} | " + " | ".join(cells) + " |")
    out.append("")
    return "\n".join(out)


# ---- plots --------------------------------------------------------------------------------------


def plot(trials: Sequence[Trial], out_dir: Path, systems: Sequence[str]) -> list[Path]:
    """failover.png and overlap.png in ``out_dir``: one panel per fault, one strip per system.
    Raises ImportError without matplotlib (``pip install .[bench]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    faults = [f for f in FAULTS if any(t.fault == f for t in trials)]
    paths = []
    for what in ("failover", "overlap"):
        height_in = 0.8 + len(faults) * (0.55 + 0.22 * len(systems))
        fig, axes = plt.subplots(len(faults), 1, figsize=(8.5, height_in), squeeze=False, dpi=72)
        for ax, fault in zip(axes[:, 0], faults, strict=True):
            _panel(ax, what, fault, [t for t in trials if t.fault == fault], systems)
        axes[-1, 0].set_xlabel(
            "seconds, log scale. ● failover: old script's last line to the new script's first\n"
            "○ no gap (the old script still ran): fault to the new script's first line.  | median"
            if what == "failover"
            else "seconds two scripts ran at once, symlog scale\n"
            "▶ still two when the benchmark stopped watching (the system never ended it)",
            fontsize=8,
        )
        fig.tight_layout(rect=(0, 0, 0.86, 1))
        path = out_dir / f"{what}.png"
        fig.savefig(path)
        plt.close(fig)
        _shrink(path)
        paths.append(path)
    return paths


def _shrink(path: Path) -> None:
    # 64 colours are plenty for dots and text, and the PNG shrinks to about a quarter (docs/ keeps them)
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def _panel(ax: Any, what: str, fault: str, trials: Sequence[Trial], systems: Sequence[str]) -> None:
    import random

    jitter = random.Random(0)  # the vertical spread of the dots only
    ax.set_title(FAULT_TITLES[fault], fontsize=9, loc="left")
    ax.set_yticks(range(len(systems)))
    ax.set_yticklabels(systems, fontsize=7)
    ax.set_ylim(-0.6, len(systems) - 0.4)
    ax.invert_yaxis()
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    if what == "failover":
        ax.set_xscale("log")
        ax.set_xlim(0.02, 30)
    else:
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(-0.002, 30)

    def spread(values: Sequence[float], y: int) -> list[float]:
        return [y + jitter.uniform(-0.25, 0.25) for _ in values]

    for y, system in enumerate(systems):
        ts = [t for t in trials if t.system == system]
        if not ts:
            continue
        if what == "failover":
            gaps = [t.failover_s for t in ts if t.failover_s is not None]
            no_gap = [t.takeover_s for t in ts if t.failover_s is None and t.takeover_s is not None]
            ax.scatter(gaps, spread(gaps, y), s=8, alpha=0.6, color="C0")
            ax.scatter(no_gap, spread(no_gap, y), s=10, alpha=0.6, facecolors="none", edgecolors="C3")
            for values in (gaps, no_gap):
                if values:
                    med = statistics.median(values)
                    ax.plot([med, med], [y - 0.35, y + 0.35], color="k", lw=1.2)
            note = f"{len(gaps)}/{len(ts)} with a gap"
        else:
            done = [t.overlap_s for t in ts if not t.overlap_censored]
            cut = [t.overlap_s for t in ts if t.overlap_censored]
            ax.scatter(done, spread(done, y), s=8, alpha=0.6, color="C0")
            ax.scatter(cut, spread(cut, y), s=14, alpha=0.7, marker=">", color="C3")
            note = f"{sum(1 for t in ts if t.overlap_s > 0)}/{len(ts)} overlapped"
        ax.text(1.01, y, note, transform=ax.get_yaxis_transform(), ha="left", va="center", fontsize=7)
