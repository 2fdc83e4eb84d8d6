"""The Prometheus metrics: one collector that reads a ``Snapshot`` when it is scraped.

What this module owns
---------------------
The metric names, their help texts, types and labels (docs/operations.md lists them with example
alert rules), and how each is read from a snapshot. The exposition format itself is
``prometheus_client``'s (the official client, pure Python): ``SnapshotCollector`` is a custom
collector, so nothing is updated while nobody scrapes; every value is read from one ``Snapshot``
taken at scrape time, the same picture ``/status`` and ``pyquorum status`` show.

Naming (Prometheus' conventions): the ``pyquorum_`` prefix, base units (``_seconds``), ``_total`` for
counters, ``_info`` for build metadata; a reason, result, role or message type is a label with a fixed
set of values, every one of them present from the start at 0. Per-peer series (``peer`` label) are at
most one per member; ``pyquorum_peer_last_seen_seconds`` and ``pyquorum_peer_rtt_seconds`` are left
out for a peer with no such fact (never heard; the round trip is the master's only).

``prometheus_client`` is imported only when the HTTP listener starts: it takes about 0.1 s to import,
which a daemon without ``--http`` should not pay.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable, Iterator, Mapping

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from pyquorum.runtime.status import ROLES, Snapshot

__all__ = ["CONTENT_TYPE_LATEST", "SnapshotCollector", "render"]

HOOK_RESULTS = ("ok", "failed", "timeout")


class SnapshotCollector(Collector):
    """Yields every pyquorum metric from ``snapshot()``, called once per scrape."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        info = InfoMetricFamily("pyquorum_build", "pyquorum's version and the Python running it.")
        info.add_metric([], {"version": s.version, "python": platform.python_version()})
        yield info
        yield _gauge("pyquorum_is_master", "1 if this node is the master, else 0.", s.is_master)
        yield _gauge(
            "pyquorum_has_quorum",
            "1 if this node reaches a majority of the members (itself included), else 0.",
            s.has_quorum,
        )
        yield _gauge(
            "pyquorum_master_known",
            "1 if this node knows a live master (itself, or one heard within the election timeout).",
            s.master is not None,
        )
        yield _gauge("pyquorum_term", "The current term (the master's fencing token).", s.term)
        yield _gauge(
            "pyquorum_lease_remaining_seconds",
            "Master: seconds until it must step down unless a newer heartbeat round is acknowledged; "
            "0 elsewhere.",
            s.lease_remaining_s or 0.0,
        )
        yield _gauge("pyquorum_members", "Members of the cluster, this node included.", len(s.members))
        yield _gauge("pyquorum_script_running", "1 while this node's script runs, else 0.", s.script.running)
        yield _gauge(
            "pyquorum_loop_on_time",
            "1 while the daemon's protocol ticker runs on time (what /health reports), else 0.",
            s.loop_on_time,
        )
        yield _gauge("pyquorum_loop_lag_seconds", "How late the ticker's last wake-up came.", s.loop_lag_s)
        up = GaugeMetricFamily(
            "pyquorum_peer_up", "1 if the peer is reachable as this node knows it, else 0.", labels=["peer"]
        )
        seen = GaugeMetricFamily(
            "pyquorum_peer_last_seen_seconds",
            "Seconds since a datagram from the peer was last accepted.",
            labels=["peer"],
        )
        rtt = GaugeMetricFamily(
            "pyquorum_peer_rtt_seconds",
            "Master: the last heartbeat round trip to the peer, from the round's send to its "
            "acknowledgement.",
            labels=["peer"],
        )
        for p in s.peers:
            if p.is_self:
                continue
            up.add_metric([p.id], float(p.reachable))
            if p.last_heard_s is not None:
                seen.add_metric([p.id], p.last_heard_s)
            if p.rtt_s is not None:
                rtt.add_metric([p.id], p.rtt_s)
        yield from (up, seen, rtt)
        yield _counter(
            "pyquorum_role_changes", "Times this node became each role.", "role", s.role_changes, ROLES
        )
        yield _counter("pyquorum_elections", "This node's elections, by result.", "result", s.elections)
        yield _counter(
            "pyquorum_script_exits", "Ends of this node's script runs, by reason.", "reason", s.script_exits
        )
        sent = CounterMetricFamily(
            "pyquorum_datagrams",
            "Datagrams sent, and received and accepted, by message type.",
            labels=["direction", "type"],
        )
        for direction, counts in (("sent", s.datagrams_sent), ("received", s.datagrams_received)):
            for kind, n in counts.items():
                sent.add_metric([direction, kind], n)
        yield sent
        yield _counter(
            "pyquorum_datagrams_rejected",
            "Datagrams refused by the wire, by reason (docs/security.md §3).",
            "reason",
            s.datagrams_rejected,
        )
        h = s.hooks
        yield _counter(
            "pyquorum_hook_runs",
            "Notify hook runs (--notify), by result: ok, failed (exit status not 0, or it could not "
            "start), timeout (killed at --notify-timeout).",
            "result",
            {} if h is None else {"ok": h.delivered, "failed": h.failed, "timeout": h.timed_out},
            HOOK_RESULTS,
        )
        yield CounterMetricFamily(
            "pyquorum_hook_events_dropped",
            "Notify hook events never run: the queue was full, the daemon was stopping, or a "
            "later event superseded them.",
            value=0 if h is None else h.dropped,
        )
        buckets = [("+Inf" if math.isinf(b) else repr(b), float(n)) for b, n in s.election_histogram]
        hist = HistogramMetricFamily(
            "pyquorum_election_duration_seconds",
            "How long this node's elections took, from the pre-vote to the result.",
        )
        hist.add_metric([], buckets, s.election_sum_s)
        yield hist


def _gauge(name: str, doc: str, value: float | bool) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


def _counter(
    name: str,
    doc: str,
    label: str,
    counts: Mapping[str, int],
    order: tuple[str, ...] | None = None,
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key in order or tuple(counts):
        family.add_metric([key], counts.get(key, 0))
    return family


def registry(snapshot: Callable[[], Snapshot]) -> CollectorRegistry:
    """A registry with only pyquorum's collector (no process or platform collectors: their values
    would be read on every scrape from /proc, and are another exporter's job)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SnapshotCollector(snapshot))
    return reg


def render(reg: CollectorRegistry) -> bytes:
    """The text exposition of ``reg`` now."""
    return generate_latest(reg)
