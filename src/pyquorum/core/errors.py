"""Whose fault is it (after h11/_util.py).

``RemoteProtocolError``: a peer (or an attacker) sent something we cannot accept. The datagram is
dropped and counted; it never crashes the daemon. ``LocalProtocolError``: our own invariant is broken,
or the caller used the core wrongly; it is raised at once.
"""

from __future__ import annotations


class PyquorumError(Exception):
    """Base class of every error pyquorum raises on purpose."""


class LocalProtocolError(PyquorumError):
    """We broke a rule ourselves (a bug, or the runtime called the core out of order)."""


class RemoteProtocolError(PyquorumError):
    """A datagram was malformed, forged, replayed, oversized or from another cluster."""


class ConfigError(PyquorumError):
    """The configuration cannot work; ``problems`` lists every reason at once."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems
