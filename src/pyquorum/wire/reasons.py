"""Why a datagram was refused: one closed set of words, and a counter that knows them all.

What this module owns
---------------------
``REASONS``: every reason for which the wire refuses a datagram, in the order ``Endpoint.receive``
checks them (docs/security.md §3). Each is one machine-usable word that the daemon counts, logs and
shows in ``status.json``; a metrics exporter can name its series after them. No other word is ever
counted: the codec, the endpoint and the replay guard take their reasons from here, ``Reason`` lets
mypy check every use, and ``RejectCounts`` refuses a word it does not know (our own bug).

=================  ==========================================================================
decoding (codec)   too-large, truncated, bad-magic, bad-version, unexpected-mac, unauthenticated,
                   unknown-key, bad-mac, bad-checksum, unknown-sender, wrong-receiver, bad-type,
                   bad-field, trailing-bytes
the endpoint       wrong-source (no key: not from the sender's configured address),
                   cluster-mismatch (another cluster's fingerprint; answered, never stepped),
                   unexpected-info (a ClusterInfo with our own fingerprint, which no node sends)
freshness (replay) stale-epoch, bad-echo, too-old, replayed
=================  ==========================================================================

``RejectCounts`` holds every reason from the start, at 0, so a reader (``status.json``, a metrics
exporter) sees the whole set whether or not anything was refused yet.
"""

from __future__ import annotations

import typing
from typing import Final, Literal

from pyquorum.core.errors import LocalProtocolError

__all__ = ["DECODE_REASONS", "REASONS", "REPLAY_REASONS", "Reason", "RejectCounts"]

Reason = Literal[
    "too-large",
    "truncated",
    "bad-magic",
    "bad-version",
    "unexpected-mac",
    "unauthenticated",
    "unknown-key",
    "bad-mac",
    "bad-checksum",
    "unknown-sender",
    "wrong-receiver",
    "bad-type",
    "bad-field",
    "trailing-bytes",
    "wrong-source",
    "cluster-mismatch",
    "unexpected-info",
    "stale-epoch",
    "bad-echo",
    "too-old",
    "replayed",
]

REASONS: Final[tuple[Reason, ...]] = typing.get_args(Reason)
"""Every reason, in the order of the checks."""

DECODE_REASONS: Final[frozenset[Reason]] = frozenset(REASONS[: REASONS.index("trailing-bytes") + 1])
"""What ``Codec.decode`` may raise (``DatagramError.reason``)."""

REPLAY_REASONS: Final[frozenset[Reason]] = frozenset({"stale-epoch", "bad-echo", "too-old", "replayed"})
"""What ``ReplayGuard.check`` may return."""


class RejectCounts:
    """Refused datagrams per reason since the process started; every reason is present from 0."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[Reason, int] = dict.fromkeys(REASONS, 0)

    def add(self, reason: Reason) -> int:
        """Count one refusal; returns the new count for ``reason``."""
        if reason not in self._counts:
            raise LocalProtocolError(f"{reason!r} is not a reject reason")  # our own bug
        self._counts[reason] += 1
        return self._counts[reason]

    def __getitem__(self, reason: Reason) -> int:
        return self._counts[reason]

    def total(self) -> int:
        return sum(self._counts.values())

    def as_dict(self) -> dict[str, int]:
        """Every reason, in ``REASONS`` order, with its count (0 included)."""
        return {reason: count for reason, count in self._counts.items()}
