"""The wire: bytes <-> messages, authentication, freshness, and the one way in and out.

``endpoint`` (``Endpoint.receive`` / ``Endpoint.send``) is what the daemon and the simulation use;
it runs ``codec`` (format, MAC, size limits) and ``replay`` (epochs, sequence numbers) in a fixed
order and counts every refusal under one of ``reasons.REASONS``. ``keyring`` holds the keys; reading
key files is ``pyquorum.keyfile``'s job. Everything here is pure: no sockets, clocks or files.
"""

from __future__ import annotations

from pyquorum.wire.codec import ClusterInfo, Codec, DatagramError, Envelope, Hello, cluster_fingerprint
from pyquorum.wire.endpoint import Datagram, Deliver, Endpoint, Foreign, Handshake, Operate, Received, Reject
from pyquorum.wire.keyring import KeyRing
from pyquorum.wire.reasons import REASONS, Reason, RejectCounts
from pyquorum.wire.replay import ReplayGuard, next_boot_epoch

__all__ = [
    "REASONS",
    "ClusterInfo",
    "Codec",
    "Datagram",
    "DatagramError",
    "Deliver",
    "Endpoint",
    "Envelope",
    "Foreign",
    "Handshake",
    "Hello",
    "KeyRing",
    "Operate",
    "Reason",
    "Received",
    "Reject",
    "RejectCounts",
    "ReplayGuard",
    "cluster_fingerprint",
    "next_boot_epoch",
]
